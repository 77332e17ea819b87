"""Bad input on a real mount: a clear errno, QEMU's value unchanged, the mount healthy."""

from __future__ import annotations

import errno
import os
import posixpath
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import VM, Mount, RawQMP, mounted, qemu_vm, walk_qmp

EXTRA = [
    *("-object", "iothread,id=io1"),
    *("-object", "throttle-group,id=tg1"),
    *("-object", "thread-context,id=tc1"),
]


@pytest.fixture(scope="module")
def bvm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    with qemu_vm(tmp_path_factory.mktemp("bad"), EXTRA) as vm:
        yield vm


@pytest.fixture(scope="module")
def bmnt(bvm: VM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(bvm.socket, tmp_path_factory.mktemp("badmnt") / "qom") as m:
        yield m


@pytest.fixture(scope="module")
def qmp(bvm: VM) -> Iterator[RawQMP]:
    with bvm.qmp() as q:
        yield q


def find_prop(qmp: RawQMP, name: str) -> str:
    """The QOM path of the first property called ``name`` (paths vary by version)."""
    for obj, props in walk_qmp(qmp, "/machine").items():
        if any(p["name"] == name for p in props):
            return posixpath.join(obj, name)
    raise LookupError(name)


def qget(qmp: RawQMP, path: str) -> Any:
    obj, name = posixpath.split(path)
    return qmp.cmd("qom-get", path=obj, property=name)


def write(
    mnt: Mount, path: str, data: bytes, flags: int = os.O_TRUNC, offset: int | None = None
) -> None:
    fd = os.open(mnt.path / path.lstrip("/"), os.O_WRONLY | flags)
    try:
        if offset is None:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def assert_refused(
    mnt: Mount, qmp: RawQMP, path: str, action: Callable[[], object], want: int
) -> None:
    before = qget(qmp, path)
    with pytest.raises(OSError) as exc:
        action()
    assert exc.value.errno == want, (path, errno.errorcode.get(exc.value.errno or 0))
    assert qget(qmp, path) == before, path
    assert (mnt.path / "machine" / "type").read_text().strip()  # still healthy


CASES: list[tuple[str, str, bytes]] = [
    # (description, property path or finder key, text written)
    ("bool", "/machine/graphics", b"maybe\n"),
    ("bool as JSON string", "/machine/graphics", b'"true"\n'),
    ("int not a number", "/objects/io1/poll-max-ns", b"12abc\n"),
    ("int64 overflow", "/objects/io1/poll-max-ns", b"9223372036854775808\n"),
    ("int negative refused by QEMU", "/objects/io1/poll-max-ns", b"-5\n"),
    ("uint8 out of range", "s4_val", b"256\n"),
    ("uint8 negative", "s4_val", b"-1\n"),
    ("size negative", "/machine/max-fw-size", b"-1\n"),
    ("size garbage", "/machine/max-fw-size", b"lots\n"),
    ("enum", "/machine/acpi", b"maybe\n"),
    ("struct bad JSON", "/objects/tg1/limits", b"{not json\n"),
    ("struct unknown member", "/objects/tg1/limits", b'{"nope": 1}\n'),
    ("struct wrong JSON type", "/objects/tg1/limits", b"[1, 2]\n"),
    ("string not UTF-8", "/machine/kernel", b"\xff\xfe\n"),
]


@pytest.mark.parametrize(("what", "where", "data"), CASES, ids=[c[0] for c in CASES])
def test_invalid_values(bmnt: Mount, qmp: RawQMP, what: str, where: str, data: bytes) -> None:
    path = where if where.startswith("/") else find_prop(qmp, where)
    assert_refused(bmnt, qmp, path, lambda: write(bmnt, path, data), errno.EINVAL)


def test_valid_values_of_each_kind_round_trip(bmnt: Mount, qmp: RawQMP) -> None:
    """What was read, written back, sets the same value; a new value takes."""
    paths = [
        "/machine/graphics",
        "/objects/io1/poll-max-ns",
        find_prop(qmp, "s4_val"),
        "/machine/max-fw-size",
        "/machine/acpi",
        "/objects/tg1/limits",
        "/machine/kernel",
    ]
    for path in paths:
        before = qget(qmp, path)
        fs = bmnt.path / path.lstrip("/")
        text = fs.read_bytes()
        write(bmnt, path, text)
        assert qget(qmp, path) == before, path
    write(bmnt, "/objects/io1/poll-max-ns", b"4096\n")
    assert qget(qmp, "/objects/io1/poll-max-ns") == 4096
    write(bmnt, "/machine/max-fw-size", b"4M\n")
    assert qget(qmp, "/machine/max-fw-size") == 4 << 20
    write(bmnt, "/machine/kernel", "vmlinuz-é\n".encode())
    assert qget(qmp, "/machine/kernel") == "vmlinuz-é"
    assert (bmnt.path / "machine" / "kernel").read_text() == "vmlinuz-é\n"


def test_read_only_child_and_guarded(bmnt: Mount, qmp: RawQMP) -> None:
    assert_refused(bmnt, qmp, "/machine/type", lambda: write(bmnt, "/machine/type", b"x"), 13)
    with pytest.raises(IsADirectoryError):
        write(bmnt, "/machine/unattached", b"x")
    q35 = "/machine/q35/realized"
    assert_refused(bmnt, qmp, q35, lambda: write(bmnt, q35, b"false\n"), errno.EPERM)


def test_odd_writes(bmnt: Mount, qmp: RawQMP) -> None:
    kernel = "/machine/kernel"
    for action, want in [
        (lambda: write(bmnt, kernel, b"x", offset=5), errno.EINVAL),
        (lambda: write(bmnt, kernel, b"x", flags=os.O_APPEND | os.O_TRUNC), errno.EINVAL),
        (lambda: write(bmnt, kernel, b"x", flags=os.O_APPEND), errno.EINVAL),
        (lambda: write(bmnt, kernel, b"x" * (10 << 20)), errno.EFBIG),
        (lambda: os.truncate(bmnt.path / "machine" / "kernel", 10), errno.EINVAL),
    ]:
        assert_refused(bmnt, qmp, kernel, action, want)
    # A value split over several write() calls is set whole.
    fd = os.open(bmnt.path / "machine" / "kernel", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"split-")
        os.write(fd, b"value\n")
    finally:
        os.close(fd)
    assert qget(qmp, kernel) == "split-value"


def test_structure_cannot_change(bmnt: Mount, qmp: RawQMP) -> None:
    m = bmnt.path / "machine"
    before = sorted(os.listdir(m))
    for action in (
        lambda: os.mkdir(m / "newdir"),
        lambda: os.rmdir(m / "unattached"),
        lambda: os.unlink(m / "graphics"),
        lambda: os.rename(m / "graphics", m / "graphics2"),
        lambda: os.chmod(m / "graphics", 0o600),
        lambda: os.symlink("q35", m / "newlink"),
        lambda: (m / "newfile").write_text("1"),
    ):
        with pytest.raises(PermissionError):
            action()
    assert sorted(os.listdir(m)) == before


def test_names_with_brackets_at_dots_and_backslashes(bmnt: Mount, qmp: RawQMP) -> None:
    """Real trees have names like fw_cfg's '\\x2from@etc\\x2facpi\\x2frsdp[0]'."""
    odd = [
        (obj, p["name"])
        for obj, props in walk_qmp(qmp, "/machine").items()
        for p in props
        if set(p["name"]) & set("[]@.\\")
    ]
    kinds = {c for _, n in odd for c in n if c in "[]@.\\"}
    assert kinds == set("[]@.\\"), kinds
    for obj, name in odd:
        assert name in os.listdir(bmnt.path / obj.lstrip("/")), (obj, name)
        assert os.lstat(bmnt.path / obj.lstrip("/") / name)


def test_links_are_set_with_ln_sfn(bmnt: Mount, qmp: RawQMP) -> None:
    """ln -sfn sets a link property; bad targets get EINVAL and change nothing."""
    link = "/objects/pc.ram/prealloc-context"
    fs = bmnt.path / link.lstrip("/")

    def ln(target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ln", "-sfn", target, str(fs)], capture_output=True, text=True)

    assert qget(qmp, link) == ""
    for bad in ("../io1", "../nope", "../../../../etc", "/etc", "../tc1/type"):
        res = ln(bad)
        assert res.returncode != 0 and "Invalid argument" in res.stderr, (bad, res.stderr)
        assert qget(qmp, link) == ""
    res = ln("../tc1")
    assert res.returncode == 0, res.stderr
    assert qget(qmp, link) == "/objects/tc1"
    assert os.readlink(fs) == "../tc1"
    res = ln(str(bmnt.path / "objects" / "tc1"))  # absolute, inside the mount
    assert res.returncode == 0, res.stderr
    res = ln("(unset)")
    assert res.returncode == 0, res.stderr
    assert qget(qmp, link) == ""
    names = sorted(p["name"] for p in qmp.cmd("qom-list", path="/objects/pc.ram"))
    assert sorted(os.listdir(fs.parent)) == names  # no temporary name left behind
