# Convenience targets; each is what the README and CI run.
PY ?= .venv/bin/python

.PHONY: setup test lint format train compare bench bench-quick docs

.venv:
	python3 -m venv .venv

setup: .venv
	.venv/bin/pip install -e ".[all]"

# The README's second command (and the first steps of .ci/run), one step per line.
test: .venv
	.venv/bin/pip install -e ".[test]"
	$(PY) -m pytest -n 2 -q

lint:
	$(PY) -m ruff check adaptx tests examples bench
	$(PY) -m ruff format --check adaptx tests examples bench

format:
	$(PY) -m ruff format adaptx tests examples bench
	$(PY) -m ruff check --fix adaptx tests examples bench

train:
	$(PY) examples/text_classifier/train.py

compare:
	$(PY) examples/text_classifier/compare.py

bench:
	$(PY) bench/update_step.py

bench-quick:
	$(PY) bench/update_step.py --quick

# The docs site (docs/): HTML, then every example in the guides run by the doctest builder.
# -W: a warning fails the build.
docs: .venv
	.venv/bin/pip install -q -e ".[docs]"
	.venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
	.venv/bin/sphinx-build -W -b doctest docs docs/_build/doctest

.PHONY: types floors

# Type check (mypy comes with the test extra; settings in pyproject.toml's [tool.mypy]).
types:
	$(PY) -m mypy adaptx

# The fast subset on the oldest supported releases (.ci/min-constraints.txt), in .venv-min.
floors:
	python3 -m venv .venv-min
	.venv-min/bin/pip install -q -c .ci/min-constraints.txt -e ".[test-min]"
	.venv-min/bin/python -m pytest -n 2 -p no:cacheprovider -q tests/test_battery.py tests/test_matches_optax.py tests/test_optax_compat.py
