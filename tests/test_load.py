"""Load: 8 readers and a writer on one mount; no wrong value, no error, no hang."""

from __future__ import annotations

import multiprocessing as mp
import os
import posixpath
import time
from pathlib import Path

from tests.harness import mounted, qemu_vm, walk_qmp

SECONDS = float(os.environ.get("QOMFS_LOAD_SECONDS", "60"))


def reader(paths: list[tuple[str, str]], until: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    reads = wrong = errors = 0
    while time.monotonic() < until:
        for path, want in paths:
            try:
                if Path(path).read_text() != want:
                    wrong += 1
            except OSError:
                errors += 1
            reads += 1
    out.put((reads, wrong, errors))


def writer(path: str, until: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    writes = wrong = errors = 0
    value = False
    while time.monotonic() < until:
        value = not value
        text = "true\n" if value else "false\n"
        try:
            with open(path, "w") as f:
                f.write(text)
            if Path(path).read_text() != text:  # a good write shows at the next read
                wrong += 1
        except OSError:
            errors += 1
        writes += 1
    out.put((writes, wrong, errors))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("VmRSS")


def test_eight_readers_and_a_writer(tmp_path: Path) -> None:
    with qemu_vm(tmp_path) as vm, mounted(vm.socket, tmp_path / "mnt") as m:
        with vm.qmp() as qmp:
            tree = walk_qmp(qmp, "/machine/unattached")
            stable: list[tuple[str, str]] = []
            for obj, props in tree.items():
                for p in props:
                    if p["type"] in ("string", "str", "bool", "uint8", "uint32", "uint64"):
                        try:
                            v = qmp.cmd("qom-get", path=obj, property=p["name"])
                        except RuntimeError:
                            continue
                        text = ("true" if v else "false") if isinstance(v, bool) else str(v)
                        fs = str(m.path / posixpath.join(obj, p["name"]).lstrip("/"))
                        stable.append((fs, text + "\n"))
        stable = stable[: 8 * 40]
        assert len(stable) >= 8 * 20
        ctx = mp.get_context("fork")
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        until = time.monotonic() + SECONDS
        procs = [ctx.Process(target=reader, args=(stable[i::8], until, out)) for i in range(8)] + [
            ctx.Process(target=writer, args=(str(m.path / "machine/graphics"), until, out))
        ]
        rss_start = rss_kib(m.proc.pid)
        for p in procs:
            p.start()
        time.sleep(min(5.0, SECONDS / 4))
        rss_early = rss_kib(m.proc.pid)
        for p in procs:
            p.join(timeout=SECONDS + 60)
            assert p.exitcode == 0, "a worker hung or died"
        results = [out.get(timeout=10) for _ in procs]
        rss_end = rss_kib(m.proc.pid)
        total, wrong, errors = (sum(r[i] for r in results) for i in range(3))
        assert wrong == 0 and errors == 0, results
        assert total > 1000, results
        # Memory stays flat under load: no per-operation growth.
        assert rss_end < rss_early + 8 * 1024, (rss_start, rss_early, rss_end)
