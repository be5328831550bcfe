"""The peak resident memory of a stretch of this process's work (Linux: ``VmHWM``).

``with PeakRSS() as p: ...`` resets the kernel's high-water mark of this process's resident
set on entry (``/proc/self/clear_refs``, value 5), so ``p.peak_bytes`` is the peak during
the block alone and ``p.above_bytes`` that peak above the resident set at entry: what the
block added, transient copies included. Elsewhere (no ``/proc``) the process's lifetime peak
(``ru_maxrss``) stands in, which can only overstate.
"""

from __future__ import annotations

import resource
from pathlib import Path
from types import TracebackType

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set now (its lifetime peak where ``/proc`` is missing)."""
    now = _status_bytes("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    def __enter__(self) -> PeakRSS:
        try:
            _CLEAR.write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.start_bytes = rss_bytes()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        hwm = _status_bytes("VmHWM") if self.exact else None
        self.peak_bytes = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.above_bytes = max(0, self.peak_bytes - self.start_bytes)
