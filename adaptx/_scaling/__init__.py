"""Adaptive scaling: divide the step by a running estimate of the gradient's scale."""
