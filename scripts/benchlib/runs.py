"""One VM: start it, measure its floors, then mount it once per config and run
every workload there, collecting a Result per workload and a VMRun per mount."""

from __future__ import annotations

import os
import subprocess
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qomfs.vm import QEMU, VM, Mount, RawQMP, big_vm_args, mounted, qemu11_vm, qemu_vm

from .common import ENV, N_OPS, N_PAR, ROUNDS, TOOL_TIMEOUT, TTL, Config, fmt_cmds, log
from .floors import Floors, measure_floors, measure_fuse_floor
from .tree import Tree, pick_targets, raw_walk
from .workloads import Bench, best, grep_diff, tree_tools, volatile


@dataclass
class Result:
    config: str
    vm: str
    workload: str
    objects: int
    commands: dict[str, int]
    wall: float
    floor: str = ""
    floor_s: float = 0.0
    floor2: str = ""
    floor2_s: float = 0.0
    fuse_s: float = 0.0  # the FUSE floor: the same tool on a mount that sends no command
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    @property
    def ratio(self) -> float:
        return self.wall / self.floor_s if self.floor_s else float("nan")

    @property
    def ratio2(self) -> float:
        return self.wall / self.floor2_s if self.floor2_s else float("nan")

    @property
    def fuse_ratio(self) -> float:
        return self.wall / self.fuse_s if self.fuse_s else float("nan")


@dataclass
class VMRun:
    config: str
    vm: str
    qemu_version: str
    objects: int
    props: int
    links: int
    plain: int
    levels: int
    floors: dict[str, float]
    floor_commands: dict[str, int]
    rss_kib: list[int] = field(default_factory=list)
    rss_reps: int = 0
    xattr_maxrss: list[int] = field(default_factory=list)
    hwm_kib: int = 0  # VmHWM: the daemon's own peak RSS
    maxrss_kib: int = 0  # from the stats xattr (getrusage; see LEGEND)
    batch: bool = False
    par_same: bool | None = None
    par_volatile: list[str] = field(default_factory=list)
    par_mismatch: list[str] = field(default_factory=list)
    single_grep_wall: float = 0.0
    grep_rc: list[int] = field(default_factory=list)
    cat_after_list: dict[str, int] = field(default_factory=dict)
    list_for_stat: dict[str, int] = field(default_factory=dict)
    error: str = ""


def run_mount(
    cfg: Config,
    vm_kind: str,
    vm: VM,
    qmp: RawQMP,
    tree: Tree,
    floors: Floors,
    cat: str,
    files: list[str],
    dirs: list[str],
    workdir: Path,
    reps: int,
    par: bool,
    results: list[Result],
) -> VMRun:
    run = VMRun(
        cfg.name,
        vm_kind,
        "",
        len(tree.objects),
        tree.nprops,
        len(tree.links),
        len(tree.plain),
        len(tree.levels),
        floors.seconds,
        floors.commands,
    )
    tag = f"{cfg.name.replace(' ', '-')}-{vm_kind}"
    mnt = workdir / f"mnt-{tag}"
    out = workdir / f"out-{tag}"
    out.mkdir(exist_ok=True)
    args = ["--ttl", str(TTL)] + ([] if cfg.batch else ["--no-batch"])
    nobj = len(tree.objects)
    batch_floors = "LG" in floors.seconds

    benches: list[Bench] = []

    def add(workload: str, wall: float, cmds: dict[str, int], floor: str, **kw: Any) -> None:
        floor2 = kw.pop("floor2", "")
        if benches:  # the FUSE requests of the phase just measured
            kw.setdefault("extra", {})["fuse"] = dict(benches[0].last_fuse)
        kw.setdefault("fuse_s", floors.seconds.get(f"F:{workload}", 0.0))
        results.append(
            Result(
                cfg.name,
                vm_kind,
                workload,
                nobj,
                cmds,
                wall,
                floor,
                floors.seconds.get(floor, 0.0),
                floor2,
                floors.seconds.get(floor2, 0.0),
                **kw,
            )
        )

    with mounted(vm.socket, mnt, *args) as m:
        st = m.stats()
        run.qemu_version = str(st.get("qemu"))
        run.batch = bool(st.get("batch"))
        if run.batch != cfg.batch:
            raise RuntimeError(f"{cfg.name}: qomfs says batch={run.batch}")
        b = Bench(m, tree, workdir)
        benches.append(b)
        mp = str(mnt)
        list_floor2 = "LG" if batch_floors else ""
        for name, argv, floor in tree_tools(mp)[:-1]:
            log(f"  {tag}: {name}")
            wall, cmds, rc, n = b.tool(argv, out / name.replace(" ", "_"))
            note = " ".join(x for x in (f"rc {rc}" * (rc != 0), best(n)) if x)
            add(name, wall, cmds, floor, floor2=list_floor2, note=note)
        log(f"  {tag}: grep -r .")
        ref = out / "grep"
        wall, cmds, rc, n = b.tool(["grep", "-r", ".", mp], ref)
        run.single_grep_wall = wall
        note = f"rc {rc} {best(n)}".strip()
        if cfg.batch:
            add("grep -r .", wall, cmds, "LG", floor2="WG", note=note)
        else:
            add("grep -r .", wall, cmds, "WG", note=note)
        # Short in-process loops: the best wall of ROUNDS cold runs, and the
        # commands of the costliest run.
        log(f"  {tag}: cat x{N_OPS}")
        cats = [b.cat(cat) for _ in range(ROUNDS)]
        wall = min(c[0] for c in cats)
        cmds = max((c[1] for c in cats), key=lambda c: sum(c.values()))
        note = f"in-process, best of {ROUNDS}"
        add(f"cat x{N_OPS}", wall, cmds, "G1k", note=note, extra={"value": cats[0][2].decode()})
        log(f"  {tag}: stat x{N_OPS}")
        stats = [b.stat(files, dirs, cat) for _ in range(ROUNDS)]
        wall = min(x[0] for x in stats)
        cmds = max((x[1] for x in stats), key=lambda c: sum(c.values()))
        run.list_for_stat = max((x[2] for x in stats), key=lambda c: sum(c.values()))
        run.cat_after_list = max((x[3] for x in stats), key=lambda c: sum(c.values()))
        add(
            f"stat x{N_OPS}",
            wall,
            cmds,
            "LD",
            note=f"in-process lstat after ls of {len(dirs)} dirs"
            f" ({fmt_cmds(run.list_for_stat)}), best of {ROUNDS}",
            extra={"listing": run.list_for_stat},
        )
        if not par:
            return run_rss(run, b, m, mp, tag, reps)
        log(f"  {tag}: {N_PAR}x grep -r .")
        outs = [out / f"pgrep{i}" for i in range(N_PAR)]
        wall, cmds, rcs = b.par_grep(outs)
        run.grep_rc = [rc, *rcs]
        paths, unknown = grep_diff(mp, tree, ref, outs)
        vol = volatile(qmp, paths) if paths else set()
        run.par_volatile = sorted(vol)
        run.par_mismatch = sorted(paths - vol) + [x.decode(errors="replace") for x in unknown]
        run.par_same = not run.par_mismatch and len(set(run.grep_rc)) == 1
        note = "same output" if run.par_same else f"{len(run.par_mismatch)} differ"
        if vol:
            note += f" (but {len(vol)} volatile)"
        if cfg.batch:
            add(f"{N_PAR}x grep -r .", wall, cmds, "LG", floor2="WG", note=note)
        else:
            add(f"{N_PAR}x grep -r .", wall, cmds, "WG", note=note)
        return run_rss(run, b, m, mp, tag, reps)


def run_rss(run: VMRun, b: Bench, m: Mount, mp: str, tag: str, reps: int) -> VMRun:
    """Back-to-back ``ls -lR``: the daemon's RSS after the first and the last."""
    if reps:
        log(f"  {tag}: {reps}x ls -lR for RSS")
        for i in range(reps):
            subprocess.run(
                ["ls", "-lR", mp], stdout=subprocess.DEVNULL, env=ENV, timeout=TOOL_TIMEOUT
            )
            if i in (0, reps - 1):
                run.rss_kib.append(b.proc_kib("VmRSS"))
                run.xattr_maxrss.append(int(m.stats().get("maxrss_kib", 0)))
        run.rss_reps = reps
    run.hwm_kib = b.proc_kib("VmHWM")
    run.maxrss_kib = int(m.stats().get("maxrss_kib", 0))
    return run


def run_vm(
    qemu: str,
    vm_kind: str,
    configs: list[Config],
    workdir: Path,
    reps: int,
    full: bool,
    results: list[Result],
    runs: list[VMRun],
) -> None:
    extra = big_vm_args() if vm_kind == "big" else []
    name = f"bench{os.getpid()}-{vm_kind}{qemu.replace('.', '')}"
    vmdir = workdir / f"vm-{qemu}-{vm_kind}"
    vmdir.mkdir(parents=True, exist_ok=True)
    log(f"QEMU {qemu}, {vm_kind} VM: starting")
    done = len(runs)
    vm = None
    try:
        with (
            (
                qemu11_vm(vmdir, extra, name=name)
                if qemu == "11.1"
                else qemu_vm(vmdir, extra, qemu=[QEMU], name=name)
            ) as vm,
            # The big VM takes ~9 s to greet (2,000 backends): wait longer.
            vm.qmp(timeout=120) as qmp,
        ):
            ver = qmp.greeting["QMP"]["version"]["qemu"]
            has_qlg = "qom-list-get" in {c["name"] for c in qmp.cmd("query-commands")}
            tree = raw_walk(qmp)
            log(
                f"QEMU {ver['major']}.{ver['minor']}.{ver['micro']}: {len(tree.objects)} objects,"
                f" {tree.nprops} properties; measuring raw floors"
            )
            cat, files, dirs = pick_targets(qmp, tree)
            floors = measure_floors(qmp, tree, cat, dirs, has_qlg, vm_kind == "big")
            log(f"QEMU {qemu}, {vm_kind} VM: the FUSE floor")
            try:
                fuse = measure_fuse_floor(vm, tree, workdir, f"{qemu}-{vm_kind}")
                floors.seconds.update({f"F:{k}": v for k, v in fuse.items()})
            except Exception as err:  # the rows go on without it
                log(f"QEMU {qemu}, {vm_kind} VM: no FUSE floor: {err}")
                if vm.proc.poll() is not None:
                    raise
            for cfg in configs:
                try:
                    runs.append(
                        run_mount(
                            cfg,
                            vm_kind,
                            vm,
                            qmp,
                            tree,
                            floors,
                            cat,
                            files,
                            dirs,
                            workdir,
                            # RSS: 7.2 and 11.1 batch; --no-batch is 7.2's code path
                            reps if (full or cfg.batch or cfg.qemu == "7.2") else 0,
                            # 8 parallel greps on the big VM take 60-110 s each
                            full or vm_kind == "bare",
                            results,
                        )
                    )
                except Exception as err:
                    log(f"{cfg.name} {vm_kind}: FAILED: {err}")
                    traceback.print_exc()
                    if vm.proc.poll() is not None:
                        raise
                    runs.append(VMRun(cfg.name, vm_kind, "", 0, 0, 0, 0, 0, {}, {}, error=str(err)))
    except Exception as err:
        # Most likely QEMU went away: record it and go on with the next VM.
        why = f"{type(err).__name__}: {err}"
        if vm is not None and vm.proc.poll() is not None:
            tail = vm.log.read_text(errors="replace").splitlines()[-5:]
            why += f" (QEMU exited {vm.proc.returncode}: {' | '.join(tail)})"
        log(f"QEMU {qemu} {vm_kind}: FAILED: {why}")
        traceback.print_exc()
        got = {v.config for v in runs[done:]}
        for cfg in configs:
            if cfg.name not in got:
                runs.append(VMRun(cfg.name, vm_kind, "", 0, 0, 0, 0, 0, {}, {}, error=why))
