"""The QOM tree as paths, objects and properties, with a short-TTL cache.

:class:`QOMTree` answers filesystem-shaped questions ("what is at this path?",
"what is in this object?", "what does this property say?") with as few QMP
commands as it can, and turns QEMU's error replies into the exceptions of
:mod:`qomfs.errors`.  It knows nothing of FUSE.

Staleness: an object's property list and any property value (or QEMU's
refusal to give it) may be served from the cache for up to ``ttl`` seconds
after QEMU was asked, whether a reader asked or the read-ahead did.  A write
drops what it may have changed; a ``DEVICE_DELETED`` event drops the device's
subtree at once; a reconnection drops everything.

Read-ahead (see the section of :class:`QOMTree` so named) fetches in the
background what a walker such as ``grep -r`` or ``ls -R`` reads next, so that
QEMU answers while the walker is busy with FUSE.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import logging
import posixpath
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from qomfs.cache import TTLCache
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
from qomfs.qmp import MAX_BATCH, Event, QMPClient
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
    parse_list_get,
    relative_link,
    split,
)
from qomfs.values import decode_text, format_value, parse_value

# What other modules import from here, where it was defined before tree.py.
__all__ = [
    "MAX_WRITE",
    "QEMU_ORDER",
    "SORTED",
    "UNSET_LINK",
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


#: Read-ahead, for a reader that goes through a directory in order (``grep
#: -r``, ``ls -lR``) or descends into one child object after another (``ls
#: -R``, ``find``): once it has read two entries of a directory within the
#: TTL, the next entries of the same kind are fetched in the background, so
#: QEMU answers while the reader is busy with FUSE.  Only what such a reader
#: is about to ask for, so the command count stays that of the walk.
READAHEAD = 8
#: Reads in a row, in order, that make a walk.
WALK_RUN = 2
#: A directory listed during a walk: its first properties of the walked kinds
#: (a walker reads them all, in whatever order it sorts them).
READAHEAD_LISTED = 64
#: At most this many read-ahead commands queued or in flight.
READAHEAD_QUEUE = 256
#: With ``qom-list-get``: child objects listed per command, ahead of a walker.
BATCH_CHUNK = 64
#: With ``qom-list-get``, during a walk of objects: at most this many
#: listings fetched ahead of the walker (in flight, or come and not yet read
#: by it); BATCH_CHUNK at first, and SUBTREE_GROWTH more for each it read
#: that came so (two neighbours listed may be no walk of the whole tree) ...
SUBTREE_WINDOW = 16 * BATCH_CHUNK
SUBTREE_GROWTH = 4
#: ... and no more than it lists in this part of the TTL, at the pace of
#: its last SUBTREE_PACE listings (``grep -r``, reading files between
#: directories, lists ten times slower than ``ls -R``); none while the next
#: it reads has waited for it that long (so that what it reads is not stale
#: by then) ...
SUBTREE_LAG = 0.5
SUBTREE_PACE = 64
#: ... in at most this many commands at a time: the objects found meanwhile
#: make the next command's batch.
SUBTREE_FLIGHTS = 2


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
        self._ra_lock = threading.Lock()
        # (dir, kind) -> (when, name) of the last read there, and how many
        # reads in a row came one right after the other
        self._ra_seen: dict[tuple[str, Kind], tuple[float, str, int]] = {}
        self._ra_walks: dict[Kind, tuple[float, int]] = {}  # kind -> (until, order) of a walk
        self._ra_busy: set[tuple[str, str]] = set()  # queued or in flight
        self._ra_queue: collections.deque[tuple[Callable[..., bool], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._ra_pending = 0  # read-ahead queued or under way
        self._ra_stalled_until = float("-inf")  # no read-ahead before then
        self._ra_idle = threading.Condition(self._ra_lock)
        # With qom-list-get, during a walk of objects: the objects to list,
        # a heap by their place in the walker's order; that of the object it
        # listed last; the objects listed ahead and not yet read, with when;
        # and how many are in flight.
        self._frontier: list[tuple[tuple[int, ...], str]] = []
        self._frontier_order = 0
        self._walker_at: tuple[int, ...] = ()
        self._unread: dict[str, float] = {}
        self._unread_places: list[tuple[tuple[int, ...], str]] = []  # a heap
        self._descended: set[str] = set()  # whose child objects it has had
        self._frontier_hits = 0  # objects the walker found listed ahead
        self._walker_times: collections.deque[float] = collections.deque(maxlen=SUBTREE_PACE)
        self._frontier_flight = 0
        self._frontier_sent = 0  # commands
        # The path of the latest listing fetched, and when it was asked for.
        self._latest: tuple[str, float] = ("", float("-inf"))
        self._listings: TTLCache[str, Listing] = TTLCache(ttl, clock)
        self._values: TTLCache[tuple[str, str], Any] = TTLCache(ttl, clock)
        self._descriptions: TTLCache[str, dict[str, str]] = TTLCache(float("inf"), clock)
        self._clock = clock
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
            parent, name = split(path)
            siblings = self._listings.peek(parent)[1] if path != "/" else None
            order = self._walk_order(Kind.OBJECT)
            ahead = siblings.following(name, BATCH_CHUNK - 1, order) if siblings and order else ()
            more = self._unlisted(parent, ahead)[: BATCH_CHUNK - 1]
            started, generation = self._clock(), self._listings.generation
            listings = self._fetch_batch([path, *more]) if more else []
            if listings:
                for child in listings[1:]:
                    self._listings.put(child.path, child, started, generation)
                self._walked_into(listings)
                return listings[0]
            listings = self._fetch_batch([path])
            if listings:
                return listings[0]
            # QEMU refused the batch: let qom-list say precisely why.
        started = self._clock()
        try:
            reply = self.client.execute("qom-list", {"path": path})
        except ExecuteError as err:
            raise self._list_error(path, err) from err
        listing = self._listing_from(path, reply)
        self._latest = (path, started)
        return listing

    def _unlisted(self, obj: str, names: Sequence[str]) -> list[str]:
        """The paths of ``obj``'s child objects ``names`` not listed in the cache."""
        paths = (join(obj, name) for name in names)
        return [path for path in paths if not self._listings.peek(path)[0]]

    @staticmethod
    def _listing_from(path: str, reply: Any) -> Listing:
        if not isinstance(reply, list):
            raise ReadFailed(f"qom-list {path}: unexpected reply {reply!r}")
        props = [Property.from_wire(item) for item in reply]
        return Listing(path, {p.name: p for p in props})

    def _fetch_batch(self, paths: list[str]) -> list[Listing]:
        """``qom-list-get`` for ``paths``; caches the values it brings.

        Returns [] when QEMU refuses the batch (one invalid path fails it all).
        """
        started, generation = self._clock(), self._values.generation
        try:
            reply = self.client.execute("qom-list-get", {"paths": paths})
        except ExecuteError as err:
            log.debug("qom-list-get %s refused: %s", paths, err)
            return []
        return self._from_batch(paths, reply, started, generation)

    def _from_batch(
        self, paths: list[str], reply: Any, started: float, generation: int
    ) -> list[Listing]:
        """The listings in a ``qom-list-get`` reply; caches the values."""
        out = []
        for listing, values in parse_list_get(paths, reply):
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
            out.append(listing)
        self._latest = (paths[0], started)
        return out

    def readdir(self, path: str, ahead: bool = True) -> list[Property]:
        """The entries of the directory at ``path``.

        ``ahead=False``: no read-ahead (the same directory read again, such as
        the kernel's call for its end).

        With ``qom-list-get`` it also fetches, in one command, the listings
        (and values) of the child objects, which a recursive walk visits next.
        """
        listing = self.listing(path)
        if ahead and self.batch and self.ttl > 0:
            order, ahead_of_it = self._object_walk(path) if self.readahead else (0, False)
            if order:
                # A walker goes through the whole subtree: list it, a level
                # at a time and depth first, a window ahead of the walker
                # (already under way if this listing came so: the window
                # has moved on).
                if ahead_of_it:
                    self._pump()
                else:
                    self._walk_from(listing, order)
            elif missing := self._unlisted(path, listing.names(Kind.OBJECT))[:BATCH_CHUNK]:
                # In the background: the walker works through this directory
                # meanwhile, and waits only for a child it reaches first.
                self._submit(self._fetch_batch_ahead, missing, self.readahead)
        elif ahead and self.readahead:
            self._ahead_of_listing(listing)
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

    def get(self, path: str) -> Any:
        """The value of the property at ``path`` (cached for ``ttl``).

        What QEMU refused (not readable, getter failed) is cached the same
        way, so a read-ahead's answer serves the reader that follows.
        """
        obj, name = split(path)
        value = self._values.get((obj, name), lambda: self._fetch_value(obj, name))
        if self.readahead and not self.batch:
            self._ahead_of_read(path)
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

    # --- read-ahead -----------------------------------------------------------
    #
    # A walker reads one kind of entry after another in a directory, in one
    # order: grep -r its plain properties in QEMU's order (readdir's), ls -lR
    # its links sorted, ls -R (sorted) and find (QEMU's order) its child
    # objects, by listing them.  WALK_RUN reads of one kind in one directory,
    # each right after the one before in one order and within the TTL, start a
    # walk of that kind in that order, which lasts until ``ttl`` after the
    # last such read.  During a walk:
    # - a read fetches the next READAHEAD values of its kind;
    # - a listed directory fetches its first READAHEAD_LISTED values of the
    #   kinds walked (in QEMU's order, those before its first child object:
    #   grep -r reads the rest once back from that child's subtree);
    # - a walk of objects is depth-first: each listing fetches the listings
    #   of the next READAHEAD objects in that walker's order, as far as the
    #   listings cached tell (an object not yet listed counts as having no
    #   child objects; once listed, its own come before its siblings).
    # With qom-list-get (listings with values), a walk of objects is listed
    # as a whole: the child objects of each listing that comes go on a
    # frontier, a heap by where the walker lists them, which is sent 64
    # objects a command, at most SUBTREE_FLIGHTS commands at a time, and a
    # window ahead of the walker (SUBTREE_WINDOW, SUBTREE_LAG).

    def _walk_read(self, listing: Listing, name: str, kind: Kind) -> int:
        """Note a read of ``name`` (of ``kind``) in ``listing``'s object;
        the order of the walk of that kind going on (0: none)."""
        now = self._clock()
        key = (listing.path, kind)
        with self._ra_lock:
            last = self._ra_seen.get(key)
            run, order = 1, 0
            if last is not None and now - last[0] < self.ttl:
                if last[1] == name:  # the same again (readdir's second call)
                    run = last[2]
                else:
                    order = listing.adjacent(last[1], name)
                    run = last[2] + 1 if order else 1
            self._ra_seen[key] = (now, name, run)
            if len(self._ra_seen) > 4096:
                self._ra_seen = {k: v for k, v in self._ra_seen.items() if now - v[0] < self.ttl}
            if run >= WALK_RUN:
                # Reads that fit both orders keep the one the walk had.
                until, was = self._ra_walks.get(kind, (0.0, 0))
                if until > now and order & was:
                    order &= was
                elif until <= now and kind is Kind.OBJECT:
                    self._forget_frontier()  # a new walk
                self._ra_walks[kind] = (now + self.ttl, order)
            until, walk_order = self._ra_walks.get(kind, (0.0, 0))
            return walk_order if until > now else 0

    def _walk_order(self, kind: Kind) -> int:
        """The order of the walk of ``kind`` going on (0: none)."""
        with self._ra_lock:
            until, order = self._ra_walks.get(kind, (0.0, 0))
        return order if until > self._clock() else 0

    def _walks(self) -> list[tuple[Kind, int]]:
        """The walks going on: (kind, order)."""
        now = self._clock()
        with self._ra_lock:
            return [(kind, order) for kind, (until, order) in self._ra_walks.items() if until > now]

    def _ahead_of_read(self, path: str) -> None:
        """The property at ``path`` was read: fetch its next siblings' values."""
        obj, name = split(path)
        listing = self._listings.peek(obj)[1]
        prop = listing.properties.get(name) if listing is not None else None
        if listing is not None and prop is not None:
            order = self._walk_read(listing, name, prop.kind)
            if order:
                self._prefetch(obj, listing.following(name, READAHEAD, order), prop.kind)

    def _listed_by_walker(self, path: str) -> list[tuple[Kind, int]]:
        """Note that ``readdir`` listed ``path``; the walks going on."""
        if path != "/":
            parent, name = split(path)
            # (Expired or not: it tells the order of the siblings.)
            siblings = self._listings.last(parent)
            if siblings is not None:
                self._walk_read(siblings, name, Kind.OBJECT)
        return self._walks()

    def _object_walk(self, path: str) -> tuple[int, bool]:
        """Note that ``readdir`` listed ``path``: the order of the walk of
        objects going on (0: none), and whether the listing came ahead of
        the walker, with the frontier."""
        walks = self._listed_by_walker(path)
        order = next((order for kind, order in walks if kind is Kind.OBJECT), 0)
        at = self._place(path, order) if order else None
        now = self._clock()
        with self._ra_lock:
            ahead = self._unread.pop(path, None) is not None
            self._frontier_hits += ahead
            if at is not None:
                self._walker_at = at
                self._walker_times.append(now)
        return order, ahead

    def _place(self, path: str, order: int) -> tuple[int, ...] | None:
        """Where a depth-first walker in ``order`` lists ``path``: the index
        of each of its ancestors and of itself among their siblings, as far
        as cached listings (even expired) tell; they compare as the walker
        goes."""
        place: list[int] = []
        while path != "/":
            parent, name = split(path)
            listing = self._listings.last(parent)
            index = listing.index(name, order) if listing is not None else None
            if index is None:
                return None
            place.append(index)
            path = parent
        return tuple(reversed(place))

    def _ahead_of_listing(self, listing: Listing) -> None:
        """``listing`` was just read by ``readdir``: fetch what a walker
        reads next (the next objects it lists, this object's entries)."""
        path = listing.path
        walks = self._listed_by_walker(path)
        for kind, order in walks:
            if kind is Kind.OBJECT:
                self._list_ahead(path, order)
        self._ahead_of_listed(listing, walks)

    def _ahead_of_listed(self, listing: Listing, walks: Sequence[tuple[Kind, int]]) -> None:
        for kind, order in walks:
            if kind is not Kind.OBJECT:
                self._prefetch(listing.path, listing.first(kind, READAHEAD_LISTED, order), kind)

    def _list_ahead(self, path: str, order: int) -> None:
        """Fetch the listings of the next :data:`READAHEAD` objects that a
        depth-first walker at ``path`` lists, as far as the cache can tell."""
        todo: dict[str, list[str]] = {}
        for nxt in itertools.islice(self._preorder_after(path, order), READAHEAD):
            parent, name = split(nxt)
            todo.setdefault(parent, []).append(name)
        for parent, names in todo.items():  # (what is cached, _prefetch skips)
            self._prefetch(parent, tuple(names), Kind.OBJECT)

    def _preorder_after(self, path: str, order: int) -> Iterator[str]:
        """The objects a depth-first walker lists after ``path``: its child
        objects in ``order``, each followed by its own subtree, then the
        objects after ``path`` and after each of its ancestors.  Listings
        cached (even expired) tell the tree; an object not listed is taken
        as having no child objects."""
        levels: list[Iterator[str]] = []
        nxt = climbed = path
        while True:
            listing = self._listings.last(nxt)
            if listing is not None:
                names = listing.in_order(Kind.OBJECT, order)
                levels.append(map(functools.partial(join, nxt), names))
            while True:
                got = next(levels[-1], None) if levels else None
                if got is not None:
                    break
                if levels:
                    levels.pop()
                    continue
                # Below ``climbed``, all is told: what follows it comes next.
                if climbed == "/":
                    return
                parent, name = split(climbed)
                above = self._listings.last(parent)
                if above is None:
                    return
                levels.append(map(functools.partial(join, parent), above.after(name, order)))
                climbed = parent
            nxt = got
            yield nxt

    def _prefetch(self, obj: str, names: tuple[str, ...], kind: Kind) -> None:
        if self._stalled():
            return
        todo: list[str] = []
        for name in names:
            item = (obj, name)
            if kind is Kind.OBJECT:
                fresh = self._listings.peek(join(obj, name))[0]
            else:
                fresh = self._values.peek(item)[0]
            if fresh:
                continue
            with self._ra_lock:
                if item in self._ra_busy or len(self._ra_busy) >= READAHEAD_QUEUE:
                    continue
                self._ra_busy.add(item)
            todo.append(name)
        for i in range(0, len(todo), MAX_BATCH):
            self._submit(self._fetch_ahead, obj, tuple(todo[i : i + MAX_BATCH]), kind)

    def _walk_from(self, listing: Listing, order: int) -> None:
        """A walker in ``order`` lists ``listing``, which did not come ahead
        of it: put on the frontier its child objects, its next siblings and
        the child objects of those already listed (marked as seen to, but
        with no say in how far ahead the walk is listed: they were listed
        otherwise)."""
        listings, seen = [listing], {}
        if listing.path != "/":
            parent_path, name = split(listing.path)
            parent = self._listings.last(parent_path)
            if parent is not None:
                listings.append(parent)
                for sibling in itertools.islice(parent.after(name, order), 2 * BATCH_CHUNK):
                    path = join(parent_path, sibling)
                    found, fetched = self._listings.peek(path)[1], self._listings.fetched_at(path)
                    if found is not None and fetched is not None:
                        listings.append(found)
                        seen[path] = fetched
        self._descend(listings, order)
        with self._ra_lock:
            for path, fetched in seen.items():
                self._unread.setdefault(path, fetched)

    def _descend(self, listings: Sequence[Listing], order: int, ahead: bool = False) -> None:
        """Add the child objects of ``listings`` not yet listed to the
        frontier of a walk of objects in ``order``; ``ahead``: ``listings``
        came ahead of the walker (and wait for it)."""
        todo, unread = [], []
        with self._ra_lock:
            listings = [it for it in listings if it.path not in self._descended]
            self._descended.update(it.path for it in listings)
        for listing in listings:
            place = self._place(listing.path, order)
            if place is None:
                continue
            fetched = self._listings.fetched_at(listing.path) if ahead else None
            if fetched is not None:
                unread.append((place, listing.path, fetched))
            for index, name in enumerate(listing.in_order(Kind.OBJECT, order)):
                path = join(listing.path, name)
                if not self._listings.peek(path)[0]:
                    todo.append(((*place, index), path))
        if order != self._frontier_order:
            self._reorder(order)
        with self._ra_lock:
            for place, path, fetched in unread:
                self._unread[path] = fetched
                heapq.heappush(self._unread_places, (place, path))
            for item in todo:
                heapq.heappush(self._frontier, item)
        if todo:
            self._pump()

    def _reorder(self, order: int) -> None:
        """The walk goes on in another ``order``: place the frontier and what
        waits for the walker anew."""
        with self._ra_lock:
            self._frontier_order = order
            heaps = [self._frontier, self._unread_places]
            paths = [[path for _, path in heap] for heap in heaps]
        placed = [[(self._place(path, order), path) for path in some] for some in paths]
        with self._ra_lock:
            for heap, items in zip(heaps, placed, strict=True):
                heap[:] = [(place, path) for place, path in items if place is not None]
                heapq.heapify(heap)

    def _forget_frontier(self) -> None:
        """Under ``_ra_lock``: drop what a walk of objects had."""
        self._frontier.clear()
        self._unread.clear()
        self._unread_places.clear()
        self._descended.clear()
        self._frontier_hits = 0
        self._walker_times.clear()

    def _next_of_frontier(self) -> list[str] | None:
        """The next :data:`BATCH_CHUNK` objects of the frontier in the
        walker's order, unless it is a window behind (or walks no more).
        Under ``_ra_lock``."""
        if not self._frontier or self._frontier_sent >= SUBTREE_FLIGHTS:
            return None
        now = self._clock()
        if self._ra_walks.get(Kind.OBJECT, (0.0, 0))[0] <= now:
            self._forget_frontier()  # the walk is over
            return None
        # The next object the walker reads of those listed ahead of it: if
        # it has waited long, the walker is slow; wait for it.
        while self._unread_places:
            place, path = self._unread_places[0]
            fetched = self._unread.get(path)
            if fetched is not None and place > self._walker_at and now - fetched < self.ttl:
                if now - fetched >= self.ttl * SUBTREE_LAG:
                    return None
                break
            heapq.heappop(self._unread_places)
            self._unread.pop(path, None)  # read, gone past, or stale
        window = self._window(now)
        room = window - len(self._unread) - self._frontier_flight
        if room < min(BATCH_CHUNK, (window + 1) // 2):
            return None  # (wait for room for a chunk worth a command)
        chunk: dict[str, None] = {}
        while self._frontier and len(chunk) < min(room, BATCH_CHUNK):
            place, path = heapq.heappop(self._frontier)
            if place > self._walker_at:  # (else the walker has gone past it)
                chunk[path] = None
        if not chunk:
            return None
        self._ra_pending += 1
        return list(chunk)

    def _window(self, now: float) -> int:
        """How many listings may be ahead of the walker: more as it finds
        them so, and no more than it lists in SUBTREE_LAG of the TTL at
        its pace.  Under ``_ra_lock``."""
        window = min(SUBTREE_WINDOW, BATCH_CHUNK + SUBTREE_GROWTH * self._frontier_hits)
        times = self._walker_times
        if len(times) > 1 and now > times[0]:
            pace = (len(times) - 1) / (now - times[0])
            most = pace * self.ttl * SUBTREE_LAG  # (inf with --ttl inf)
            if most < window:
                window = max(1, int(most))
        return window

    def _fetch_batch_ahead(
        self, paths: list[str], deeper: bool = False, subtree: bool = False
    ) -> bool:
        """The listings (and values) of ``paths``, in one ``qom-list-get``;
        ``deeper``: once they come, those of their child objects too (the
        walker, going into the first of ``paths``, then finds its child
        objects listed or on their way).  ``subtree``: a chunk of the
        frontier of a walk, whose child objects go on the frontier."""
        if self._stalled():
            self._ahead_done()
            return True
        if not self.client.has_room(1):
            return False
        claimed, generation = self._listings.claim(paths)
        if not claimed:
            self._ahead_done()
            return True
        started, values_generation = self._clock(), self._values.generation
        if subtree:
            with self._ra_lock:
                self._frontier_flight += len(claimed)
                self._frontier_sent += 1

        def answered(_: int, result: Any) -> None:
            got: dict[str, Listing] = {}
            try:
                if isinstance(result, QomfsError):
                    raise result
                got = {
                    listing.path: listing
                    for listing in self._from_batch(claimed, result, started, values_generation)
                }
            except ExecuteError as err:
                log.debug("qom-list-get %s refused: %s", claimed, err)
            except QomfsError as err:
                self._ahead_failed(f"{len(claimed)} listings", err)
            finally:
                for path in claimed:
                    self._listings.finish(path, got.get(path), started, generation)
                if subtree:
                    self._frontier_arrived(len(claimed), got)
                elif deeper and got:
                    below = [
                        path
                        for listing in got.values()
                        for path in self._unlisted(listing.path, listing.names(Kind.OBJECT))
                    ]
                    if below:
                        self._submit(self._fetch_batch_ahead, below[:BATCH_CHUNK])
                self._ahead_done()
            self._pump()

        calls: list[tuple[str, dict[str, Any] | None]] = [("qom-list-get", {"paths": claimed})]
        if self._send_claimed(self._listings, claimed, generation, started, calls, answered):
            return True
        if subtree:
            with self._ra_lock:
                self._frontier_flight -= len(claimed)
                self._frontier_sent -= 1
        return False

    def _frontier_arrived(self, sent: int, got: dict[str, Listing]) -> None:
        with self._ra_lock:
            self._frontier_flight -= sent
            self._frontier_sent -= 1
        self._walked_into(list(got.values()))

    def _walked_into(self, listings: Sequence[Listing]) -> None:
        """During a walk of objects, ``listings`` came ahead of the walker:
        they wait for it, and their child objects go on the frontier."""
        order = self._walk_order(Kind.OBJECT)
        if order and listings:
            self._descend(listings, order, ahead=True)

    def _ahead_failed(self, what: str, err: QomfsError) -> None:
        log.debug("read-ahead of %s: %s", what, err)
        if isinstance(err, CommandTimeout | ConnectionLost):
            # QEMU is stopped or gone: the queued read-ahead would only wait
            # for timeouts one after the other.  Drop it for a while.
            with self._ra_lock:
                self._ra_stalled_until = self._clock() + self.client.timeout

    def _stalled(self) -> bool:
        return self._clock() < self._ra_stalled_until

    # Read-ahead has no threads of its own: commands go out with
    # QMPClient.submit() from whichever thread asks for them, and their
    # answers are stored by the QMP reader thread.  What finds no free slot
    # waits in a queue, sent as answers free slots.

    def _submit(self, send: Callable[..., bool], *args: Any) -> None:
        """Queue read-ahead: ``send(*args)`` sends it, or returns False when
        the client has no room yet; once over, it calls :meth:`_ahead_done`."""
        with self._ra_lock:
            self._ra_pending += 1
            self._ra_queue.append((send, args))
        self._pump()

    def _pump(self) -> None:
        """Send queued read-ahead while the client has room for it, then the
        frontier of a walk of objects."""
        while True:
            with self._ra_lock:
                if self._ra_queue:
                    send, args = self._ra_queue.popleft()
                else:
                    chunk = self._next_of_frontier()
                    if chunk is None:
                        return
                    send, args = self._fetch_batch_ahead, (chunk, False, True)
            if not send(*args):
                with self._ra_lock:
                    self._ra_queue.appendleft((send, args))
                return

    def _ahead_done(self) -> None:
        with self._ra_lock:
            self._ra_pending -= 1
            if not self._ra_pending:
                self._ra_idle.notify_all()

    def quiesce(self, timeout: float = 10.0) -> bool:
        """Wait until no read-ahead is queued or under way; whether it ended."""
        with self._ra_lock:
            return self._ra_idle.wait_for(lambda: not self._ra_pending, timeout)

    def _fetch_ahead(self, obj: str, names: tuple[str, ...], kind: Kind) -> bool:
        """Send for the listings (``kind`` OBJECT) or values of ``obj``'s
        ``names``, in one write."""
        child = kind is Kind.OBJECT
        cache: TTLCache[Any, Any] = self._listings if child else self._values
        keys: list[Any] = [join(obj, n) for n in names] if child else [(obj, n) for n in names]
        if self._stalled():
            claimed: list[Any] = []
        elif not self.client.has_room(len(keys)):
            return False
        else:
            claimed, generation = cache.claim(keys)
        got: dict[str, Listing] = {}
        started, left = self._clock(), len(claimed)

        def answered(index: int, result: Any) -> None:
            nonlocal left
            key, value = claimed[index], None
            try:
                if isinstance(result, QomfsError) and not isinstance(result, ExecuteError):
                    raise result
                if not child:
                    failed = isinstance(result, ExecuteError)
                    value = self._failed(key[0], key[1], result) if failed else result
                elif not isinstance(result, ExecuteError):
                    # (A refused listing is asked again by the walker, which
                    # then learns why.)
                    value = got[key] = self._listing_from(key, result)
            except QomfsError as err:
                self._ahead_failed(f"{key}", err)
            finally:
                # Whoever waits for this one need not wait for the rest.
                cache.finish(key, value, started, generation)
                left -= 1
                if not left:
                    self._fetched_ahead(obj, names, got, started)
            self._pump()

        if not claimed:
            self._fetched_ahead(obj, names, got, started)
            return True
        calls: list[tuple[str, dict[str, Any] | None]] = [
            ("qom-list", {"path": key})
            if child
            else ("qom-get", {"path": key[0], "property": key[1]})
            for key in claimed
        ]
        return self._send_claimed(cache, claimed, generation, started, calls, answered)

    def _send_claimed(
        self,
        cache: TTLCache[Any, Any],
        claimed: list[Any],
        generation: int,
        started: float,
        calls: list[tuple[str, dict[str, Any] | None]],
        answered: Callable[[int, Any], None],
    ) -> bool:
        """Submit ``calls`` for the keys ``claimed`` in ``cache``; when the
        client has no room, end those fetches empty-handed (their waiters
        ask themselves) and return False, to be queued again."""
        if self.client.submit(calls, answered):
            return True
        for key in claimed:
            cache.finish(key, None, started, generation)
        return False

    def _fetched_ahead(
        self, obj: str, names: tuple[str, ...], got: dict[str, Listing], started: float
    ) -> None:
        with self._ra_lock:
            self._ra_busy.difference_update((obj, n) for n in names)
        if got:
            self._latest = (next(reversed(got)), started)
            # The walker reads these objects' values soon after: ask now,
            # so QEMU need not wait for it between two directories.
            walks = self._walks()
            for listing in got.values():
                self._ahead_of_listed(listing, walks)
        self._ahead_done()

    def close(self) -> None:
        """Drop the read-ahead not yet sent."""
        with self._ra_lock:
            dropped, self._ra_queue = len(self._ra_queue), collections.deque()
            self._ra_pending -= dropped
            self._ra_busy.clear()
            self._forget_frontier()
            if not self._ra_pending:
                self._ra_idle.notify_all()

    def read_text(self, path: str) -> str:
        """The text a file at ``path`` shows (see :mod:`qomfs.values`)."""
        return format_value(self.get(path))

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
        :class:`NotWritable`, :class:`NotFound`, or a QMP error.
        """
        if len(data) > MAX_WRITE:
            raise ValueTooLarge(f"value of {len(data)} bytes is larger than {MAX_WRITE}")
        node = self.lookup(path)
        assert node.prop is not None or node.kind is Kind.OBJECT
        if node.kind is Kind.OBJECT or node.prop is None:
            raise NotWritable(f"{path} is an object, not a property")
        value = parse_value(decode_text(data), node.prop.type)
        if not self.allow_unrealize and is_destructive(node.prop.name, value):
            raise Guarded(
                f"{path}: refusing a write that can tear down or crash the VM "
                "(mount with --allow-unrealize to permit)"
            )
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
            self._values.invalidate(lambda k: k == (obj, name))
            self._listings.invalidate(lambda k: k == obj)

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
