"""qomfs.memory: glibc's malloc gives freed memory back (pinned mmap threshold,
malloc_trim), so the daemon's RSS follows what it holds.

The allocator checks run in a fresh interpreter each: the test process's own
heap (pytest's) would blur what they count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from qomfs import memory

ROOT = Path(__file__).resolve().parent.parent

needs_glibc = pytest.mark.skipif(not memory.available(), reason="malloc is not glibc's")

# Counts blocks glibc has mmapped (mallinfo2's hblks) and reads VmRSS.
PRELUDE = """
import ctypes, sys
from qomfs import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped():
    return libc.mallinfo2().hblks

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
"""


def run(body: str, *args: str) -> list[int]:
    """Run PRELUDE + ``body`` in a fresh interpreter; the ints it prints."""
    code = PRELUDE + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [int(word) for word in out.stdout.split()]


# A big block comes and goes (the cache's table rebuilt by a sweep), then
# 1 MiB blocks are allocated: how many of them glibc mmapped.
BIG_THEN_MEDIUM = """
if sys.argv[1] == "pin":
    assert memory.pin_mmap_threshold()
big = bytearray(8 << 20)
del big
before = mmapped()
blocks = [bytearray(1 << 20) for _ in range(4)]
print(mmapped() - before)
"""


@needs_glibc
def test_glibc_raises_its_mmap_threshold_after_a_big_block_is_freed() -> None:
    # What the daemon suffered: the 1 MiB blocks come from the heap.
    assert run(BIG_THEN_MEDIUM, "default") == [0]


@needs_glibc
def test_a_pinned_threshold_keeps_big_blocks_mmapped() -> None:
    # ... so they are unmapped when freed, and leave no hole in the heap.
    assert run(BIG_THEN_MEDIUM, "pin") == [4]


@needs_glibc
def test_trim_gives_back_the_free_memory_inside_the_heap() -> None:
    # 30,000 blocks of 2,000 bytes (from the heap: below the threshold, above
    # pymalloc's 512 bytes), every 16th kept: ~56 MB free in holes that
    # glibc does not return by itself.
    before, after_free, after_trim = run("""
    blocks = [bytes(2000) for _ in range(30000)]
    start = rss_kib()
    kept = blocks[::16]
    del blocks
    freed = rss_kib()
    memory.trim()
    print(start, freed, rss_kib())
    """)
    freed_kib = 30000 * 15 // 16 * 2000 // 1024
    assert before - after_free < freed_kib // 4, "glibc returned the holes by itself"
    assert after_free - after_trim > freed_kib // 2


def test_the_trimmer_calls_trim_until_stopped() -> None:
    calls = 0
    thrice = threading.Event()

    def trim() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            thrice.set()

    trimmer = memory.Trimmer(every=0.001, trim=trim).start()
    assert thrice.wait(30)
    trimmer.stop()
    done = calls
    assert trimmer.calls == done >= 3
    trimmer.stop()  # (twice is fine)
    assert calls == done


def test_a_failing_trim_stops_the_trimmer_not_the_daemon(caplog: pytest.LogCaptureFixture) -> None:
    failed = threading.Event()

    def trim() -> None:
        failed.set()
        raise OSError("no")

    trimmer = memory.Trimmer(every=0.001, trim=trim).start()
    assert failed.wait(30)
    trimmer.stop()
    assert trimmer.calls == 0
    assert "malloc_trim failed" in caplog.text


@pytest.mark.parametrize("every", [0.0, -1.0, float("nan")])
def test_the_trimmer_needs_a_period(every: float) -> None:
    with pytest.raises(ValueError):
        memory.Trimmer(every=every)
