"""Momentum: smooth the gradient over steps."""
