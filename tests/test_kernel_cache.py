"""Exact sizes and the kernel's page cache (no_open): in-process over the fake
monitor, then on a real mount (QEMU 7.2): requests per ``cat``, values changed
by another monitor, writes through the mount, tar/cp/mmap."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qomfs import fs as fsmod
from qomfs._fuse import KERNEL_CACHE, SHARED
from qomfs.fs import FILE_SIZE, QOMFS
from qomfs.model import QOMTree
from qomfs.qmp import QMPClient
from tests.fakeqmp import FakeQMP
from tests.harness import VM, Mount, expected_text, missing
from tests.test_cache import FakeClock
from tests.test_fs import FI, fails, make_tree
from tests.test_model import WITH_BATCH


class Env:
    def __init__(self, fake: FakeQMP, client: QMPClient) -> None:
        self.fake = fake
        self.clock = FakeClock()
        self.tree = QOMTree(client, ttl=1.0, readahead=False, clock=self.clock)
        self.fs = QOMFS(self.tree, mountpoint="/mnt/qom", no_open=True)

    def set(self, path: str, value: Any) -> None:
        """Change a value behind the mount's back (another monitor)."""
        obj, _, name = path.rpartition("/")
        next(p for p in self.fake.tree[obj] if p["name"] == name)["value"] = value

    def gets(self) -> int:
        return self.fake.command_counts().get("qom-get", 0)


@pytest.fixture
def e() -> Iterator[Env]:
    with FakeQMP(make_tree()) as fake, QMPClient(fake.path, timeout=3) as client:
        yield Env(fake, client)


def test_size_is_the_length_of_the_text(e: Env) -> None:
    attrs = e.fs.getattr("/machine/kernel")
    assert attrs["st_size"] == len(b"vmlinuz\n") and attrs["st_blocks"] == 1
    smp = e.fs.getattr("/machine/smp")["st_size"]
    assert smp == len(e.fs.read("/machine/smp", 65536, 0, FI(os.O_RDONLY)))
    e.set("/machine/kernel", "h\u00e9")  # UTF-8: bytes, not characters
    e.clock.advance(1.0)
    assert e.fs.getattr("/machine/kernel")["st_size"] == len("h\u00e9\n".encode())


def test_mtime_changes_with_the_text_and_only_then(e: Env) -> None:
    first = e.fs.getattr("/machine/kernel")["st_mtime"]
    e.clock.advance(1.0)  # fetched again, the same text
    assert e.fs.getattr("/machine/kernel")["st_mtime"] == first
    e.set("/machine/kernel", "vmlinux")  # the same length
    e.clock.advance(1.0)
    again = e.fs.getattr("/machine/kernel")
    assert again["st_size"] == len(b"vmlinux\n") and again["st_mtime"] > first


def test_getattr_asks_again_after_the_attribute_share_of_the_ttl(e: Env) -> None:
    """A size reported is of a value at most attr_timeout old, so the kernel
    keeping it attr_timeout more shows nothing older than the TTL."""
    assert e.fs.attr_timeout == 0.5 and e.fs.kernel_timeouts == {"attr_timeout": 0.5}
    e.fs.getattr("/machine/kernel")
    gets = e.gets()
    e.clock.advance(0.4)
    e.fs.getattr("/machine/kernel")
    assert e.gets() == gets  # young enough
    e.clock.advance(0.2)
    e.fs.getattr("/machine/kernel")
    assert e.gets() == gets + 1  # 0.6 s old: asked again, within the TTL


def test_read_serves_the_text_whose_size_was_reported(e: Env) -> None:
    size = e.fs.getattr("/machine/kernel")["st_size"]
    e.set("/machine/kernel", "a-much-longer-kernel-name")
    e.clock.advance(1.0)  # the model's value has expired...
    data = e.fs.read("/machine/kernel", 4096, 0, FI(os.O_RDONLY))
    # ...but the kernel still holds the size it was told: the read agrees
    # with it (never the head of another value, cut at the old size).
    assert data == b"vmlinuz\n" and len(data) == size


def test_unreadable_property_has_a_placeholder_size_and_read_fails(e: Env) -> None:
    assert e.fs.getattr("/machine/secret")["st_size"] == FILE_SIZE
    fails(errno.EACCES, lambda: e.fs.read("/machine/secret", 4096, 0, FI(os.O_RDONLY)))


def test_open_answers_enosys() -> None:
    with FakeQMP(make_tree()) as fake, QMPClient(fake.path, timeout=3) as client:
        fs = QOMFS(QOMTree(client, ttl=1.0, readahead=False), no_open=True)
        fails(errno.ENOSYS, lambda: fs.open("/machine/kernel", FI(os.O_RDONLY)))


def test_readdirplus_carries_sizes_when_qom_list_get_brought_the_values() -> None:
    with (
        FakeQMP(make_tree(), commands=WITH_BATCH) as fake,
        QMPClient(fake.path, timeout=3) as client,
    ):
        tree = QOMTree(client, ttl=1.0, readahead=False)
        fs = QOMFS(tree, no_open=True)
        entries = {name: known for name, _, _, known in fs.readdir_plus("/machine", 0)}
        assert entries["kernel"][0] == len(b"vmlinuz\n")
        assert entries["secret"] is None  # no value came: the kernel asks (LOOKUP)
        assert entries["q35"] is SHARED  # objects and links: no value needed
        assert fake.command_counts().get("qom-get", 0) == 0
        # getattr then reports the same size and time, at no cost
        attrs = fs.getattr("/machine/kernel")
        assert (attrs["st_size"], attrs["st_mtime"]) == entries["kernel"]
        assert fake.command_counts().get("qom-get", 0) == 0


def test_readdirplus_without_qom_list_get_leaves_sizes_to_lookup(e: Env) -> None:
    entries = {name: known for name, _, _, known in e.fs.readdir_plus("/machine", 0)}
    assert entries["kernel"] is None and e.gets() == 0


def test_a_readers_close_does_not_end_a_value(e: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without OPEN every close sends FLUSH, a reader's too: only a FLUSH from
    a process that wrote the value sends it."""
    pid = {"now": 100}
    monkeypatch.setattr(fsmod, "caller_pid", lambda: pid["now"])
    monkeypatch.setattr(fsmod, "thread_group", lambda p: p)
    fi = FI(os.O_WRONLY)
    e.fs.truncate("/machine/append", 0, fi)
    e.fs.write("/machine/append", b"x" * 8192, 0, fi)  # kept for close
    pid["now"] = 200  # a reader closes the same file
    e.fs.flush("/machine/append", FI(os.O_RDONLY))
    assert e.fake.command_counts().get("qom-set", 0) == 0
    pid["now"] = 100
    e.fs.write("/machine/append", b"y\n", 8192, fi)
    e.fs.flush("/machine/append", fi)
    assert e.fake.command_counts().get("qom-set", 0) == 1
    assert e.fs.tree.read_text("/machine/append") == "x" * 8192 + "y\n"
    e.fs.flush("/machine/append", fi)  # a second close: nothing more
    assert e.fake.command_counts().get("qom-set", 0) == 1


def test_a_write_marks_the_file_changed(e: Env) -> None:
    """What was written through the mount may sit in the kernel's pages: the
    next report has a new mtime even if QEMU's text is the one before."""
    before = e.fs.getattr("/machine/kernel")["st_mtime"]
    fi = FI(os.O_WRONLY)
    e.fs.truncate("/machine/kernel", 0, fi)
    e.fs.write("/machine/kernel", b"vmlinuz\n", 0, fi)
    after = e.fs.getattr("/machine/kernel")
    assert after["st_mtime"] > before and after["st_size"] == len(b"vmlinuz\n")


# --- on a real mount ------------------------------------------------------------------


def fuse_requests(mnt: Mount) -> dict[str, int]:
    return dict(mnt.stats().get("fuse", {}))


def spent_requests(mnt: Mount, action: Any) -> dict[str, int]:
    """FUSE requests ``action`` costs (the two stats reads around it taken out)."""
    a = fuse_requests(mnt)
    b = fuse_requests(mnt)
    cost = {k: b[k] - a.get(k, 0) for k in b if b[k] != a.get(k, 0)}
    action()
    c = fuse_requests(mnt)
    spent = {k: c[k] - b.get(k, 0) - cost.get(k, 0) for k in c}
    return {k: n for k, n in spent.items() if n > 0}


def test_repeated_cats_cost_open_read_release(mnt: Mount) -> None:
    path = mnt.path / "machine" / "kernel"
    path.read_bytes()  # once: the kernel has the value within the TTL

    def cats() -> None:
        for _ in range(100):
            with open(path, "rb") as f:
                f.read()

    spent = spent_requests(mnt, cats)
    # Direct I/O (the default): OPEN, READ until a read returns nothing (two
    # for Python's read()), RELEASE; no FLUSH (a reader's open says
    # noflush); Python's fstat asks GETATTR (a read marks the atime stale).
    # libfuse2 has no noflush (a FLUSH per close), and answers Python's
    # isatty() with an IOCTL request.
    extra = set() if KERNEL_CACHE else {"flush", "ioctl"}
    # (RELEASE goes after close() returns: the last ones may still be on the way.)
    assert spent.get("open", 0) == 100 and 90 <= spent.get("release", 0) <= 100, spent
    assert spent.get("read", 0) <= 200, spent
    assert spent.get("getattr", 0) <= 110, spent
    assert not set(spent) - {"open", "read", "release", "getattr"} - extra, spent
    assert all(spent.get(k, 0) <= 100 for k in extra), spent


def _poll(path: Path, want: bytes, limit: float) -> float:
    """Seconds until ``path`` reads ``want``; fails after ``limit``."""
    start = time.monotonic()
    while True:
        got = path.read_bytes()
        waited = time.monotonic() - start
        if got == want:
            return waited
        assert waited < limit, (got, want, waited)
        time.sleep(0.02)


@pytest.mark.parametrize("new", ["console=ttyS1", "console=ttyS0,115200n8"])
def test_a_change_by_another_monitor_shows_within_the_ttl(mnt: Mount, vm: VM, new: str) -> None:
    """Same length (only the mtime tells) and another length (the size too)."""
    ttl = float(mnt.stats()["ttl"])
    path = mnt.path / "machine" / "append"
    with vm.qmp() as qmp:
        qmp.cmd("qom-set", path="/machine", property="append", value="console=ttyS0")
        time.sleep(ttl + 0.6)
        assert path.read_bytes() == b"console=ttyS0\n"
        for _ in range(5):  # the kernel holds it now
            path.read_bytes()
        qmp.cmd("qom-set", path="/machine", property="append", value=new)
        changed = time.monotonic()
        _poll(path, f"{new}\n".encode(), ttl + 0.5)
        # The size: the kernel keeps it half the TTL more (as it keeps a
        # size with direct I/O, of a value up to the TTL old).
        while os.stat(path).st_size != len(new) + 1:
            assert time.monotonic() - changed < 1.5 * ttl + 0.5
            time.sleep(0.02)


def test_a_write_through_the_mount_shows_at_once(mnt: Mount) -> None:
    path = mnt.path / "machine" / "append"
    for i in range(20):
        text = f"value-{i % 10}-{'x' * (i % 3)}\n".encode()  # same lengths, and not
        with open(path, "wb") as f:
            f.write(text)
        assert path.read_bytes() == text, i
        assert os.stat(path).st_size == len(text)
        # a value set at close (several writes), read at once
        with open(path, "wb", buffering=0) as f:
            f.write(b"pieces-")
            f.write(b"%d\n" % i)
        assert path.read_bytes() == b"pieces-%d\n" % i, i


def test_echo_through_a_shell_is_read_back_at_once(mnt: Mount) -> None:
    path = mnt.path / "machine" / "append"
    script = "".join(f"echo a{i % 2}{i} > {path}; cat {path}; " for i in range(30))
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [f"a{i % 2}{i}" for i in range(30)]


def test_tar_and_cp_are_byte_exact(mnt: Mount, vm: VM, tmp_path: Path) -> None:
    src = mnt.path / "machine" / "q35"
    want: dict[str, bytes] = {}
    with vm.qmp() as qmp:
        for prop in qmp.cmd("qom-list", path="/machine/q35"):
            if prop["type"].startswith(("child<", "link<")):
                continue
            try:
                value = qmp.cmd("qom-get", path="/machine/q35", property=prop["name"])
            except RuntimeError:
                continue  # not readable: tar and cp report it, as for any file
            want[prop["name"]] = expected_text(value).encode()
    res = subprocess.run(
        ["tar", "cf", str(tmp_path / "x.tar"), "-C", str(src.parent), "q35"],
        capture_output=True,
        text=True,
    )
    assert res.stderr == "", res.stderr  # no "File shrank", no padding
    (tmp_path / "t").mkdir()
    subprocess.run(["tar", "xf", str(tmp_path / "x.tar"), "-C", str(tmp_path / "t")], check=True)
    res = subprocess.run(
        ["cp", "-a", str(src), str(tmp_path / "c")], capture_output=True, text=True
    )
    assert res.stderr == "", res.stderr
    checked = 0
    for rel, text in want.items():
        for root in (tmp_path / "t" / "q35", tmp_path / "c"):
            copy = root / rel
            if copy.is_file() and not copy.is_symlink():
                assert copy.read_bytes() == text, rel
                checked += 1
    assert checked >= 10


def test_rsync_copies_a_subtree(mnt: Mount, tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        missing("rsync is not installed (scripts/install-deps installs it)")
    src = mnt.path / "machine" / "q35"
    res = subprocess.run(
        ["rsync", "-a", f"{src}/", str(tmp_path / "r")], capture_output=True, text=True
    )
    assert res.returncode in (0, 23), res.stderr  # 23: unreadable properties
    assert (tmp_path / "r" / "type").read_bytes() == (src / "type").read_bytes()


def test_kernel_cache_reader_opens(e: Env) -> None:
    """kernel_cache (off by default): readers through the page cache, kept
    between opens; writers with direct I/O."""
    fs = QOMFS(e.tree, kernel_cache=True)
    assert fs.kernel_cache == KERNEL_CACHE
    reader, writer = FI(os.O_RDONLY), FI(os.O_WRONLY)
    fs.open("/machine/kernel", reader)
    fs.open("/machine/kernel", writer)
    if KERNEL_CACHE:
        assert (reader.direct_io, getattr(reader, "keep_cache", 0)) == (0, 1)
    assert writer.direct_io == 1
    size = fs.getattr("/machine/kernel")["st_size"]
    assert len(fs.read("/machine/kernel", 4096, 0, reader)) == size


def test_ttl_zero_opens_files_with_direct_io_and_no_sizes() -> None:
    """--ttl 0: every read asks QEMU, so a stat does not (placeholder size)."""
    with FakeQMP(make_tree()) as fake, QMPClient(fake.path, timeout=3) as client:
        fs = QOMFS(QOMTree(client, ttl=0, readahead=False))
        assert not fs.no_open
        assert fs.getattr("/machine/kernel")["st_size"] == FILE_SIZE
        assert fake.command_counts().get("qom-get", 0) == 0
        fi = FI(os.O_RDONLY)
        fs.open("/machine/kernel", fi)
        assert fi.direct_io == 1
        assert fs.read("/machine/kernel", 4096, 0, fi) == b"vmlinuz\n"
