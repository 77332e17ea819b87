"""The workloads on a qomfs mount: each tool run from a cold cache, timed, and
its QMP commands counted (Bench); comparing the outputs of parallel greps."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from qomfs.vm import Mount, RawQMP, proc_status_kib

from .common import COLD_WAIT, ENV, N_OPS, ROUNDS, SHORT_RUN, TOOL_TIMEOUT
from .tree import Tree, join


def best(n: int) -> str:
    return f"best of {n}" if n > 1 else ""


def wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    """Wait for every process; kill them all after ``timeout`` seconds.

    Not ``Popen.wait(timeout=...)``: that polls with sleeps of up to 50 ms,
    which would add up to 50 ms to every measured wall time.
    """

    def kill() -> None:
        for p in procs:
            with contextlib.suppress(OSError):
                p.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        rcs = [p.wait() for p in procs]
    finally:
        timer.cancel()
    if any(rc == -signal.SIGKILL for rc in rcs):
        raise TimeoutError(f"{procs[0].args!r} took longer than {timeout:g} s")
    return rcs


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] != before.get(k, 0)}


class Bench:
    def __init__(self, mount: Mount, tree: Tree, workdir: Path) -> None:
        self.m = mount
        self.tree = tree
        self.mnt = str(mount.path)
        self.workdir = workdir
        #: The FUSE requests of the last measured phase, by the operation that
        #: served them (from the daemon's count; the stats reads subtracted).
        self.last_fuse: dict[str, int] = {}
        self._fuse_at: dict[str, int] = {}
        one = self._fuse()
        self._stats_cost = delta(one, self._fuse())  # what reading the counts costs

    def _fuse(self) -> dict[str, int]:
        return dict(self.m.stats().get("fuse", {}))

    def counts(self) -> dict[str, int]:
        st = self.m.stats()
        fuse = dict(st.get("fuse", {}))
        if self._fuse_at:
            got = delta(self._fuse_at, fuse)
            for k, n in self._stats_cost.items():
                if k in got:
                    got[k] -= n
            self.last_fuse = {k: n for k, n in got.items() if n > 0}
        self._fuse_at = fuse
        return dict(st["commands"])

    def cold(self) -> None:
        time.sleep(COLD_WAIT)

    def settle(self) -> dict[str, int]:
        """The counts once the daemon's read-ahead has stopped issuing commands
        (so that they count for the phase that caused them)."""
        self.m.settled_commands(quiet=0.05, limit=3)
        return self.counts()

    def tool(self, argv: list[str], out: Path) -> tuple[float, dict[str, int], int, int]:
        """Run ``argv`` from a cold cache, stdout to ``out``.

        A run shorter than SHORT_RUN is noisy: it is repeated (each time
        cold) ROUNDS times.  Returns the best wall, the commands of the
        costliest run, the exit status, and the number of runs.
        """
        runs = [self.tools([argv], [out])]
        if runs[0][0] < SHORT_RUN:
            runs += [self.tools([argv], [out]) for _ in range(ROUNDS - 1)]
        wall = min(r[0] for r in runs)
        cmds = max((r[1] for r in runs), key=lambda c: sum(c.values()))
        return wall, cmds, runs[-1][2][0], len(runs)

    def tools(
        self, argvs: list[list[str]], outs: list[Path]
    ) -> tuple[float, dict[str, int], list[int]]:
        """Run the commands at once from a cold cache; wall until the last ends."""
        self.cold()
        before = self.counts()
        procs: list[subprocess.Popen[bytes]] = []
        with contextlib.ExitStack() as stack:
            files = [
                (
                    stack.enter_context(open(out, "wb")),
                    stack.enter_context(open(f"{out}.err", "wb")),
                )
                for out in outs
            ]
            t = time.perf_counter()
            try:
                for argv, (f, e) in zip(argvs, files, strict=True):
                    procs.append(subprocess.Popen(argv, stdout=f, stderr=e, env=ENV))
                rcs = wait_all(procs, TOOL_TIMEOUT)
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            wall = time.perf_counter() - t
        return wall, delta(before, self.counts()), rcs

    def par_grep(self, outs: list[Path]) -> tuple[float, dict[str, int], list[int]]:
        return self.tools([["grep", "-r", ".", self.mnt]] * len(outs), outs)

    def cat(self, path: str) -> tuple[float, dict[str, int], bytes]:
        """``cat path`` N_OPS times, in this process, from a cold cache."""
        self.cold()
        full = self.mnt + path
        before = self.counts()
        data = b""
        t = time.perf_counter()
        for _ in range(N_OPS):
            fd = os.open(full, os.O_RDONLY)
            try:
                data = os.read(fd, 65536)
            finally:
                os.close(fd)
        wall = time.perf_counter() - t
        return wall, delta(before, self.counts()), data

    def stat(
        self, files: list[str], dirs: list[str], cat: str
    ) -> tuple[float, dict[str, int], dict[str, int], dict[str, int]]:
        """List ``dirs``; then one cat, then lstat every file.

        Returns the stat phase's wall and commands, the listing's commands and
        the single cat's commands (both within the TTL of the listing).
        """
        self.cold()
        c0 = self.counts()
        for d in dirs:
            os.listdir(self.mnt + d)
        c1 = self.settle()
        with open(self.mnt + cat, "rb") as f:
            f.read()
        c2 = self.settle()
        t = time.perf_counter()
        for p in files:
            os.lstat(self.mnt + p)
        wall = time.perf_counter() - t
        c3 = self.counts()
        return wall, delta(c2, c3), delta(c0, c1), delta(c1, c2)

    def proc_kib(self, field: str) -> int:
        """``VmRSS``/``VmHWM`` of the daemon, from /proc."""
        return proc_status_kib(self.m.proc.pid, field)


def tree_tools(mp: str) -> list[tuple[str, list[str], str]]:
    """The tools that walk the whole tree: (workload, argv, raw floor)."""
    return [
        ("ls -R", ["ls", "-R", mp], "W"),
        ("ls -lR", ["ls", "-lR", mp], "WL"),
        ("find -type f", ["find", mp, "-type", "f"], "W"),
        ("find -type l", ["find", mp, "-type", "l"], "W"),
        ("grep -r .", ["grep", "-r", ".", mp], "WG"),
    ]


def grep_diff(mnt: str, tree: Tree, ref: Path, outs: list[Path]) -> tuple[set[str], list[bytes]]:
    """Property paths whose grep lines differ between ``ref`` and ``outs``.

    Returns (QOM paths of differing lines, lines that name no known file).
    """
    known = {join(o, n) for o, n in tree.plain}

    def path_of(line: bytes) -> str | None:
        text = line.decode("utf-8", "surrogateescape")
        if text.startswith("grep: "):
            text = text[6:]
        if not text.startswith(mnt):
            return None
        text = text[len(mnt) :]
        pos = text.find(":")
        while pos >= 0:
            if text[:pos] in known:
                return text[:pos]
            pos = text.find(":", pos + 1)
        return None

    def lines(p: Path) -> collections.Counter[bytes]:
        out = collections.Counter(p.read_bytes().splitlines())
        out.update(Path(str(p) + ".err").read_bytes().splitlines())
        return out

    base = lines(ref)
    paths: set[str] = set()
    unknown: list[bytes] = []
    for out in outs:
        other = lines(out)
        for line in (base - other) + (other - base):
            path = path_of(line)
            if path is None:
                unknown.append(line)
            else:
                paths.add(path)
    return paths, unknown


def volatile(qmp: RawQMP, paths: set[str]) -> set[str]:
    """Of ``paths``, those whose value changes within 1.1 s (e.g. rtc-time)."""
    first = {}
    for p in paths:
        obj, name = p.rsplit("/", 1)
        try:
            first[p] = qmp.cmd("qom-get", path=obj, property=name)
        except RuntimeError as err:
            first[p] = err.args
    time.sleep(1.1)
    out = set()
    for p in paths:
        obj, name = p.rsplit("/", 1)
        try:
            value = qmp.cmd("qom-get", path=obj, property=name)
        except RuntimeError as err:
            value = err.args
        if value != first[p]:
            out.add(p)
    return out
