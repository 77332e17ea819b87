"""The source distribution and the wheel that ``python -m build`` makes of this
tree, built once per test session (:func:`dists`) for every test that needs them.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.harness import ROOT, missing


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


@functools.cache
def dists() -> Dists:
    """``python -m build``: an sdist, then a wheel built from that sdist (in
    isolated build environments, as a user's ``pip install`` would)."""
    try:
        import build  # noqa: F401
    except ImportError:
        missing("the 'build' package is not installed (pip install -e '.[test]')")
    out = Path(tempfile.mkdtemp(prefix="qomfs-dist-"))
    atexit.register(shutil.rmtree, out, True)
    r = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0 and "Could not find a version" in r.stdout + r.stderr:
        missing(f"pip cannot fetch the build requirements: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    (sdist,) = out.glob("qomfs-*.tar.gz")
    (wheel,) = out.glob("qomfs-*.whl")
    return Dists(sdist, wheel)


def install_wheel(where: Path, wheel: Path, *, deps: bool, timeout: float) -> None:
    """Make a fresh virtualenv at ``where`` (no pip of its own) and install
    ``wheel`` into it with the outer pip, with its dependencies or without."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(where / "bin" / "python"), "install"]
    r = subprocess.run(
        [*pip, *([] if deps else ["--no-deps"]), "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr
