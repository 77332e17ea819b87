"""Floors: what the same QMP work costs a raw single-threaded client (W, WL, WG,
LG, G1k, LD), and what each tool costs on a mount that sends no command at all."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qomfs.vm import VM, RawQMP, mounted

from .common import ENV, N_OPS, TOOL_TIMEOUT
from .tree import Tree, join, raw_walk
from .workloads import Bench, tree_tools


def raw_gets(qmp: RawQMP, props: list[tuple[str, str]]) -> int:
    """qom-get each property; return how many failed."""
    failed = 0
    for obj, name in props:
        try:
            qmp.cmd("qom-get", path=obj, property=name)
        except RuntimeError:
            failed += 1
    return failed


def raw_level_walk(qmp: RawQMP) -> int:
    """qom-list-get one tree level per command; return the command count."""
    level, n = ["/"], 0
    while level:
        reply = qmp.cmd("qom-list-get", paths=level)
        n += 1
        level = [
            join(o, p["name"])
            for o, obj in zip(level, reply, strict=True)
            for p in obj["properties"]
            if p["type"].startswith("child<")
        ]
    return n


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t, result


def best_of(n: int, fn: Any, *args: Any) -> float:
    return min(timed(fn, *args)[0] for _ in range(n))


@dataclass
class Floors:
    seconds: dict[str, float]
    commands: dict[str, int]


def measure_floors(
    qmp: RawQMP, tree: Tree, cat: str, dirs: list[str], has_qlg: bool, big: bool
) -> Floors:
    reps = 1 if big else 3
    s: dict[str, float] = {}
    c: dict[str, int] = {}
    s["W"] = best_of(2 if big else 5, raw_walk, qmp)
    c["W"] = len(tree.objects)
    links = best_of(reps, raw_gets, qmp, tree.links)
    s["WL"] = s["W"] + links
    c["WL"] = c["W"] + len(tree.links)
    plain = best_of(reps if big else 2, raw_gets, qmp, tree.plain)
    s["WG"] = s["W"] + plain
    c["WG"] = c["W"] + len(tree.plain)
    obj, name = cat.rsplit("/", 1)
    s["G1k"] = best_of(reps, raw_gets, qmp, [(obj, name)] * N_OPS)
    c["G1k"] = N_OPS
    s["LD"] = best_of(reps * 3, lambda: [qmp.cmd("qom-list", path=d) for d in dirs])
    c["LD"] = len(dirs)
    if has_qlg:
        s["LG"] = best_of(2 if big else 5, raw_level_walk, qmp)
        c["LG"] = len(tree.levels)
    return Floors(s, c)


def measure_fuse_floor(vm: VM, tree: Tree, workdir: Path, tag: str) -> dict[str, float]:
    """The FUSE floor of each tool: its wall on a qomfs mount whose cache
    holds every listing and value and never expires (``--ttl inf
    --no-readahead``, warmed by one ``ls -lR`` and one ``grep -r``), so that
    it sends no QMP command.  What is left is the tool, the kernel's FUSE
    round trips and qomfs' own adapter: no mount of this design beats it."""
    mnt = workdir / f"mnt-{tag}-fuse-floor"
    out = workdir / f"out-{tag}-fuse-floor"
    out.mkdir(exist_ok=True)
    seconds: dict[str, float] = {}
    with mounted(vm.socket, mnt, "--ttl", "inf", "--no-readahead") as m:
        tools = tree_tools(str(mnt))
        for name, argv, _ in tools:
            if name in ("ls -lR", "grep -r ."):
                subprocess.run(
                    argv,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=ENV,
                    timeout=TOOL_TIMEOUT,
                )
        b = Bench(m, tree, workdir)
        for name, argv, _ in tools:
            wall, cmds, _, _ = b.tool(argv, out / name.replace(" ", "_"))
            if cmds:
                raise RuntimeError(f"FUSE floor: {name} sent QMP commands: {cmds}")
            seconds[name] = wall
    return seconds
