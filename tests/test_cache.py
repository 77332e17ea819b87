"""TTLCache: expiry on an injected clock, single flight, invalidation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from qomfs.cache import TTLCache
from qomfs.errors import CommandTimeout, QomfsError, WaitTimeout


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


def run_threads(n: int, target: Callable[[], object]) -> list[threading.Thread]:
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


# --- a read never returns a value from before a write (issue 13, item 2) ---------


def invalidator(how: str, cache: TTLCache[str, str]) -> Callable[[str], None]:
    """Invalidate one key the way ``how`` says."""
    return {
        "key": lambda key: cache.invalidate_key(key),
        "keys": lambda key: cache.invalidate_keys([key]),
        "predicate": lambda key: cache.invalidate(lambda k: k == key),
        "all": lambda key: cache.invalidate(),
    }[how]


@pytest.mark.parametrize("how", ["key", "keys", "predicate", "all"])
def test_get_after_invalidation_does_not_join_the_fetch_before_it(how: str) -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock)
    old_gate, new_gate = threading.Event(), threading.Event()
    old_fetch = Fetcher(old_gate)
    before: list[str] = []
    after: list[str] = []
    early = run_threads(1, lambda: before.append(cache.get("k", old_fetch)))
    assert old_fetch.started.wait(5)
    joined = run_threads(1, lambda: before.append(cache.get("k", old_fetch)))
    wait_until(lambda: clock.reads >= 2)  # the second reader waits for the first's fetch
    invalidator(how, cache)("k")  # e.g. a qom-set returned
    new_fetch = Fetcher(new_gate)
    late = run_threads(1, lambda: after.append(cache.get("k", new_fetch)))
    assert new_fetch.started.wait(5), "the reader after the write joined the old fetch"
    old_gate.set()
    for t in early + joined:
        t.join(5)
    assert before == ["v1", "v1"]  # they asked before the write: the old answer is theirs
    assert cache.peek("k") == (False, None)  # ... but it is not kept
    new_gate.set()
    late[0].join(5)
    assert after == ["v1"] and new_fetch.calls == 1  # (new_fetch's own first answer)
    assert cache.peek("k") == (True, "v1")
    assert old_fetch.calls == 1


def test_invalidate_key_spares_the_other_keys_of_a_batch() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock)
    claimed, generation = cache.claim(["a", "b", "c"])
    assert claimed == ["a", "b", "c"]
    before_put = cache.generation
    cache.invalidate_key("b")
    assert cache.generation > generation == before_put
    for key in claimed:
        cache.finish(key, key.upper(), clock.now, generation)
    assert cache.peek("a") == (True, "A")
    assert cache.peek("b") == (False, None)
    assert cache.peek("c") == (True, "C")
    # put_many and put of a fetch begun before the invalidation: the same.
    cache.invalidate_keys(["x", "z"])
    cache.put_many([("x", "X"), ("y", "Y")], clock.now, generation)
    cache.put("z", "Z", clock.now, generation)
    cache.put("w", "W", clock.now, generation)
    assert [cache.peek(k)[0] for k in "xyzw"] == [False, True, False, True]
    # A fetch begun after the invalidation stores again.
    cache.put("x", "X2", clock.now, cache.generation)
    assert cache.peek("x") == (True, "X2")


def test_get_stores_its_answer_when_another_key_was_invalidated() -> None:
    cache: TTLCache[str, str] = TTLCache(1.0, FakeClock())
    gate = threading.Event()
    fetch = Fetcher(gate)
    threads = run_threads(1, lambda: cache.get("a", fetch))
    assert fetch.started.wait(5)
    cache.invalidate_key("b")  # a write of another property
    gate.set()
    threads[0].join(5)
    assert cache.peek("a") == (True, "v1")
    assert cache.get("a", fetch) == "v1" and fetch.calls == 1


def test_the_finish_of_a_detached_claim_leaves_the_new_fetch_alone() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock)
    claimed, generation = cache.claim(["k"])
    assert claimed == ["k"]
    cache.invalidate_key("k")
    gate = threading.Event()
    fetch = Fetcher(gate)
    results: list[str] = []
    threads = run_threads(1, lambda: results.append(cache.get("k", fetch)))
    assert fetch.started.wait(5)
    threads += run_threads(1, lambda: results.append(cache.get("k", fetch)))
    wait_until(lambda: clock.reads >= 3)  # claim, then the two readers
    cache.finish("k", "old", clock.now, generation)  # the batch from before the write
    assert cache.peek("k") == (False, None)
    gate.set()
    for t in threads:
        t.join(5)
    assert results == ["v1", "v1"] and fetch.calls == 1
    assert cache.claim(["k"])[0] == []  # fresh now


class Key:
    """A key that counts how often keys are compared (a scan compares them all)."""

    compared = 0

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return self.n

    def __eq__(self, other: object) -> bool:
        Key.compared += 1
        return isinstance(other, Key) and other.n == self.n


def test_invalidate_key_touches_only_its_key() -> None:
    cache: TTLCache[Key, int] = TTLCache(1.0, FakeClock())
    keys = [Key(n) for n in range(50_000)]  # a big VM's properties
    cache.put_many(((k, k.n) for k in keys), 100.0, cache.generation)
    Key.compared = 0
    cache.invalidate_key(Key(7))
    cache.invalidate_keys([Key(8), Key(9)])
    assert Key.compared <= 9  # a few dict probes per key, no scan
    assert cache.peek(keys[7]) == (False, None) and cache.peek(keys[10]) == (True, 10)


@pytest.mark.parametrize("how", ["key", "predicate"])
def test_no_stale_read_after_write_under_concurrency(how: str) -> None:
    """One thread reads k in a tight loop through a slow fetch; another
    writes, invalidates and reads back, 200 times."""
    clock = FakeClock()
    cache: TTLCache[str, int] = TTLCache(1.0, clock)
    invalidate: Callable[[str], None] = {
        "key": lambda key: cache.invalidate_key(key),
        "predicate": lambda key: cache.invalidate(lambda k: k == key),
    }[how]
    source = [0]  # "QEMU"
    done = [0]  # the last write whose invalidation returned
    stop = threading.Event()
    stale: list[tuple[int, int]] = []
    busy = [0]  # the reader's fetches under way
    fetching = threading.Event()  # the reader began a fetch

    def fetch() -> int:
        mine = threading.current_thread() is thread
        busy[0] += mine
        if mine:
            fetching.set()
        value = source[0]
        time.sleep(0.002)  # the reply takes a while: writes happen meanwhile
        busy[0] -= mine
        return value

    def reader() -> None:
        while not stop.is_set():
            floor = done[0]
            value = cache.get("k", fetch)
            if value < floor:
                stale.append((floor, value))
            clock.advance(1.0)  # expired: its next read fetches again

    thread = threading.Thread(target=reader)
    thread.start()
    readbacks: list[int] = []
    raced = 0  # writes made while the reader's fetch was under way
    try:
        for i in range(1, 201):
            fetching.clear()
            fetching.wait(1)  # (mostly: write while the reader waits for QEMU)
            raced += busy[0] > 0
            source[0] = i  # qom-set
            invalidate("k")
            done[0] = i
            readbacks.append(cache.get("k", fetch))
    finally:
        stop.set()
        thread.join(5)
    wrong = [(i, got) for i, got in enumerate(readbacks, 1) if got != i]
    assert not wrong, f"{len(wrong)} of 200 read-backs stale (wrote, read): {wrong[:5]}"
    assert not stale, f"{len(stale)} stale reads (written, read): {stale[:5]}"
    assert raced >= 50, raced  # the case at stake did happen, often


# --- bounded memory (item 5) ------------------------------------------------------


def test_expired_values_are_dropped_after_a_grace_for_last() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock)  # retain: max(4 TTLs, 120 s)
    for n in range(1000):
        cache.put(f"old{n}", "x")
    clock.advance(60)
    assert cache.peek("old1") == (False, None)
    assert cache.last("old1") == "x"  # a walker's ancestors are still known
    cache.put("new", "y")
    clock.advance(61)  # 121 s after the old ones were fetched
    assert cache.last("old1") is None
    assert cache.last("new") == "y"
    cache.put("newer", "z")  # a store sweeps once retain / 4 has gone by
    assert cache.stored() == 2
    assert cache.retain == 120.0


def test_the_sweep_runs_at_most_every_quarter_of_retain() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock, retain=8.0)
    cache.put("a", "x")
    clock.advance(8)  # "a" is past retain
    cache.put("b", "x")  # sweeps (2 s since the first store)
    assert cache.stored() == 1
    clock.advance(7)  # "b" is 7 s old; now "c"
    cache.put("c", "x")
    clock.advance(1.5)  # "b" past retain, but the last sweep was 1.5 s ago
    cache.put("d", "x")
    assert cache.stored() == 3 and cache.last("b") is None
    clock.advance(0.5)
    cache.put("e", "x")
    assert cache.stored() == 3  # c, d, e


def test_ttl_inf_keeps_everything_and_knows_when_it_was_fetched() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(float("inf"), clock)
    cache.put("k", "v")
    assert cache.get("l", Fetcher()) == "v1"
    clock.advance(1e9)
    cache.put("m", "w")
    assert cache.peek("k") == (True, "v") and cache.last("k") == "v"
    assert cache.fetched_at("k") == 100.0  # not inf - inf
    assert cache.fetched_at("l") == 100.0
    assert cache.stored() == 3 and len(cache) == 3


def test_epochs_are_forgotten_once_no_fetch_can_predate_them() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock, wait_timeout=5.0, retain=8.0)
    generation = cache.generation
    cache.invalidate_keys(f"k{n}" for n in range(100))
    for _ in range(10):  # sweeps every 2 s
        clock.advance(2)
        cache.put("x", "y")
    assert not cache._epochs
    # A fetch that began before them, long ago, stores nothing at all.
    cache.put("k1", "old", clock.now, generation)
    cache.put("z", "old", clock.now, generation)
    assert cache.peek("k1") == (False, None) and cache.peek("z") == (False, None)
    cache.put("z", "new", clock.now, cache.generation)
    assert cache.peek("z") == (True, "new")


# --- nothing waits forever (item 4) ----------------------------------------------


def test_a_waiter_gives_up_after_wait_timeout() -> None:
    clock = FakeClock()
    cache: TTLCache[str, str] = TTLCache(1.0, clock, wait_timeout=0.2)
    stuck = threading.Event()
    hung = Fetcher(stuck)  # its reply never comes (until the end of the test)
    owner = run_threads(1, lambda: cache.get("k", hung))
    assert hung.started.wait(5)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            cache.get("k", Fetcher())
        except BaseException as err:  # (the test inspects it)
            errors.append(err)

    waiter = run_threads(1, wait)
    waiter[0].join(5)  # far beyond 0.2 s: the bound, not the time
    try:
        assert not waiter[0].is_alive(), "the waiter still waits"
        (err,) = errors
        assert isinstance(err, WaitTimeout) and isinstance(err, CommandTimeout)
        assert isinstance(err, QomfsError) and err.timeout == 0.2 and err.key == "k"
        assert "'k'" in str(err)
        # The stuck fetch is abandoned: the next reader asks anew.
        fresh = Fetcher()
        assert cache.get("k", fresh) == "v1" and fresh.calls == 1
    finally:
        stuck.set()
        owner[0].join(5)


def test_wait_timeout_must_be_a_bounded_number_of_seconds() -> None:
    for bad in (0, -1, float("inf"), float("nan"), 1e7):
        with pytest.raises(ValueError):
            TTLCache(1.0, FakeClock(), wait_timeout=bad)
    with pytest.raises(ValueError):
        TTLCache(10.0, FakeClock(), retain=5.0)
