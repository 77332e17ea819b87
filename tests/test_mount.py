"""End to end: a real QEMU, a real FUSE mount, real tools.

Every expectation comes from QEMU itself through an independent raw QMP
client on the VM's second monitor, never from qomfs's own output.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import posixpath
import stat
import subprocess
import time

import pytest

from tests.harness import VM, Mount, assert_mount_matches, expected_text, fs_path, walk_qmp


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=check)


def sh(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def tree(vm: VM) -> dict[str, list[dict[str, str]]]:
    with vm.qmp() as qmp:
        return walk_qmp(qmp)


def test_tree_matches_qmp(mnt: Mount, vm: VM, tree: dict[str, list[dict[str, str]]]) -> None:
    """Every object, property and link of the bare q35 is in the mount, right."""
    with vm.qmp() as qmp:
        assert_mount_matches(mnt, qmp, tree)


def test_example_session(mnt: Mount, vm: VM) -> None:
    """The session from the README, with the real shell tools."""
    with vm.qmp() as qmp:
        root = sorted(p["name"] for p in qmp.cmd("qom-list", path="/"))
        machine_type = qmp.cmd("qom-get", path="/machine", property="type")
        bus = qmp.cmd("qom-get", path="/machine/q35", property="parent_bus")
        graphics = qmp.cmd("qom-get", path="/machine", property="graphics")
        assert run("ls", str(mnt.path)).stdout.split() == root
        assert run("cat", f"{mnt.path}/machine/type").stdout == machine_type + "\n"
        link = run("readlink", f"{mnt.path}/machine/q35/parent_bus").stdout.strip()
        assert link == posixpath.relpath(bus, "/machine/q35")
        try:
            new = "false" if graphics else "true"
            res = sh(f"echo {new} > {mnt.path}/machine/graphics")
            assert res.returncode == 0, res.stderr
            assert qmp.cmd("qom-get", path="/machine", property="graphics") is (not graphics)
            assert run("cat", f"{mnt.path}/machine/graphics").stdout == f"{new}\n"
        finally:
            qmp.cmd("qom-set", path="/machine", property="graphics", value=graphics)


def test_ls_find_grep_stat(mnt: Mount, tree: dict[str, list[dict[str, str]]]) -> None:
    props = [(o, p) for o, ps in tree.items() for p in ps]
    links = sum(p["type"].startswith("link<") for _, p in props)
    children = sum(p["type"].startswith("child<") for _, p in props)
    files = len(props) - links - children
    m = str(mnt.path)
    assert run("ls", "-R", m).returncode == 0
    assert run("ls", "-lR", m).returncode == 0
    assert len(run("find", m, "-type", "l").stdout.splitlines()) == links
    assert len(run("find", m, "-type", "d").stdout.splitlines()) == len(tree)
    assert len(run("find", m, "-type", "f").stdout.splitlines()) == files
    # grep -r reads every file; unreadable properties make it exit 2.
    grep = run("grep", "-r", "-c", "", f"{m}/machine/q35", check=False)
    assert grep.returncode in (0, 2)
    counts = dict(line.rsplit(":", 1) for line in grep.stdout.splitlines())
    assert counts[f"{m}/machine/q35/type"] == "1"
    st = run("stat", "-c", "%u %g %F", f"{m}/machine/type").stdout.strip().split(maxsplit=2)
    assert st == [str(os.getuid()), str(os.getgid()), "regular file"]


def test_inodes_are_stable_and_distinct(mnt: Mount, tree: dict[str, list[dict[str, str]]]) -> None:
    paths = [fs_path(mnt, o) / p["name"] for o, ps in list(tree.items())[:20] for p in ps]
    first = [os.lstat(p).st_ino for p in paths]
    second = [os.lstat(p).st_ino for p in paths]
    assert first == second
    assert len(set(first)) == len(first)
    # readdir reports the same inode (and type) as stat, so ls -R needs no stat
    with os.scandir(mnt.path / "machine") as it:
        for entry in it:
            assert entry.inode() == os.lstat(entry.path).st_ino


def test_size_is_the_length_of_the_text(mnt: Mount, vm: VM) -> None:
    """``st_size`` is what a reader gets, read whole or in small pieces."""
    with vm.qmp() as qmp:
        smp = qmp.cmd("qom-get", path="/machine", property="smp")
    path = mnt.path / "machine" / "smp"
    assert os.stat(path).st_size == len(expected_text(smp).encode())
    assert json.loads(path.read_text()) == smp
    with open(path, "rb", buffering=0) as f:
        chunks = []
        while chunk := f.read(7):
            chunks.append(chunk)
    assert json.loads(b"".join(chunks)) == smp


@pytest.mark.parametrize(
    ("prop", "text", "err"),
    [
        ("graphics", "maybe", "Invalid argument"),
        ("graphics", '"true"', "Invalid argument"),
        ("type", "pc", "Permission denied"),
        ("unattached", "x", "Is a directory"),
    ],
)
def test_bad_writes_fail_and_change_nothing(
    mnt: Mount, vm: VM, prop: str, text: str, err: str
) -> None:
    with vm.qmp() as qmp:
        before = qmp.cmd("qom-get", path="/machine", property=prop)
        res = sh(f"echo '{text}' > {mnt.path}/machine/{prop}")
        assert res.returncode != 0
        assert err in res.stderr
        assert qmp.cmd("qom-get", path="/machine", property=prop) == before


def test_missing_paths_are_enoent(mnt: Mount) -> None:
    with pytest.raises(FileNotFoundError):
        (mnt.path / "machine" / "nope").read_text()
    with pytest.raises(FileNotFoundError):
        os.listdir(mnt.path / "nope")
    with pytest.raises(NotADirectoryError):
        os.stat(mnt.path / "machine" / "type" / "x")
    for op in (
        lambda: os.mkdir(mnt.path / "machine" / "new"),
        lambda: os.unlink(mnt.path / "machine" / "type"),
        lambda: (mnt.path / "machine" / "newfile").write_text("1"),
    ):
        with pytest.raises(PermissionError):
            op()


def test_listing_then_stat_costs_nothing(mnt: Mount, vm: VM) -> None:
    """The cache: stat after a listing and repeated reads within the TTL.

    Without qom-list-get (QEMU 7.2) a property's size costs its value, one
    qom-get; objects and links cost nothing.  Reads after that cost nothing.
    """
    time.sleep(1.1)  # no walk of an earlier test goes on
    d = mnt.path / "machine" / "q35"
    names = os.listdir(d)
    before = mnt.settled_commands()  # what the listing read ahead counts for it
    files = [name for name in names if stat.S_ISREG(os.lstat(d / name).st_mode)]
    assert 0 < mnt.commands() - before <= len(files)
    after_stat = mnt.commands()
    (d / "type").read_text()
    (d / "type").read_text()
    assert mnt.commands() == after_stat


def test_ls_r_costs_one_command_per_object(
    mnt: Mount, tree: dict[str, list[dict[str, str]]]
) -> None:
    time.sleep(1.1)  # let the TTL run out: a cold walk
    before = mnt.stats()["commands"]
    run("ls", "-R", str(mnt.path))
    after = mnt.stats()["commands"]
    spent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert sum(spent.values()) <= len(tree) + 2, spent
    assert spent.get("qom-get", 0) == 0, spent


def spent_on(mnt: Mount, *cmd: str) -> dict[str, int]:
    """The QMP commands ``cmd`` costs from a cold cache (read-ahead included)."""
    time.sleep(1.1)  # let the TTL run out
    before = mnt.stats()["commands"]
    run(*cmd, check=False)
    mnt.settled_commands()  # read-ahead still under way counts for this walk
    after = mnt.stats()["commands"]
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def test_walks_cost_what_their_reads_need(
    mnt: Mount, tree: dict[str, list[dict[str, str]]]
) -> None:
    """Read-ahead fetches what the walker reads next, and nothing more: grep -r
    needs one qom-get per plain property, ls -lR one per link (readlink) and,
    without qom-list-get (QEMU 7.2), one per plain property (its size).

    With the kernel's page cache (not the default) a value fetched ahead
    more than half the TTL before the walker stats it is fetched again: a
    few percent on a loaded machine (6% seen under a load of 10), hence the
    slack."""
    plain = sum(not p["type"].startswith(("child<", "link<")) for ps in tree.values() for p in ps)
    links = sum(p["type"].startswith("link<") for ps in tree.values() for p in ps)
    objects = len(tree)
    slack = 3 + plain // 10
    grep = spent_on(mnt, "grep", "-r", ".", str(mnt.path))
    assert objects <= grep["qom-list"] <= objects + 3 + objects // 20, grep
    assert plain <= grep["qom-get"] <= plain + slack, grep
    ls = spent_on(mnt, "ls", "-lR", str(mnt.path))
    assert objects <= ls["qom-list"] <= objects + 3 + objects // 20, ls
    assert links + plain <= ls["qom-get"] <= links + plain + slack, ls
    find = spent_on(mnt, "find", str(mnt.path), "-type", "f")
    assert objects <= find["qom-list"] <= objects + 3 and "qom-get" not in find, find


def test_parallel_greps_agree_and_share_commands(mnt: Mount) -> None:
    """8 parallel grep -r see exactly what one sees, for about one's QMP cost."""
    target = str(mnt.path / "machine" / "q35")

    def grep() -> str:
        res = run("grep", "-r", ".", target, check=False)
        return "".join(sorted(res.stdout.splitlines(keepends=True)))

    time.sleep(1.1)
    before = mnt.commands()
    alone = grep()
    one = mnt.commands() - before
    time.sleep(1.1)  # cold again
    before = mnt.commands()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(lambda _: grep(), range(8)))
    eight = mnt.commands() - before
    assert alone and all(out == alone for out in outputs)
    assert one > 10
    assert eight <= 2 * one, (one, eight)  # one fetch per key serves all waiters
