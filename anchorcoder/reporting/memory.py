"""Process memory as the operating system sees it (CPU torch keeps no allocator statistics)."""

from __future__ import annotations

import resource
import threading
import time


def rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_growth(fn, interval_s: float = 0.001):
    """``(fn(), peak resident-set growth in bytes while it ran)``, sampled by a thread every
    ``interval_s``. Large tensors are their own mappings, so RSS follows them as they come and go."""
    baseline, peak, running = rss_bytes(), [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
        peak[0] = max(peak[0], rss_bytes())
    finally:
        running[0] = False
        thread.join()
    return result, max(peak[0] - baseline, 0)
