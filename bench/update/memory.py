"""Memory measured while a step runs: the process RSS and the device allocator's peak.

>>> with RssPeak() as r:
...     _ = bytearray(1 << 20)
>>> r.delta is None or r.delta >= 0
True
"""

from __future__ import annotations

import os
import threading
import time

import jax


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


class RssPeak:
    """Samples the process RSS every ~0.2 ms while active; ``delta`` = peak - start."""

    def __init__(self):
        self.start = self.peak = None
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        if self.start is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            r = rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self._stop.set()
        if self.start is not None:
            self._thread.join()
            r = rss_bytes()
            if r is not None:
                self.peak = max(self.peak, r)

    @property
    def delta(self) -> int | None:
        return None if self.start is None else self.peak - self.start


def device_memory() -> dict | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = None
    return stats or None


def probe_step(step, device: bool = True) -> dict:
    """Runs ``step()`` once, isolated: the RSS growth, and (``device``) the accelerator
    allocator's running peak when the backend reports one."""
    with RssPeak() as r:
        step()
    info = {"rss_peak_delta_bytes": r.delta}
    dm = device_memory() if device else None
    if dm and "peak_bytes_in_use" in dm:
        info["device_peak_bytes_in_use"] = int(dm["peak_bytes_in_use"])
    return info
