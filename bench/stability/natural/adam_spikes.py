r"""Adam's own loss spikes: small tanh networks fitted full batch at a constant rate.

A fully connected tanh network :math:`f_\theta: \mathbb{R} \to \mathbb{R}` (He-style
:math:`\mathcal N(0, 1/\text{fan-in})` weights, zero biases) is fitted by mean squared
error to :math:`N = 256` fixed points :math:`x \in [-1, 1]` of a target

.. math::

  y = \sin(\pi x) + a \sin(k \pi x)

(``smooth``: :math:`a = 0`; ``fast``: a fast component :math:`a = 0.3, k = 8`). Full batch,
no noise: once the loss is small, the gradient is small for many steps, Adam's second
moment :math:`v` decays towards it (:math:`\beta_2 = 0.999` forgets in about 1000 steps),
and when the gradient grows again :math:`g^2 / \hat v \gg 1` and the step is far larger
than the learning rate: the loss jumps by orders of magnitude and comes back (Bai et al.
2025; the "slingshot" of Thilak et al. 2022; the edge of stability of adaptive methods,
Cohen et al. 2022). Nothing is injected: the spikes are the optimizer's own.

References:
  Bai et al., `Adaptive Preconditioners Trigger Loss Spikes in Adam
  <https://arxiv.org/abs/2506.04805>`_, 2025.

  Thilak et al., `The Slingshot Mechanism <https://arxiv.org/abs/2206.04817>`_, 2022.

  Cohen et al., `Adaptive Gradient Methods at the Edge of Stability
  <https://arxiv.org/abs/2207.14484>`_, 2022.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bench.stability.natural.runner import Workload

POINTS = 256
TARGETS = {"smooth": (0.0, 1.0), "fast": (0.3, 8.0)}


def _data(target: str) -> tuple[jax.Array, jax.Array]:
    a, k = TARGETS[target]
    x = jnp.linspace(-1.0, 1.0, POINTS, dtype=jnp.float32)[:, None]
    y = jnp.sin(jnp.pi * x) + a * jnp.sin(k * jnp.pi * x)
    return x, y


def _init(width: int, depth: int):
    sizes = [1] + [width] * depth + [1]

    def init(key):
        keys = jax.random.split(key, len(sizes) - 1)
        return [
            {
                "w": jax.random.normal(k, (m, n), jnp.float32) / jnp.sqrt(float(m)),
                "b": jnp.zeros((n,), jnp.float32),
            }
            for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
        ]

    return init


def mlp(params, x):
    """The tanh network: tanh on every layer but the last."""
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def workload(width: int, depth: int, target: str, lr: float, steps: int) -> Workload:
    """The full-batch fit of ``target`` by a ``depth``-hidden-layer tanh net of ``width``."""
    x, y = _data(target)

    def loss(params, key):
        del key
        return jnp.mean((mlp(params, x) - y) ** 2)

    return Workload(
        name=f"w{width} d{depth} {target} lr{lr:g}",
        family="adam_spikes",
        init=_init(width, depth),
        loss=loss,
        steps=steps,
        learning_rate=lr,
    )


def variants(quick: bool) -> list[Workload]:
    """Several widths, depths, targets and learning rates; one small one in quick mode."""
    if quick:
        return [workload(16, 1, "smooth", 1e-2, 300)]
    steps = 5000
    return [
        workload(32, 2, "smooth", 3e-3, steps),
        workload(64, 2, "smooth", 1e-3, steps),
        workload(64, 3, "smooth", 1e-3, steps),
        workload(64, 2, "fast", 1e-2, steps),
    ]
