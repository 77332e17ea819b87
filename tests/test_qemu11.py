"""QEMU 11.1 (qom-list-get) in a trixie chroot: the batched path, for real.

scripts/qemu11-setup builds the chroot (scripts/test runs it).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, VM, Mount, assert_mount_matches, missing, mounted, qemu_vm, walk_qmp

CHROOT = Path(os.environ.get("QOMFS_QEMU11_ROOT", "/var/lib/qomfs/trixie"))
QEMU11 = [str(ROOT / "scripts" / "qemu11")]


@pytest.fixture(scope="module")
def vm11(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    if not (CHROOT / "usr/bin/qemu-system-x86_64").exists():
        missing(f"QEMU 11.1 chroot missing at {CHROOT} (run scripts/qemu11-setup)")
    sock_dir = CHROOT / "tmp"
    work = tmp_path_factory.mktemp("vm11")
    with qemu_vm(work, qemu=QEMU11, sock_dir=sock_dir, name=f"qomfs{os.getpid()}") as vm:
        yield vm


@pytest.fixture(scope="module")
def tree11(vm11: VM) -> dict[str, list[dict[str, str]]]:
    with vm11.qmp() as qmp:
        assert "qom-list-get" in {c["name"] for c in qmp.cmd("query-commands")}
        return walk_qmp(qmp)


@pytest.fixture(scope="module")
def mnt11(vm11: VM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(vm11.socket, tmp_path_factory.mktemp("mnt11") / "qom") as m:
        yield m


def test_uses_qom_list_get(mnt11: Mount) -> None:
    stats = mnt11.stats()
    assert stats["batch"] is True
    assert stats["qemu"].startswith("11.")


def test_tree_matches_qmp(mnt11: Mount, vm11: VM, tree11: dict[str, list[dict[str, str]]]) -> None:
    with vm11.qmp() as qmp:
        assert_mount_matches(mnt11, qmp, tree11)


def test_grep_r_costs_at_most_one_command_per_object(
    mnt11: Mount, tree11: dict[str, list[dict[str, str]]]
) -> None:
    time.sleep(1.2)  # past the TTL: a cold walk
    before = mnt11.stats()["commands"]
    grep = subprocess.run(
        ["grep", "-r", "-c", "", str(mnt11.path)], capture_output=True, text=True, timeout=120
    )
    assert grep.returncode in (0, 2)  # 2: a getter that fails (crash-information)
    after = mnt11.stats()["commands"]
    spent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    plain = sum(not p["type"].startswith(("child<", "link<")) for ps in tree11.values() for p in ps)
    # grep -r reads every regular file (it does not follow symlinks)
    assert len(grep.stdout.splitlines()) == plain  # a count for each, even failed ones
    assert sum(spent.values()) <= len(tree11), spent
    assert spent.get("qom-get", 0) <= 5, spent  # only properties with no value in the batch


def test_no_batch_uses_qom_list_and_qom_get(vm11: VM, tmp_path: Path) -> None:
    # The module's mount holds vm11's first monitor; a second VM is needed.
    sock_dir = CHROOT / "tmp"
    with (
        qemu_vm(tmp_path, qemu=QEMU11, sock_dir=sock_dir, name=f"nb{os.getpid()}") as vm,
        mounted(vm.socket, tmp_path / "mnt", "--no-batch") as m,
    ):
        assert m.stats()["batch"] is False
        (m.path / "machine" / "type").read_text()
        os.listdir(m.path / "machine")
        spent = m.stats()["commands"]
        assert "qom-list-get" not in spent
        assert spent["qom-get"] >= 1 and spent["qom-list"] >= 1


@pytest.mark.parametrize(
    "walker", [["ls", "-R", "."], ["find", ".", "-type", "d"]], ids=["ls-R", "find"]
)
def test_walks_list_many_objects_a_command(
    mnt11: Mount, tree11: dict[str, list[dict[str, str]]], walker: list[str]
) -> None:
    """A recursive walk gets the tree a level at a time, up to 64 objects a
    qom-list-get, in the order it lists them: far fewer commands than
    objects."""
    time.sleep(1.2)  # past the TTL: a cold walk
    before = mnt11.commands()
    done = subprocess.run(
        walker,
        cwd=mnt11.path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert done.returncode == 0, done.stderr
    spent = mnt11.settled_commands() - before
    # Every object, once: a directory line of find, a heading of ls -R.
    lines = done.stdout.splitlines()
    seen = [line for line in lines if line.endswith(":")] if walker[0] == "ls" else lines
    assert len(seen) == len(tree11)
    depth = max(path.count("/") for path in tree11)
    # 64 objects a command, and at worst two part-filled commands a level.
    assert spent <= len(tree11) // 64 + 2 * (depth + 1), spent
