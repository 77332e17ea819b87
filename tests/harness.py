"""Test-only helpers over qomfs.vm: skip-or-fail when QEMU or FUSE is missing,
and independent checks of a mount against plain QMP.

A missing QEMU or FUSE fails the test in CI (``CI`` set) and skips it, with
the reason, on a developer's machine.  Starting VMs and mounts lives in
``qomfs.vm`` (the scripts use it too); its names are re-exported here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qomfs import vm as _vm
from qomfs.vm import (
    BARE_Q35,
    QEMU,
    QEMU11,
    QEMU11_ROOT,
    STATS_XATTR,
    VM,
    Mount,
    RawQMP,
    Unavailable,
    big_vm_args,
    qomfs_command,
    unmount,
    wait_for,
)

__all__ = [
    "BARE_Q35",
    "QEMU",
    "QEMU11",
    "QEMU11_ROOT",
    "ROOT",
    "STATS_XATTR",
    "VM",
    "Mount",
    "RawQMP",
    "Unavailable",
    "assert_mount_matches",
    "big_vm_args",
    "expected_text",
    "fs_path",
    "missing",
    "mounted",
    "qemu11_vm",
    "qemu_vm",
    "qomfs_command",
    "require_fuse",
    "require_qemu",
    "unmount",
    "wait_for",
    "walk_qmp",
]

ROOT = Path(__file__).resolve().parent.parent


def missing(reason: str) -> None:
    """Fail in CI, skip elsewhere, and say why."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"CI needs this: {reason}")
    pytest.skip(reason)


def require_qemu(qemu: str = QEMU) -> None:
    problem = _vm.qemu_problem(qemu)
    if problem:
        missing(problem)


def require_fuse() -> None:
    problem = _vm.fuse_problem()
    if problem:
        missing(problem)


def qemu_vm(
    workdir: Path,
    extra: Sequence[str] = (),
    qemu: Sequence[str] | None = None,
    sock_dir: Path | None = None,
    name: str = "vm",
) -> contextlib.AbstractContextManager[VM]:
    """qomfs.vm.qemu_vm, skipped (or failed in CI) when the QEMU is missing."""
    require_qemu((list(qemu) if qemu else [QEMU])[0])
    return _vm.qemu_vm(workdir, extra, qemu=qemu, sock_dir=sock_dir, name=name)


def qemu11_vm(tmp_path_factory: Any, tag: str) -> contextlib.AbstractContextManager[VM]:
    """A QEMU 11.1 VM in its chroot (socket under the chroot's /tmp, named
    ``<tag><pid>``, workdir ``<tag>11``); skipped (or failed in CI) without it.

    ``tmp_path_factory`` is pytest's fixture of that name."""
    if not (QEMU11_ROOT / "usr/bin/qemu-system-x86_64").exists():
        missing(f"QEMU 11.1 chroot missing at {QEMU11_ROOT} (run scripts/qemu11-setup)")
    work = tmp_path_factory.mktemp(f"{tag}11")
    return qemu_vm(work, qemu=QEMU11, sock_dir=QEMU11_ROOT / "tmp", name=f"{tag}{os.getpid()}")


def mounted(
    socket_path: Path | str,
    mountpoint: Path,
    *args: str,
    env: dict[str, str] | None = None,
    check_exit: bool = True,
    listen: bool = False,
) -> contextlib.AbstractContextManager[Mount]:
    """qomfs.vm.mounted (``qom-fuse -f -v``), skipped (or failed in CI) without FUSE."""
    require_fuse()
    return _vm.mounted(
        socket_path, mountpoint, *args, env=env, check_exit=check_exit, listen=listen
    )


def walk_qmp(qmp: RawQMP, root: str = "/") -> dict[str, list[dict[str, str]]]:
    """Every object path of the tree -> its qom-list, by plain QMP."""
    out: dict[str, list[dict[str, str]]] = {}
    todo = [root]
    while todo:
        path = todo.pop()
        props = qmp.cmd("qom-list", path=path)
        out[path] = props
        for p in props:
            if p["type"].startswith("child<"):
                todo.append(path.rstrip("/") + "/" + p["name"])
    return out


def expected_text(value: Any) -> str:
    """The documented text format, written independently of qomfs.values."""
    if value is True:
        return "true\n"
    if value is False:
        return "false\n"
    if isinstance(value, str):
        return value + "\n"
    if isinstance(value, int):
        return f"{value}\n"
    return json.dumps(value) + "\n"


def fs_path(mnt: Mount, qom_path: str) -> Path:
    return mnt.path / qom_path.lstrip("/")


def assert_mount_matches(mnt: Mount, qmp: RawQMP, tree: dict[str, list[dict[str, str]]]) -> None:
    """Every object, property and link of ``tree`` is in the mount, right.

    Values come from ``qmp`` (an independent client); a value that differs
    is read again from QEMU and must have moved on its own (rtc-time).
    """
    import pytest

    assert len(tree) > 200  # a bare q35 has ~250 objects
    checked = {"dir": 0, "link": 0, "file": 0, "unreadable": 0}
    for obj, props in tree.items():
        d = fs_path(mnt, obj)
        assert sorted(os.listdir(d)) == sorted(p["name"] for p in props), obj
        for p in props:
            path = d / p["name"]
            qom = posixpath.join(obj, p["name"])
            st = os.lstat(path)
            if p["type"].startswith("child<"):
                assert stat.S_ISDIR(st.st_mode), qom
                checked["dir"] += 1
                continue
            try:
                value = qmp.cmd("qom-get", path=obj, property=p["name"])
            except RuntimeError as err:
                with pytest.raises(OSError) as exc:
                    path.read_bytes()
                want = errno.EACCES if "not readable" in err.args[1] else errno.EIO
                assert exc.value.errno == want, (qom, err.args)
                checked["unreadable"] += 1
                continue
            if p["type"].startswith("link<"):
                assert stat.S_ISLNK(st.st_mode), qom
                target = os.readlink(path)
                if value:
                    assert target == posixpath.relpath(value, obj), qom
                    assert os.path.realpath(path) == str(fs_path(mnt, value)), qom
                else:
                    assert target == "(unset)"
                    assert not os.path.exists(path)  # dangling, by design
                checked["link"] += 1
                continue
            assert stat.S_ISREG(st.st_mode), qom
            text = path.read_text()
            if text != expected_text(value):
                # A few values move on their own (rtc-time, date), and the
                # mount may show one up to its TTL old: such a value must be
                # seen to change in QEMU itself within a second.
                time.sleep(1.1)
                again = qmp.cmd("qom-get", path=obj, property=p["name"])
                assert again != value, (qom, text, value)
            checked["file"] += 1
    assert checked["dir"] == len(tree) - 1
    assert checked["link"] > 200 and checked["file"] > 1000, checked
    assert checked["unreadable"] >= 1, checked
