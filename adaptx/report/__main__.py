"""``python -m adaptx.report RUN``; see :mod:`adaptx.report`."""

import sys

from adaptx.report import main

if __name__ == "__main__":
    sys.exit(main())
