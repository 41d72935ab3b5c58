"""Why a guard skipped a step: the codes of ``guard/last_reason``, in one place.

The stability report (:mod:`adaptx.report`) and :func:`adaptx.check` both read them from
here. This module imports nothing, so the report keeps running without JAX.
"""

from __future__ import annotations

import math

#: ``guard/last_reason`` codes (adaptx/_guards/guard.py): ``{code: (event kind, words)}``.
#: Code 0 is a step that was not skipped.
REASONS = {
    1: ("skip_nonfinite", "non-finite gradients"),
    2: ("skip_spike", "gradient-norm spike"),
    3: ("skip_nonfinite_loss", "non-finite loss"),
    4: ("skip_loss_spike", "loss spike"),
    5: ("skip_max_grad_norm", "gradient norm above max_grad_norm"),
    6: ("skip_max_loss", "loss above max_loss"),
}


def reason_words(code: float | None) -> str | None:
    """What a ``last_reason`` code means: ``"non-finite gradients"``; ``None`` for 0 or none.

    A code this table does not know is named by its number.

    Args:
      code: a ``guard/last_reason`` figure, as a number (or ``None`` when not logged).

    Returns:
      The words for the code, or ``None`` when the step was not skipped (0, NaN, ``None``).

    Examples:
      >>> reason_words(1), reason_words(6.0), reason_words(9), reason_words(0)
      ('non-finite gradients', 'loss above max_loss', 'reason 9', None)
    """
    if code is None or math.isnan(code) or code == 0:
        return None
    known = REASONS.get(int(code)) if math.isfinite(code) else None
    return known[1] if known is not None else f"reason {code:g}"
