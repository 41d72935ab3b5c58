"""``python -m bench.stability.natural``: see :mod:`bench.stability.natural.sweep`."""

from bench.stability.natural.sweep import main

if __name__ == "__main__":
    main()
