"""Fitting in: xattrs, many VMs per mount, mount(8)/fstab, libfuse2 with fusepy."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import (
    ROOT,
    VM,
    Mount,
    missing,
    mounted,
    qemu_vm,
    require_fuse,
    unmount,
    wait_for,
)


def getfattr(path: Path, name: str) -> str:
    out = subprocess.run(
        ["getfattr", "-h", "--only-values", "-n", name, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_xattrs_type_and_description(mnt: Mount, vm: VM) -> None:
    if shutil.which("getfattr") is None:
        missing("getfattr is not installed (package attr; run scripts/install-deps)")
    with vm.qmp() as qmp:
        props = {p["name"]: p["type"] for p in qmp.cmd("qom-list", path="/machine/q35")}
        for name, qom_type in props.items():
            if qom_type.startswith("child<"):  # a directory: the object's own class
                props[name] = qmp.cmd("qom-get", path=f"/machine/q35/{name}", property="type")
        cls = qmp.cmd("qom-get", path="/machine/q35", property="type")
        descriptions = {
            p["name"]: p.get("description", "")
            for p in qmp.cmd("qom-list-properties", typename="pc-q35-7.2-machine")
        }
    time.sleep(1.1)  # no walk of an earlier test goes on
    d = mnt.path / "machine" / "q35"
    os.listdir(d)
    mnt.settled_commands()  # what the listing read ahead counts for it
    before = mnt.stats()["commands"]
    for name, qom_type in props.items():
        if qom_type.startswith("link<"):
            continue  # Linux allows user.* xattrs on files and directories only
        assert getfattr(d / name, "user.qom.type") == qom_type, name
    after = mnt.stats()["commands"]
    # listxattr/getxattr of type: no QMP command; getfattr's stat of a file
    # may cost its value (its size, on QEMU 7.2) and nothing else.
    spent = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert set(spent) <= {"qom-get"}, spent
    assert spent.get("qom-get", 0) <= len(props), spent
    assert getfattr(d, "user.qom.type") == cls
    dump = subprocess.run(
        ["getfattr", "-h", "-d", str(mnt.path / "machine" / "graphics")],
        capture_output=True,
        text=True,
    ).stdout
    assert "user.qom.type=" in dump and "user.qom.description=" in dump
    assert (
        getfattr(mnt.path / "machine" / "graphics", "user.qom.description")
        == descriptions["graphics"]
    )


def test_foreign_xattrs_are_not_supported(mnt: Mount) -> None:
    """security.* and system.* say ENOTSUP (ls -l then stops asking), user.* works."""
    for path in (mnt.path / "machine", mnt.path / "machine" / "graphics"):
        for name in ("security.selinux", "system.posix_acl_access"):
            with pytest.raises(OSError) as info:
                os.getxattr(path, name)
            assert info.value.errno == errno.ENOTSUP, (path, name)
        assert os.getxattr(path, "user.qom.type")
    with pytest.raises(OSError) as info:
        os.getxattr(mnt.path / "machine" / "graphics", "user.nope")
    assert info.value.errno == errno.ENODATA


@contextlib.contextmanager
def vms_in_dir(work: Path, n: int) -> Iterator[tuple[Path, list[VM]]]:
    sockdir = work / "sockets"
    sockdir.mkdir()
    with contextlib.ExitStack() as stack:
        vms = [stack.enter_context(qemu_vm(work / f"w{i}", name=f"vm{i}")) for i in range(n)]
        for vm in vms:
            # A symlink to each VM's socket: what the forest sees as a socket.
            os.symlink(vm.socket, sockdir / vm.socket.stem)
        yield sockdir, vms


def test_many_vms_one_mount_survives_one_dying(tmp_path: Path) -> None:
    """Three VMs; one killed mid-run; the others answer all along."""
    require_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with vms_in_dir(tmp_path, 3) as (sockdir, vms):
        proc = subprocess.Popen(
            [sys.executable, "-m", "qomfs", "-f", "--socket-dir", str(sockdir), str(mnt)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: os.path.ismount(mnt), 20, "the forest mount")
            names = sorted(os.listdir(mnt))
            assert names == sorted(vm.socket.stem for vm in vms)
            with vms[0].qmp() as qmp:
                want = qmp.cmd("qom-get", path="/machine", property="type") + "\n"
            errors: list[str] = []
            stop = threading.Event()

            def reader(name: str) -> None:
                while not stop.is_set():
                    try:
                        assert (mnt / name / "machine" / "type").read_text() == want
                        os.listdir(mnt / name / "machine" / "q35")
                    except (OSError, AssertionError) as err:
                        errors.append(f"{name}: {err!r}")
                    time.sleep(0.01)

            threads = [threading.Thread(target=reader, args=(n,)) for n in names[1:]]
            for t in threads:
                t.start()
            time.sleep(0.5)
            vms[0].kill()
            wait_for(lambda: names[0] not in os.listdir(mnt), 3, "the dead VM to vanish")
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(timeout=10)
            assert errors == []
            with pytest.raises(OSError):
                (mnt / names[0] / "machine" / "type").read_text()
        finally:
            unmount(mnt)
            proc.wait(timeout=20)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


def test_mount_fuse_and_fstab_form(vm: VM, tmp_path: Path) -> None:
    """mount -t fuse.qom-fuse SOCKET MNT -o ro (what an fstab line does)."""
    require_fuse()
    helper = shutil.which("mount.fuse3") or shutil.which("mount.fuse")
    if helper is None:
        missing("mount.fuse3 is not installed (package fuse3)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    command = Path(sys.executable).parent / "qom-fuse"
    if not command.exists():
        missing(f"{command} is not installed (pip install -e .)")
    with qemu_vm(tmp_path, name="fstab") as own:
        # mount(8) runs helpers with a fixed PATH, where a virtualenv's
        # qom-fuse is not: name it in the source as mount.fuse allows
        # ("PROGRAM#SOURCE"); mount.fuse then runs PROGRAM SOURCE MNT -o OPTS.
        res = subprocess.run(
            ["mount", "-t", "fuse", f"{command}#{own.socket}", str(mnt), "-o", "ro,ttl=2"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        try:
            assert res.returncode == 0, res.stderr
            assert os.path.ismount(mnt)
            with own.qmp() as qmp:
                want = qmp.cmd("qom-get", path="/machine", property="type") + "\n"
            assert (mnt / "machine" / "type").read_text() == want
            with pytest.raises(OSError) as exc:
                (mnt / "machine" / "graphics").write_text("false\n")
            assert exc.value.errno == 30  # EROFS
            line = next(
                ln for ln in Path("/proc/mounts").read_text().splitlines() if str(mnt) in ln
            )
            assert "fuse.qom-fuse" in line and " ro," in line
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
        assert not os.path.ismount(mnt)


def test_libfuse2_with_fusepy(tmp_path: Path) -> None:
    """The same filesystem through plain fusepy on libfuse2."""
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as err:
        missing(f"fusepy/libfuse2 not usable: {err} (run scripts/install-deps)")
    with (
        qemu_vm(tmp_path) as own,
        mounted(own.socket, tmp_path / "mnt", env={"QOMFS_FUSE": "fusepy"}) as m,
    ):
        maps = Path(f"/proc/{m.proc.pid}/maps").read_text()
        assert "libfuse.so.2" in maps and "libfuse3" not in maps
        with own.qmp() as qmp:
            want = qmp.cmd("qom-get", path="/machine", property="type") + "\n"
            link = qmp.cmd("qom-get", path="/machine/q35", property="parent_bus")
            assert (m.path / "machine" / "type").read_text() == want
            assert os.readlink(m.path / "machine" / "q35" / "parent_bus") == os.path.relpath(
                link, "/machine/q35"
            )
            res = subprocess.run(
                ["bash", "-c", f"echo false > {m.path}/machine/graphics"], capture_output=True
            )
            assert res.returncode == 0
            assert qmp.cmd("qom-get", path="/machine", property="graphics") is False
            res = subprocess.run(
                ["bash", "-c", f"echo maybe > {m.path}/machine/graphics"],
                capture_output=True,
                text=True,
            )
            assert res.returncode != 0 and "Invalid argument" in res.stderr
        assert os.stat(m.path / "machine" / "type").st_mtime > 1e9  # real times
