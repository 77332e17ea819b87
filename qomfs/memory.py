"""Keep the daemon's RSS to what it uses: make glibc's malloc give freed memory
back to the system (a fixed mmap threshold, and ``malloc_trim`` now and then).
"""

# Why: the daemon's heap churns.  Every TTL the cache replaces its values and
# listings, FUSE threads and the QMP reader allocate in malloc arenas of their
# own, and the cache's tables (megabytes on a big VM) are rebuilt as values
# expire.  With glibc's defaults, freeing one big block raises the mmap
# threshold to its size, so later big blocks come from the heap and leave
# holes there, and free memory inside an arena stays in RSS until
# malloc_trim.  Neither is a leak (what Python holds stays flat), but RSS
# creeps.  Elsewhere than glibc this module does nothing.

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("qomfs.memory")

#: mallopt's parameter number for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
#: Blocks this big or bigger are mmapped, and unmapped when freed.  glibc's
#: default starting value; setting it also stops glibc from raising it.
MMAP_THRESHOLD = 128 * 1024
#: Seconds between two ``malloc_trim`` calls of :class:`Trimmer`.
TRIM_EVERY = 30.0


def _load_glibc() -> Any:
    """glibc, or None elsewhere (musl, macOS, ...)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # (the C library the interpreter runs on)
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


_glibc = _load_glibc()


def available() -> bool:
    """Whether this process's malloc is glibc's (else the calls do nothing)."""
    return _glibc is not None


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have every block of ``threshold`` bytes or more mmapped, now and later.

    glibc starts at 128 KiB but raises the threshold to the size of each
    mmapped block freed (up to 32 MiB): after a cache table of a few MiB has
    been freed once, the next ones come from the heap.  Whether it was set.
    """
    return _glibc is not None and _glibc.mallopt(M_MMAP_THRESHOLD, threshold) == 1


def trim() -> bool:
    """Give the free pages of every malloc arena back to the system;
    whether any were."""
    return _glibc is not None and _glibc.malloc_trim(0) == 1


class Trimmer:
    """Call ``trim`` every ``every`` seconds in a daemon thread, until :meth:`stop`."""

    def __init__(self, every: float = TRIM_EVERY, trim: Callable[[], object] = trim) -> None:
        if not every > 0:
            raise ValueError(f"every must be more than 0 seconds: {every}")
        self.every = every
        self.calls = 0
        self._trim = trim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qomfs-trim", daemon=True)

    def start(self) -> Trimmer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self._trim()
            except Exception:  # never let housekeeping take the daemon down
                log.exception("malloc_trim failed")
                return
            self.calls += 1


def keep_rss_down() -> Trimmer | None:
    """For the daemon, before its threads start: pin the mmap threshold and
    start a :class:`Trimmer` (None, and nothing done, where malloc is not
    glibc's)."""
    if not available():
        return None
    pin_mmap_threshold()
    return Trimmer().start()
