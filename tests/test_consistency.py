"""A read never comes back stale: once a write has returned, no reader that
starts after it sees the value from before it (issue 13, item 2).

One reader reads a property in a tight loop while a writer writes ``v<i>``
and reads it back, 200 times: on a real QEMU through a real FUSE mount (the
reader in another process), and in-process on the model over the fake QMP
server, whose ``qom-get`` is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qomfs.model import QOMTree
from qomfs.qmp import QMPClient
from tests.fakeqmp import FakeQMP
from tests.harness import VM, mounted
from tests.test_cache import FakeClock

WRITES = 200
#: A writable string property of every q35 machine (the kernel command line).
OBJ, PROP = "/machine", "append"

#: The reader: open, read, close in a loop until told to stop; one line per
#: read: the CLOCK_MONOTONIC time it began, and what it read.
READER = r"""
import os, sys, time
path, stop = sys.argv[1], sys.argv[2]
out = []
while not os.path.exists(stop):
    began = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        text = os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    out.append(f"{began!r} {text.strip()}")
print("\n".join(out))
"""


def number(text: str) -> int:
    """``v17`` -> 17; the value before the first write -> 0."""
    return int(text[1:]) if text.startswith("v") else 0


def stale_reads(reads: list[tuple[float, int]], written: list[float]) -> list[tuple[int, int]]:
    """The reads that began after write ``i`` had returned yet saw an older
    value: (i, what they saw).  ``written[i - 1]``: when write ``i`` returned."""
    stale = []
    for began, seen in reads:
        # The last write that had returned when this read began.
        last = sum(1 for done in written if done < began)
        if seen < last:
            stale.append((last, seen))
    return stale


def assert_fresh(readbacks: list[str], stale: list[tuple[int, int]], reads: int) -> None:
    """The writer read each of its writes back; no reader saw an older value."""
    wrong = [(i, got) for i, got in enumerate(readbacks, 1) if got != f"v{i}"]
    assert not wrong, f"{len(wrong)} of {WRITES} read-backs stale (wrote, read): {wrong[:5]}"
    assert not stale, f"{len(stale)} of {reads} reads stale (written, read): {stale[:5]}"


@pytest.mark.parametrize("ttl", ["1", "0.002"])
def test_no_stale_read_through_the_mount(vm: VM, tmp_path: Path, ttl: str) -> None:
    """``echo v<i> > append; cat append`` against a reader in another process.

    ``--ttl 0.002``: the reader's reads nearly always ask QEMU, so a write
    nearly always lands while one of its ``qom-get`` is under way.
    """
    with vm.qmp() as qmp:
        original = qmp.cmd("qom-get", path=OBJ, property=PROP)
    with mounted(vm.socket, tmp_path / "qom", "--ttl", ttl) as mnt:
        path = mnt.path / OBJ.lstrip("/") / PROP
        stop = tmp_path / "stop"
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(path), str(stop)],
            stdout=subprocess.PIPE,
            text=True,
        )
        written: list[float] = []
        readbacks: list[str] = []
        try:
            for i in range(1, WRITES + 1):
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
                try:
                    os.write(fd, f"v{i}\n".encode())  # one write() call, as echo
                finally:
                    os.close(fd)
                written.append(time.monotonic())
                readbacks.append(path.read_text().strip())
        finally:
            stop.touch()
            out, _ = reader.communicate(timeout=60)
        try:
            assert reader.returncode == 0
            lines = (line.split(" ", 1) for line in out.splitlines())
            reads = [(float(began), number(text)) for began, text in lines]
            assert_fresh(readbacks, stale_reads(reads, written), len(reads))
            assert len(reads) > WRITES  # the reader ran all along
        finally:
            with vm.qmp() as qmp:
                qmp.cmd("qom-set", path=OBJ, property=PROP, value=original)


@pytest.fixture
def fake() -> Iterator[FakeQMP]:
    tree = {
        "/": [{"name": "machine", "type": "child<container>"}],
        OBJ: [{"name": PROP, "type": "string", "value": ""}],
    }
    with FakeQMP(tree) as server:
        server.delay["qom-get"] = 0.002  # the reply takes a while: writes come meanwhile
        yield server


def test_no_stale_read_in_the_model(fake: FakeQMP) -> None:
    """The same on QOMTree: one thread reads, another sets and reads back."""
    clock = FakeClock()
    prop = f"{OBJ}/{PROP}"
    with QMPClient(fake.path, timeout=10) as client:
        tree = QOMTree(client, ttl=1.0, clock=clock)
        done = [0]  # the last write that returned
        stop = threading.Event()
        reads: list[tuple[int, int]] = []
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                while not stop.is_set():
                    floor = done[0]
                    reads.append((floor, number(tree.get(prop))))
                    clock.advance(1.0)  # expired: its next read asks QEMU again
            except BaseException as err:
                errors.append(err)

        thread = threading.Thread(target=reader)
        thread.start()
        readbacks: list[str] = []
        try:
            for i in range(1, WRITES + 1):
                tree.set(prop, f"v{i}")
                done[0] = i
                readbacks.append(tree.get(prop))
        finally:
            stop.set()
            thread.join(10)
    assert not errors
    stale = [(floor, seen) for floor, seen in reads if seen < floor]
    assert_fresh(readbacks, stale, len(reads))
    assert len(reads) > WRITES // 2  # the reader ran all along
