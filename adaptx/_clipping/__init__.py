"""Clipping: bound the size of the gradient before it reaches the optimizer."""
