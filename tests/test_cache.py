"""TTLCache: expiry on an injected clock, single flight, invalidation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from qomfs.cache import TTLCache


class FakeClock:
    """A clock that moves only when told; counts how often it is read."""

    def __init__(self) -> None:
        self.now = 100.0
        self.reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.reads += 1
            return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Fetcher:
    """A fetch function that counts calls and returns "v1", "v2", ..."""

    def __init__(self, gate: threading.Event | None = None, error: Exception | None = None):
        self.calls = 0
        self.gate = gate
        self.error = error
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            self.calls += 1
            n = self.calls
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(5), "test never released the fetch"
        if self.error is not None:
            raise self.error
        return f"v{n}"


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def run_threads(n: int, target: Callable[[], None]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_value_expires_after_ttl() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock)
    fetch = Fetcher()
    assert cache.get("k", fetch) == "v1"
    clock.advance(0.75)
    assert cache.get("k", fetch) == "v1"
    assert cache.peek("k") == (True, "v1")
    clock.advance(0.25)  # exactly ttl after the fetch started: stale
    assert cache.peek("k") == (False, None)
    assert cache.get("k", fetch) == "v2"
    assert fetch.calls == 2


def test_age_counts_from_when_the_fetch_started() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock)

    def slow_fetch() -> str:
        clock.advance(0.5)  # QEMU took 0.5 s to answer
        return "old"

    assert cache.get("k", slow_fetch) == "old"
    clock.advance(0.25)
    assert cache.peek("k") == (True, "old")
    clock.advance(0.25)  # 1.0 s after QEMU was asked
    assert cache.peek("k") == (False, None)


def test_put_and_keys_are_independent() -> None:
    clock = FakeClock()
    cache: TTLCache[tuple[str, str], int] = TTLCache(1.0, clock)
    cache.put(("/a", "x"), 1, fetched_at=clock.now - 0.5)
    cache.put(("/a", "y"), 2)
    clock.advance(0.6)
    assert cache.peek(("/a", "x")) == (False, None)
    assert cache.peek(("/a", "y")) == (True, 2)
    assert len(cache) == 1


def test_last_keeps_an_expired_value_until_invalidated() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock)
    assert cache.last("k") is None
    cache.put("k", "v")
    clock.advance(5)
    assert cache.peek("k") == (False, None)
    assert cache.last("k") == "v"
    cache.invalidate(lambda key: key == "k")
    assert cache.last("k") is None


def test_ttl_zero_never_caches() -> None:
    cache: TTLCache[str, str] = TTLCache(0, FakeClock())
    fetch = Fetcher()
    assert [cache.get("k", fetch) for _ in range(3)] == ["v1", "v2", "v3"]
    cache.put("k", "x")
    assert cache.peek("k") == (False, None)
    assert len(cache) == 0


def test_single_flight() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock)
    gate = threading.Event()
    fetch = Fetcher(gate)
    results: list[str] = []
    threads = run_threads(8, lambda: results.append(cache.get("k", fetch)))
    # Each get() reads the clock once before it fetches or joins the flight.
    wait_until(lambda: clock.reads >= 8)
    assert fetch.calls == 1
    gate.set()
    for t in threads:
        t.join(5)
    assert results == ["v1"] * 8
    assert fetch.calls == 1


def test_exception_reaches_every_waiter_and_is_not_cached() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock)
    gate = threading.Event()
    failing = Fetcher(gate, error=LookupError("QEMU said no"))
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            cache.get("k", failing)
        except LookupError as err:
            errors.append(err)

    threads = run_threads(5, ask)
    wait_until(lambda: clock.reads >= 5)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(errors) == 5 and all(str(e) == "QEMU said no" for e in errors)
    assert failing.calls == 1
    assert cache.peek("k") == (False, None)
    assert cache.get("k", Fetcher()) == "v1"  # asked again, not the cached error


@pytest.mark.parametrize("everything", [True, False])
def test_invalidate_during_fetch_drops_the_stale_result(everything: bool) -> None:
    cache: TTLCache[str, str] = TTLCache(1.0, FakeClock())
    gate = threading.Event()
    fetch = Fetcher(gate)
    results: list[str] = []
    threads = run_threads(1, lambda: results.append(cache.get("k", fetch)))
    assert fetch.started.wait(5)
    cache.invalidate(None if everything else (lambda k: k == "k"))  # e.g. a qom-set
    gate.set()
    threads[0].join(5)
    assert results == ["v1"]  # the caller that asked still gets its answer
    assert cache.peek("k") == (False, None)
    assert cache.get("k", fetch) == "v2"


def test_invalidate_with_predicate() -> None:
    cache: TTLCache[str, str] = TTLCache(1.0, FakeClock())
    for key in ("/a", "/a/b", "/ab", "/c"):
        cache.put(key, key.upper())
    cache.invalidate(lambda k: k == "/a" or k.startswith("/a/"))
    assert cache.peek("/a") == (False, None)
    assert cache.peek("/a/b") == (False, None)
    assert cache.peek("/ab") == (True, "/AB")
    assert cache.peek("/c") == (True, "/C")
    cache.invalidate()
    assert len(cache) == 0
