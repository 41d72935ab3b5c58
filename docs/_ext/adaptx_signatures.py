"""Sphinx extension: type aliases in signatures keep their names.

autodoc prints an annotation that Python has evaluated (a module without ``from __future__
import annotations``) as what the alias stands for, so ``jax.typing.ArrayLike`` reads
``Array | ndarray | bool | number | bool | int | float | complex``, eight times in a
signature with eight such arguments; an annotation that stayed a string reads
``jax.typing.ArrayLike`` in full, whatever ``autodoc_typehints_format`` says. This
extension writes both as the alias, shortened as the other names of the signature are
(``ArrayLike``, the full name in the link's title). ``autodoc_type_aliases`` does the
first only for annotations that are strings, and the library mixes both kinds.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import optax
from sphinx.application import Sphinx
from sphinx.util.typing import stringify_annotation

#: The aliases written by name: the name a signature shows, and the object it stands for.
ALIASES: dict[str, Any] = {
    "optax.ScalarOrSchedule": optax.ScalarOrSchedule,  # contains ArrayLike: first
    "jax.typing.ArrayLike": jax.typing.ArrayLike,
    "jax.typing.DTypeLike": jax.typing.DTypeLike,
}

#: Names that an unevaluated annotation spells out in full; shortened as evaluated ones are.
SHORTENED = (
    *ALIASES,
    "optax.GradientTransformationExtraArgs",
    "optax.GradientTransformation",
    "optax.Params",
    "optax.Updates",
    "optax.OptState",
    "jax.Array",
)


@functools.cache
def _replacements(short: bool) -> list[tuple[re.Pattern[str], str]]:
    mode = "smart" if short else "fully-qualified-except-typing"
    out = []
    for name, alias in ALIASES.items():
        text = stringify_annotation(alias, mode)
        # The expansion, not inside a longer name (``bool`` of ``numpy.bool``).
        out.append((re.compile(r"(?<![\w.~])" + re.escape(text) + r"(?![\w.\[])"), name))
    for name in SHORTENED:
        out.append((re.compile(r"(?<![\w.~])" + re.escape(name) + r"(?![\w.])"), name))
    if short:
        out = [(pattern, "~" + name) for pattern, name in out]
    return out


def rewrite(text: str, replacements: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, name in replacements:
        text = pattern.sub(name, text)
    return text


def _process_signature(app, what, name, obj, options, signature, return_annotation):
    if not name.startswith("adaptx"):
        return None
    replacements = _replacements(app.config.autodoc_typehints_format == "short")
    if signature:
        signature = rewrite(signature, replacements)
    if return_annotation:
        return_annotation = rewrite(return_annotation, replacements)
    return signature, return_annotation


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.autodoc")
    app.connect("autodoc-process-signature", _process_signature)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
