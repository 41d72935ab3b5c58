"""``python -m bench.stability``: see :mod:`bench.stability.run`."""

from bench.stability.run import main

if __name__ == "__main__":
    main()
