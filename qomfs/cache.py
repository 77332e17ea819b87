"""A small thread-safe TTL cache that fetches each missing key once.

When several threads ask for the same missing key at once, one fetches and the
others wait for its answer (or its exception): eight parallel ``grep -r`` cost
the QMP commands of one.  One fetch may also bring several keys at once
(:meth:`TTLCache.claim` and :meth:`TTLCache.finish`).  With ``ttl <= 0``
nothing is kept or shared: every call fetches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Flight(Generic[V]):
    done: threading.Event = field(default_factory=threading.Event)
    value: V | None = None
    error: BaseException | None = None


class TTLCache(Generic[K, V]):
    """Map keys to values for at most ``ttl`` seconds of ``clock``.

    A value is served until ``ttl`` seconds after its fetch *started*, so no
    answer is older than ``ttl`` relative to when QEMU was asked.  Thread-safe.
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._data: dict[K, tuple[float, V]] = {}
        self._flights: dict[K, _Flight[V]] = {}
        self._generation = 0

    def __len__(self) -> int:
        """How many fresh values the cache holds."""
        now = self.clock()
        with self._lock:
            return sum(now < expiry for expiry, _ in self._data.values())

    def peek(self, key: K) -> tuple[bool, V | None]:
        """``(True, value)`` when a fresh value is cached, else ``(False, None)``."""
        if self.ttl <= 0:
            return False, None
        with self._lock:
            hit = self._data.get(key)
            if hit is not None and self.clock() < hit[0]:
                return True, hit[1]
        return False, None

    def fetched_at(self, key: K) -> float | None:
        """When the fresh value cached for ``key`` was fetched (None if none)."""
        with self._lock:
            hit = self._data.get(key)
            now = self.clock()
        return hit[0] - self.ttl if hit is not None and now < hit[0] else None

    def last(self, key: K) -> V | None:
        """The value last stored for ``key``, fresh or expired (None if none,
        or dropped by :meth:`invalidate`)."""
        with self._lock:
            hit = self._data.get(key)
        return hit[1] if hit is not None else None

    @property
    def generation(self) -> int:
        """Changes on every :meth:`invalidate`; read it before a fetch for :meth:`put`."""
        with self._lock:
            return self._generation

    def put(
        self, key: K, value: V, fetched_at: float | None = None, generation: int | None = None
    ) -> None:
        """Store ``value`` as fetched at ``fetched_at`` (default: now).

        With ``generation`` (read before the fetch began), nothing is stored
        if an :meth:`invalidate` happened since: the value may predate it.
        """
        if self.ttl <= 0:
            return
        start = self.clock() if fetched_at is None else fetched_at
        with self._lock:
            if generation is None or generation == self._generation:
                self._data[key] = (start + self.ttl, value)

    def put_many(self, items: Iterable[tuple[K, V]], fetched_at: float, generation: int) -> None:
        """:meth:`put` of each ``(key, value)`` of one fetch, under one lock
        (a ``qom-list-get`` of 64 objects brings hundreds of values)."""
        if self.ttl <= 0:
            return
        expiry = fetched_at + self.ttl
        with self._lock:
            if generation == self._generation:
                self._data.update((key, (expiry, value)) for key, value in items)

    def get(self, key: K, fetch: Callable[[], V]) -> V:
        """The cached value for ``key``, or ``fetch()`` (run once for all waiters).

        Exceptions from ``fetch`` propagate to every waiting caller and are
        not cached.
        """
        if self.ttl <= 0:
            return fetch()
        while True:
            with self._lock:
                hit = self._data.get(key)
                now = self.clock()
                if hit is not None and now < hit[0]:
                    return hit[1]
                flight = self._flights.get(key)
                if flight is None:
                    flight = self._flights[key] = _Flight()
                    generation = self._generation
                    break
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.value is not None:
                return flight.value
            # No value came (None is a legal value, or a batch fetch brought
            # nothing for this key): fetch ourselves.
            return fetch()
        try:
            value = fetch()
        except BaseException as err:
            flight.error = err
            raise
        else:
            flight.value = value
            with self._lock:
                # An invalidation while we fetched makes our answer suspect.
                if generation == self._generation:
                    self._data[key] = (now + self.ttl, value)
            return value
        finally:
            with self._lock:
                self._flights.pop(key, None)
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
            claimed = []
            for key in keys:
                hit = self._data.get(key)
                if (hit is not None and now < hit[0]) or key in self._flights:
                    continue
                self._flights[key] = _Flight()
                claimed.append(key)
            return claimed, self._generation

    def finish(self, key: K, value: V | None, fetched_at: float, generation: int) -> None:
        """End the fetch of a claimed key.  ``None``: it brought no value, and
        whoever waits for it fetches it alone."""
        with self._lock:
            flight = self._flights.pop(key, None)
            if value is not None and generation == self._generation:
                self._data[key] = (fetched_at + self.ttl, value)
        if flight is not None:
            flight.value = value
            flight.done.set()

    def invalidate(self, predicate: Callable[[K], bool] | None = None) -> None:
        """Drop every key (or those matching ``predicate``)."""
        with self._lock:
            self._generation += 1
            if predicate is None:
                self._data.clear()
            else:
                for key in [k for k in self._data if predicate(k)]:
                    del self._data[key]
