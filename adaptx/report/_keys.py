"""What a log's keys name: adaptx telemetry figures, per-tensor figures, loss and norm.

adaptx telemetry keys are ``"<transform>/<figure>"`` (``"guard/skipped"``), or
``"<path>/<transform>/<figure>"`` when a transform appears twice in the optimizer
state (``"0/clip_by_global_norm/scale"``). Per-tensor keys are
``"<transform>/<figure>/<param path>"`` whose figure starts with ``tensor_``
(``"clip_spikes/tensor_grad_norm/encoder/layers_0/attn/qkv/kernel"``).
"""

from __future__ import annotations

from typing import NamedTuple

#: The per-tensor figure the "share of the norm" and the heat map are computed from.
TENSOR_NORM = "tensor_grad_norm"


class Key(NamedTuple):
    """One key, split: ``prefix`` (the transform, with its state path), ``figure``, ``tensor``."""

    prefix: str
    figure: str
    tensor: str | None

    @property
    def transform(self) -> str:
        """The transform's name, without its state path (``"0/guard"`` -> ``"guard"``)."""
        return self.prefix.rsplit("/", 1)[-1]


def split_key(key: str) -> Key:
    """Splits a log key into transform prefix, figure and parameter path.

    Args:
      key: a key of a record.

    Returns:
      A :class:`Key`; ``prefix`` is ``""`` for a key without ``/`` (``"loss"``) and
      ``tensor`` is ``None`` unless the figure starts with ``tensor_``.

    Examples:
      >>> split_key("0/clip_by_global_norm/scale")
      Key(prefix='0/clip_by_global_norm', figure='scale', tensor=None)
      >>> split_key("clip_spikes/tensor_grad_norm/encoder/attn/kernel").tensor
      'encoder/attn/kernel'
    """
    parts = key.split("/")
    for i, part in enumerate(parts[1:], 1):
        if part.startswith("tensor_"):
            return Key("/".join(parts[:i]), part, "/".join(parts[i + 1 :]) or None)
    return Key("/".join(parts[:-1]), parts[-1], None)


def all_keys(records: list[dict]) -> list[str]:
    """Every key of ``records``, in order of first appearance."""
    return list(dict.fromkeys(k for r in records for k in r))


def transforms(keys: list[str]) -> dict[str, set[str]]:
    """The scalar (not per-tensor) figures of each transform prefix, ``{prefix: {figure}}``."""
    out: dict[str, set[str]] = {}
    for key in keys:
        k = split_key(key)
        if k.prefix and k.tensor is None:
            out.setdefault(k.prefix, set()).add(k.figure)
    return out


def _preferred(keys: list[str], transform=lambda key: split_key(key).transform) -> str | None:
    """A guard's key if there is one (it sees every incoming gradient), else the first."""
    guards = [k for k in keys if transform(k) == "guard"]
    found = guards or keys
    return found[0] if found else None


def norm_key(keys: list[str]) -> str | None:
    """The key of the global gradient norm before any clipping.

    ``"grad_norm"`` when the log has it (the text classifier example writes the norm of
    the gradient it computed), else a transform's ``"*/grad_norm"``: a guard's first,
    because on a step a guard skips the transforms inside it keep last step's figures.

    Examples:
      >>> norm_key(["loss", "clip_spikes/grad_norm", "guard/grad_norm"])
      'guard/grad_norm'
    """
    if "grad_norm" in keys:
        return "grad_norm"
    found = [k for k in keys if (s := split_key(k)).figure == "grad_norm" and s.tensor is None]
    return _preferred(sorted(found))


def loss_key(keys: list[str]) -> str | None:
    """``"loss"``, else a transform's ``"*/loss"`` (a guard's, passed ``value=loss``), or ``None``.

    Examples:
      >>> loss_key(["step", "guard/loss"]), loss_key(["step", "loss"]), loss_key(["step"])
      ('guard/loss', 'loss', None)
    """
    if "loss" in keys:
        return "loss"
    found = [k for k in keys if (s := split_key(k)).figure == "loss" and s.tensor is None]
    return _preferred(sorted(found))


def threshold_keys(keys: list[str]) -> list[str]:
    """The keys of defense thresholds on the gradient norm (``*/threshold``, ``*/max_norm``).

    Examples:
      >>> threshold_keys(["clip_spikes/threshold", "guard/loss", "zclip/max_norm"])
      ['clip_spikes/threshold', 'zclip/max_norm']
    """
    figures = ("threshold", "max_norm")
    return [k for k in keys if (s := split_key(k)).figure in figures and s.tensor is None]


def tensor_keys(keys: list[str], figure: str = TENSOR_NORM) -> dict[str, str]:
    """Per-tensor keys of one figure, ``{param path: key}``, from one transform.

    When several transforms report ``figure``, the one reporting the most tensors is
    used (a guard's on a tie, else the first in sorted order).

    Examples:
      >>> tensor_keys(["loss", "guard/tensor_grad_norm/w", "guard/tensor_grad_norm/b"])
      {'w': 'guard/tensor_grad_norm/w', 'b': 'guard/tensor_grad_norm/b'}
    """
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        k = split_key(key)
        if k.figure == figure and k.tensor is not None:
            groups.setdefault(k.prefix, {})[k.tensor] = key
    if not groups:
        return {}
    most = max(len(g) for g in groups.values())
    tied = sorted(p for p, g in groups.items() if len(g) == most)
    chosen = _preferred(tied, transform=lambda prefix: prefix.rsplit("/", 1)[-1])
    return groups[chosen] if chosen is not None else {}
