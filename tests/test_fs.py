"""The FUSE operations class in-process: QOMFS on a QOMTree over the fake monitor.

No mount: each test calls the methods libfuse would call, with a stand-in for
``struct fuse_file_info``, and counts the ``qom-set`` commands the fake
monitor received.  What only a kernel shows is in test_writes.py.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from qomfs._fuse import FuseOSError
from qomfs.errors import Guarded, NotFound
from qomfs.fs import (
    DD_BLOCK,
    DESCRIPTION_XATTR,
    ENOATTR,
    QOMFS,
    STATS_XATTR,
    TYPE_XATTR,
    WRITE_BLOCK,
    describe,
    killed_by_signal,
)
from qomfs.model import MAX_WRITE, QOMTree
from qomfs.qmp import QMPClient
from qomfs.values import Verdict, judge
from tests.fakeqmp import FakeQMP, Tree

MACHINE = "pc-q35-7.2-machine"
SMP = {"cpus": 1, "sockets": 1}


def make_tree() -> Tree:
    return {
        "/": [
            {"name": "type", "type": "string", "value": "container"},
            {"name": "machine", "type": f"child<{MACHINE}>"},
        ],
        "/machine": [
            {"name": "type", "type": "string", "value": MACHINE, "readonly": True},
            {"name": "graphics", "type": "bool", "value": True},
            {"name": "kernel", "type": "string", "value": "vmlinuz"},
            {"name": "append", "type": "string", "value": "console=ttyS0"},
            {"name": "acpi", "type": "OnOffAuto", "value": "auto", "enum": ["on", "off", "auto"]},
            {"name": "s4_val", "type": "uint8", "value": 2},
            {"name": "max-fw-size", "type": "size", "value": 8 << 20},
            {"name": "smp", "type": "SMPConfiguration", "value": SMP},
            {"name": "secret", "type": "string"},  # no getter
            {"name": "crash-information", "type": "GuestPanicInformation", "error": "No crash"},
            {"name": "memory-backend", "type": "link<memory-backend>", "value": ""},
            {"name": "q35", "type": "child<q35-pcihost>"},
        ],
        "/machine/q35": [
            {"name": "type", "type": "string", "value": "q35-pcihost", "readonly": True},
            {"name": "realized", "type": "bool", "value": True},
            {"name": "parent_bus", "type": "link<bus>", "value": "/machine"},
        ],
    }


@dataclass
class FI:
    """What mfusepy passes with raw_fi: the fields QOMFS reads and sets."""

    flags: int = os.O_WRONLY | os.O_TRUNC
    fh: int = 0
    direct_io: int = 0
    noflush: int = 0


class Env:
    """QOMFS over the fake monitor, called as the kernel calls it.

    ``no_open``: as mounted (``open`` answers ENOSYS, and the kernel then
    passes no open file: fh 0, ``O_TRUNC`` as a truncate); else with an
    open file per ``open``.
    """

    def __init__(
        self, fake: FakeQMP, client: QMPClient, read_only: bool = False, no_open: bool = True
    ) -> None:
        self.fake = fake
        self.no_open = no_open
        self.tree = QOMTree(client, ttl=1.0, readahead=False)
        self.fs = QOMFS(self.tree, read_only=read_only, mountpoint="/mnt/qom", no_open=no_open)

    def sets(self) -> int:
        """qom-set commands the monitor has received."""
        return self.fake.command_counts().get("qom-set", 0)

    def value(self, path: str) -> Any:
        """The fake monitor's value of the property at ``path``."""
        obj, _, name = path.rpartition("/")
        return next(p["value"] for p in self.fake.tree[obj] if p["name"] == name)

    def open(self, path: str, flags: int = os.O_WRONLY | os.O_TRUNC) -> FI:
        fi = FI(flags)
        if self.no_open:
            fails(errno.ENOSYS, lambda: self.fs.open(path, fi))
            self.fs.getattr(path)  # the kernel's LOOKUP
            if flags & os.O_TRUNC:
                self.fs.truncate(path, 0, fi)  # no ATOMIC_O_TRUNC: a truncate first
            return fi
        assert self.fs.open(path, fi) == 0
        return fi

    def write_all(self, path: str, *chunks: bytes) -> FI:
        """write() each chunk at its offset, as the kernel passes a writer's calls."""
        fi = self.open(path)
        offset = 0
        for chunk in chunks:
            assert self.fs.write(path, chunk, offset, fi) == len(chunk)
            offset += len(chunk)
        return fi

    def close(self, path: str, fi: FI) -> None:
        """close(): FLUSH, then RELEASE."""
        try:
            self.fs.flush(path, fi)
        finally:
            if not self.no_open:
                self.fs.release(path, fi)


@pytest.fixture(params=[True, False], ids=["no_open", "open"])
def e(request: pytest.FixtureRequest) -> Iterator[Env]:
    with FakeQMP(make_tree()) as fake, QMPClient(fake.path, timeout=3) as client:
        yield Env(fake, client, no_open=request.param)


def fails(code: int, action: Callable[[], object]) -> None:
    with pytest.raises(FuseOSError) as exc:
        action()
    assert exc.value.errno == code, errno.errorcode.get(exc.value.errno or 0)


# --- a value written in one write() call ----------------------------------------------


def test_one_write_is_set_by_that_call(e: Env) -> None:
    """echo false > graphics: set inside write(), so the shell sees its error."""
    fi = e.write_all("/machine/graphics", b"false\n")
    assert e.sets() == 1 and e.value("/machine/graphics") is False
    e.close("/machine/graphics", fi)
    e.close("/machine/graphics", fi)  # FLUSH again (a dup'd descriptor): nothing new
    assert e.sets() == 1


def test_one_write_without_newline_is_set_by_that_call(e: Env) -> None:
    """printf %s false > graphics; os.write(fd, b"4M")."""
    e.write_all("/machine/graphics", b"false")
    e.write_all("/machine/max-fw-size", b"4M")
    assert e.sets() == 2
    assert e.value("/machine/graphics") is False and e.value("/machine/max-fw-size") == 4 << 20


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/machine/graphics", b"maybe\n"),
        ("/machine/graphics", b"maybe"),  # no newline: still no start of a boolean
        ("/machine/graphics", b'"true"\n'),
        ("/machine/graphics", b"tr\n"),  # a newline ends a boolean
        ("/machine/s4_val", b"12abc\n"),
        ("/machine/s4_val", b"12abc"),
        ("/machine/s4_val", b"256\n"),
        ("/machine/s4_val", b"256"),  # out of range: more digits only make it larger
        ("/machine/max-fw-size", b"lots\n"),
        ("/machine/smp", b"{not json\n"),
        ("/machine/smp", b'{"cpus": 2\n'),  # a short line is a whole value: refused
        ("/machine/smp", b'{"cpus": 2}x'),
        ("/machine/kernel", b"\xff\xfe\n"),
    ],
)
def test_text_that_cannot_be_a_value_is_refused_at_once(e: Env, path: str, text: bytes) -> None:
    before = e.value(path)
    fi = e.open(path)
    fails(errno.EINVAL, lambda: e.fs.write(path, text, 0, fi))
    fails(errno.EINVAL, lambda: e.fs.write(path, b"1\n", len(text), fi))  # and stays so
    e.close(path, fi)  # nothing sent at close either: the writer has its error
    assert e.sets() == 0 and e.value(path) == before


def test_qemu_refusal_of_one_write_shows_at_that_write(e: Env) -> None:
    """echo maybe > acpi: text for an enum is QEMU's to judge; its no is EINVAL."""
    fi = e.open("/machine/acpi")
    fails(errno.EINVAL, lambda: e.fs.write("/machine/acpi", b"maybe\n", 0, fi))
    assert e.sets() == 1 and e.value("/machine/acpi") == "auto"
    e.close("/machine/acpi", fi)
    assert e.sets() == 1  # not sent again at close


@pytest.mark.parametrize(
    ("path", "text", "code"),
    [
        ("/machine/type", b"pc\n", errno.EACCES),  # QEMU: not writable
        ("/machine/q35/realized", b"false\n", errno.EPERM),  # guarded, never sent
    ],
)
def test_refusals_map_to_errno(e: Env, path: str, text: bytes, code: int) -> None:
    before = e.value(path)
    fi = e.open(path)
    fails(code, lambda: e.fs.write(path, text, 0, fi))
    assert e.value(path) == before


# --- a value written in several write() calls ----------------------------------------


def test_many_writes_are_set_once_at_flush(e: Env) -> None:
    """cat, tr, Python: nothing is sent before close, then one qom-set of the whole."""
    text = b"a" * 19999 + b"\n"
    chunks = [text[i : i + WRITE_BLOCK] for i in range(0, len(text), WRITE_BLOCK)]
    fi = e.write_all("/machine/append", *chunks)
    assert len(chunks) == 3 and e.sets() == 0 and e.value("/machine/append") == "console=ttyS0"
    e.close("/machine/append", fi)
    assert e.sets() == 1 and e.value("/machine/append") == "a" * 19999


def test_one_long_write_is_set_at_flush(e: Env) -> None:
    """A first write() of a full buffer or more may be followed by more."""
    fi = e.write_all("/machine/append", b"b" * WRITE_BLOCK)
    assert e.sets() == 0
    e.close("/machine/append", fi)
    assert e.sets() == 1 and e.value("/machine/append") == "b" * WRITE_BLOCK


def test_dd_blocks_are_set_at_flush(e: Env) -> None:
    """dd's 512-byte blocks: the first is short, but may be one of many."""
    text = b"c" * 1000 + b"\n"
    fi = e.write_all("/machine/append", text[:DD_BLOCK], text[DD_BLOCK:])
    assert e.sets() == 0
    e.close("/machine/append", fi)
    assert e.sets() == 1 and e.value("/machine/append") == "c" * 1000


def test_json_split_over_two_writes_is_set_whole(e: Env) -> None:
    fi = e.write_all("/machine/smp", b'{"cpus": ', b'2, "sockets": 2}\n')
    assert e.sets() == 0
    e.close("/machine/smp", fi)
    assert e.sets() == 1 and e.value("/machine/smp") == {"cpus": 2, "sockets": 2}


def test_text_that_may_go_on_waits_for_more(e: Env) -> None:
    """A short first write that is no value yet (no newline): dd bs=1, a slow pipe."""
    fi = e.write_all("/machine/graphics", b"f", b"al", b"se\n")
    fi2 = e.write_all("/machine/kernel", "é\n".encode()[:1], "é\n".encode()[1:])
    assert e.sets() == 0
    e.close("/machine/graphics", fi)
    e.close("/machine/kernel", fi2)
    assert e.sets() == 2
    assert e.value("/machine/graphics") is False and e.value("/machine/kernel") == "é"


def test_refused_at_flush_leaves_the_old_value(e: Env, caplog: pytest.LogCaptureFixture) -> None:
    """QEMU refuses a value that came in several writes: error at close, value kept."""
    fi = e.write_all("/machine/acpi", b"x" * WRITE_BLOCK, b"x\n")
    assert e.sets() == 0
    fails(errno.EINVAL, lambda: e.fs.flush("/machine/acpi", fi))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "qomfs.fs"]
    assert "flush: /machine/acpi" in line and "GenericError" in line
    assert len(line) < 500  # QEMU quotes the 8 KiB value; the log does not
    assert e.sets() == 1 and e.value("/machine/acpi") == "auto"
    e.fs.flush("/machine/acpi", fi)  # another descriptor's close: not sent again
    fails(errno.EINVAL, lambda: e.fs.write("/machine/acpi", b"on\n", WRITE_BLOCK + 2, fi))
    e.fs.release("/machine/acpi", fi)
    assert e.sets() == 1


def test_a_chunk_that_spoils_the_value_is_refused_at_that_write(e: Env) -> None:
    fi = e.write_all("/machine/smp", b'{"cpus": ' + b" " * WRITE_BLOCK)
    fails(errno.EINVAL, lambda: e.fs.write("/machine/smp", b"]", WRITE_BLOCK + 9, fi))
    e.close("/machine/smp", fi)
    assert e.sets() == 0 and e.value("/machine/smp") == SMP


def test_size_limit_counts_the_whole_value(e: Env) -> None:
    """tr of 10 MiB: EFBIG at the write() that crosses MAX_WRITE; nothing sent, ever."""
    path = "/machine/append"
    fi = e.open(path)
    offset = 0
    while offset + WRITE_BLOCK <= MAX_WRITE:
        e.fs.write(path, b"a" * WRITE_BLOCK, offset, fi)
        offset += WRITE_BLOCK
    assert offset == MAX_WRITE  # exactly MAX_WRITE is allowed...
    fails(errno.EFBIG, lambda: e.fs.write(path, b"a", offset, fi))  # ...one more is not
    fails(errno.EFBIG, lambda: e.fs.write(path, b"a", offset, fi))
    e.close(path, fi)
    assert e.sets() == 0 and e.value(path) == "console=ttyS0"
    fi = e.open(path)
    fails(errno.EFBIG, lambda: e.fs.write(path, b"a" * (MAX_WRITE + 1), 0, fi))
    assert e.sets() == 0


def test_exactly_max_write_is_set(e: Env) -> None:
    fi = e.write_all("/machine/append", b"d" * MAX_WRITE)
    e.close("/machine/append", fi)
    assert e.sets() == 1 and e.value("/machine/append") == "d" * MAX_WRITE


def test_more_after_a_value_set_at_once(e: Env) -> None:
    """(echo a; echo b) > prop: the first line is set by its write; the whole at close."""
    fi = e.write_all("/machine/kernel", b"a\n", b"b\n")
    assert e.sets() == 1 and e.value("/machine/kernel") == "a"
    e.close("/machine/kernel", fi)
    assert e.sets() == 2 and e.value("/machine/kernel") == "a\nb"
    # For a boolean the second line can never make a value: refused at once.
    fi = e.write_all("/machine/graphics", b"false\n")
    fails(errno.EINVAL, lambda: e.fs.write("/machine/graphics", b"true\n", 6, fi))
    e.close("/machine/graphics", fi)
    assert e.sets() == 3 and e.value("/machine/graphics") is False


# --- offsets, truncation, release, read-only ---------------------------------------------


def test_write_at_a_wrong_offset_is_refused(e: Env) -> None:
    """dd seek=1, or a hole: a value is written from offset 0, in order."""
    fi = e.open("/machine/kernel")
    fails(errno.EINVAL, lambda: e.fs.write("/machine/kernel", b"x", 512, fi))
    fi = e.write_all("/machine/kernel", b"x" * DD_BLOCK)
    fails(errno.EINVAL, lambda: e.fs.write("/machine/kernel", b"y", DD_BLOCK + 1, fi))
    e.close("/machine/kernel", fi)
    assert e.sets() == 0 and e.value("/machine/kernel") == "vmlinuz"


def test_writing_again_from_offset_0_starts_a_new_value(e: Env) -> None:
    """pwrite(fd, ..., 0) or seek(0) then write: the value written last counts."""
    fi = e.write_all("/machine/kernel", b"x" * DD_BLOCK)
    e.fs.write("/machine/kernel", b"second\n", 0, fi)
    assert e.sets() == 1 and e.value("/machine/kernel") == "second"
    e.close("/machine/kernel", fi)
    assert e.sets() == 1


def test_truncate(e: Env) -> None:
    fs = e.fs
    assert fs.truncate("/machine/kernel", 0) == 0  # "> file" before its write
    fails(errno.EINVAL, lambda: fs.truncate("/machine/kernel", 10))
    fails(errno.EISDIR, lambda: fs.truncate("/machine", 0))
    # ftruncate(fd, 0) of an open file: what it wrote is dropped, not set.
    fi = e.write_all("/machine/kernel", b"x" * DD_BLOCK)
    assert fs.truncate("/machine/kernel", 0, fi) == 0
    e.close("/machine/kernel", fi)
    assert e.sets() == 0 and e.value("/machine/kernel") == "vmlinuz"


def test_release_without_flush_still_sets_the_value(e: Env) -> None:
    if e.no_open:
        pytest.skip("without OPEN the kernel sends no RELEASE")
    fi = e.write_all("/machine/append", b"e" * WRITE_BLOCK)
    e.fs.release("/machine/append", fi)
    assert e.sets() == 1 and e.value("/machine/append") == "e" * WRITE_BLOCK
    fi = e.write_all("/machine/acpi", b"x" * WRITE_BLOCK)
    e.fs.release("/machine/acpi", fi)  # refused: logged, nobody to tell
    assert e.sets() == 2 and e.value("/machine/acpi") == "auto"


def test_a_writer_killed_mid_value_sets_nothing(e: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLUSH from a process dying of a signal: what it wrote is not set."""
    monkeypatch.setattr("qomfs.fs.caller_pid", lambda: 4242)
    monkeypatch.setattr("qomfs.fs.killed_by_signal", lambda pid: 9 if pid == 4242 else 0)
    fi = e.write_all("/machine/append", b"f" * WRITE_BLOCK)
    e.close("/machine/append", fi)  # FLUSH from the dying writer, then RELEASE
    assert e.sets() == 0 and e.value("/machine/append") == "console=ttyS0"
    # A process sharing the open file that writes on sends the whole at its close.
    fi = e.write_all("/machine/append", b"f" * WRITE_BLOCK)
    e.fs.flush("/machine/append", fi)
    monkeypatch.setattr("qomfs.fs.caller_pid", lambda: 4343)
    e.fs.write("/machine/append", b"g\n", WRITE_BLOCK, fi)
    e.close("/machine/append", fi)
    assert e.sets() == 1 and e.value("/machine/append") == "f" * WRITE_BLOCK + "g"
    monkeypatch.setattr("qomfs.fs.killed_by_signal", lambda pid: 0)  # a normal exit
    fi = e.write_all("/machine/append", b"f" * WRITE_BLOCK)
    e.close("/machine/append", fi)
    assert e.sets() == 2


def test_killed_by_signal_reads_proc() -> None:
    assert killed_by_signal(os.getpid()) == 0  # alive
    assert killed_by_signal(2**22 + 1) == 0  # no such process (above pid_max)


@pytest.mark.parametrize("no_open", [True, False])
def test_read_only_refuses_writes_before_qmp(no_open: bool) -> None:
    with FakeQMP(make_tree()) as fake, QMPClient(fake.path, timeout=3) as client:
        e = Env(fake, client, read_only=True, no_open=no_open)
        if not no_open:  # (without OPEN, the write below is the first to know)
            fails(errno.EROFS, lambda: e.fs.open("/machine/kernel", FI(os.O_WRONLY)))
        fails(errno.EROFS, lambda: e.fs.write("/machine/kernel", b"x\n", 0, FI()))
        fails(errno.EROFS, lambda: e.fs.truncate("/machine/kernel", 0))
        fails(errno.EROFS, lambda: e.fs.symlink("/machine/q35/parent_bus", "../.."))
        fails(errno.EROFS, lambda: e.fs.mkdir("/machine/new", 0o755))
        fi = e.open("/machine/kernel", os.O_RDONLY)
        assert e.fs.read("/machine/kernel", 100, 0, fi) == b"vmlinuz\n"
        e.close("/machine/kernel", fi)
        assert e.sets() == 0


# --- handles and reads ------------------------------------------------------------------


def test_handles(e: Env) -> None:
    if e.no_open:
        pytest.skip("without OPEN there are no handles (tests/test_kernel_cache.py)")
    fs = e.fs
    a, b = e.open("/machine/kernel", os.O_RDONLY), e.open("/machine/kernel", os.O_RDONLY)
    assert a.fh != b.fh and a.direct_io == 1  # one value per open file, as read
    assert a.noflush == 1  # a reader's close needs no FLUSH
    assert e.open("/machine/kernel", os.O_WRONLY).noflush == 0
    assert fs.read("/machine/kernel", 3, 0, a) == b"vml"
    e.fake.tree["/machine"][2]["value"] = "changed"
    assert fs.read("/machine/kernel", 100, 3, a) == b"inuz\n"  # the same value, read on
    fs.release("/machine/kernel", a)
    fails(errno.EBADF, lambda: fs.read("/machine/kernel", 3, 0, a))
    fails(errno.EBADF, lambda: fs.write("/machine/kernel", b"x", 0, a))
    assert fs.flush("/machine/kernel", a) == 0  # a stale FLUSH is harmless
    fails(errno.EISDIR, lambda: fs.open("/machine", FI(os.O_RDONLY)))
    fails(errno.EINVAL, lambda: fs.open("/machine/kernel", FI(os.O_WRONLY | os.O_APPEND)))


def test_read_errors(e: Env) -> None:
    fi = e.open("/machine/secret", os.O_RDONLY)
    fails(errno.EACCES, lambda: e.fs.read("/machine/secret", 100, 0, fi))
    fi = e.open("/machine/crash-information", os.O_RDONLY)
    fails(errno.EIO, lambda: e.fs.read("/machine/crash-information", 100, 0, fi))
    fails(errno.ENOENT, lambda: e.open("/machine/nope", os.O_RDONLY))


# --- attributes, directories, xattrs, links ------------------------------------------------


def test_getattr(e: Env) -> None:
    fs = e.fs
    d, f, ln = fs.getattr("/machine"), fs.getattr("/machine/kernel"), fs.getattr("/machine/q35")
    assert stat.S_ISDIR(d["st_mode"]) and stat.S_ISREG(f["st_mode"]) and stat.S_ISDIR(ln["st_mode"])
    assert stat.S_ISLNK(fs.getattr("/machine/q35/parent_bus")["st_mode"])
    assert f["st_blksize"] == WRITE_BLOCK  # what stdio and Python size their buffers by
    assert f["st_ino"] != d["st_ino"] and fs.getattr("/")["st_ino"] == 1
    fails(errno.ENOENT, lambda: fs.getattr("/machine/nope"))
    fails(errno.ENOTDIR, lambda: fs.getattr("/machine/kernel/x"))


def test_readdir(e: Env) -> None:
    names = [n if isinstance(n, str) else n[0] for n in e.fs.readdir("/machine/q35", None)]
    assert names == [".", "..", "type", "realized", "parent_bus"]
    plus = e.fs.readdir_plus("/machine/q35", 0)
    assert [n for n, _, _, _ in plus] == names
    kinds = [stat.S_IFMT(a["st_mode"]) for _, _, a, _ in plus[2:]]
    assert kinds == [stat.S_IFREG, stat.S_IFREG, stat.S_IFLNK]
    assert [n for n, _, _, _ in e.fs.readdir_plus("/machine/q35", 3)] == ["realized", "parent_bus"]


def test_xattrs(e: Env) -> None:
    fs = e.fs
    assert fs.listxattr("/machine/kernel") == [TYPE_XATTR, DESCRIPTION_XATTR]
    assert fs.listxattr("/machine") == [TYPE_XATTR]
    assert STATS_XATTR in fs.listxattr("/")
    assert fs.getxattr("/machine/kernel", TYPE_XATTR) == b"string"
    assert fs.getxattr("/machine", TYPE_XATTR) == MACHINE.encode()
    assert json.loads(fs.getxattr("/", STATS_XATTR))["commands"]["qom-list"] >= 1
    fails(errno.ENOTSUP, lambda: fs.getxattr("/machine/kernel", "security.selinux"))
    fails(ENOATTR, lambda: fs.getxattr("/machine/kernel", "user.nope"))
    fails(ENOATTR, lambda: fs.getxattr("/machine", DESCRIPTION_XATTR))


def test_symlinks_list_no_xattrs(e: Env) -> None:
    """Linux refuses user.* on a symlink: getfattr -h -d must find nothing to fail on."""
    assert e.fs.listxattr("/machine/q35/parent_bus") == []
    assert e.fs.listxattr("/machine/memory-backend") == []
    e.fs.symlink("/machine/CuAbC123", "q35")  # ln -sf's stepping stone
    assert e.fs.listxattr("/machine/CuAbC123") == []


def test_links(e: Env) -> None:
    fs = e.fs
    assert fs.readlink("/machine/q35/parent_bus") == ".."
    assert fs.readlink("/machine/memory-backend") == "(unset)"
    # ln -sfn q35 memory-backend: symlink under a temporary name, then rename.
    assert fs.symlink("/machine/CuXyZ789", "q35") == 0
    assert stat.S_ISLNK(fs.getattr("/machine/CuXyZ789")["st_mode"])
    assert fs.readlink("/machine/CuXyZ789") == "q35"
    assert fs.rename("/machine/CuXyZ789", "/machine/memory-backend") == 0
    assert e.value("/machine/memory-backend") == "/machine/q35"
    fails(errno.ENOENT, lambda: fs.getattr("/machine/CuXyZ789"))
    # ln -sn onto the link itself; bad targets; names that cannot be made.
    assert fs.symlink("/machine/memory-backend", "(unset)") == 0
    assert e.value("/machine/memory-backend") == ""
    fails(errno.EINVAL, lambda: fs.symlink("/machine/memory-backend", "kernel"))
    fails(errno.EINVAL, lambda: fs.symlink("/machine/memory-backend", "../../etc"))
    fails(errno.EPERM, lambda: fs.symlink("/machine/newlink", "q35"))
    fails(errno.EEXIST, lambda: fs.symlink("/machine/kernel", "q35"))
    fails(errno.EPERM, lambda: fs.rename("/machine/kernel", "/machine/kernel2"))
    fails(errno.EPERM, lambda: fs.unlink("/machine/kernel"))
    assert fs.symlink("/machine/CuAaaaaa", "q35") == 0
    assert fs.unlink("/machine/CuAaaaaa") == 0
    assert e.value("/machine/memory-backend") == ""


# --- judging text: never refuse the start of a longer value --------------------------------


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-(10**12), 10**12)
    if kind == 2:
        return rng.choice([0.5, -1.25e-7, 3e21, 1.0])
    if kind in (3, 4):
        alphabet = 'ab "\\/\n\té€😀\x01'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
    if kind in (5, 6):
        return {f"k{i}": _random_json(rng, depth + 1) for i in range(rng.randrange(4))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_no_start_of_valid_json_is_refused() -> None:
    """Any cut of a valid JSON text, however formatted, may still become valid."""
    rng = random.Random(13)
    for _ in range(300):
        doc = {"v": _random_json(rng)} if rng.random() < 0.5 else [_random_json(rng)]
        styles: list[dict[str, Any]] = [
            {},
            {"indent": 2},
            {"separators": (",", ":")},
            {"ensure_ascii": False},
        ]
        style = rng.choice(styles)
        data = (json.dumps(doc, **style) + "\n").encode()
        assert judge(data, "SMPConfiguration")[0] is Verdict.VALID, data
        for cut in range(len(data)):
            verdict, _ = judge(data[:cut], "SMPConfiguration")
            assert verdict is not Verdict.INVALID, (data, cut)


@pytest.mark.parametrize(
    ("qom_type", "text"),
    [
        ("bool", "true\n"),
        ("bool", " True \n"),
        ("bool", "OFF"),
        ("uint8", "255"),
        ("size", "4 MiB\n"),
        ("int32", "-0x7f\n"),
        ("double", "-1.5e3\n"),
        ("string", "é"),
        ("OnOffAuto", "auto\n"),
    ],
)
def test_no_start_of_a_scalar_is_refused(qom_type: str, text: str) -> None:
    data = text.encode()
    assert judge(data, qom_type)[0] is Verdict.VALID
    for cut in range(len(data)):
        assert judge(data[:cut], qom_type)[0] is not Verdict.INVALID, (qom_type, data[:cut])


@pytest.mark.parametrize(
    ("qom_type", "text"),
    [
        ("bool", b"yes please"),
        ("bool", b"tr "),
        ("bool", b"x"),
        ("uint8", b"-1"),
        ("int32", b"1 2"),
        ("size", b"4 Kx"),
        ("double", b"1.5z"),
        ("SMPConfiguration", b'{"a": 1} {'),
        ("SMPConfiguration", b'["a\nb"'),
        ("SMPConfiguration", b"[truex"),
        ("SMPConfiguration", b"[1, }"),
        ("string", b"a\xffb"),
    ],
)
def test_text_no_more_can_make_valid_is_invalid(qom_type: str, text: bytes) -> None:
    verdict, err = judge(text, qom_type)
    assert verdict is Verdict.INVALID and err is not None


def test_sizes_are_the_text_length_or_4096_without_sizes() -> None:
    """A file's st_size is the length of what cat prints (its value fetched
    for it); with sizes=False (--no-sizes) every file is 4096 bytes and a stat
    costs no command."""
    with FakeQMP(make_tree()) as fake, QMPClient(fake.path, timeout=3) as client:
        exact = QOMFS(QOMTree(client, ttl=1.0, readahead=False), mountpoint="/mnt/qom")
        exact.readdir("/machine", 0)
        gets = fake.command_counts().get("qom-get", 0)
        assert exact.getattr("/machine/append")["st_size"] == len(b"console=ttyS0\n")
        assert fake.command_counts().get("qom-get", 0) == gets + 1
        # A value read and its stat's size agree.
        fi = FI(os.O_RDONLY)
        data = exact.read("/machine/kernel", 4096, 0, fi)
        assert exact.getattr("/machine/kernel")["st_size"] == len(data) == len(b"vmlinuz\n")

        plain = QOMFS(QOMTree(client, ttl=1.0, readahead=False), mountpoint="/mnt/qom", sizes=False)
        plain.readdir("/machine", 0)
        gets = fake.command_counts().get("qom-get", 0)
        for name in ("append", "kernel", "graphics", "smp", "s4_val"):
            assert plain.getattr(f"/machine/{name}")["st_size"] == 4096
        assert fake.command_counts().get("qom-get", 0) == gets


def test_a_guarded_write_says_how_to_permit_it() -> None:
    """The model refuses a teardown without naming a mount option; the
    mount's log line names it."""
    line = describe(Guarded("/machine/q35/realized: refusing a write"), "/machine/q35/realized")
    assert line.endswith("(mount with --allow-unrealize to permit)")
    assert "allow-unrealize" not in describe(NotFound("/x: no such object"), "/x")
