"""Writes through a real mount with real tools: a value is set whole, once, or not at all.

Each test names the writer (bash builtins, cat, tr, dd, Python) and checks,
with an independent QMP connection, what QEMU holds afterwards and, with the
daemon's counters, how many ``qom-set`` commands reached it.
"""

from __future__ import annotations

import errno
import os
import posixpath
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import VM, Mount, RawQMP, mounted, qemu_vm, wait_for

EXTRA = ["-object", "throttle-group,id=tg1"]
LIMITS = "/objects/tg1/limits"


@pytest.fixture(scope="module")
def wvm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    with qemu_vm(tmp_path_factory.mktemp("writes"), EXTRA) as vm:
        yield vm


@pytest.fixture(scope="module")
def wmnt(wvm: VM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(wvm.socket, tmp_path_factory.mktemp("wmnt") / "qom") as m:
        yield m


@pytest.fixture(scope="module")
def qmp(wvm: VM) -> Iterator[RawQMP]:
    with wvm.qmp() as q:
        yield q


def qget(qmp: RawQMP, path: str) -> Any:
    obj, name = posixpath.split(path)
    return qmp.cmd("qom-get", path=obj, property=name)


def qset(qmp: RawQMP, path: str, value: Any) -> None:
    obj, name = posixpath.split(path)
    qmp.cmd("qom-set", path=obj, property=name, value=value)


def sets(mnt: Mount) -> int:
    """qom-set commands the daemon has sent."""
    return int(mnt.stats()["commands"].get("qom-set", 0))


def bash(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def fs(mnt: Mount, path: str) -> Path:
    return mnt.path / path.lstrip("/")


def test_tr_of_10_mib_is_refused_and_sets_nothing(wmnt: Mount, qmp: RawQMP) -> None:
    """The issue's case: tr writes 8 KiB at a time; EFBIG, and no 64 KiB prefix set."""
    qset(qmp, "/machine/append", "console=ttyS0")
    before = sets(wmnt)
    res = bash(f"head -c 10M /dev/zero | tr '\\0' a > {fs(wmnt, '/machine/append')}")
    assert res.returncode != 0 and "File too large" in res.stderr, res.stderr
    assert qget(qmp, "/machine/append") == "console=ttyS0"
    assert sets(wmnt) == before


def test_a_value_in_many_writes_is_set_once(wmnt: Mount, qmp: RawQMP, tmp_path: Path) -> None:
    """cat from a pipe and tr write a value in pieces: one qom-set of the whole, at close."""
    src = tmp_path / "value"
    text = "k" * 19999
    src.write_text(text + "\n")
    target = fs(wmnt, "/machine/kernel")
    writers = [
        # cat gets the value from the pipe in two pieces, so writes it in two calls
        f"(head -c 8192 {src}; sleep 0.3; tail -c +8193 {src}) | cat > {target}",
        f"tr x k < {src} > {target}",  # stdio: 8 KiB writes
        f"dd if={src} of={target} status=none",  # 512-byte writes
    ]
    for i, script in enumerate(writers):
        qset(qmp, "/machine/kernel", f"old{i}")
        before = sets(wmnt)
        res = bash(script)
        assert res.returncode == 0, (script, res.stderr)
        assert qget(qmp, "/machine/kernel") == text, script
        assert sets(wmnt) == before + 1, script


def test_json_split_over_two_write_calls(wmnt: Mount, qmp: RawQMP) -> None:
    """Half a JSON value is no error: the whole is set at close, in one qom-set."""
    before = sets(wmnt)
    fd = os.open(fs(wmnt, LIMITS), os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b'{"iops-total": 1')
        os.write(fd, b'00, "bps-total": 4096}\n')
        assert sets(wmnt) == before  # nothing yet
    finally:
        os.close(fd)
    limits = qget(qmp, LIMITS)
    assert limits["iops-total"] == 100 and limits["bps-total"] == 4096
    assert sets(wmnt) == before + 1


def test_echo_sees_its_error_at_once(wmnt: Mount, qmp: RawQMP) -> None:
    """bash's echo ignores close(): its error must come from write() itself."""
    graphics = qget(qmp, "/machine/graphics")
    before = sets(wmnt)
    res = bash(f"echo maybe > {fs(wmnt, '/machine/graphics')}")
    assert res.returncode != 0 and "Invalid argument" in res.stderr, res.stderr
    assert sets(wmnt) == before  # refused before any command
    res = bash(f"echo maybe > {fs(wmnt, '/machine/acpi')}")  # an enum: QEMU says no
    assert res.returncode != 0 and "Invalid argument" in res.stderr, res.stderr
    res = bash(f"echo '{{\"iops-total\": 5' > {fs(wmnt, LIMITS)}")  # an unclosed struct
    assert res.returncode != 0 and "Invalid argument" in res.stderr, res.stderr
    assert qget(qmp, "/machine/graphics") == graphics and qget(qmp, "/machine/acpi") == "auto"
    new = "false" if graphics else "true"
    res = bash(f"printf %s {new} > {fs(wmnt, '/machine/graphics')}")  # no newline
    assert res.returncode == 0 and qget(qmp, "/machine/graphics") is (not graphics)
    qset(qmp, "/machine/graphics", graphics)


def test_dd_and_python_see_a_refusal_at_close(wmnt: Mount, qmp: RawQMP, tmp_path: Path) -> None:
    """QEMU refuses a value written in several pieces: the error comes at close,
    the old value stays, and the value was sent once."""
    acpi = fs(wmnt, "/machine/acpi")
    src = tmp_path / "bad"
    src.write_text("x" * 9999 + "\n")
    before = sets(wmnt)
    res = bash(f"dd if={src} of={acpi} bs=4k status=none")
    assert res.returncode != 0 and "Invalid argument" in res.stderr, res.stderr
    res = bash(f"cat {src} > {acpi}")
    assert res.returncode != 0 and "Invalid argument" in res.stderr, res.stderr
    with pytest.raises(OSError) as exc, open(acpi, "w") as f:
        f.write("x" * 9999 + "\n")
    assert exc.value.errno == errno.EINVAL
    assert qget(qmp, "/machine/acpi") == "auto"
    assert sets(wmnt) == before + 3


def test_a_writer_killed_mid_value_sets_nothing(wmnt: Mount, qmp: RawQMP) -> None:
    """Ctrl-C or SIGKILL in the middle of a value: the kernel closes the file as
    close() would, but the daemon sees the writer dying of a signal."""
    kernel = fs(wmnt, "/machine/kernel")
    qset(qmp, "/machine/kernel", "keep")
    before = sets(wmnt)
    with open(kernel, "wb") as out:  # closed at once: a FLUSH with nothing written
        cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=out)
    assert cat.stdin is not None
    cat.stdin.write(b"k" * 9000)  # one write() of 9000 bytes: kept for more
    cat.stdin.flush()
    wait_for(lambda: Path(f"/proc/{cat.pid}/io").read_text().find("syscw: 1") >= 0, 10, "cat")
    cat.send_signal(signal.SIGINT)
    assert cat.wait(timeout=10) == -signal.SIGINT
    script = (
        f"import os, signal; fd = os.open({str(kernel)!r}, os.O_WRONLY | os.O_TRUNC); "
        "os.write(fd, b'p' * 9000); os.kill(os.getpid(), signal.SIGKILL)"
    )
    res = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert res.returncode == -signal.SIGKILL
    assert qget(qmp, "/machine/kernel") == "keep" and sets(wmnt) == before
    # Exiting without close() is no kill: the value is set.
    script = script.replace("os.kill(os.getpid(), signal.SIGKILL)", "os._exit(3)")
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == 3
    assert qget(qmp, "/machine/kernel") == "p" * 9000 and sets(wmnt) == before + 1


def test_offsets_and_truncation(wmnt: Mount, qmp: RawQMP) -> None:
    kernel = fs(wmnt, "/machine/kernel")
    qset(qmp, "/machine/kernel", "keep")
    res = bash(f"echo abc | dd of={kernel} seek=1 status=none")  # a hole: refused
    assert res.returncode != 0 and "Invalid argument" in res.stderr
    assert qget(qmp, "/machine/kernel") == "keep"
    res = bash(f"echo abc | dd of={kernel} conv=notrunc status=none")
    assert res.returncode == 0 and qget(qmp, "/machine/kernel") == "abc"
    # pwrite at 0 again: the value written last counts; ftruncate(0) drops it.
    before = sets(wmnt)
    fd = os.open(kernel, os.O_WRONLY)
    try:
        os.write(fd, b"x" * 512)
        os.pwrite(fd, b"second\n", 0)
        assert qget(qmp, "/machine/kernel") == "second"
        os.pwrite(fd, b"y" * 512, 0)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    assert qget(qmp, "/machine/kernel") == "second" and sets(wmnt) == before + 1


def test_two_echos_into_one_file(wmnt: Mount, qmp: RawQMP) -> None:
    """The residual case: a whole-looking first line, then more on the same file.
    The first line is set by its write; what follows, with it, at close."""
    before = sets(wmnt)
    res = bash(f"(echo a; echo b) > {fs(wmnt, '/machine/kernel')}")
    assert res.returncode == 0
    assert qget(qmp, "/machine/kernel") == "a\nb" and sets(wmnt) == before + 2
    res = bash(f"(echo true; echo false) > {fs(wmnt, '/machine/graphics')}")
    assert res.returncode != 0 and "Invalid argument" in res.stderr  # the second echo's
    assert qget(qmp, "/machine/graphics") is True


def test_symlinks_list_no_unreadable_xattrs(wmnt: Mount) -> None:
    link = fs(wmnt, "/machine/q35/parent_bus")
    assert os.listxattr(link, follow_symlinks=False) == []
    res = subprocess.run(["getfattr", "-h", "-d", str(link)], capture_output=True, text=True)
    assert res.returncode == 0 and "No such attribute" not in res.stderr, res.stderr
    assert "user.qom.type" in os.listxattr(fs(wmnt, "/machine/graphics"))


def test_no_libfuse_thread_warning(wmnt: Mount) -> None:
    """libfuse 3.14.0 complained of mfusepy's max_idle_threads (-1) at every mount."""
    os.listdir(wmnt.path)
    assert "Ignoring invalid max threads value" not in wmnt.logtext()
