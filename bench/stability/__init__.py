"""The stability benchmark: recorded training runs, injected faults, and every defense replayed.

``python -m bench.stability`` replays the traces in ``traces.npz`` through each defense;
``python -m bench.stability.record`` re-records them. See ``bench/README.md``.
"""
