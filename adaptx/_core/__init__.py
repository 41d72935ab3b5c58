"""Shared machinery: validation, tree numerics, telemetry registration."""
