"""A thread-safe TTL cache that fetches each missing key once and never keeps
an answer that a later invalidation (a write) may have made stale.

When several threads ask for the same missing key at once, one fetches and the
others wait for its answer (or its exception): eight parallel ``grep -r`` cost
the QMP commands of one.  One fetch may also bring several keys at once
(:meth:`TTLCache.claim` and :meth:`TTLCache.finish`).  With ``ttl <= 0``
nothing is kept or shared: every call fetches.

After :meth:`TTLCache.invalidate_key` returns, no reader gets an answer
fetched before it: the key's value is dropped, a fetch of it under way is
detached (a new reader starts its own; those already waiting still get the
old answer, they asked before the write), and every fetch that began before
stores nothing for that key (an epoch per key).  Memory is bounded: a value
is dropped :attr:`TTLCache.retain` seconds after its fetch.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from qomfs.errors import WaitTimeout

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: How long :meth:`TTLCache.last` keeps an expired value, by default: this
#: many TTLs, and at least :data:`RETAIN_MIN` seconds (the read-ahead follows
#: a walker by the listings of its ancestors, listed when it went in).
RETAIN_TTLS = 4
RETAIN_MIN = 120.0
#: Default bound on a wait for another thread's fetch (seconds).
WAIT_TIMEOUT = 30.0
#: Python's waits overflow beyond this (seconds).
MAX_WAIT = 1e6


@dataclass(eq=False)
class _Flight(Generic[V]):
    """One fetch under way; ``generation``: the cache's when it began."""

    generation: int
    started: float = 0.0  # the clock when it began
    done: threading.Event = field(default_factory=threading.Event)
    value: V | None = None
    error: BaseException | None = None


class TTLCache(Generic[K, V]):
    """Map keys to values for at most ``ttl`` seconds of ``clock``.

    A value is served until ``ttl`` seconds after its fetch *started*, so no
    answer is older than ``ttl`` relative to when QEMU was asked.  It is kept
    for :meth:`last` until ``retain`` seconds after that (default:
    ``max(4 * ttl, 120 s)``), then dropped by a sweep that runs at most every
    ``retain / 4`` seconds of ``clock``.  With ``ttl = inf`` nothing expires.

    A thread that waits for another's fetch of the same key waits at most
    ``wait_timeout`` real seconds, then raises :class:`WaitTimeout`.
    Thread-safe.
    """

    def __init__(
        self,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        wait_timeout: float = WAIT_TIMEOUT,
        retain: float | None = None,
    ) -> None:
        if not 0 < wait_timeout <= MAX_WAIT:
            raise ValueError(f"wait_timeout must be in (0, {MAX_WAIT:g}] seconds: {wait_timeout}")
        if retain is None:
            retain = max(RETAIN_TTLS * ttl, RETAIN_MIN)
        if not retain >= ttl:
            raise ValueError(f"retain ({retain}) must be at least the ttl ({ttl})")
        self.ttl = ttl
        self.clock = clock
        self.wait_timeout = wait_timeout
        self.retain = retain
        self._lock = threading.Lock()
        # key -> (when its fetch began, value)
        self._data: dict[K, tuple[float, V]] = {}
        # The fetch of a key that a new reader joins.
        self._flights: dict[K, _Flight[V]] = {}
        # The fetches begun by claim(), attached or detached, for finish().
        self._claims: dict[tuple[K, int], _Flight[V]] = {}
        # Bumped by every invalidation.  A fetch that began at generation g
        # stores nothing for a key invalidated since (its epoch > g), nor
        # anything at all if g < the floor (set by invalidate(), whose keys
        # cannot be told in advance).
        self._generation = 0
        self._floor = 0
        self._epochs: dict[K, int] = {}
        # Sweeps: when the last ran, and (when, generation) at each, to
        # forget epochs that no fetch under way can predate.
        self._swept: float | None = None
        self._sweep_every = retain / 4 if math.isfinite(retain) else wait_timeout
        self._marks: collections.deque[tuple[float, int]] = collections.deque()

    def __len__(self) -> int:
        """How many fresh values the cache holds."""
        now = self.clock()
        with self._lock:
            return sum(now < start + self.ttl for start, _ in self._data.values())

    def stored(self) -> int:
        """How many values the cache holds, fresh or kept for :meth:`last`."""
        with self._lock:
            return len(self._data)

    def peek(self, key: K, max_age: float | None = None) -> tuple[bool, V | None]:
        """``(True, value)`` when a fresh value is cached, else ``(False, None)``.

        With ``max_age``, a value is fresh only if its fetch began at most
        that many seconds ago (and within the TTL).
        """
        if self.ttl <= 0:
            return False, None
        limit = self.ttl if max_age is None else min(self.ttl, max_age)
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and self.clock() < hit[0] + limit:
                return True, hit[1]
        return False, None

    def fetched_at(self, key: K) -> float | None:
        """When the fetch of the fresh value cached for ``key`` began (None if none)."""
        with self._lock:
            hit = self._data.get(key)
            now = self.clock()
        return hit[0] if hit is not None and now < hit[0] + self.ttl else None

    def last(self, key: K) -> V | None:
        """The value last stored for ``key``, fresh or expired: None if none,
        if dropped by an invalidation, or once fetched ``retain`` seconds ago."""
        with self._lock:
            hit = self._data.get(key)
            now = self.clock()
        return hit[1] if hit is not None and now < hit[0] + self.retain else None

    @property
    def generation(self) -> int:
        """Grows on every invalidation; read it before a fetch for :meth:`put`."""
        with self._lock:
            return self._generation

    def put(
        self, key: K, value: V, fetched_at: float | None = None, generation: int | None = None
    ) -> None:
        """Store ``value`` as fetched at ``fetched_at`` (default: now).

        With ``generation`` (read before the fetch began), nothing is stored
        if ``key`` was invalidated since: the value may predate it.
        """
        if self.ttl <= 0:
            return
        now = self.clock()
        start = now if fetched_at is None else fetched_at
        with self._lock:
            if generation is None or self._may_store(key, generation):
                self._data[key] = (start, value)
            self._sweep_if_due(now)

    def put_many(self, items: Iterable[tuple[K, V]], fetched_at: float, generation: int) -> None:
        """:meth:`put` of each ``(key, value)`` of one fetch, under one lock
        (a ``qom-list-get`` of 64 objects brings hundreds of values).  A key
        invalidated since ``generation`` is skipped; the others are stored."""
        if self.ttl <= 0:
            return
        now = self.clock()
        with self._lock:
            if generation >= self._floor:
                if self._epochs:
                    epochs = self._epochs
                    items = ((k, v) for k, v in items if epochs.get(k, generation) <= generation)
                self._data.update((key, (fetched_at, value)) for key, value in items)
            self._sweep_if_due(now)

    def get(self, key: K, fetch: Callable[[], V], max_age: float | None = None) -> V:
        """:meth:`get_timed` without the time."""
        return self.get_timed(key, fetch, max_age)[0]

    def get_timed(
        self, key: K, fetch: Callable[[], V], max_age: float | None = None
    ) -> tuple[V, float]:
        """The cached value for ``key``, or ``fetch()`` (run once for all waiters).

        ``max_age``: a cached value whose fetch began longer ago than that is
        fetched again, even within the TTL (a fetch under way is joined).
        Returns the value and when its fetch began (``clock``).

        Exceptions from ``fetch`` propagate to every waiting caller and are
        not cached.  A caller that joins another thread's fetch raises
        :class:`WaitTimeout` if no answer comes within ``wait_timeout``.
        """
        if self.ttl <= 0:
            now = self.clock()
            return fetch(), now
        with self._lock:
            now = self.clock()
            self._sweep_if_due(now)
            hit = self._data.get(key)
            limit = self.ttl if max_age is None else min(self.ttl, max_age)
            if hit is not None and now < hit[0] + limit:
                return hit[1], hit[0]
            flight = self._flights.get(key)
            joined = flight is not None
            if flight is None:
                flight = self._flights[key] = _Flight(self._generation, now)
        if joined:
            return self._join(key, flight, fetch)
        try:
            value = fetch()
        except BaseException as err:
            flight.error = err
            self._land(key, flight)
            raise
        flight.value = value
        self._land(key, flight, (now, value))
        return value, now

    def _join(self, key: K, flight: _Flight[V], fetch: Callable[[], V]) -> tuple[V, float]:
        """Wait for another thread's ``flight`` of ``key``."""
        if not flight.done.wait(self.wait_timeout):
            with self._lock:
                # It is stuck: whoever asks next starts anew.
                if self._flights.get(key) is flight:
                    del self._flights[key]
            raise WaitTimeout(key, self.wait_timeout)
        if flight.error is not None:
            raise flight.error
        if flight.value is not None:
            return flight.value, flight.started
        # No value came (None is a legal value, or a batch fetch brought
        # nothing for this key): fetch ourselves.
        now = self.clock()
        return fetch(), now

    def _land(self, key: K, flight: _Flight[V], got: tuple[float, V] | None = None) -> None:
        """End ``flight`` of ``key``: store ``got`` unless ``key`` was
        invalidated since the fetch began, and wake its waiters."""
        with self._lock:
            if got is not None and self._may_store(key, flight.generation):
                self._data[key] = got
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.done.set()

    def claim(self, keys: Iterable[K]) -> tuple[list[K], int]:
        """Start one fetch for several keys (one command for many values).

        The keys neither fresh nor being fetched are marked as being fetched,
        so that :meth:`get` of one waits, and returned with the generation to
        pass to :meth:`finish`, which must follow for each of them.
        """
        if self.ttl <= 0:
            return [], 0
        with self._lock:
            now = self.clock()
            self._sweep_if_due(now)
            generation = self._generation
            claimed = []
            for key in keys:
                hit = self._data.get(key)
                if (hit is not None and now < hit[0] + self.ttl) or key in self._flights:
                    continue
                flight: _Flight[V] = _Flight(generation, now)
                self._flights[key] = self._claims[key, generation] = flight
                claimed.append(key)
            return claimed, generation

    def finish(self, key: K, value: V | None, fetched_at: float, generation: int) -> None:
        """End the fetch of a claimed key.  ``None``: it brought no value, and
        whoever waits for it fetches it alone.  Nothing is stored if ``key``
        was invalidated since the claim."""
        with self._lock:
            flight = self._claims.pop((key, generation), None)
            if flight is not None and self._flights.get(key) is flight:
                del self._flights[key]
            if value is not None and self.ttl > 0 and self._may_store(key, generation):
                self._data[key] = (fetched_at, value)
        if flight is not None:
            flight.value = value
            flight.done.set()

    def invalidate_key(self, key: K) -> None:
        """Forget ``key``: its value, its fetch under way (detached: a new
        reader fetches anew), and whatever a fetch begun before brings."""
        self.invalidate_keys((key,))

    def invalidate_keys(self, keys: Iterable[K]) -> None:
        """:meth:`invalidate_key` of each of ``keys``, in time O(len(keys))."""
        with self._lock:
            self._generation += 1
            if self.ttl <= 0:
                return
            for key in keys:
                self._epochs[key] = self._generation
                self._data.pop(key, None)
                self._flights.pop(key, None)

    def invalidate(self, predicate: Callable[[K], bool] | None = None) -> None:
        """Drop every key (or those matching ``predicate``) and detach their
        fetches under way.  Scans every key: for rare events (a device
        deleted, a reconnect).  No fetch begun before stores anything, for
        any key (which keys it brings cannot be told in advance)."""
        with self._lock:
            self._generation += 1
            self._floor = self._generation
            self._epochs.clear()  # (all older than the floor)
            if predicate is None:
                self._data.clear()
                self._flights.clear()
                return
            for key in [k for k in self._data if predicate(k)]:
                del self._data[key]
            for key in [k for k in self._flights if predicate(k)]:
                del self._flights[key]

    # --- under the lock --------------------------------------------------------

    def _may_store(self, key: K, generation: int) -> bool:
        """Whether a fetch begun at ``generation`` may store ``key``."""
        return generation >= self._floor and self._epochs.get(key, generation) <= generation

    def _sweep_if_due(self, now: float) -> None:
        """Drop the values fetched ``retain`` ago, and the epochs older than
        any fetch that may still store, once every ``retain / 4`` seconds."""
        if self._swept is None:
            self._swept = now
        if now - self._swept < self._sweep_every:
            return
        self._swept = now
        if math.isfinite(self.retain):
            old = now - self.retain
            if any(start <= old for start, _ in self._data.values()):
                # (A new dict: deleting keys would not shrink the table.)
                self._data = {k: hit for k, hit in self._data.items() if hit[0] > old}
        # A fetch that began before the generation of a sweep wait_timeout
        # ago is refused (its waiters have given up): epochs up to it go.
        self._marks.append((now, self._generation))
        seen = None
        while self._marks and now - self._marks[0][0] >= self.wait_timeout:
            seen = self._marks.popleft()[1]
        if seen is not None and seen > self._floor:
            self._floor = seen
            self._epochs = {k: e for k, e in self._epochs.items() if e > seen}
