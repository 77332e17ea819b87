"""The FUSE adapter: filesystem operations on a :class:`~qomfs.model.QOMTree`.

This is the only module that thinks in errno.  Every outcome of the core maps
to an errno through :data:`ERRNO` and is logged with what QEMU said.  It also
decides when the bytes written to an open file are a whole value to set (see
:meth:`QOMFS.write`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from qomfs._fuse import (
    KERNEL_CACHE,
    SHARED,
    FuseOSError,
    Operations,
    caller_pid,
    invalidate_path,
    request_counts,
)
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
from qomfs.model import MAX_WRITE, Kind, Node, Tree, join
from qomfs.values import Verdict, judge

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

#: ``st_size`` of a property file whose value cannot be read (no getter, a
#: getter that fails), and of every file with ``--ttl 0``: not 0, so that a
#: read is asked for.  Any other property file's ``st_size`` is the length
#: of its text.
FILE_SIZE = 4096
#: What the kernel may keep of a file's attributes, as a share of the TTL;
#: a size or time reported was at most the rest of the TTL old.
ATTR_SHARE = 0.5
#: How long (at least) what was reported of a file is remembered, to keep
#: its ``st_mtime`` while its text stays the same.
SEEN_RETAIN = 120.0
#: A value written through the mount and sent is kept that long for a
#: process that writes on after it (``(echo a; sleep 1; echo b) > prop``).
WRITER_RETAIN = 60.0
#: ``st_blksize`` of a property file: stdio (glibc takes min(st_blksize,
#: BUFSIZ=8192)), Python's ``open()`` and ``tr`` write in chunks of this size
#: when a value does not fit in one, so a first write() shorter than this is
#: no full buffer of a longer value.
WRITE_BLOCK = 8192
#: The longest error text a log line quotes.
LOG_TEXT = 300
#: ``PF_EXITING`` in the flags of ``/proc/PID/stat``: the task is in exit().
PF_EXITING = 0x4
#: ``dd``'s default block: a first write() of a multiple of this may be the
#: first block of many.
DD_BLOCK = 512

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
    """A log line's worth: the path, our words, and QEMU's error class.

    At most :data:`LOG_TEXT` characters of the error's text: QEMU repeats a
    refused value in its description, and a value may be 64 KiB long.
    """
    text = str(err)
    if len(text) > LOG_TEXT:
        text = f"{text[:LOG_TEXT]}... ({len(text) - LOG_TEXT} more characters)"
    if not text.startswith(path):
        text = f"{path}: {text}"
    cause = err.cause if isinstance(err, QOMError) else None
    if isinstance(cause, ExecuteError):
        text += f" (QEMU {cause.command}: {cause.error_class})"
    if isinstance(err, Guarded):
        text += " (mount with --allow-unrealize to permit)"
    return text


def killed_by_signal(pid: int) -> int:
    """The signal that is killing process ``pid``, or 0.

    A writer killed in the middle of a value (Ctrl-C, SIGKILL, ``timeout``)
    has its descriptors closed by the kernel, and FLUSH cannot tell that close
    from a writer's own.  Its ``/proc/PID/stat`` can: the task is exiting
    (``PF_EXITING``) and its exit code, set before the descriptors are closed,
    holds the signal.  A normal exit, even with a non-zero status, is 0.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return 0
    fields = text[text.rfind(b")") + 2 :].split()  # from field 3, "state"
    try:
        flags, exit_code = int(fields[9 - 3]), int(fields[52 - 3])
    except (IndexError, ValueError):
        return 0
    return exit_code & 0x7F if flags & PF_EXITING else 0


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
    """One open file (or, without OPEN, one file's writer): what it read,
    and the value it is writing."""

    path: str
    data: bytes | None = None  # the value as read, fixed for this open file
    value: bytearray = field(default_factory=bytearray)  # written since offset 0
    sent: bool = True  # ``value`` was set (or refused), or there is none
    failed: int = 0  # the errno of a refusal already reported: nothing more is sent
    qom_type: str | None = None  # the property's type, looked up at the first write
    lock: threading.Lock = field(default_factory=threading.Lock)
    cached: bool = False  # read through the kernel's page cache (an open for reading)
    writers: set[int] = field(default_factory=set)  # without OPEN: the writers' processes
    used: float = 0.0  # without OPEN: when it was last written (monotonic)


@dataclass
class _Seen:
    """What was last reported of a property file: its text and ``st_mtime``."""

    text: str
    data: bytes
    mtime: int  # nanoseconds; a new one whenever the text changes
    reported: float  # monotonic; the kernel may keep the size until then + attr timeout
    dirty: bool = False  # written through the mount: next time, a new mtime
    fetched: float = float("-inf")  # when QEMU was asked for ``text`` (the tree's clock)
    written: float = float("-inf")  # when a write of it began (the tree's clock)


def thread_group(pid: int) -> int:
    """The process (thread group) of thread ``pid``; ``pid`` if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return pid


class QOMFS(Operations):  # type: ignore[misc]
    """fusepy/mfusepy operations.  Thread-safe: FUSE calls from many threads.

    ``read_only`` refuses every write with EROFS before any QMP command.
    ``on_ready`` runs once the kernel has sent INIT (the mount is usable).

    A file's size is the length of its text (with ``--ttl`` above 0); its
    ``st_mtime`` changes whenever a value fetched again has a different
    text, or was written through the mount.  Files are opened with direct
    I/O and a handle per open file: one value per open file, as read.

    Measured alternatives, off by default (see notes): ``kernel_cache``
    (libfuse3): a read-only open reads through the kernel's page cache,
    kept between opens until a getattr shows a new ``st_mtime`` or
    ``st_size``; writers keep direct I/O.  ``no_open``: ``open`` answers
    ENOSYS, the kernel sends no OPEN or RELEASE, and a value being written
    is kept per path and per writing process (see :meth:`write`); a
    writer's bytes then pass through the page cache, where readers see them.
    """

    use_ns = True  # times in integer nanoseconds (mfusepy, fusepy >= 3)

    def __init__(
        self,
        tree: Tree,
        *,
        read_only: bool = False,
        on_ready: Callable[[], None] | None = None,
        mountpoint: str = "",
        no_open: bool | None = None,
        kernel_cache: bool = False,
        sizes: bool = True,
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
        self._seen: dict[str, _Seen] = {}
        self._writers: dict[str, _Handle] = {}  # without OPEN: path -> its value being written
        self._swept = time.monotonic()
        ttl = getattr(tree, "ttl", 1.0)
        ttl = ttl if isinstance(ttl, (int, float)) and ttl >= 0 else 1.0
        #: Sizes are known from values; with a TTL of 0 (every read asks
        #: QEMU) a stat would cost a command of its own: then none is known.
        #: ``sizes=False`` (--no-sizes) shows 4096 for every file, as sysfs.
        self.sizes = sizes and ttl > 0
        #: Readers go through the kernel's page cache (libfuse3, sizes known).
        #: Off by default: a reader whose read() calls span a change of a
        #: growing value gets the old head and the new tail (the kernel's
        #: file size is shared by all; scripts/soak saw "\noak-1\n" once in
        #: 333,000 reads), where direct I/O keeps one value per open file.
        self.kernel_cache = kernel_cache and KERNEL_CACHE and self.sizes
        # Not by default: with no_open a writer's bytes go through the page
        # cache, and a reader at that moment sees them, cut at the old size
        # (scripts/soak: "soak-10" for "soak-9\n", "s").  Kept for measures.
        self.no_open = bool(no_open)
        #: How long the kernel may keep attributes and entries: a share of
        #: the TTL, so that a size it keeps plus the age of the value it
        #: measured stays within the TTL.  (At most 1 s, as before.)
        self.attr_timeout = min(1.0, ATTR_SHARE * ttl) if math.isfinite(ttl) else 1.0
        #: A value reported in a getattr was fetched at most this long ago,
        #: when the kernel's page cache holds values (its content then
        #: follows the sizes).  With direct I/O a read fetches the value
        #: itself: a size is then up to the TTL old, as any value, and a
        #: walker's values fetched ahead are not fetched again for it.
        paged = self.kernel_cache or self.no_open
        self.max_age = self.attr_timeout if math.isfinite(ttl) and paged else None
        # (Names are not capped: an entry's attributes come with it and
        # are kept for attr_timeout only.)
        self.kernel_timeouts = {"attr_timeout": self.attr_timeout}

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
                "st_blksize": WRITE_BLOCK,
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
        attrs = dict(self._bases[node.kind], st_ino=inode(node.path))
        if node.kind is Kind.PROPERTY and self.sizes:
            try:
                data, mtime = self._text(node.path, self.max_age)
            except (NotReadable, ReadFailed) as err:
                # QEMU refused the value (no getter, a getter that fails):
                # a read says why.  A timeout or a lost connection is the
                # stat's own error.
                log.debug("%s: no size: %s", node.path, err)
                return attrs
            attrs.update(
                st_size=len(data),
                st_blocks=(len(data) + 511) // 512,
                st_mtime=mtime,
                st_ctime=mtime,
            )
        return attrs

    def _text(self, path: str, max_age: float | None) -> tuple[bytes, int]:
        """The text of the property at ``path`` (fetched at most ``max_age``
        seconds ago) and its ``st_mtime``, noted as reported to the kernel."""
        timed = getattr(self.tree, "read_text_timed", None)
        if timed is None:  # a tree without fetch times (a forest): in order of answers
            return self._note(path, self.tree.read_text(path), None)
        text, fetched = timed(path, max_age)
        return self._note(path, text, fetched)

    def _now(self) -> float:
        """The tree's clock, that of its fetch times."""
        clock: Callable[[], float] = getattr(self.tree, "clock", time.monotonic)
        return clock()

    def _note(self, path: str, text: str, fetched: float | None) -> tuple[bytes, int]:
        """Note ``text``, fetched at ``fetched`` (the tree's clock), as what the
        kernel is told of ``path``; its bytes and mtime.

        Answers can come back out of order: one fetched before what was
        noted already (or before a write began) is not news, and the text
        noted stays.  So what the kernel is told never goes back in time.
        """
        now = time.monotonic()
        with self._handles_lock:
            seen = self._seen.get(path)
            if (
                seen is not None
                and fetched is not None
                and seen.mtime  # (0: only a write's mark, nothing reported yet)
                and (fetched < seen.fetched or fetched < seen.written)
            ):
                return seen.data, seen.mtime
            if seen is not None and seen.text == text and not seen.dirty:
                seen.reported = now
                if fetched is not None:
                    seen.fetched = fetched
                return seen.data, seen.mtime
            mtime = time.time_ns()
            if seen is not None and mtime <= seen.mtime:
                mtime = seen.mtime + 1  # changed: the time must change too
            data = text.encode("utf-8", "surrogateescape")
            self._seen[path] = _Seen(
                text,
                data,
                mtime,
                now,
                fetched=fetched if fetched is not None else float("-inf"),
                written=seen.written if seen is not None else float("-inf"),
            )
            if now - self._swept > SEEN_RETAIN / 4:
                self._sweep(now)
        return data, mtime

    def _sweep(self, now: float) -> None:
        """Forget what was reported long ago, and writers long done (lock held)."""
        self._swept = now
        keep = max(SEEN_RETAIN, 4 * self.attr_timeout)
        self._seen = {p: s for p, s in self._seen.items() if now - s.reported < keep}
        self._writers = {
            p: h
            for p, h in self._writers.items()
            if not h.sent or h.failed or now - h.used < WRITER_RETAIN
        }

    def _reported(self, path: str) -> bytes | None:
        """The text the kernel was told the size of, while it may keep it
        (a read in the middle of a write included: what it reads agrees
        with the size it holds)."""
        with self._handles_lock:
            seen = self._seen.get(path)
            if seen is None or time.monotonic() - seen.reported > self.attr_timeout:
                return None
            return seen.data

    def _touch(self, path: str, starts: bool = True) -> None:
        """``path`` is written: its next report gets a new ``st_mtime`` (the
        kernel then drops what it kept).  ``starts``: a write begins, and
        a value fetched before now is no news after it."""
        with self._handles_lock:
            seen = self._seen.get(path)
            if seen is None:  # nothing reported yet: a mark of the write alone
                seen = self._seen[path] = _Seen("", b"", 0, float("-inf"))
            seen.dirty = True
            if starts:
                seen.written = self._now()

    @_operation
    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        if self._pending and self._pending_link(path) is not None:
            return dict(self._bases[Kind.LINK], st_ino=inode(path))
        return self._attrs(self.tree.lookup(path))

    @_operation
    def readdir(self, path: str, fh: Any) -> list[Any]:
        """Plain READDIR (libfuse2): each entry's type and inode."""
        return [".", ".."] + [
            (name, {"st_mode": attrs["st_mode"], "st_ino": ino}, 0)
            for name, ino, attrs, _ in self._entries(path, 2, ahead=True, sizes=False)
        ]

    @_operation
    def readdir_plus(self, path: str, offset: int) -> list[tuple[str, int, dict[str, Any], Any]]:
        """For READDIRPLUS (libfuse3): from entry ``offset`` on, each entry's
        name, inode, attributes (one shared dict per kind of entry) and what
        differs for it: :data:`~qomfs._fuse.SHARED` (nothing), ``(size,
        mtime)`` of a property whose value is known, or None for one whose
        value is not (the kernel then asks for its attributes by LOOKUP).
        A call past the first is the kernel asking for the rest, or the end."""
        return self._entries(path, offset, ahead=offset == 0, sizes=True)

    def _entries(
        self, path: str, offset: int, ahead: bool, sizes: bool
    ) -> list[tuple[str, int, dict[str, Any], Any]]:
        props = self.tree.readdir(path, ahead=ahead)
        here = self._bases[Kind.OBJECT]
        entries: list[tuple[str, int, dict[str, Any], Any]] = [
            (dot, inode(path), here, SHARED) for dot in (".", "..")
        ][offset:]
        known: Callable[[str, float], tuple[str, float] | None] | None = getattr(
            self.tree, "known_text_timed", None
        )
        max_age = self.max_age if self.max_age is not None else float("inf")
        for prop in props[max(0, offset - 2) :]:
            child = join(path, prop.name)
            extra: Any = SHARED
            if sizes and prop.kind is Kind.PROPERTY:
                got = known(child, max_age) if known is not None else None
                if got is None:
                    extra = None
                else:
                    data, mtime = self._note(child, *got)
                    extra = (len(data), mtime)
            entries.append((prop.name, inode(child), self._bases[prop.kind], extra))
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
        # Requests the kernel sent into Python, by the operation that
        # served them (getattr: LOOKUP and GETATTR).
        stats["fuse"] = request_counts()
        return json.dumps(stats, sort_keys=True).encode()

    @_operation
    def listxattr(self, path: str) -> list[str]:
        if self._pending and self._pending_link(path) is not None:
            return []
        node = self.tree.lookup(path)
        if node.kind is Kind.LINK:
            # Linux refuses user.* attributes on symlinks (ENODATA) before
            # asking us: list none that could not be read.
            return []
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
        if self.no_open:
            # From now on the kernel opens files without asking, keeps their
            # pages, and sends neither OPEN nor RELEASE (nor their O_TRUNC:
            # see _fuse, FUSE_CAP_ATOMIC_O_TRUNC).
            raise FuseOSError(errno.ENOSYS)
        node = self.tree.lookup(path)
        if node.kind is Kind.OBJECT:
            raise FuseOSError(errno.EISDIR)
        if self.read_only and fi.flags & os.O_ACCMODE != os.O_RDONLY:
            raise FuseOSError(errno.EROFS)
        if fi.flags & os.O_APPEND:
            # A value is replaced whole; appending to it has no meaning.
            raise InvalidValue(f"{path}: appending is not supported; write the whole value")
        fh = next(self._next_fh)
        reader = fi.flags & os.O_ACCMODE == os.O_RDONLY
        cached = reader and self.kernel_cache
        with self._handles_lock:
            self._handles[fh] = _Handle(path, cached=cached)
        fi.fh = fh
        if cached:
            # A reader reads through the kernel's page cache, kept from one
            # open to the next: the kernel drops it when a getattr shows a
            # new st_mtime or st_size (auto_inval_data).
            fi.direct_io = 0
            fi.keep_cache = 1
        else:
            # A writer's bytes never enter the page cache, where readers
            # would see a value being written; and without sizes (libfuse2
            # aside: --ttl 0), every read comes to us.
            fi.direct_io = 1
        if reader and hasattr(fi, "noflush"):
            # A reader has nothing to flush: spare its close a FLUSH round
            # trip (libfuse >= 3.11; a kernel without FOPEN_NOFLUSH ignores it).
            fi.noflush = 1
        return 0

    def _writer(self, path: str, offset: int) -> _Handle:
        """Without OPEN: the value being written to ``path`` by this process."""
        process = thread_group(caller_pid())
        with self._handles_lock:
            handle = self._writers.get(path)
            if handle is None or (offset == 0 and process not in handle.writers):
                handle = self._writers[path] = _Handle(path)
            handle.writers.add(process)
            handle.used = time.monotonic()
        return handle

    def _handle(self, fi: Any) -> _Handle:
        with self._handles_lock:
            handle = self._handles.get(fi.fh)
        if handle is None:
            raise FuseOSError(errno.EBADF)
        return handle

    @_operation
    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        if not getattr(fi, "fh", 0):
            # No open file: the kernel fills its page cache.  The text whose
            # size it was told, while it may keep that size; else anew.
            data = self._reported(path)
            if data is None:
                data, _ = self._text(path, self.max_age)
            return data[offset : offset + size]
        handle = self._handle(fi)
        if handle.cached:
            # The kernel's page cache: the text whose size it holds.
            data = self._reported(path)
            if data is None:
                data, _ = self._text(path, self.max_age)
            return data[offset : offset + size]
        if handle.data is None or offset == 0:
            # A read from the start asks QEMU (or the cache) again, so a file
            # kept open and re-read with pread(0) sees fresh values.
            handle.data, _ = self._text(handle.path, None)
        return handle.data[offset : offset + size]

    # --- writing a value ------------------------------------------------------
    #
    # An open file collects what it writes from offset 0 and sends it whole,
    # with one qom-set, or not at all; nothing is set from part of a value.
    # When (see README, "Text format"):
    #
    # * A first write() at offset 0 shorter than WRITE_BLOCK and no multiple of
    #   DD_BLOCK is taken for a whole value (echo, printf, a small cat, Python's
    #   write of a small string): set by that call, its error returned by it,
    #   because the shells' builtins never look at close().  Text that is no
    #   value yet, with no newline at its end, waits for more instead.
    # * Anything longer, and what follows, is kept and set at close (FLUSH),
    #   where cat, dd, tr, tee, cp and Python see the error.  FLUSH comes at
    #   the close of every descriptor of the open file: a value is sent at
    #   the first close after it was written, not again at the next.  Not
    #   when the closing process is dying of a signal (Ctrl-C in the middle).
    # * Text that no more bytes can make valid ("maybe" for a bool, bad JSON
    #   before its end) is refused at the write() that shows it (EINVAL), and a
    #   value past MAX_WRITE at the write() that crosses it (EFBIG).
    # * Once this open file's value was refused, its later writes get the same
    #   error and nothing more is sent for it.
    # A first write that looks whole and is followed by more ((echo a; echo
    # b) > prop) is set twice: by its write(), then whole at close.
    #
    # Without OPEN (no_open) there is no open file: writes come with fh 0.
    # The value being written is then kept per path, with the processes that
    # wrote it; a FLUSH sends it only when it comes from one of them (a
    # reader's close is no end of a value).  A truncate to 0 (O_TRUNC,
    # ftruncate) or a write at offset 0 from another process starts anew.

    @_operation
    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        if self.read_only:
            raise FuseOSError(errno.EROFS)
        self._touch(path)
        handle = self._handle(fi) if getattr(fi, "fh", 0) else self._writer(path, offset)
        with handle.lock:
            if handle.failed:
                raise FuseOSError(handle.failed)
            with self._refusals(handle):
                return self._write(handle, data, offset)

    def _write(self, handle: _Handle, data: bytes, offset: int) -> int:
        if offset == 0 and handle.value:
            handle.value.clear()  # written again from the start: a new value
            handle.sent = True
        if offset != len(handle.value):
            # Only a value written from the start, possibly over several
            # write() calls, makes sense; never a patch in the middle.
            raise InvalidValue(
                f"write at offset {offset} after {len(handle.value)} bytes: "
                "a value is written whole, from offset 0, in order"
            )
        size = len(handle.value) + len(data)
        if size > MAX_WRITE:
            raise ValueTooLarge(f"value of {size} bytes or more is larger than {MAX_WRITE}")
        if handle.qom_type is None:
            node = self.tree.lookup(handle.path)
            if node.kind is Kind.OBJECT or node.prop is None:
                raise FuseOSError(errno.EISDIR)
            handle.qom_type = node.prop.type
        first = not handle.value
        handle.value += data
        handle.sent = False
        handle.data = None
        verdict, err = judge(bytes(handle.value), handle.qom_type)
        whole = first and len(data) < WRITE_BLOCK and len(data) % DD_BLOCK != 0
        if whole and (verdict is Verdict.VALID or data.endswith(b"\n")):
            handle.sent = True
            try:
                self.tree.write(handle.path, bytes(handle.value))
            finally:
                self._touch(handle.path, starts=False)
        elif verdict is Verdict.INVALID:
            assert err is not None
            raise err
        return len(data)

    @contextlib.contextmanager
    def _refusals(self, handle: _Handle) -> Iterator[None]:
        """Remember the errno of a refusal: this open file sends nothing more."""
        try:
            yield
        except FuseOSError as err:
            handle.failed = err.errno
            raise
        except QomfsError as err:
            handle.failed = errno_for(err)
            raise
        except Exception:
            handle.failed = errno.EIO
            raise

    @_operation
    def flush(self, path: str, fi: Any) -> int:
        """close() of a descriptor: set the value written since the last one."""
        fh = getattr(fi, "fh", 0)
        pid = caller_pid()
        with self._handles_lock:
            handle = self._handles.get(fh) if fh else self._writers.get(path)
        if handle is None:
            return 0  # a reader's close (no_open: every close comes here)
        if not fh and (handle.sent or thread_group(pid) not in handle.writers):
            return 0  # not the end of this value: another process closes
        with handle.lock:
            sent = self._send(handle, pid)
        if sent:
            self._invalidate(path)
        return 0

    def _invalidate(self, path: str) -> None:
        """Make the kernel forget ``path``'s pages and attributes now (a
        value set at close, after the writes that marked them stale; a stat
        in between may have refreshed them).  In a thread: the kernel is
        waiting for this request's answer; joined briefly so that the
        closing process's next read is fresh."""
        done = threading.Thread(target=invalidate_path, args=(path,), daemon=True)
        done.start()
        done.join(0.5)

    def _send(self, handle: _Handle, pid: int = 0) -> bool:
        """Set the value written, unless sent already; whether it was sent."""
        if handle.failed or handle.sent:
            return False
        handle.sent = True  # once: a refusal is not sent again at the next close
        signal = killed_by_signal(pid) if pid else 0
        if signal:
            log.warning(
                "%s: the writer (pid %d) was killed by signal %d before it closed the file: "
                "what it wrote is not set",
                handle.path,
                pid,
                signal,
            )
            # Not sent at RELEASE either; a process that shares the open
            # file and writes on sends it all at its own close.
            return False
        with self._refusals(handle):
            try:
                self.tree.write(handle.path, bytes(handle.value))
            finally:
                self._touch(handle.path, starts=False)
        return True

    @_operation
    def truncate(self, path: str, length: int, fi: Any = None) -> int:
        if self.read_only:
            raise FuseOSError(errno.EROFS)
        node = self.tree.lookup(path)
        if node.kind is Kind.OBJECT:
            raise FuseOSError(errno.EISDIR)
        if length != 0:
            # Truncation to 0 is what "> file" does before the write; any
            # other length has no meaning for a property.
            raise FuseOSError(errno.EINVAL)
        self._touch(path)
        fh: int | None = getattr(fi, "fh", None)  # only ftruncate() passes the open file
        with self._handles_lock:
            if not fh:
                # No open file (no_open): O_TRUNC or ftruncate(fd, 0) of
                # this path; what was being written to it is gone.
                self._writers.pop(path, None)
            handle = self._handles.get(fh) if fh else None
        if handle is not None:
            # ftruncate(fd, 0): what this open file wrote is gone, not set.
            with handle.lock:
                handle.value.clear()
                handle.sent = True
        return 0

    def release(self, path: str, fi: Any) -> int:
        with self._handles_lock:
            handle = self._handles.pop(fi.fh, None)
        if handle is not None and not handle.sent and not handle.failed:
            # No FLUSH came (the kernel sends one at every close, so hardly
            # ever): the value is set still; nobody is left to hear an error.
            with handle.lock:
                try:
                    self._send(handle)
                except Exception as err:  # logged: nobody is left to tell
                    log.warning("%s: value written and closed, then refused: %s", path, err)
        return 0

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
