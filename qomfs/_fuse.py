"""The one place that imports the FUSE binding.

mfusepy (the maintained fork, libfuse2 and libfuse3) is preferred; plain fusepy
(libfuse2) has the same API.  ``QOMFS_FUSE=fusepy`` forces the latter.
"""

from __future__ import annotations

import ctypes
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

#: libfuse3: the kernel asks for entries with their attributes (READDIRPLUS)...
FUSE_READDIR_PLUS = 1
#: ...and an entry filled with this flag carries them, so no LOOKUP follows.
FUSE_FILL_DIR_PLUS = 2


_BaseFUSE: Any = _binding.FUSE


class _FUSE(_BaseFUSE):  # type: ignore[misc]
    """The binding's FUSE, answering READDIRPLUS with every entry's attributes.

    mfusepy passes only an entry's type to libfuse; when the operations offer
    ``readdir_plus(path) -> [(name, attrs)]``, this fills whole ``stat``s, and
    the kernel then needs no LOOKUP per entry before ``stat`` or ``open``.
    """

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        plus = getattr(self.operations, "readdir_plus", None)
        if path is None or plus is None or not flags & FUSE_READDIR_PLUS:
            return int(super().readdir_fuse_3(path, buf, filler, offset, fip, flags))
        st = _binding.c_stat()
        size = ctypes.sizeof(st)
        # Offsets, not 0: libfuse 3.14 drops the attributes of entries that
        # it buffers itself (offset 0).  The kernel resumes at an entry's offset.
        entries = plus(path.decode(self.encoding, self.errors))
        for index in range(offset, len(entries)):
            name, attrs = entries[index]
            ctypes.memset(ctypes.byref(st), 0, size)
            _binding.set_st_attrs(st, attrs, use_ns=self.use_ns)
            fill = 0 if name in (".", "..") else FUSE_FILL_DIR_PLUS
            if filler(buf, name.encode(self.encoding, self.errors), st, index + 1, fill) != 0:
                break
        return 0


FUSE: Any = _FUSE if getattr(_binding, "fuse_version_major", 2) == 3 else _binding.FUSE
FuseOSError: Any = _binding.FuseOSError
Operations: Any = _binding.Operations
BINDING: str = _binding.__name__
