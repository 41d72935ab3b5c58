r"""What a loss curve says about a run: spike episodes, late loss, final loss, failure.

A step :math:`t \ge 1` is *spiking* when its loss is not finite or

.. math::

  L_t > k \cdot \min_{\max(0, t - W) \le s < t} L_s

(``factor`` :math:`k = 10`, ``window`` :math:`W = 200` previous steps; non-finite
losses in the window are ignored). A maximal run of consecutive spiking steps is one
*episode*; the count of episodes is the number of rising edges of the spiking flag.

The *late loss* is the median of the last fifth of the steps, the *final loss* the last
step's; both count a non-finite loss as :math:`+\infty`, so a run that diverged ranks
last and a median over seeds is still defined.

On a stochastic workload every figure reads the loss of its fixed batch (see
``runner.py``); the episodes of the minibatch loss are kept beside them
(``minibatch_episodes``) to show how much of that count was sampling noise.
"""

from __future__ import annotations

import numpy as np

FACTOR = 10.0
WINDOW = 200
LATE_FRACTION = 0.2


def running_min_before(loss: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """``out[t] = min(loss[max(0, t - window):t])`` over finite losses; NaN where there are none."""
    x = np.where(np.isfinite(loss), loss, np.inf).astype(np.float64)
    padded = np.concatenate([np.full(window, np.inf), x[:-1]])
    out = np.lib.stride_tricks.sliding_window_view(padded, window).min(axis=1)
    out[np.isinf(out)] = np.nan
    return out


def spiking(loss: np.ndarray, factor: float = FACTOR, window: int = WINDOW) -> np.ndarray:
    """Boolean per step: non-finite, or above ``factor`` times the previous window's minimum."""
    loss = np.asarray(loss, np.float64)
    ref = running_min_before(loss, window)
    with np.errstate(invalid="ignore"):
        above = loss > factor * ref
    flag = ~np.isfinite(loss) | above
    flag[0] = ~np.isfinite(loss[0])
    return flag


def spike_episodes(loss: np.ndarray, factor: float = FACTOR, window: int = WINDOW) -> int:
    """Number of separate spiking episodes (maximal runs of spiking steps)."""
    flag = spiking(loss, factor, window).astype(np.int8)
    return int(np.sum(np.diff(np.concatenate([[0], flag])) == 1))


def _finite_or_inf(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.where(np.isfinite(x), x, np.inf)


def late_loss(loss: np.ndarray, fraction: float = LATE_FRACTION) -> float:
    """Median of the last ``fraction`` of the steps (non-finite counts as +inf)."""
    loss = _finite_or_inf(loss)
    k = max(1, int(round(fraction * loss.shape[0])))
    return float(np.median(loss[-k:]))


def final_loss(loss: np.ndarray) -> float:
    """The last step's loss (non-finite counts as +inf)."""
    return float(_finite_or_inf(loss)[-1])


def failed(late: float, fail_above: float | None) -> bool:
    """A run fails when its late loss is not at or below ``fail_above`` (NaN and inf fail);
    with no level (``None``) it never does."""
    return bool(fail_above is not None and not late <= fail_above)


def run_figures(
    loss: np.ndarray, fail_above: float | None, minibatch: np.ndarray | None = None
) -> dict:
    """The figures of one run; it *fails* when its late loss is above ``fail_above``.

    ``loss`` is the curve the figures read; ``minibatch``, where given, is the training
    loss of a run whose ``loss`` is a fixed batch's, and adds ``minibatch_episodes``.
    """
    late = late_loss(loss)
    out = {
        "episodes": spike_episodes(loss),
        "late": late,
        "final": final_loss(loss),
        "failed": failed(late, fail_above),
        "nonfinite": bool(not np.all(np.isfinite(loss))),
    }
    if minibatch is not None:
        out["minibatch_episodes"] = spike_episodes(minibatch)
    return out


def over_seeds(runs: list[dict]) -> dict:
    """Median and min-max over seeds of each figure, and the failure rate."""
    out = {"seeds": len(runs), "fail_rate": float(np.mean([r["failed"] for r in runs]))}
    out["nonfinite_rate"] = float(np.mean([r["nonfinite"] for r in runs]))
    keys = ["episodes", "late", "final"]
    if all("minibatch_episodes" in r for r in runs):
        keys.append("minibatch_episodes")
    for key in keys:
        vals = np.array([r[key] for r in runs], np.float64)
        out[key] = {
            "median": float(np.median(vals)),
            "min": float(vals.min()),
            "max": float(vals.max()),
            "total": float(vals.sum()) if key.endswith("episodes") else None,
        }
    return out
