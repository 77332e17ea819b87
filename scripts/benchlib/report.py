"""The bench's report: the results table, the checks against the targets, the legend."""

from __future__ import annotations

from dataclasses import dataclass

from .common import N_OPS, N_PAR, TREE_WORKLOADS, WORKLOADS, fmt_cmds
from .runs import Result, VMRun


def fmt_ratio(x: float) -> str:
    return "" if x != x else f"{x:.2f}"


def table(results: list[Result], runs: list[VMRun]) -> str:
    lines = []
    head = (
        f"{'config':<14}{'vm':<5}{'workload':<14}{'QMP commands':<30}{'cmd/obj':>8}"
        f"{'wall s':>9}{'us/obj':>8}  {'floor':<5}{'floor s':>8}{'ratio':>7}"
        f"  {'floor2':<6}{'s':>7}{'ratio':>7}  {'fuse s':>7}{'ratio':>7}  note"
    )
    lines.append(head)
    lines.append("-" * len(head))
    prev = None
    for r in results:
        if prev is not None and (r.config, r.vm) != prev:
            lines.append("")
        prev = (r.config, r.vm)
        per_obj = r.wall / r.objects * 1e6
        f2 = f"{r.floor2:<6}{r.floor2_s:>7.3f}{fmt_ratio(r.ratio2):>7}" if r.floor2 else " " * 20
        fu = f"{r.fuse_s:>7.3f}{fmt_ratio(r.fuse_ratio):>7}" if r.fuse_s else " " * 14
        lines.append(
            f"{r.config:<14}{r.vm:<5}{r.workload:<14}{fmt_cmds(r.commands):<30}"
            f"{r.total / r.objects:>8.2f}{r.wall:>9.3f}{per_obj:>8.1f}  {r.floor:<5}"
            f"{r.floor_s:>8.3f}{fmt_ratio(r.ratio):>7}  {f2}  {fu}  {r.note}"
        )
    lines.append("")
    lines.append(
        f"{'config':<14}{'vm':<5}{'QEMU':<8}{'objects':>8}{'props':>7}{'links':>7}"
        f"{'plain':>7}{'levels':>7}  {'reps':>4}{'VmRSS rep1':>11}{'VmRSS repN':>11}"
        f"{'VmHWM':>8}  {'xattr maxrss':>12}"
    )
    for v in runs:
        if v.error:
            lines.append(f"{v.config:<14}{v.vm:<5}ERROR: {v.error}")
            continue
        rss1, rssn = (str(v.rss_kib[0]), str(v.rss_kib[-1])) if v.rss_kib else ("-", "-")
        lines.append(
            f"{v.config:<14}{v.vm:<5}{v.qemu_version:<8}{v.objects:>8}{v.props:>7}{v.links:>7}"
            f"{v.plain:>7}{v.levels:>7}  {v.rss_reps or '-':>4}{rss1:>11}{rssn:>11}"
            f"{v.hwm_kib:>8}  {v.maxrss_kib:>12}"
        )
    return "\n".join(lines)


#: FUSE request kinds in the requests table, by the operation that served
#: them; the rest are summed under "other".
FUSE_KINDS = [
    ("getattr", "getattr"),  # LOOKUP and GETATTR
    ("readdir_plus", "rdplus"),
    ("readdir", "readdir"),
    ("opendir", "opendir"),
    ("releasedir", "reldir"),
    ("open", "open"),
    ("read", "read"),
    ("flush", "flush"),
    ("release", "release"),
    ("readlink", "readlink"),
    ("getxattr", "getxattr"),
]


def fuse_table(results: list[Result], runs: list[VMRun]) -> str:
    """FUSE requests by kind per workload: per file for walks (files: the
    property files and links of the tree), per call for cat and stat."""
    files = {(v.config, v.vm): v.links + v.plain for v in runs}
    head = f"{'config':<14}{'vm':<5}{'workload':<14}{'per':<6}{'total':>8}{'/unit':>7}"
    head += "".join(f"{short:>9}" for _, short in FUSE_KINDS) + f"{'other':>8}"
    lines = [
        "FUSE requests (counted in the daemon's adapter), per file of the tree or per call",
        head,
        "-" * len(head),
    ]
    totals = False
    for r in results:
        fuse = r.extra.get("fuse")
        if fuse is None:
            continue
        per_call = r.workload in (f"cat x{N_OPS}", f"stat x{N_OPS}")
        unit = N_OPS if per_call else files.get((r.config, r.vm), 0)
        if not unit:  # the VM's run failed before its counts: totals only
            unit = 1
            per_call = False
            totals = True
        elif r.workload.startswith(f"{N_PAR}x"):
            unit *= N_PAR
        total = sum(fuse.values())
        known = {name for name, _ in FUSE_KINDS}
        other = sum(n for k, n in fuse.items() if k not in known)
        per = "call" if per_call else "file" if unit > 1 else "run"
        row = f"{r.config:<14}{r.vm:<5}{r.workload:<14}{per:<6}"
        row += f"{total:>8} {total / unit:>6.2f}"
        row += "".join(f"{fuse.get(name, 0) / unit:>9.2f}" for name, _ in FUSE_KINDS)
        lines.append(row + f"{other / unit:>8.2f}")
    if totals:
        lines.append("(per run: the VM's figures are missing, so the counts are totals)")
    return "\n".join(lines)


@dataclass
class Check:
    config: str
    target: str
    ok: bool | None
    detail: str


def checks(results: list[Result], runs: list[VMRun]) -> list[Check]:
    out: list[Check] = []
    run_of = {(v.config, v.vm): v for v in runs if not v.error}
    results = [r for r in results if (r.config, r.vm) in run_of]
    by = {(r.config, r.vm, r.workload): r for r in results}
    configs = list(dict.fromkeys(r.config for r in results))
    for cfg in configs:
        vms = [vm for vm in ("bare", "big") if (cfg, vm) in run_of]
        batch = any(by[(cfg, vm, "grep -r .")].floor == "LG" for vm in vms)

        def rows(workloads: list[str], vms: list[str] = vms, cfg: str = cfg) -> list[Result]:
            return [by[(cfg, vm, w)] for vm in vms for w in workloads if (cfg, vm, w) in by]

        # ls / find: commands and wall
        bad = [r for r in rows(TREE_WORKLOADS) if r.total > r.objects + 10]
        worst = max(rows(TREE_WORKLOADS), key=lambda r: r.total / r.objects)

        def why(r: Result, cfg: str = cfg) -> str:
            need = run_of[(cfg, r.vm)].floor_commands.get(r.floor, 0)
            text = f"{r.vm} {r.workload}: {r.total} > {r.objects + 10}"
            if need > r.objects + 10:
                text += f" (the raw floor {r.floor} needs {need} too)"
            return text

        out.append(
            Check(
                cfg,
                "ls -R/ls -lR/find: commands <= objects + 10",
                not bad,
                "; ".join(why(r) for r in bad)
                or f"worst {worst.vm} {worst.workload}: {worst.total / worst.objects:.2f}/obj",
            )
        )
        worst = max(rows(TREE_WORKLOADS), key=lambda r: r.ratio)
        out.append(
            Check(
                cfg,
                "ls -R/ls -lR/find: wall <= 1.5x raw floor (W; WL for ls -lR)",
                worst.ratio <= 1.5,
                f"worst {worst.vm} {worst.workload}: {worst.ratio:.2f}x",
            )
        )
        greps = rows(["grep -r ."])
        if not batch:
            bad_c = []
            for r in greps:
                v = run_of[(cfg, r.vm)]
                lists, gets = r.commands.get("qom-list", 0), r.commands.get("qom-get", 0)
                others = set(r.commands) - {"qom-list", "qom-get"}
                if lists > v.objects or gets > v.plain or others:
                    bad_c.append(r)
            out.append(
                Check(
                    cfg,
                    "grep -r: qom-list <= objects, qom-get <= plain properties",
                    not bad_c,
                    "; ".join(
                        f"{r.vm}: {fmt_cmds(r.commands)} vs {r.objects} obj, "
                        f"{run_of[(cfg, r.vm)].plain} plain"
                        for r in (bad_c or greps)
                    ),
                )
            )
            worst = max(greps, key=lambda r: r.ratio)
            out.append(
                Check(
                    cfg,
                    "grep -r: wall <= 1.3x raw floor (WG)",
                    worst.ratio <= 1.3,
                    "; ".join(f"{r.vm} {r.ratio:.2f}x" for r in greps),
                )
            )
        else:
            out.append(
                Check(
                    cfg,
                    "grep -r: commands <= objects (about one per object or fewer)",
                    all(r.total <= r.objects for r in greps),
                    "; ".join(f"{r.vm}: {r.total}/{r.objects} obj" for r in greps),
                )
            )
            nb = f"{cfg} no-batch"
            pairs = [
                (r, by[(nb, r.vm, "grep -r .")]) for r in greps if (nb, r.vm, "grep -r .") in by
            ]
            if pairs:
                out.append(
                    Check(
                        cfg,
                        "grep -r: >= 5x faster than --no-batch",
                        all(o.wall / r.wall >= 5 for r, o in pairs),
                        "; ".join(
                            f"{r.vm} {o.wall / r.wall:.1f}x"
                            + (f" (FUSE floor: {o.wall / r.fuse_s:.1f}x)" if r.fuse_s else "")
                            for r, o in pairs
                        ),
                    )
                )
            else:
                out.append(Check(cfg, "grep -r: >= 5x faster than --no-batch", None, "not run"))
        stats = rows([f"stat x{N_OPS}"])
        out.append(
            Check(
                cfg,
                f"stat x{N_OPS} after listing the directories: 0 commands",
                all(r.total == 0 for r in stats),
                "; ".join(f"{r.vm}: {r.total}" for r in stats),
            )
        )
        cats = [(vm, run_of[(cfg, vm)].cat_after_list) for vm in vms if (cfg, vm) in run_of]
        out.append(
            Check(
                cfg,
                "cat of a property (directory listed): <= 1 command",
                all(sum(c.values()) <= 1 for _, c in cats),
                "; ".join(f"{vm}: {fmt_cmds(c)}" for vm, c in cats)
                + "; cat x1000 cold: "
                + "; ".join(f"{r.vm} {fmt_cmds(r.commands)}" for r in rows([f"cat x{N_OPS}"])),
            )
        )
        if len(vms) == 2:
            bare, big = run_of[(cfg, "bare")], run_of[(cfg, "big")]
            per_obj, per_unit = [], []
            fuse_scale: list[float] = []
            for w in WORKLOADS:
                a, z = by.get((cfg, "bare", w)), by.get((cfg, "big", w))
                if a is None or z is None:
                    continue
                if w in (f"cat x{N_OPS}", f"stat x{N_OPS}"):
                    f = u = z.wall / a.wall  # the same 1000 operations on both
                else:
                    f = (z.wall / z.objects) / (a.wall / a.objects)
                    # The unit of work: files read (grep), entries (ls -lR), objects.
                    unit = {"ls -lR": "props"}.get(w, "plain" if "grep" in w else "objects")
                    u = (z.wall / getattr(big, unit)) / (a.wall / getattr(bare, unit))
                per_obj.append((f, w))
                per_unit.append((u, w, unit if "x1000" not in w else "op"))
                if a.fuse_s and z.fuse_s:
                    fuse_scale.append((z.fuse_s / z.objects) / (a.fuse_s / a.objects))
            out.append(
                Check(
                    cfg,
                    "scale: big VM time per object <= 1.3x bare q35's, every workload",
                    max(f for f, _ in per_obj) <= 1.3,
                    ", ".join(f"{w} {f:.2f}" for f, w in per_obj)
                    + (
                        "; FUSE floor: " + ", ".join(f"{f:.2f}" for f in fuse_scale)
                        if fuse_scale
                        else ""
                    ),
                )
            )
            out.append(
                Check(
                    cfg,
                    "scale (per unit of work: object, entry, file, op) <= 1.3x",
                    max(u for u, _, _ in per_unit) <= 1.3,
                    ", ".join(f"{w} {u:.2f}/{unit}" for u, w, unit in per_unit),
                )
            )
        for vm in vms:
            vr = run_of.get((cfg, vm))
            if vr is None or len(vr.rss_kib) < 2:
                continue
            grow = vr.rss_kib[-1] / vr.rss_kib[0]
            out.append(
                Check(
                    cfg,
                    f"RSS flat over {vr.rss_reps}x ls -lR ({vm}): rep N <= 1.1x rep 1",
                    grow <= 1.1,
                    f"VmRSS {vr.rss_kib[0]} -> {vr.rss_kib[-1]} KiB ({grow:.3f}x); "
                    f"VmHWM {vr.hwm_kib} KiB; xattr maxrss "
                    f"{' -> '.join(map(str, vr.xattr_maxrss))} KiB",
                )
            )
        for vm in vms:
            vr = run_of.get((cfg, vm))
            par = by.get((cfg, vm, f"{N_PAR}x grep -r ."))
            if vr is None or par is None:
                continue
            detail = f"rc {vr.grep_rc}"
            if vr.par_volatile:
                detail += f"; volatile, ignored: {', '.join(vr.par_volatile[:4])}"
            if vr.par_mismatch:
                detail += f"; differ: {', '.join(vr.par_mismatch[:4])}"
            out.append(
                Check(cfg, f"{N_PAR}x grep -r ({vm}): same output as one", vr.par_same, detail)
            )
            f = par.wall / vr.single_grep_wall
            out.append(
                Check(
                    cfg,
                    f"{N_PAR}x grep -r ({vm}): wall <= {N_PAR}x one grep",
                    f <= N_PAR,
                    f"{par.wall:.2f} s vs {vr.single_grep_wall:.2f} s = {f:.2f}x",
                )
            )
    return out


def fmt_checks(cs: list[Check]) -> str:
    lines = []
    for c in cs:
        mark = "SKIP" if c.ok is None else ("PASS" if c.ok else "FAIL")
        lines.append(f"{mark} [{c.config}] {c.target}: {c.detail}")
    return "\n".join(lines)


LEGEND = """\
floors (raw single-threaded QMP client on the VM's second unix-socket monitor):
  W  qom-list walk   WL  W + qom-get of every link   WG  W + qom-get of every plain property
  LG qom-list-get, one command per tree level   G1k 1000 x qom-get   LD qom-list of the stat'ed dirs
fuse s = the FUSE floor: the same tool on a qomfs mount with everything cached and no TTL
  (--ttl inf, warmed), which sends no QMP command: the tool, FUSE and qomfs' adapter alone.
ratio = qomfs wall / floor wall.  cat/stat: in-process loops (os.open+read+close, os.lstat);
stat row = the lstat phase after listing its directories.  Each workload starts cold (qomfs
--ttl 1, waits 1.2 s); runs under 2 s are repeated: best wall of 3, commands of the costliest.
Peak RSS: VmHWM of the daemon.  "xattr maxrss" is getrusage's ru_maxrss, which on Linux
keeps the peak of the process that forked the daemon (this script): not the daemon's own."""
