"""Debian 13 (trixie) as its users have it: its own QEMU 10.0 (no qom-list-get)
under a qomfs mount, and its Python 3.13 running the unit tests and a real mount
test, in the chroot that scripts/qemu10-setup makes.

The 3.13 runs use a copy of this tree inside the chroot (the chroot cannot see
the host's files); /dev and /proc are mounted in a private mount namespace that
ends with the run, so nothing stays mounted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.harness import ROOT, VM, Mount, assert_mount_matches, missing, mounted, walk_qmp
from tests.qemus import QEMU10_ROOT, any_qemu_vm

PYTHON = "/opt/qomfs-venv/bin/python"
#: The tests that need neither QEMU nor FUSE.
UNIT_TESTS = [
    "tests/test_values.py",
    "tests/test_cache.py",
    "tests/test_model.py",
    "tests/test_readahead.py",
    "tests/test_qmp.py",
    "tests/test_shell_parse.py",
    "tests/test_shell_schema.py",
]
#: The real mount test run under Python 3.13, on QEMU 10.0: the whole tree
#: through the mount, against plain QMP.
MOUNT_TEST = "tests/test_mount.py::test_tree_matches_qmp"


def need_chroot() -> None:
    if not (QEMU10_ROOT / PYTHON.lstrip("/")).exists():
        missing(f"the Debian 13 chroot is missing at {QEMU10_ROOT} (run scripts/qemu10-setup)")
    if os.geteuid() != 0:
        missing("running in the Debian 13 chroot needs root")


@pytest.fixture(scope="module")
def vm10(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    with any_qemu_vm("10.0", tmp_path_factory.mktemp("vm10"), "d13") as machine:
        yield machine


@pytest.fixture(scope="module")
def mnt10(vm10: VM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(vm10.socket, tmp_path_factory.mktemp("mnt10") / "qom") as m:
        yield m


def test_qemu_10_has_no_qom_list_get(vm10: VM, mnt10: Mount) -> None:
    with vm10.qmp() as qmp:
        version = qmp.cmd("query-version")["qemu"]
        commands = {c["name"] for c in qmp.cmd("query-commands")}
    assert (version["major"], version["minor"]) == (10, 0)
    assert "qom-list-get" not in commands
    stats = mnt10.stats()
    assert stats["qemu"].startswith("10.0.") and stats["batch"] is False


def test_qemu_10_tree_matches_qmp(vm10: VM, mnt10: Mount) -> None:
    with vm10.qmp() as qmp:
        assert_mount_matches(mnt10, qmp, walk_qmp(qmp))


@pytest.fixture(scope="module")
def tree_copy() -> Iterator[str]:
    """This tree's qomfs and tests, copied into the chroot; the path inside it."""
    need_chroot()
    inside = f"/tmp/qomfs-py313-{os.getpid()}"
    host = QEMU10_ROOT / inside.lstrip("/")
    shutil.rmtree(host, ignore_errors=True)
    host.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("qomfs", "tests"):
        shutil.copytree(ROOT / name, host / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", host / "pyproject.toml")
    # Hypothesis fails an example that takes over 200 ms: a timing assertion, which
    # a loaded 2-core machine breaks now and then (seen on test_int_round_trip).
    (host / "no_deadline.py").write_text(
        "from hypothesis import settings\n\n"
        'settings.register_profile("no-deadline", deadline=None)\n'
        'settings.load_profile("no-deadline")\n'
    )
    yield inside
    shutil.rmtree(host, ignore_errors=True)


def in_chroot(workdir: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``PYTHON ARGS`` in the chroot, cwd ``workdir``, with /dev and /proc."""
    script = (
        'mount --bind /dev "$0/dev" && mount -t proc proc "$0/proc" && '
        'cd "$0" && exec chroot "$0" sh -c \'cd "$1" && shift && exec "$@"\' sh "$@"'
    )
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "LC_ALL": "C.UTF-8"}
    if os.environ.get("CI"):
        env["CI"] = os.environ["CI"]  # missing QEMU or FUSE fails there too
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(QEMU10_ROOT),
            workdir,
            PYTHON,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_python_is_3_13(tree_copy: str) -> None:
    r = in_chroot(tree_copy, "-c", "import sys; print(sys.version_info[:2])", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(3, 13)"


def test_unit_tests_under_python_3_13(tree_copy: str) -> None:
    r = in_chroot(
        tree_copy,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no_deadline",
        *UNIT_TESTS,
        timeout=600,
    )
    tail = r.stdout[-3000:]
    assert r.returncode == 0, tail + r.stderr[-2000:]
    assert " passed" in tail and "failed" not in tail and "skipped" not in tail, tail


def test_a_mount_under_python_3_13_on_qemu_10(tree_copy: str) -> None:
    """A real qom-fuse mount (libfuse3 and fusermount3 of Debian 13) of Debian
    13's QEMU, tested with the suite's own check of the whole tree."""
    r = in_chroot(
        tree_copy, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", MOUNT_TEST, timeout=600
    )
    tail = r.stdout[-3000:]
    assert r.returncode == 0, tail + r.stderr[-2000:]
    assert tail.splitlines()[-1].startswith("1 passed"), tail
