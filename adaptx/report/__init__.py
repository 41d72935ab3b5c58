"""A stability report of a training run, from its ``metrics.jsonl`` alone.

.. code-block:: text

  python -m adaptx.report RUN            # RUN: a run directory or its metrics.jsonl
  python -m adaptx.report RUN --bad-steps bad_steps.json
  python -m adaptx.report --help

prints one line per event, e.g. ::

  step 1234: grad norm 3.1e4 (2.1e4x its running median); 97 % of it in
  encoder/layers_3/attn/qkv/kernel; skipped by guard (gradient-norm spike)

then the count of each kind of intervention and the tensors that most often held the
largest share of the norm, and writes ``stability.png`` beside the log (see
:func:`plot`). With ``--bad-steps FILE`` it also writes the skipped, clipped and
non-finite steps to ``FILE`` as JSON (see :func:`bad_steps`). This package needs only
the standard library and NumPy (and matplotlib for the picture); it never imports JAX or
the rest of adaptx itself.

**The log.** One JSON object per line, one line per training step, as the text
classifier example writes it: ``step``, ``loss``, ``grad_norm`` (before clipping) and
the figures of :func:`adaptx.telemetry`, keyed ``"<transform>/<figure>"``, or
``"<path>/<transform>/<figure>"`` when a transform appears twice. Per-tensor figures
are keyed ``"<transform>/tensor_<figure>/<param path>"``. Values may be the strings
``"nan"``, ``"inf"``, ``"-inf"``. Lines with an ``epoch`` key and no ``loss`` key
(per-epoch summaries) are not steps.

**Events.** Counters are read by figure name, whatever the transform: each name means
one thing in every adaptx state (``*/num_clipped`` counts clipped steps so far,
``*/tensors_clipped`` the tensors clipped at that step, ...), so a new transform that
keeps to these names is read as the ones below. A step is an event when any of these
holds (``T`` is any transform):

- *skipped*: ``T/last_reason`` (a guard's reason code) is nonzero; its kind follows
  the code: 1 non-finite gradients, 2 gradient-norm spike, 3 non-finite loss, 4 loss
  spike, 5 gradient norm above ``max_grad_norm``, 6 loss above ``max_loss``. For a
  transform without a reason code, ``T/skipped`` went up since the previous line; and
  ``T/nonfinite_skipped`` going up is a skip of non-finite gradients
  (``dynamic_loss_scale``), ``T/num_skipped`` a step zeroed as a gradient-norm spike
  (``zclip``). A counter is compared with 0 on a first line at step 0, and not at all on
  a first line after step 0 (a resumed log).
- *rewound*: ``T/rewinds`` went up.
- *spike let through*: ``T/forced`` went up (a guard at ``max_consecutive_skips``).
- *spike clipped*: ``T/spike`` is 1 (``clip_spikes``, ``zclip``).
- *clipped*: ``T/scale`` is below 0.99 (every ``scale`` but ``dynamic_loss_scale``'s,
  which is a loss scale); ``T/num_clipped`` went up and ``T`` logs no ``scale`` (which
  says whether, and by how much, it clipped); or ``T/tensors_clipped``, the tensors
  ``T`` scaled down at that step, is positive (``adagc``, ``clip_by_block_rms``, update
  clipping in ``scale_by_adam``).
- *non-finite, not skipped*: the loss or the global gradient norm is NaN or infinite
  and nothing skipped the step.

A skipped step is reported as skipped only, with any rewind or forced spike: the
transforms inside a guard keep the previous step's state when it skips, so their
scale and spike figures at that step are stale. The event's kind is its most severe
intervention, in the order of :data:`KINDS`. The global gradient norm is the log's
``grad_norm``, else a guard's ``*/grad_norm``, else another transform's. Its running
median is taken over up to 50 preceding healthy steps: finite, nonzero norms of steps
that were no event, or only a clip. The leading tensor of a step is the one with the
largest share of the squared norm in ``*/tensor_grad_norm/<param path>``.

Examples:
  >>> from adaptx import report
  >>> rows = [{"step": s, "loss": 0.5, "guard/grad_norm": 1.0, "guard/last_reason": 0}
  ...         for s in range(10)]
  >>> rows[7].update({"guard/grad_norm": 3.1e4, "guard/last_reason": 2})
  >>> print(report.format_summary(rows))
  10 steps (0-9), 1 event
  step 7: grad norm 3.1e4 (3.1e4x its running median); skipped by guard (gradient-norm spike)
  interventions: 1 skipped (gradient-norm spike)
"""

from adaptx.report._bad_steps import bad_steps
from adaptx.report._cli import main
from adaptx.report._events import KINDS, Event, leading_tensor, summarize
from adaptx.report._plot import plot
from adaptx.report._read import read_metrics
from adaptx.report._summary import format_summary

__all__ = (
    "KINDS",
    "Event",
    "bad_steps",
    "format_summary",
    "leading_tensor",
    "main",
    "plot",
    "read_metrics",
    "summarize",
)
