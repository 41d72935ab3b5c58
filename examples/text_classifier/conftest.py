"""pytest: this folder's modules import each other by name (``import data``), as they do when
run as scripts: ``python examples/text_classifier/train.py`` puts the script's folder on
``sys.path``. pytest (``--import-mode=importlib``) does not, so this conftest does, once, for
the tests and the doctests of every module here."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
