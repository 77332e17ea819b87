"""Read-ahead: fetch in the background what a walker such as ``grep -r`` or
``ls -R`` reads next, so that QEMU answers while the walker is busy with FUSE.

:class:`Walks` tells a walk from other reads and :class:`Frontier` holds the
objects a walk of the whole tree lists next; both own their lock and do no
I/O.  :class:`ReadAhead` turns them into batched commands, sent through
:meth:`Client.submit` and stored in the model's caches.

A walker reads one kind of entry after another in a directory, in one order:
grep -r its plain properties in QEMU's order (readdir's), ls -lR its links
sorted, ls -R (sorted) and find (QEMU's order) its child objects, by listing
them.  :data:`WALK_RUN` reads of one kind in one directory, each right after
the one before in one order and within the TTL, start a walk of that kind in
that order, which lasts until ``ttl`` after the last such read.  During a
walk:

- a read fetches the next :data:`READAHEAD` values of its kind;
- a listed directory fetches its first :data:`READAHEAD_LISTED` values of the
  kinds walked (in QEMU's order, those before its first child object: grep -r
  reads the rest once back from that child's subtree);
- a walk of objects is depth-first: each listing fetches the listings of the
  next READAHEAD objects in that walker's order, as far as the listings cached
  tell (an object not yet listed counts as having no child objects; once
  listed, its own come before its siblings).

With ``qom-list-get`` (listings with values), a walk of objects is listed as a
whole: the child objects of each listing that comes go on the frontier, a heap
by where the walker lists them, which is sent :data:`BATCH_CHUNK` objects a
command, at most :data:`SUBTREE_FLIGHTS` commands at a time, and a window ahead
of the walker (:data:`SUBTREE_WINDOW`, :data:`SUBTREE_LAG`).
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from qomfs.cache import TTLCache
from qomfs.errors import CommandTimeout, ConnectionLost, ExecuteError, QomfsError
from qomfs.qmp import MAX_BATCH
from qomfs.tree import Kind, Listing, join, parse_list, split

log = logging.getLogger("qomfs.readahead")

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

#: Where a depth-first walker lists an object: the index of each of its
#: ancestors and of itself among their siblings; places compare as it goes.
Place = tuple[int, ...]


class Client(Protocol):
    """The part of :class:`~qomfs.qmp.QMPClient` the read-ahead sends through."""

    timeout: float

    def has_room(self, count: int) -> bool: ...

    def submit(
        self,
        calls: list[tuple[str, dict[str, Any] | None]],
        callback: Callable[[int, Any], None],
    ) -> bool: ...


class Model(Protocol):
    """What the read-ahead needs of the model besides its caches: how an
    answer becomes what they hold."""

    def refused_value(self, obj: str, name: str, err: ExecuteError) -> Any:
        """What the value cache holds for a ``qom-get`` QEMU refused."""
        ...

    def store_batch(
        self, paths: list[str], reply: Any, started: float, generation: int
    ) -> list[Listing]:
        """The listings of a ``qom-list-get`` reply; caches its values."""
        ...

    def note_listed(self, path: str, started: float) -> None:
        """``path``'s listing was fetched, asked for at ``started``."""
        ...


class Walks:
    """Which walks go on: per kind of entry, until when, and in what order.

    Thread-safe (its own lock); no I/O.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        # (dir, kind) -> (when, name) of the last read there, and how many
        # reads in a row came one right after the other
        self._seen: dict[tuple[str, Kind], tuple[float, str, int]] = {}
        self._walks: dict[Kind, tuple[float, int]] = {}  # kind -> (until, order) of a walk

    def read(self, listing: Listing, name: str, kind: Kind, now: float) -> tuple[int, bool]:
        """Note a read of ``name`` (of ``kind``) in ``listing``'s object at
        ``now``: the order of the walk of that kind going on (0: none), and
        whether a new walk of objects began with it."""
        key = (listing.path, kind)
        new_walk = False
        with self._lock:
            last = self._seen.get(key)
            run, order = 1, 0
            if last is not None and now - last[0] < self.ttl:
                if last[1] == name:  # the same again (readdir's second call)
                    run = last[2]
                else:
                    order = listing.adjacent(last[1], name)
                    run = last[2] + 1 if order else 1
            self._seen[key] = (now, name, run)
            if len(self._seen) > 4096:
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.ttl}
            if run >= WALK_RUN:
                # Reads that fit both orders keep the one the walk had.
                until, was = self._walks.get(kind, (0.0, 0))
                if until > now and order & was:
                    order &= was
                elif until <= now and kind is Kind.OBJECT:
                    new_walk = True
                self._walks[kind] = (now + self.ttl, order)
            until, walk_order = self._walks.get(kind, (0.0, 0))
            return (walk_order if until > now else 0), new_walk

    def order(self, kind: Kind, now: float) -> int:
        """The order of the walk of ``kind`` going on (0: none)."""
        with self._lock:
            until, order = self._walks.get(kind, (0.0, 0))
        return order if until > now else 0

    def active(self, kind: Kind, now: float) -> bool:
        """Whether a walk of ``kind`` goes on (in some order or none)."""
        with self._lock:
            return self._walks.get(kind, (0.0, 0))[0] > now

    def going_on(self, now: float) -> list[tuple[Kind, int]]:
        """The walks going on: (kind, order)."""
        with self._lock:
            return [(kind, order) for kind, (until, order) in self._walks.items() if until > now]


class Frontier:
    """During a walk of objects with ``qom-list-get``: the objects to list
    ahead of the walker, and those listed ahead that it has not read yet.

    ``place(path, order)`` tells where a walker in ``order`` lists ``path``
    (None when the cached listings cannot tell); it must do no I/O, as it
    is called under the frontier's lock.  Thread-safe; no I/O.
    """

    def __init__(self, ttl: float, place: Callable[[str, int], Place | None]) -> None:
        self.ttl = ttl
        self._place = place
        self._lock = threading.Lock()
        # The objects to list, a heap by their place in the walker's order;
        # that of the object it listed last; the objects listed ahead and not
        # yet read, with when; and how many are in flight.
        self._heap: list[tuple[Place, str]] = []
        self._order = 0
        self._walker_at: Place = ()
        self._unread: dict[str, float] = {}
        self._unread_places: list[tuple[Place, str]] = []  # a heap
        self._descended: set[str] = set()  # whose child objects it has had
        self._hits = 0  # objects the walker found listed ahead
        self._walker_times: collections.deque[float] = collections.deque(maxlen=SUBTREE_PACE)
        self._flight = 0
        self._sent = 0  # commands

    def forget(self) -> None:
        """Drop what a walk of objects had (a new walk begins, or none)."""
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        self._heap.clear()
        self._unread.clear()
        self._unread_places.clear()
        self._descended.clear()
        self._hits = 0
        self._walker_times.clear()

    def walker_listed(self, path: str, at: Place | None, now: float) -> bool:
        """The walker listed ``path`` at place ``at`` (None: unknown) at
        ``now``; whether that listing had come ahead of it."""
        with self._lock:
            ahead = self._unread.pop(path, None) is not None
            self._hits += ahead
            if at is not None:
                self._walker_at = at
                self._walker_times.append(now)
        return ahead

    def waiting(self, seen: dict[str, float]) -> None:
        """The listings ``seen`` (path -> when fetched) wait for the walker,
        with no say in how far ahead the walk is listed."""
        with self._lock:
            for path, fetched in seen.items():
                self._unread.setdefault(path, fetched)

    def descend_once(self, listings: Sequence[Listing]) -> list[Listing]:
        """Those of ``listings`` whose child objects were not yet added
        (marked as added now)."""
        with self._lock:
            todo = [it for it in listings if it.path not in self._descended]
            self._descended.update(it.path for it in todo)
        return todo

    def add(
        self,
        order: int,
        todo: Sequence[tuple[Place, str]],
        unread: Sequence[tuple[Place, str, float]],
    ) -> None:
        """Add objects to list (``todo``) and listings that came ahead of the
        walker (``unread``, with when fetched), placed in ``order``.  If the
        walk goes on in another order than before, what the frontier holds is
        placed anew first, under the same lock, so that nothing added or
        taken meanwhile is lost or comes back."""
        with self._lock:
            if order != self._order:
                self._reorder(order)
            for place, path, fetched in unread:
                self._unread[path] = fetched
                heapq.heappush(self._unread_places, (place, path))
            for item in todo:
                heapq.heappush(self._heap, item)

    def _reorder(self, order: int) -> None:
        """Under the lock: place the frontier and what waits for the walker
        in ``order``."""
        self._order = order
        for heap in (self._heap, self._unread_places):
            placed = [(self._place(path, order), path) for _, path in heap]
            heap[:] = [(place, path) for place, path in placed if place is not None]
            heapq.heapify(heap)

    def next_chunk(self, now: float, walking: bool) -> list[str] | None:
        """The next :data:`BATCH_CHUNK` objects in the walker's order, unless
        it is a window behind (or, ``walking`` false, walks no more)."""
        with self._lock:
            if not self._heap or self._sent >= SUBTREE_FLIGHTS:
                return None
            if not walking:
                self._forget()  # the walk is over
                return None
            # The next object the walker reads of those listed ahead of it:
            # if it has waited long, the walker is slow; wait for it.
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
            room = window - len(self._unread) - self._flight
            if room < min(BATCH_CHUNK, (window + 1) // 2):
                return None  # (wait for room for a chunk worth a command)
            chunk: dict[str, None] = {}
            while self._heap and len(chunk) < min(room, BATCH_CHUNK):
                place, path = heapq.heappop(self._heap)
                if place > self._walker_at:  # (else the walker has gone past it)
                    chunk[path] = None
            return list(chunk) or None

    def _window(self, now: float) -> int:
        """Under the lock: how many listings may be ahead of the walker:
        more as it finds them so, and no more than it lists in SUBTREE_LAG of
        the TTL at its pace."""
        window = min(SUBTREE_WINDOW, BATCH_CHUNK + SUBTREE_GROWTH * self._hits)
        times = self._walker_times
        if len(times) > 1 and now > times[0]:
            pace = (len(times) - 1) / (now - times[0])
            most = pace * self.ttl * SUBTREE_LAG  # (inf with --ttl inf)
            if most < window:
                window = max(1, int(most))
        return window

    def sending(self, count: int) -> None:
        """A command for ``count`` objects of the frontier goes out."""
        with self._lock:
            self._flight += count
            self._sent += 1

    def answered(self, count: int) -> None:
        """A command for ``count`` objects is over (or was not sent)."""
        with self._lock:
            self._flight -= count
            self._sent -= 1


class ReadAhead:
    """The read-ahead of one model: decides what to fetch, and sends it.

    It has no threads of its own: commands go out with ``client.submit()``
    from whichever thread asks for them, and their answers are stored by the
    client's reader thread.  What finds no free slot waits in a queue, sent as
    answers free slots.  ``enabled`` false keeps only the background listing
    of a listed directory's child objects with ``qom-list-get``.  Thread-safe.
    """

    def __init__(
        self,
        model: Model,
        client: Client,
        listings: TTLCache[str, Listing],
        values: TTLCache[tuple[str, str], Any],
        *,
        ttl: float,
        clock: Callable[[], float],
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.ttl = ttl
        self._model = model
        self._client = client
        self._listings = listings
        self._values = values
        self._clock = clock
        self._walks = Walks(ttl)
        self._frontier = Frontier(ttl, self._place)
        self._lock = threading.Lock()
        self._busy: set[tuple[str, str]] = set()  # queued or in flight
        self._queue: collections.deque[tuple[Callable[..., bool], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._pending = 0  # read-ahead queued or under way
        self._stalled_until = float("-inf")  # no read-ahead before then
        self._idle = threading.Condition(self._lock)

    # --- what the model tells it --------------------------------------------

    def listed(self, listing: Listing, batch: bool) -> None:
        """``readdir`` listed ``listing`` (``batch``: with ``qom-list-get``)."""
        path = listing.path
        if batch:
            order, ahead_of_it = self._object_walk(path) if self.enabled else (0, False)
            if order:
                # A walker goes through the whole subtree: list it, a level
                # at a time and depth first, a window ahead of the walker
                # (already under way if this listing came so: the window
                # has moved on).
                if ahead_of_it:
                    self._pump()
                else:
                    self._walk_from(listing, order)
            elif missing := self.unlisted(path, listing.names(Kind.OBJECT))[:BATCH_CHUNK]:
                # In the background: the walker works through this directory
                # meanwhile, and waits only for a child it reaches first.
                self._submit(self._fetch_batch_ahead, missing, self.enabled)
        elif self.enabled:
            self._ahead_of_listing(listing)

    def read(self, path: str) -> None:
        """The property at ``path`` was read: fetch its next siblings' values."""
        obj, name = split(path)
        listing = self._listings.peek(obj)[1]
        prop = listing.properties.get(name) if listing is not None else None
        if listing is not None and prop is not None:
            order = self._walk_read(listing, name, prop.kind)
            if order:
                self._prefetch(obj, listing.following(name, READAHEAD, order), prop.kind)

    def siblings_to_list(self, path: str) -> list[str]:
        """The object at ``path`` is to be listed with ``qom-list-get``: the
        siblings a walker of objects lists next, not yet listed, to list in
        the same command (none when no walk goes on)."""
        parent, name = split(path)
        siblings = self._listings.peek(parent)[1] if path != "/" else None
        order = self._walks.order(Kind.OBJECT, self._clock())
        ahead = siblings.following(name, BATCH_CHUNK - 1, order) if siblings and order else ()
        return self.unlisted(parent, ahead)[: BATCH_CHUNK - 1]

    def walked_into(self, listings: Sequence[Listing]) -> None:
        """During a walk of objects, ``listings`` came ahead of the walker:
        they wait for it, and their child objects go on the frontier."""
        order = self._walks.order(Kind.OBJECT, self._clock())
        if order and listings:
            self._descend(listings, order, ahead=True)

    def unlisted(self, obj: str, names: Sequence[str]) -> list[str]:
        """The paths of ``obj``'s child objects ``names`` not listed in the cache."""
        paths = (join(obj, name) for name in names)
        return [path for path in paths if not self._listings.peek(path)[0]]

    def quiesce(self, timeout: float = 10.0) -> bool:
        """Wait until no read-ahead is queued or under way; whether it ended."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self) -> None:
        """Drop the read-ahead not yet sent."""
        with self._lock:
            dropped, self._queue = len(self._queue), collections.deque()
            self._pending -= dropped
            self._busy.clear()
            self._frontier.forget()
            if not self._pending:
                self._idle.notify_all()

    # --- walks ----------------------------------------------------------------

    def _walk_read(self, listing: Listing, name: str, kind: Kind) -> int:
        """Note a read of ``name`` (of ``kind``) in ``listing``'s object;
        the order of the walk of that kind going on (0: none)."""
        order, new_walk = self._walks.read(listing, name, kind, self._clock())
        if new_walk:
            self._frontier.forget()
        return order

    def _listed_by_walker(self, path: str) -> list[tuple[Kind, int]]:
        """Note that ``readdir`` listed ``path``; the walks going on."""
        if path != "/":
            parent, name = split(path)
            # (Expired or not: it tells the order of the siblings.)
            siblings = self._listings.last(parent)
            if siblings is not None:
                self._walk_read(siblings, name, Kind.OBJECT)
        return self._walks.going_on(self._clock())

    def _object_walk(self, path: str) -> tuple[int, bool]:
        """Note that ``readdir`` listed ``path``: the order of the walk of
        objects going on (0: none), and whether the listing came ahead of
        the walker, with the frontier."""
        walks = self._listed_by_walker(path)
        order = next((order for kind, order in walks if kind is Kind.OBJECT), 0)
        at = self._place(path, order) if order else None
        return order, self._frontier.walker_listed(path, at, self._clock())

    def _place(self, path: str, order: int) -> Place | None:
        """Where a depth-first walker in ``order`` lists ``path``, as far as
        cached listings (even expired) tell."""
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

    # --- the frontier of a walk of objects ------------------------------------

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
        self._frontier.waiting(seen)

    def _descend(self, listings: Sequence[Listing], order: int, ahead: bool = False) -> None:
        """Add the child objects of ``listings`` not yet listed to the
        frontier of a walk of objects in ``order``; ``ahead``: ``listings``
        came ahead of the walker (and wait for it)."""
        todo, unread = [], []
        for listing in self._frontier.descend_once(listings):
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
        self._frontier.add(order, todo, unread)
        if todo:
            self._pump()

    # --- sending --------------------------------------------------------------

    def _stalled(self) -> bool:
        return self._clock() < self._stalled_until

    def _failed(self, what: str, err: QomfsError) -> None:
        log.debug("read-ahead of %s: %s", what, err)
        if isinstance(err, CommandTimeout | ConnectionLost):
            # QEMU is stopped or gone: the queued read-ahead would only wait
            # for timeouts one after the other.  Drop it for a while.
            with self._lock:
                self._stalled_until = self._clock() + self._client.timeout

    def _submit(self, send: Callable[..., bool], *args: Any) -> None:
        """Queue read-ahead: ``send(*args)`` sends it, or returns False when
        the client has no room yet; once over, it calls :meth:`_done`."""
        with self._lock:
            self._pending += 1
            self._queue.append((send, args))
        self._pump()

    def _pump(self) -> None:
        """Send queued read-ahead while the client has room for it, then the
        frontier of a walk of objects."""
        while True:
            with self._lock:
                if self._queue:
                    send, args = self._queue.popleft()
                else:
                    now = self._clock()
                    walking = self._walks.active(Kind.OBJECT, now)
                    chunk = self._frontier.next_chunk(now, walking)
                    if chunk is None:
                        return
                    self._pending += 1
                    send, args = self._fetch_batch_ahead, (chunk, False, True)
            if not send(*args):
                with self._lock:
                    self._queue.appendleft((send, args))
                return

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()

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
            with self._lock:
                if item in self._busy or len(self._busy) >= READAHEAD_QUEUE:
                    continue
                self._busy.add(item)
            todo.append(name)
        for i in range(0, len(todo), MAX_BATCH):
            self._submit(self._fetch_ahead, obj, tuple(todo[i : i + MAX_BATCH]), kind)

    def _fetch_ahead(self, obj: str, names: tuple[str, ...], kind: Kind) -> bool:
        """Send for the listings (``kind`` OBJECT) or values of ``obj``'s
        ``names``, in one write."""
        child = kind is Kind.OBJECT
        cache: TTLCache[Any, Any] = self._listings if child else self._values
        keys: list[Any] = [join(obj, n) for n in names] if child else [(obj, n) for n in names]
        if self._stalled():
            claimed: list[Any] = []
        elif not self._client.has_room(len(keys)):
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
                    value = self._model.refused_value(key[0], key[1], result) if failed else result
                elif not isinstance(result, ExecuteError):
                    # (A refused listing is asked again by the walker, which
                    # then learns why.)
                    value = got[key] = parse_list(key, result)
            except QomfsError as err:
                self._failed(f"{key}", err)
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

    def _fetched_ahead(
        self, obj: str, names: tuple[str, ...], got: dict[str, Listing], started: float
    ) -> None:
        with self._lock:
            self._busy.difference_update((obj, n) for n in names)
        if got:
            self._model.note_listed(next(reversed(got)), started)
            # The walker reads these objects' values soon after: ask now,
            # so QEMU need not wait for it between two directories.
            walks = self._walks.going_on(self._clock())
            for listing in got.values():
                self._ahead_of_listed(listing, walks)
        self._done()

    def _fetch_batch_ahead(
        self, paths: list[str], deeper: bool = False, subtree: bool = False
    ) -> bool:
        """The listings (and values) of ``paths``, in one ``qom-list-get``;
        ``deeper``: once they come, those of their child objects too (the
        walker, going into the first of ``paths``, then finds its child
        objects listed or on their way).  ``subtree``: a chunk of the
        frontier of a walk, whose child objects go on the frontier."""
        if self._stalled():
            self._done()
            return True
        if not self._client.has_room(1):
            return False
        claimed, generation = self._listings.claim(paths)
        if not claimed:
            self._done()
            return True
        started, values_generation = self._clock(), self._values.generation
        if subtree:
            self._frontier.sending(len(claimed))

        def answered(_: int, result: Any) -> None:
            got: dict[str, Listing] = {}
            try:
                if isinstance(result, QomfsError):
                    raise result
                got = {
                    listing.path: listing
                    for listing in self._model.store_batch(
                        claimed, result, started, values_generation
                    )
                }
            except ExecuteError as err:
                log.debug("qom-list-get %s refused: %s", claimed, err)
            except QomfsError as err:
                self._failed(f"{len(claimed)} listings", err)
            finally:
                for path in claimed:
                    self._listings.finish(path, got.get(path), started, generation)
                if subtree:
                    self._frontier.answered(len(claimed))
                    self.walked_into(list(got.values()))
                elif deeper and got:
                    below = [
                        path
                        for listing in got.values()
                        for path in self.unlisted(listing.path, listing.names(Kind.OBJECT))
                    ]
                    if below:
                        self._submit(self._fetch_batch_ahead, below[:BATCH_CHUNK])
                self._done()
            self._pump()

        calls: list[tuple[str, dict[str, Any] | None]] = [("qom-list-get", {"paths": claimed})]
        if self._send_claimed(self._listings, claimed, generation, started, calls, answered):
            return True
        if subtree:
            self._frontier.answered(len(claimed))
        return False

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
        if self._client.submit(calls, answered):
            return True
        for key in claimed:
            cache.finish(key, None, started, generation)
        return False
