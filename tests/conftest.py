"""Strict numerics for the library's own tests.

Every test under ``tests/`` runs with JAX's strict dtype promotion and with rank
promotion raising, so an accidental float32 * bfloat16 or a silent broadcast in a
transform is a test failure, not a quiet upcast.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_jax():
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield
