"""Every public name documents itself: math, arguments, returns, a runnable example, references.

The examples themselves run as doctests (``--doctest-modules`` over ``adaptx/``).
"""

import inspect

import pytest

import adaptx

FUNCTIONS = sorted(n for n in adaptx.__all__ if n[0].islower())
STATES = sorted(n for n in adaptx.__all__ if hasattr(getattr(adaptx, n), "_fields"))
CLASSES = sorted(n for n in adaptx.__all__ if n[0].isupper() and n not in STATES)
# adaptx's own API, nothing to cite
NO_PAPER = {
    "telemetry",
    "loss_scale",
    "check",
    "adopt_state",
    "restore_on_skip",
    "chain",
    "scalar_clip",
    "scale_by_learning_rate",
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_docstring_has_every_section(name):
    doc = inspect.getdoc(getattr(adaptx, name))
    assert doc, name
    for section in ("Args:", "Returns:", "Examples:", ">>> "):
        assert section in doc, f"{name} lacks {section!r}"
    if name not in NO_PAPER:
        assert "References:" in doc, name
        assert ".. math::" in doc or ".. code-block::" in doc, f"{name} states no math"


@pytest.mark.parametrize("name", STATES)
def test_state_docstring_describes_every_field(name):
    cls = getattr(adaptx, name)
    doc = inspect.getdoc(cls)
    for field in cls._fields:
        assert f"{field}:" in doc, f"{name} does not document {field}"


@pytest.mark.parametrize("name", CLASSES)
def test_class_docstring_has_an_example_and_says_what_it_holds(name):
    doc = inspect.getdoc(getattr(adaptx, name))
    assert doc, name
    for section in ("Examples:", ">>> "):
        assert section in doc, f"{name} lacks {section!r}"
    assert "Args:" in doc or "Attributes:" in doc, name


def test_all_is_sorted_and_complete():
    assert list(adaptx.__all__) == sorted(adaptx.__all__)
    # Submodules (adaptx.report) are imported on their own, not re-exported.
    public = {
        n for n in dir(adaptx) if not n.startswith("_") and not inspect.ismodule(getattr(adaptx, n))
    }
    assert set(adaptx.__all__) == public - {"annotations"}
