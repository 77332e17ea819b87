"""The FUSE adapter: filesystem operations on a :class:`~qomfs.model.QOMTree`.

This is the only module that thinks in errno.  Every outcome of the core maps
to an errno through :data:`ERRNO` and is logged with what QEMU said.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from qomfs._fuse import FuseOSError, Operations
from qomfs.errors import (
    CommandTimeout,
    ConnectionLost,
    ExecuteError,
    Guarded,
    InvalidValue,
    NotADirectory,
    NotFound,
    NotReadable,
    NotWritable,
    QOMError,
    QomfsError,
    ReadFailed,
    ValueTooLarge,
)
from qomfs.model import Kind, Node, Tree, join

log = logging.getLogger("qomfs.fs")

#: Core outcome -> errno.  Lookup walks the exception's class hierarchy, so a
#: subclass not named here takes its closest ancestor's errno.
ERRNO: dict[type[BaseException], int] = {
    NotFound: errno.ENOENT,
    NotADirectory: errno.ENOTDIR,
    NotWritable: errno.EACCES,
    NotReadable: errno.EACCES,
    InvalidValue: errno.EINVAL,
    ValueTooLarge: errno.EFBIG,
    Guarded: errno.EPERM,
    ReadFailed: errno.EIO,
    CommandTimeout: errno.ETIMEDOUT,
    ConnectionLost: errno.EIO,
    QomfsError: errno.EIO,  # anything else of ours: protocol errors, ...
}

#: On the mount's root: JSON with the daemon's QMP command counts and RSS.
STATS_XATTR = "user.qomfs.stats"
#: A property's QOM type (``uint32``, ``link<pci-bus>``); an object's class.
TYPE_XATTR = "user.qom.type"
#: A property's description, from ``qom-list-properties`` of its class.
DESCRIPTION_XATTR = "user.qom.description"
#: How long a symlink made by ``ln -sf`` on its way to ``rename`` lives.
PENDING_LINK_LIFE = 30.0
#: The temporary name GNU ln -f gives it (gnulib force-link.c: "CuXXXXXX").
LN_TEMPORARY = re.compile(r"Cu[A-Za-z0-9]{6}")
ENOATTR = getattr(errno, "ENOATTR", errno.ENODATA)

#: ``st_size`` of a property file.  The real length is known only after a
#: ``qom-get``; files are opened with direct I/O so readers see the whole value.
FILE_SIZE = 4096

F = TypeVar("F", bound=Callable[..., Any])


def errno_for(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in ERRNO:
            return ERRNO[cls]
    return errno.EIO


def _operation(func: F) -> F:
    """Run a FUSE operation; turn core exceptions into FuseOSError via ERRNO."""

    @functools.wraps(func)
    def wrapper(self: QOMFS, path: str, *args: Any) -> Any:
        try:
            return func(self, path, *args)
        except FuseOSError:
            raise
        except QomfsError as err:
            code = errno_for(err)
            level = logging.DEBUG if code == errno.ENOENT else logging.WARNING
            if level >= log.getEffectiveLevel():
                log.log(
                    level, "%s: %s -> %s", func.__name__, describe(err, path), errno.errorcode[code]
                )
            raise FuseOSError(code) from err
        except Exception:
            log.exception("%s %s: internal error", func.__name__, path)
            raise FuseOSError(errno.EIO) from None

    return cast(F, wrapper)


def describe(err: QomfsError, path: str) -> str:
    """A log line's worth: the path, our words, and QEMU's error class."""
    text = str(err)
    if not text.startswith(path):
        text = f"{path}: {text}"
    cause = err.cause if isinstance(err, QOMError) else None
    if isinstance(cause, ExecuteError):
        text += f" (QEMU {cause.command}: {cause.error_class})"
    return text


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@functools.lru_cache(maxsize=1 << 16)
def inode(path: str) -> int:
    """A stable inode number for ``path``: the same on every mount."""
    if path == "/":
        return 1
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return max(2, int.from_bytes(digest, "little") >> 1)


@dataclass
class _Handle:
    path: str
    data: bytes | None = None  # the value as read, fixed for this open file
    written: bytes = b""  # what this open file has written so far


class QOMFS(Operations):  # type: ignore[misc]
    """fusepy/mfusepy operations.  Thread-safe: FUSE calls from many threads.

    ``read_only`` refuses every write with EROFS before any QMP command.
    ``on_ready`` runs once the kernel has sent INIT (the mount is usable).
    """

    use_ns = True  # times in integer nanoseconds (mfusepy, fusepy >= 3)

    def __init__(
        self,
        tree: Tree,
        *,
        read_only: bool = False,
        on_ready: Callable[[], None] | None = None,
        mountpoint: str = "",
    ) -> None:
        self.mountpoint = mountpoint
        self.tree = tree
        self.read_only = read_only
        self.on_ready = on_ready
        self.mounted = False  # set once the kernel has sent INIT
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.mounted_at = int(time.time() * 1e9)
        self._handles: dict[int, _Handle] = {}
        self._handles_lock = threading.Lock()
        self._next_fh = itertools.count(1)
        self._pending: dict[str, tuple[str, float]] = {}  # path -> (symlink text, expiry)

    # --- life cycle ---------------------------------------------------------

    def init(self, path: str) -> None:
        self.mounted = True
        if self.on_ready is not None:
            self.on_ready()

    def destroy(self, path: str) -> None:
        log.info("unmounted")

    # --- attributes ---------------------------------------------------------

    @functools.cached_property
    def _bases(self) -> dict[Kind, dict[str, Any]]:
        """The attributes of each kind of entry, but its inode."""
        t = self.mounted_at  # nanoseconds: use_ns is honoured by mfusepy and fusepy 3
        shapes = {
            Kind.OBJECT: (stat.S_IFDIR | 0o755, 2, 0),
            Kind.LINK: (stat.S_IFLNK | 0o777, 1, 0),
            Kind.PROPERTY: (stat.S_IFREG | 0o644, 1, FILE_SIZE),
        }
        return {
            kind: {
                "st_mode": mode,
                "st_nlink": nlink,
                "st_size": size,
                "st_uid": self.uid,
                "st_gid": self.gid,
                "st_atime": t,
                "st_mtime": t,
                "st_ctime": t,
                "st_blocks": 0,
            }
            for kind, (mode, nlink, size) in shapes.items()
        }

    def _attrs(self, node: Node) -> dict[str, Any]:
        return dict(self._bases[node.kind], st_ino=inode(node.path))

    @_operation
    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        if self._pending and self._pending_link(path) is not None:
            return self._attrs(Node(path, Kind.LINK, None))
        return self._attrs(self.tree.lookup(path))

    @_operation
    def readdir(self, path: str, fh: Any) -> list[Any]:
        """Plain READDIR (libfuse2): each entry's type and inode."""
        return [".", ".."] + [
            (name, {"st_mode": attrs["st_mode"], "st_ino": ino}, 0)
            for name, ino, attrs in self._entries(path, 2, ahead=True)
        ]

    @_operation
    def readdir_plus(self, path: str, offset: int) -> list[tuple[str, int, dict[str, Any]]]:
        """For READDIRPLUS (libfuse3): from entry ``offset`` on, each entry's
        name, inode and other attributes (one shared dict per kind of entry).
        A call past the first is the kernel asking for the rest, or the end."""
        return self._entries(path, offset, ahead=offset == 0)

    def _entries(
        self, path: str, offset: int, ahead: bool
    ) -> list[tuple[str, int, dict[str, Any]]]:
        props = self.tree.readdir(path, ahead=ahead)
        here = self._bases[Kind.OBJECT]
        entries = [(dot, inode(path), here) for dot in (".", "..")][offset:]
        for prop in props[max(0, offset - 2) :]:
            entries.append((prop.name, inode(join(path, prop.name)), self._bases[prop.kind]))
        return entries

    @_operation
    def readlink(self, path: str) -> str:
        pending = self._pending_link(path) if self._pending else None
        return pending if pending is not None else self.tree.readlink(path)

    @_operation
    def statfs(self, path: str) -> dict[str, Any]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    # --- extended attributes -------------------------------------------------

    def _stats(self) -> bytes:
        stats = self.tree.stats()
        # Not getrusage's ru_maxrss: Linux carries it across exec(), so it
        # would report the peak of whatever process started the daemon.
        stats["maxrss_kib"] = _proc_status_kib("VmHWM")
        return json.dumps(stats, sort_keys=True).encode()

    @_operation
    def listxattr(self, path: str) -> list[str]:
        node = self.tree.lookup(path)
        names = [TYPE_XATTR]
        if node.kind is not Kind.OBJECT:
            names.append(DESCRIPTION_XATTR)
        if path == "/":
            names.append(STATS_XATTR)
        return names

    @_operation
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if not name.startswith("user."):
            # security.selinux, system.posix_acl_*: not ours.  ENOTSUP, not
            # ENODATA: ls(1) then stops asking for every file of this mount.
            raise FuseOSError(errno.ENOTSUP)
        if path == "/" and name == STATS_XATTR:
            return self._stats()
        node = self.tree.lookup(path)
        if name == TYPE_XATTR:
            if node.kind is Kind.OBJECT:
                return self.tree.object_type(path).encode()
            assert node.prop is not None
            return node.prop.type.encode()
        if name == DESCRIPTION_XATTR and node.kind is not Kind.OBJECT:
            return self.tree.description(path).encode()
        raise FuseOSError(ENOATTR)

    # --- files --------------------------------------------------------------

    @_operation
    def open(self, path: str, fi: Any) -> int:
        node = self.tree.lookup(path)
        if node.kind is Kind.OBJECT:
            raise FuseOSError(errno.EISDIR)
        if self.read_only and fi.flags & os.O_ACCMODE != os.O_RDONLY:
            raise FuseOSError(errno.EROFS)
        if fi.flags & os.O_APPEND:
            # A value is replaced whole; appending to it has no meaning.
            raise InvalidValue(f"{path}: appending is not supported; write the whole value")
        fh = next(self._next_fh)
        with self._handles_lock:
            self._handles[fh] = _Handle(path)
        fi.fh = fh
        # The kernel must pass every read to us: st_size is not the length.
        fi.direct_io = 1
        return 0

    def _handle(self, fi: Any) -> _Handle:
        with self._handles_lock:
            handle = self._handles.get(fi.fh)
        if handle is None:
            raise FuseOSError(errno.EBADF)
        return handle

    @_operation
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        handle = self._handle(fi)
        if handle.data is None or offset == 0:
            # A read from the start asks QEMU (or the cache) again, so a file
            # kept open and re-read with pread(0) sees fresh values.
            handle.data = self.tree.read_text(handle.path).encode("utf-8", "surrogateescape")
        return handle.data[offset : offset + size]

    @_operation
    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        if self.read_only:
            raise FuseOSError(errno.EROFS)
        handle = self._handle(fi)
        if offset != len(handle.written):
            # Only a value written from the start, possibly over several
            # write() calls, makes sense; never a patch in the middle.
            raise InvalidValue(
                f"write at offset {offset}: a value must be written whole, from offset 0"
            )
        value = handle.written + data
        self.tree.write(handle.path, value)
        handle.written = value
        handle.data = None
        return len(data)

    @_operation
    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        if self.read_only:
            raise FuseOSError(errno.EROFS)
        node = self.tree.lookup(path)
        if node.kind is Kind.OBJECT:
            raise FuseOSError(errno.EISDIR)
        if length != 0:
            # Truncation to 0 is what "> file" does before the write; any
            # other length has no meaning for a property.
            raise FuseOSError(errno.EINVAL)
        return 0

    def release(self, path: str, fi: Any) -> int:
        with self._handles_lock:
            self._handles.pop(fi.fh, None)
        return 0

    # No flush(): unregistered, it costs one ENOSYS, and then the kernel stops
    # sending FLUSH on every close (one FUSE round trip less per file read).
    flush = None

    def utimens(self, path: str, times: Any = None) -> int:
        return 0  # touch(1) works and changes nothing

    # --- writable links: ln -sfn TARGET LINK ----------------------------------
    #
    # ln -sf cannot replace an existing name with symlink(2): it makes a
    # symlink under a temporary name (CuXXXXXX) and rename(2)s it over LINK.
    # Such a symlink is kept here, in memory, until it is renamed onto a link
    # property (which sets that property) or removed.

    def _pending_link(self, path: str) -> str | None:
        with self._handles_lock:
            hit = self._pending.get(path)
            if hit is not None and hit[1] < time.monotonic():
                del self._pending[path]
                hit = None
        return hit[0] if hit is not None else None

    @_operation
    def symlink(self, target: str, source: str) -> int:
        if self.read_only:
            raise FuseOSError(errno.EROFS)
        parent = target.rsplit("/", 1)[0] or "/"
        if self.tree.lookup(parent).kind is not Kind.OBJECT:
            raise FuseOSError(errno.ENOTDIR)
        try:
            node = self.tree.lookup(target)
        except NotFound:
            if not LN_TEMPORARY.fullmatch(target.rsplit("/", 1)[1]):
                # Only ln's stepping stone; a new link property cannot be made.
                raise FuseOSError(errno.EPERM) from None
            with self._handles_lock:
                self._pending[target] = (source, time.monotonic() + PENDING_LINK_LIFE)
            return 0
        if node.kind is not Kind.LINK:
            raise FuseOSError(errno.EEXIST)
        self.tree.write_link(target, source, self.mountpoint)
        return 0

    @_operation
    def rename(self, old: str, new: str) -> int:
        text = self._pending_link(old)
        if text is None:
            return self._refuse()
        try:
            self.tree.write_link(new, text, self.mountpoint)
        finally:
            with self._handles_lock:
                self._pending.pop(old, None)
        return 0

    @_operation
    def unlink(self, path: str) -> int:
        with self._handles_lock:
            if self._pending.pop(path, None) is not None:
                return 0
        return self._refuse()

    # --- what a QOM tree cannot do -------------------------------------------

    def _refuse(self, *args: Any) -> int:
        raise FuseOSError(errno.EROFS if self.read_only else errno.EPERM)

    create = mkdir = rmdir = link = mknod = _refuse
    chmod = chown = setxattr = removexattr = _refuse
