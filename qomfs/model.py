"""One QEMU's QOM tree over QMP: lookups, listings, values, writes and links,
through a short-TTL cache.

:class:`QOMTree` answers filesystem-shaped questions ("what is at this path?",
"what is in this object?", "what does this property say?") with as few QMP
commands as it can, and turns QEMU's error replies into the exceptions of
:mod:`qomfs.errors`.  It knows nothing of FUSE.

Staleness: an object's property list and any property value (or QEMU's
refusal to give it) may be served from the cache for up to ``ttl`` seconds
after QEMU was asked, whether a reader asked or the read-ahead did.  A write
drops what it may have changed; a ``DEVICE_DELETED`` event drops the device's
subtree at once; a reconnection drops everything.

What a walker such as ``grep -r`` or ``ls -R`` reads next is fetched in the
background by :mod:`qomfs.readahead`, into the same caches.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qomfs.cache import MAX_WAIT, TTLCache
from qomfs.errors import (
    ExecuteError,
    Guarded,
    InvalidValue,
    NotADirectory,
    NotFound,
    NotReadable,
    NotWritable,
    QOMError,
    ReadFailed,
    ValueTooLarge,
)
from qomfs.qmp import Event, QMPClient
from qomfs.readahead import (
    BATCH_CHUNK,
    READAHEAD,
    READAHEAD_LISTED,
    READAHEAD_QUEUE,
    SUBTREE_FLIGHTS,
    SUBTREE_GROWTH,
    SUBTREE_LAG,
    SUBTREE_PACE,
    SUBTREE_WINDOW,
    WALK_RUN,
    ReadAhead,
)
from qomfs.tree import (
    MAX_WRITE,
    QEMU_ORDER,
    SORTED,
    UNSET_LINK,
    Kind,
    Listing,
    Node,
    Property,
    Tree,
    climbs_out,
    is_destructive,
    join,
    parse_list,
    parse_list_get,
    relative_link,
    split,
)
from qomfs.values import decode_text, format_value, parse_value

# What other modules import from here, where it was defined before tree.py
# and readahead.py.
__all__ = [
    "BATCH_CHUNK",
    "MAX_WRITE",
    "QEMU_ORDER",
    "READAHEAD",
    "READAHEAD_LISTED",
    "READAHEAD_QUEUE",
    "SORTED",
    "SUBTREE_FLIGHTS",
    "SUBTREE_GROWTH",
    "SUBTREE_LAG",
    "SUBTREE_PACE",
    "SUBTREE_WINDOW",
    "UNSET_LINK",
    "WALK_RUN",
    "Kind",
    "Listing",
    "Node",
    "Property",
    "QOMTree",
    "Tree",
    "is_destructive",
    "join",
    "parse_list_get",
    "relative_link",
    "split",
]

log = logging.getLogger("qomfs.model")


@dataclass(frozen=True)
class _Failed:
    """A read QEMU refused, cached like a value (as fresh as a value would be)."""

    kind: type[QOMError]
    message: str
    cause: ExecuteError

    def error(self) -> QOMError:
        error = self.kind(self.message, self.cause)
        error.__cause__ = self.cause
        return error


def _is_property_not_found(desc: str, name: str) -> bool:
    """QEMU's "Property 'TYPE.NAME' not found" (or "'NAME'"), not a getter's words."""
    return desc == f"Property '{name}' not found" or (
        desc.startswith("Property '") and desc.endswith(f".{name}' not found")
    )


class QOMTree:
    """Cached, thread-safe access to one QEMU's QOM tree.

    ``batch`` chooses ``qom-list-get`` (QEMU >= 10.1) for listings: ``None``
    uses it when the server offers it.  ``allow_unrealize`` lets a write of
    ``false`` to ``realized`` through.  ``readahead`` (on unless ``ttl`` is
    0) fetches ahead of a reader in the background (see
    :data:`READAHEAD`).  ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        client: QMPClient,
        ttl: float = 1.0,
        *,
        batch: bool | None = None,
        allow_unrealize: bool = False,
        readahead: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.allow_unrealize = allow_unrealize
        self.readahead = readahead and ttl > 0
        self._batch_pref = batch
        # The path of the latest listing fetched, and when it was asked for.
        self._latest: tuple[str, float] = ("", float("-inf"))
        # A reader joining another's fetch waits at most as long as that
        # fetch can take: a wait for a free slot, then for the reply.
        wait = min(2 * client.timeout + 2, MAX_WAIT)
        self._listings: TTLCache[str, Listing] = TTLCache(ttl, clock, wait_timeout=wait)
        self._values: TTLCache[tuple[str, str], Any] = TTLCache(ttl, clock, wait_timeout=wait)
        self._descriptions: TTLCache[str, dict[str, str]] = TTLCache(
            float("inf"), clock, wait_timeout=wait
        )
        self._clock = clock
        #: The clock of the fetch times the model reports (``read_text_timed``).
        self.clock = clock
        self._ahead = ReadAhead(
            self,
            client,
            self._listings,
            self._values,
            ttl=ttl,
            clock=clock,
            enabled=self.readahead,
        )
        client.subscribe(self._on_event)
        client.on_reconnect(self.invalidate_all)

    @property
    def batch(self) -> bool:
        """Whether listings come from ``qom-list-get`` (with values)."""
        if self._batch_pref is not None:
            return self._batch_pref and self.client.has_command("qom-list-get")
        return self.client.has_command("qom-list-get")

    def stats(self) -> dict[str, Any]:
        """Counters for ``user.qomfs.stats``: QEMU version, QMP commands sent."""
        return {
            "qemu": self.client.version,
            "batch": self.batch,
            "ttl": self.ttl,
            "commands": self.client.command_counts(),
            "total": self.client.total_commands(),
        }

    # --- cache control ------------------------------------------------------

    def invalidate_all(self) -> None:
        self._listings.invalidate()
        self._values.invalidate()

    def invalidate(self, path: str) -> None:
        """Forget ``path``, everything below it, and its parent's listing."""
        prefix = path.rstrip("/") + "/"
        parent, _ = split(path)
        self._listings.invalidate(lambda k: k in (path, parent) or k.startswith(prefix))
        self._values.invalidate(lambda k: k[0] == path or k[0].startswith(prefix))

    def _on_event(self, event: Event) -> None:
        if event.name == "DEVICE_DELETED":
            path = event.data.get("path")
            if isinstance(path, str) and path.startswith("/"):
                log.info("device %s deleted: dropping it from the cache", path)
                self.invalidate(path)

    # --- reading ------------------------------------------------------------

    def listing(self, path: str) -> Listing:
        """The properties of the object at ``path`` (cached).

        Raises :class:`NotFound` when there is no such object.
        """
        return self._listings.get(path, lambda: self._fetch_listing(path))

    def _fetch_listing(self, path: str) -> Listing:
        if self.batch and self.ttl > 0:
            # A walker that reaches an object not yet listed gets the next
            # siblings' listings in the same command, in its order.  (A
            # lookup that is no walk, cat's say, gets just the one.)
            more = self._ahead.siblings_to_list(path)
            started, generation = self._clock(), self._listings.generation
            got = self._list_get([path, *more]) if more else None
            if got:
                listings = [listing for listing, _ in got]
                for child in listings[1:]:
                    self._listings.put(child.path, child, started, generation)
                self._ahead.walked_into(listings)
                return listings[0]
            got = self._list_get([path])
            if got:
                return got[0][0]
            # QEMU refused the batch: let qom-list say precisely why.
        return self._list(path)

    def _list(self, path: str) -> Listing:
        """``qom-list`` of the object at ``path``; QEMU's refusal classified."""
        started = self._clock()
        try:
            reply = self.client.execute("qom-list", {"path": path})
        except ExecuteError as err:
            raise self._list_error(path, err) from err
        listing = parse_list(path, reply)
        self._latest = (path, started)
        return listing

    def list_get(
        self, paths: list[str], *, gone_ok: bool = False
    ) -> list[tuple[Listing, dict[str, Any]]]:
        """Each object's listing, with the values of its properties that came
        along, in as few commands as QEMU allows.

        With ``qom-list-get`` (:attr:`batch`) one command lists them all, with
        values (a property whose getter failed has none).  QEMU refuses the
        whole command when one path is gone: then each is asked alone, and
        ``qom-list`` asked for one refused alone says why.  Without
        ``qom-list-get``: listings with no values.  An object that does not
        exist raises :class:`NotFound`, or with ``gone_ok`` is left out.
        """
        got = self._list_get(paths) if self.batch else None
        if got is not None:
            return got
        out: list[tuple[Listing, dict[str, Any]]] = []
        for path in paths:
            one = self._list_get([path]) if self.batch and len(paths) > 1 else None
            if one is None:
                try:
                    one = [(self._listings.get(path, functools.partial(self._list, path)), {})]
                except NotFound:
                    if not gone_ok:
                        raise
                    continue
            out.extend(one)
        return out

    def _list_get(self, paths: list[str]) -> list[tuple[Listing, dict[str, Any]]] | None:
        """``qom-list-get`` for ``paths``; caches the values it brings.

        None when QEMU refuses the command (one invalid path fails it all).
        """
        started, generation = self._clock(), self._values.generation
        try:
            reply = self.client.execute("qom-list-get", {"paths": paths})
        except ExecuteError as err:
            log.debug("qom-list-get %s refused: %s", paths, err)
            return None
        return self._store(paths, reply, started, generation)

    def _store(
        self, paths: list[str], reply: Any, started: float, generation: int
    ) -> list[tuple[Listing, dict[str, Any]]]:
        """Each object of a ``qom-list-get`` reply with its values, which
        go into the cache."""
        out = parse_list_get(paths, reply)
        for listing, values in out:
            props = listing.properties
            self._values.put_many(
                (
                    ((listing.path, name), value)
                    for name, value in values.items()
                    if not props[name].is_child
                ),
                started,
                generation,
            )
        self._latest = (paths[0], started)
        return out

    # What the read-ahead needs of the model (:class:`qomfs.readahead.Model`).

    def store_batch(
        self, paths: list[str], reply: Any, started: float, generation: int
    ) -> list[Listing]:
        """The listings of a ``qom-list-get`` reply; caches its values."""
        return [listing for listing, _ in self._store(paths, reply, started, generation)]

    def refused_value(self, obj: str, name: str, err: ExecuteError) -> Any:
        """What the value cache holds for a ``qom-get`` QEMU refused."""
        return self._failed(obj, name, err)

    def note_listed(self, path: str, started: float) -> None:
        """``path``'s listing was fetched, asked for at ``started``."""
        self._latest = (path, started)

    def readdir(self, path: str, ahead: bool = True) -> list[Property]:
        """The entries of the directory at ``path``.

        ``ahead=False``: no read-ahead (the same directory read again, such as
        the kernel's call for its end).

        With ``qom-list-get`` it also fetches, in one command, the listings
        (and values) of the child objects, which a recursive walk visits next.
        """
        listing = self.listing(path)
        if ahead and self.ttl > 0:
            self._ahead.listed(listing, batch=self.batch)
        return list(listing.properties.values())

    def lookup(self, path: str) -> Node:
        """What ``path`` is.  Costs a command only when the parent is not cached."""
        if path == "/":
            return Node("/", Kind.OBJECT, None)
        parent, name = split(path)
        if not self._listings.peek(parent)[0]:
            # The kernel checks a walker's ancestors again every second, and
            # the objects of a big directory as it gets to them; a listing
            # of ``path`` or below it within the TTL says it is still there.
            old = self._listings.last(parent)
            prop = old.properties.get(name) if old is not None else None
            if (
                prop is not None
                and prop.is_child
                and (self._listings.peek(path)[0] or self._seen_below(path))
            ):
                return Node(path, Kind.OBJECT, prop)
        try:
            listing = self.listing(parent)
        except NotFound:
            # The parent may be a property rather than a missing object.
            grand, pname = split(parent)
            if parent != "/" and self._is_leaf(grand, pname):
                raise NotADirectory(f"{parent} is a property, not an object") from None
            raise
        prop = listing.properties.get(name)
        if prop is None:
            raise NotFound(f"{path}: no such object or property")
        return Node(path, prop.kind, prop)

    def _seen_below(self, path: str) -> bool:
        """Whether the latest listing fetched, within the TTL, is of ``path``
        or of an object below it (QEMU resolved ``path`` then)."""
        latest, when = self._latest
        return self._clock() - when < self.ttl and (
            latest == path or latest.startswith(path.rstrip("/") + "/")
        )

    def _is_leaf(self, obj: str, name: str) -> bool:
        try:
            prop = self.listing(obj).properties.get(name)
        except NotFound:
            return False
        return prop is not None and not prop.is_child

    def get(self, path: str, max_age: float | None = None) -> Any:
        """The value of the property at ``path`` (cached for ``ttl``, or for
        ``max_age`` seconds from when QEMU was asked, if that is less).

        What QEMU refused (not readable, getter failed) is cached the same
        way, so a read-ahead's answer serves the reader that follows.
        """
        obj, name = split(path)
        value = self._values.get((obj, name), lambda: self._fetch_value(obj, name), max_age)
        if self.readahead and not self.batch:
            self._ahead.read(path)
        if isinstance(value, _Failed):
            raise value.error()
        return value

    def _fetch_value(self, obj: str, name: str) -> Any:
        try:
            return self.client.execute("qom-get", {"path": obj, "property": name})
        except ExecuteError as err:
            return self._failed(obj, name, err)

    def _failed(self, obj: str, name: str, err: ExecuteError) -> _Failed:
        error = self._get_error(obj, name, err)
        assert isinstance(error, QOMError)
        return _Failed(type(error), str(error), err)

    def quiesce(self, timeout: float = 10.0) -> bool:
        """Wait until no read-ahead is queued or under way; whether it ended."""
        return self._ahead.quiesce(timeout)

    def close(self) -> None:
        """Drop the read-ahead not yet sent."""
        self._ahead.close()

    def read_text_timed(self, path: str, max_age: float | None = None) -> tuple[str, float]:
        """:meth:`read_text`, and when QEMU was asked for that value (the
        model's clock): a later fetch of the same property is not older."""
        obj, name = split(path)
        value, started = self._values.get_timed(
            (obj, name), lambda: self._fetch_value(obj, name), max_age
        )
        if self.readahead and not self.batch:
            self._ahead.read(path)
        if isinstance(value, _Failed):
            raise value.error()
        return format_value(value), started

    def read_text(self, path: str, max_age: float | None = None) -> str:
        """The text a file at ``path`` shows (see :mod:`qomfs.values`); see
        :meth:`get` for ``max_age``."""
        return format_value(self.get(path, max_age))

    def known_text(self, path: str, max_age: float) -> str | None:
        """The text of the value cached for ``path`` if QEMU was asked for it
        at most ``max_age`` seconds ago; None otherwise, and for a value QEMU
        refused.  Sends nothing: with ``qom-list-get`` a listing brings the
        values of its object, so a directory's sizes are known with it.
        """
        got = self.known_text_timed(path, max_age)
        return None if got is None else got[0]

    def known_text_timed(self, path: str, max_age: float) -> tuple[str, float] | None:
        """:meth:`known_text` and when its value was fetched (the model's clock)."""
        key = split(path)
        hit, value = self._values.peek(key, max_age)
        started = self._values.fetched_at(key)
        if not hit or isinstance(value, _Failed) or started is None:
            return None
        return format_value(value), started

    def readlink(self, path: str) -> str:
        """The relative symlink text of the link property at ``path``.

        An unset link (value ``""``) reads as :data:`UNSET_LINK`, a name that
        resolves nowhere, so ``ls -l`` and ``find`` show a dangling link.
        """
        value = self.get(path)
        if not isinstance(value, str) or not value.startswith("/"):
            return UNSET_LINK
        return relative_link(path, value)

    def object_type(self, path: str) -> str:
        """The class of the object at ``path`` (``T`` of its ``child<T>``)."""
        node = self.lookup(path)
        if node.kind is not Kind.OBJECT:
            raise NotADirectory(f"{path} is a property, not an object")
        return node.prop.target_type if node.prop is not None else "container"

    def description(self, path: str) -> str:
        """QEMU's description of the property at ``path`` ("" when it has none).

        One ``qom-list-properties`` per class, kept for the life of the
        mount: a class's properties do not change while QEMU runs.
        """
        obj, name = split(path)
        cls = self.object_type(obj)
        return self._descriptions.get(cls, lambda: self._fetch_descriptions(cls)).get(name, "")

    def _fetch_descriptions(self, cls: str) -> dict[str, str]:
        try:
            reply = self.client.execute("qom-list-properties", {"typename": cls})
        except ExecuteError as err:
            log.debug("no descriptions for %s: %s", cls, err.desc)
            return {}
        return {
            str(p["name"]): str(p.get("description", ""))
            for p in reply
            if isinstance(p, dict) and "name" in p
        }

    # --- writing ------------------------------------------------------------

    def write(self, path: str, data: bytes) -> None:
        """Set the property at ``path`` from text, converted by its QOM type.

        Raises :class:`InvalidValue` (text or value refused),
        :class:`NotWritable`, :class:`NotFound`, :class:`Guarded` (a write
        that can take the VM down, unless ``allow_unrealize``), or a QMP error.
        """
        if len(data) > MAX_WRITE:
            raise ValueTooLarge(f"value of {len(data)} bytes is larger than {MAX_WRITE}")
        node = self.lookup(path)
        assert node.prop is not None or node.kind is Kind.OBJECT
        if node.kind is Kind.OBJECT or node.prop is None:
            raise NotWritable(f"{path} is an object, not a property")
        value = parse_value(decode_text(data), node.prop.type)
        if not self.allow_unrealize and is_destructive(node.prop.name, value):
            # (Which option permits it is the caller's to say.)
            raise Guarded(f"{path}: refusing a write that can tear down or crash the VM")
        self.set(path, value)

    def write_link(self, path: str, text: str, mountpoint: str = "") -> None:
        """Point the link property at ``path`` where symlink ``text`` leads.

        ``text`` is relative to the link's directory, or absolute under
        ``mountpoint``; :data:`UNSET_LINK` clears the link.  A target outside
        the tree, or one that is not an object, is :class:`InvalidValue`.
        """
        node = self.lookup(path)
        if node.kind is not Kind.LINK:
            raise NotWritable(f"{path} is not a link property")
        if text == UNSET_LINK:
            self.set(path, "")
            return
        if text.startswith("/"):
            prefix = mountpoint.rstrip("/") + "/"
            if not mountpoint or not text.startswith(prefix):
                raise InvalidValue(f"{path}: {text} is outside the mount")
            target = "/" + text[len(prefix) :]
        else:
            # normpath() would silently stop at "/": check the climb first.
            if climbs_out(posixpath.dirname(path), text):
                raise InvalidValue(f"{path}: {text} leads outside the mount")
            target = posixpath.join(posixpath.dirname(path), text)
        target = posixpath.normpath(target)
        try:
            kind = self.lookup(target).kind
        except (NotFound, NotADirectory):
            raise InvalidValue(f"{path}: {text} is not an object in the tree") from None
        if kind is not Kind.OBJECT:
            raise InvalidValue(f"{path}: {text} is a property, not an object")
        self.set(path, target)

    def set(self, path: str, value: Any) -> None:
        """``qom-set`` the property at ``path`` to the JSON ``value``."""
        obj, name = split(path)
        try:
            self.client.execute("qom-set", {"path": obj, "property": name, "value": value})
        except ExecuteError as err:
            raise self._set_error(obj, name, err) from err
        finally:
            # Whatever happened, the old value and the object's shape
            # (links, realized) may be out of date now.
            self._values.invalidate_key((obj, name))
            self._listings.invalidate_key(obj)

    # --- QEMU's errors, classified -------------------------------------------

    @staticmethod
    def _list_error(path: str, err: ExecuteError) -> Exception:
        if err.error_class == "DeviceNotFound":
            return NotFound(f"{path}: no such object", err)
        return ReadFailed(f"qom-list {path}: {err.desc}", err)

    @staticmethod
    def _get_error(obj: str, name: str, err: ExecuteError) -> Exception:
        where = join(obj, name)
        if err.error_class == "DeviceNotFound" or _is_property_not_found(err.desc, name):
            return NotFound(f"{where}: {err.desc}", err)
        if "not readable" in err.desc:
            return NotReadable(f"{where}: {err.desc}", err)
        return ReadFailed(f"{where}: {err.desc}", err)

    @staticmethod
    def _set_error(obj: str, name: str, err: ExecuteError) -> Exception:
        where = join(obj, name)
        if "not writable" in err.desc:
            return NotWritable(f"{where}: {err.desc}", err)
        if err.error_class == "DeviceNotFound" and f"'{obj}'" in err.desc:
            return NotFound(f"{where}: {err.desc}", err)
        if _is_property_not_found(err.desc, name):
            return NotFound(f"{where}: {err.desc}", err)
        return InvalidValue(f"{where}: {err.desc}", err)
