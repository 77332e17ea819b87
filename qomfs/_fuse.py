"""The one place that imports the FUSE binding.

mfusepy (the maintained fork, libfuse2 and libfuse3) is preferred; plain fusepy
(libfuse2) has the same API.  ``QOMFS_FUSE=fusepy`` forces the latter.
"""

from __future__ import annotations

import os
from typing import Any

_forced = os.environ.get("QOMFS_FUSE", "")


def _load() -> Any:
    if _forced == "fusepy":
        import fuse

        return fuse
    # mfusepy takes libfuse2 when both are installed; we want libfuse3.
    if not os.environ.get("FUSE_LIBRARY_PATH"):
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy

        return mfusepy
    except ImportError:  # pragma: no cover - depends on what is installed
        import fuse

        return fuse


_binding = _load()

FUSE: Any = _binding.FUSE
FuseOSError: Any = _binding.FuseOSError
Operations: Any = _binding.Operations
BINDING: str = _binding.__name__
