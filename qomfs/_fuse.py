"""The one place that imports the FUSE binding.

mfusepy (the maintained fork, libfuse2 and libfuse3) is preferred; plain fusepy
(libfuse2) has the same API.  ``QOMFS_FUSE=fusepy`` forces the latter.
"""

from __future__ import annotations

import ctypes
import os
import threading
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
#: libfuse3's default: READDIRPLUS only for a directory's first chunk (then
#: the entries of a large directory each cost a LOOKUP).  Switched off.
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
#: libfuse3's default: O_TRUNC travels with OPEN.  Without OPEN (no_open) it
#: would be lost; switched off, the kernel sends a truncate first.
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
#: The kernel drops a file's cached pages when its ``st_mtime`` changes.
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
#: Idle worker threads libfuse3 keeps.  mfusepy leaves the option unset, and
#: libfuse 3.14.0 then prints "Ignoring invalid max threads value 4294967295
#: > max (100000)." at every mount; libfuse2 knows no such option.
MAX_IDLE_THREADS = 10


_BaseFUSE: Any = _binding.FUSE
_pinned = threading.local()
_libfuse: Any = getattr(_binding, "_libfuse", None)
#: libfuse3's ``struct fuse *`` of this process's mount, seen in a request.
_fuse_ptr: int | None = None


class _Counts(threading.local):
    """One dict of request counts per libfuse thread: no lock on the way."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        with _all_lock:
            _all_counts.append(self.counts)


_all_counts: list[dict[str, int]] = []
_all_lock = threading.Lock()
_counts = _Counts()


def request_counts() -> dict[str, int]:
    """How many requests of each kind the kernel sent into Python, named by
    the operation that served them (``getattr`` answers LOOKUP and GETATTR)."""
    total: dict[str, int] = {}
    with _all_lock:
        tables = list(_all_counts)
    for table in tables:
        for name, n in list(table.items()):
            total[name] = total.get(name, 0) + n
    return total


def _count(func: Any) -> None:
    name = getattr(func, "__name__", "?")
    if name.endswith(("_fuse_2", "_fuse_3")):
        name = name[:-7]
    table = _counts.counts
    table[name] = table.get(name, 0) + 1


def _pin_thread_state() -> None:
    """Keep this libfuse thread's Python thread state between callbacks.

    A ctypes callback on a thread Python did not start makes a thread state
    on entry and destroys it on return (PyGILState_Ensure/Release), each time
    with its frame stack (an mmap and a munmap): for every FUSE request.  One
    more Ensure, never released, keeps the state for the thread's life.
    """
    ctypes.pythonapi.PyGILState_Ensure()
    _pinned.done = True


class _FUSE(_BaseFUSE):  # type: ignore[misc]
    """The binding's FUSE, answering READDIRPLUS with every entry's attributes.

    mfusepy passes only an entry's type to libfuse; when the operations offer
    ``readdir_plus(path, offset) -> [(name, inode, attrs)]`` (the entries
    from ``offset`` on), this fills whole ``stat``s, and the kernel then needs
    no LOOKUP per entry before ``stat`` or ``open``.  ``attrs`` dicts are
    meant to be shared: each becomes a ``struct stat`` once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._templates: dict[int, tuple[dict[str, Any], bytes]] = {}
        kwargs.setdefault("max_idle_threads", MAX_IDLE_THREADS)
        _kernel_options(args[0] if args else kwargs.get("operations"), kwargs, libfuse3=True)
        super().__init__(*args, **kwargs)  # runs the FUSE loop

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(_pinned, "done", False):
            _pin_thread_state()
        _count(func)
        global _fuse_ptr
        if _fuse_ptr is None and _libfuse is not None:
            _fuse_ptr = _libfuse.fuse_get_context().contents.fuse
        return super()._wrapper(func, *args, **kwargs)

    def init_fuse_3(self, conn: Any, config: Any) -> None:
        if conn and getattr(self.operations, "readdir_plus", None) is not None:
            conn.contents.want &= ~FUSE_CAP_READDIRPLUS_AUTO
        if conn and getattr(self.operations, "kernel_cache", False):
            # O_TRUNC as a truncate whose answer has the value's size: an
            # atomic O_TRUNC makes the kernel set the size to 0 at open,
            # and a reader at that moment would read nothing.
            conn.contents.want &= ~FUSE_CAP_ATOMIC_O_TRUNC
            if conn.contents.capable & FUSE_CAP_AUTO_INVAL_DATA:
                conn.contents.want |= FUSE_CAP_AUTO_INVAL_DATA
        super().init_fuse_3(conn, config)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        """As mfusepy's, but an ftruncate() passes its open file (as libfuse2's
        ``ftruncate`` does), so that the filesystem knows which one it cuts."""
        fh = (fip.contents if self.raw_fi else fip.contents.fh) if fip else None
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        return int(self.operations.truncate(decoded, length, fh))

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        plus = getattr(self.operations, "readdir_plus", None)
        if path is None or plus is None:
            return int(super().readdir_fuse_3(path, buf, filler, offset, fip, flags))
        # A plain READDIR too (the kernel asks for the end of a directory so):
        # the same offsets, without the attributes.
        plus_flag = FUSE_FILL_DIR_PLUS if flags & FUSE_READDIR_PLUS else 0
        st = _binding.c_stat()
        entries = plus(path.decode(self.encoding, self.errors), offset)
        # Offsets, not 0: libfuse 3.14 drops the attributes of entries that
        # it buffers itself (offset 0).  The kernel resumes at an entry's offset.
        for index, (name, ino, attrs, known) in enumerate(entries, start=offset):
            ctypes.memmove(ctypes.byref(st), self._template(attrs), ctypes.sizeof(st))
            st.st_ino = ino
            fill = 0 if name in (".", "..") else plus_flag
            if known is None:
                fill = 0  # only the type: the kernel asks (LOOKUP) for the rest
            elif known is not SHARED:
                size, mtime = known
                st.st_size = size
                st.st_blocks = (size + 511) // 512
                st.st_mtimespec.tv_sec, st.st_mtimespec.tv_nsec = divmod(mtime, 1_000_000_000)
                st.st_ctimespec.tv_sec, st.st_ctimespec.tv_nsec = divmod(mtime, 1_000_000_000)
            if filler(buf, name.encode(self.encoding, self.errors), st, index + 1, fill) != 0:
                break
        return 0

    def _template(self, attrs: dict[str, Any]) -> bytes:
        """A ``struct stat`` filled from ``attrs``, made once per dict."""
        hit = self._templates.get(id(attrs))
        if hit is None or hit[0] is not attrs:
            st = _binding.c_stat()
            _binding.set_st_attrs(st, attrs, use_ns=self.use_ns)
            if len(self._templates) > 64:
                self._templates.clear()
            hit = self._templates[id(attrs)] = (attrs, bytes(st))
        return hit[1]


class _FUSE2(_BaseFUSE):  # type: ignore[misc]
    """libfuse2's FUSE (fusepy, or mfusepy without libfuse3): requests counted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _kernel_options(args[0] if args else kwargs.get("operations"), kwargs, libfuse3=False)
        super().__init__(*args, **kwargs)  # runs the FUSE loop

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        _count(func)
        return super()._wrapper(func, *args, **kwargs)


def _kernel_options(operations: Any, kwargs: dict[str, Any], libfuse3: bool) -> None:
    """The kernel's cache settings the operations ask for.

    ``operations.kernel_timeouts`` caps ``attr_timeout`` and
    ``entry_timeout`` (the kernel's attributes must not outlive the values
    they describe).
    """
    timeouts = getattr(operations, "kernel_timeouts", None)
    if isinstance(timeouts, dict):
        for name, cap in timeouts.items():
            given = kwargs.get(name)
            kwargs[name] = cap if given is None else min(float(given), cap)


#: In a ``readdir_plus`` entry: the attributes dict is whole as it is.
SHARED = True


def invalidate_path(path: str) -> bool:
    """Ask the kernel to drop what it caches of ``path`` (attributes, pages).

    libfuse3's ``fuse_invalidate_path``; call it outside the request that
    concerns ``path`` (the kernel may hold that file's pages locked).  False
    when it cannot be done here (libfuse2, or before the first request).
    """
    if _fuse_ptr is None or _libfuse is None or not hasattr(_libfuse, "fuse_invalidate_path"):
        return False
    func = _libfuse.fuse_invalidate_path
    func.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    func.restype = ctypes.c_int
    return int(func(_fuse_ptr, path.encode("utf-8", "surrogateescape"))) == 0


def caller_pid() -> int:
    """The process whose request this FUSE thread serves; 0 outside a request."""
    try:
        return int(_binding.fuse_get_context()[2])
    except ValueError:  # NULL context: not called from a FUSE request
        return 0


#: Whether files can go without OPEN and keep their pages (no_open).  It
#: needs the kernel to drop a file's pages when its ``st_mtime`` changes
#: (auto_inval_data): libfuse3 asks for that, libfuse 2.9 cannot.
KERNEL_CACHE: bool = getattr(_binding, "fuse_version_major", 2) == 3
FUSE: Any = _FUSE if getattr(_binding, "fuse_version_major", 2) == 3 else _FUSE2
FuseOSError: Any = _binding.FuseOSError
Operations: Any = _binding.Operations
BINDING: str = _binding.__name__
