"""This process's peak resident memory: overall, or sampled over one phase of a job."""

from __future__ import annotations

import os
import resource
import sys
import threading


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM).

    Not a parent's ``ru_maxrss`` from wait4: Linux carries the parent's RSS at fork into the child's
    maxrss across exec, so every child would report at least the parent's."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class PhasePeakRss:
    """Peak RSS over a ``with`` block, sampled every ``interval`` seconds by a thread.

    Sampling rather than resetting the kernel's high-water mark (``clear_refs``): a reset would also
    erase the earlier peak that a parent reads from wait4. A spike shorter than ``interval`` can be
    missed; a training step's activations live far longer. ``peak_mb`` is None without /proc."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak: int | None = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample_once()

    def __enter__(self) -> PhasePeakRss:
        if self.peak is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample_once()

    def _sample_once(self) -> None:
        rss = _rss_bytes()
        if rss is not None and self.peak is not None:
            self.peak = max(self.peak, rss)

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak is None else round(self.peak / 2**20, 1)
