"""Read-ahead: what a walker reads next is fetched in the background.

Against the fake monitor, counted in QMP commands: a walk costs the commands
it would cost without read-ahead (each fetched once, ahead or not), and reads
that do not look like a walk fetch nothing ahead.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest

from qomfs.errors import CommandTimeout, NotReadable, ReadFailed
from qomfs.model import (
    BATCH_CHUNK,
    READAHEAD,
    SUBTREE_LAG,
    SUBTREE_PACE,
    SUBTREE_WINDOW,
    QOMTree,
)
from qomfs.qmp import MAX_ASYNC, QMPClient
from qomfs.readahead import Frontier
from qomfs.tree import QEMU_ORDER, SORTED
from tests.fakeqmp import BASE_COMMANDS, FakeQMP, Tree
from tests.test_cache import FakeClock
from tests.test_model import WITH_BATCH, Env, Spent, env

#: /machine's plain (not child, not link) properties, in QEMU's order.
PLAIN = ["type", "smm", "dump-guest-core", "phandle-start", "smp", "secret", "crash-information"]
N_CHILDREN = 100


def settle(tree: QOMTree, spent: Spent) -> dict[str, int]:
    """Commands sent until the read-ahead has nothing left to do."""
    assert tree.quiesce()
    return spent()


def wide_tree(n: int = N_CHILDREN) -> Tree:
    """/objects with ``n`` objects m0..m99, two properties each."""
    tree: Tree = {
        "/": [
            {"name": "type", "type": "string", "value": "container"},
            {"name": "objects", "type": "child<container>"},
        ],
        "/objects": [{"name": "type", "type": "string", "value": "container"}],
    }
    for i in range(n):
        tree["/objects"].append({"name": f"m{i}", "type": "child<memory-backend-ram>"})
        tree[f"/objects/m{i}"] = [
            {"name": "type", "type": "string", "value": "memory-backend-ram"},
            {"name": "size", "type": "size", "value": 1 << 20},
        ]
    return tree


@pytest.fixture
def e() -> Iterator[Env]:
    with env() as it:
        yield it
        it.tree.close()


@contextlib.contextmanager
def wide(batch: bool) -> Iterator[tuple[QOMTree, Spent]]:
    commands = WITH_BATCH if batch else BASE_COMMANDS
    with FakeQMP(wide_tree(), commands=commands) as fake, QMPClient(fake.path, timeout=3) as c:
        tree = QOMTree(c, ttl=30, clock=FakeClock())
        yield tree, Spent(c)
        tree.close()


def test_reads_in_order_fetch_the_rest_ahead(e: Env) -> None:
    e.tree.readdir("/machine")
    e.spent()
    assert e.tree.read_text("/machine/type") == "pc-q35-7.2-machine\n"
    assert e.tree.read_text("/machine/smm") == "auto\n"
    # Two reads in a row in QEMU's order: the rest of /machine's plain
    # properties arrive without being asked for, each fetched once.
    assert settle(e.tree, e.spent) == {"qom-get": len(PLAIN)}
    assert e.tree.read_text("/machine/smp") == '{"cpus": 1, "sockets": 1}\n'
    with pytest.raises(NotReadable):  # QEMU's refusal, cached like a value
        e.tree.get("/machine/secret")
    with pytest.raises(ReadFailed, match="No crash"):
        e.tree.get("/machine/crash-information")
    assert e.tree.read_text("/machine/phandle-start") == "0\n"
    assert e.spent() == {}


@pytest.mark.parametrize(
    "reads",
    [
        ["smm", "smm", "smm"],  # the same file again: cat in a loop
        ["type", "phandle-start"],  # not one after the other
        ["smm"],  # one cat
    ],
)
def test_reads_that_are_no_walk_fetch_nothing_ahead(e: Env, reads: list[str]) -> None:
    e.tree.readdir("/machine")
    e.spent()
    for name in reads:
        e.tree.get(f"/machine/{name}")
    assert settle(e.tree, e.spent) == {"qom-get": len(set(reads))}


def test_ttl_zero_reads_nothing_ahead() -> None:
    with env(ttl=0) as e0:
        e0.tree.readdir("/machine")
        for name in PLAIN[:4]:
            e0.tree.get(f"/machine/{name}")
        assert settle(e0.tree, e0.spent) == {"qom-get": 4, "qom-list": 1}


def test_refusals_are_cached_for_the_ttl(e: Env) -> None:
    for _ in range(3):
        with pytest.raises(NotReadable) as info:
            e.tree.get("/machine/secret")
        assert info.value.cause is not None and info.value.__cause__ is info.value.cause
    assert e.spent() == {"qom-get": 1}
    e.clock.advance(1.0)
    with pytest.raises(NotReadable):
        e.tree.get("/machine/secret")
    assert e.spent() == {"qom-get": 1}


def test_listing_walk_lists_the_next_objects_ahead() -> None:
    with wide(batch=False) as (tree, spent):
        tree.readdir("/")
        tree.readdir("/objects")
        tree.readdir("/objects/m0")
        tree.readdir("/objects/m1")  # the next one: a walk
        ahead = settle(tree, spent)
        assert ahead.get("qom-get", 0) == 0
        # The next READAHEAD in QEMU's order, and as many sorted.
        assert READAHEAD <= ahead["qom-list"] - 4 <= 2 * READAHEAD
        assert all(listed(tree, f"/objects/m{i}") for i in range(2, 2 + READAHEAD))
        # A whole walk still lists each object once.
        for i in range(N_CHILDREN):
            tree.readdir(f"/objects/m{i}")
        rest = settle(tree, spent)
        assert ahead["qom-list"] + rest.get("qom-list", 0) == N_CHILDREN + 2
        assert rest.get("qom-get", 0) == 0


def test_listing_walk_in_sorted_order_is_read_ahead_too() -> None:
    """ls sorts: m0, m1, m10, m11, ... is a walk as much as m0, m1, m2."""
    with wide(batch=False) as (tree, spent):
        tree.readdir("/objects")
        for name in ["m0", "m1", "m10"]:
            tree.readdir(f"/objects/{name}")
        settle(tree, spent)
        assert all(listed(tree, f"/objects/{name}") for name in ["m11", "m12", "m13"])


def nested_tree() -> tuple[Tree, list[str]]:
    """/top with objects n0..n5, each with three leaf objects k0..k2 (but n3,
    a leaf); and the objects in the order a depth-first walker lists them."""
    tree: Tree = {"/": [{"name": "top", "type": "child<container>"}], "/top": []}
    order = ["/", "/top"]
    for n in range(6):
        node = f"/top/n{n}"
        tree["/top"].append({"name": f"n{n}", "type": "child<container>"})
        tree[node] = [{"name": "type", "type": "string", "value": "container"}]
        order.append(node)
        for k in range(3 if n != 3 else 0):
            tree[node].append({"name": f"k{k}", "type": "child<container>"})
            tree[f"{node}/k{k}"] = [{"name": "id", "type": "int", "value": k}]
            order.append(f"{node}/k{k}")
    return tree, order


def walk_finding_listed(tree: QOMTree, spent: Spent, order: list[str], after: str) -> None:
    """List the objects in ``order``, letting the read-ahead settle after
    each; check that each one after ``after`` is listed before it is reached."""
    walk_from = order.index(after) + 1
    for i, path in enumerate(order):
        if i >= walk_from:
            assert listed(tree, path), path
        tree.readdir(path)
        settle(tree, spent)


def test_listing_walk_goes_depth_first() -> None:
    """Once two neighbours have been listed, each next object a depth-first
    walker lists (a child first, else what follows) is listed before it
    gets there, and the whole walk lists each object once."""
    objects, order = nested_tree()
    with FakeQMP(objects) as fake, QMPClient(fake.path, timeout=3) as client:
        tree, spent = QOMTree(client, ttl=30, clock=FakeClock()), Spent(client)
        walk_finding_listed(tree, spent, order, after="/top/n0/k1")  # k0, k1: a walk
        assert client.command_counts()["qom-list"] == len(order)
        tree.close()


def test_batch_walk_lists_objects_in_chunks() -> None:
    """With qom-list-get, a walker gets 64 objects' listings per command."""
    with wide(batch=True) as (tree, spent):
        tree.readdir("/objects")
        first = settle(tree, spent)
        assert first == {"qom-list-get": 2}, first  # /objects, then its first 64
        for i in range(N_CHILDREN):
            tree.readdir(f"/objects/m{i}")
            assert tree.get(f"/objects/m{i}/size") == 1 << 20
        assert settle(tree, spent) == {"qom-list-get": 1}  # m64..m99 in one
        assert tree.readdir("/objects/m99")[1].name == "size"


def listed(tree: QOMTree, path: str) -> bool:
    """Whether ``path``'s listing is in the cache (fetched ahead)."""
    return tree._listings.peek(path)[0]


def test_read_ahead_stops_while_qemu_does_not_answer() -> None:
    """A stopped QEMU: the queued read-ahead is dropped after the first
    timeouts instead of timing out one command after another."""
    objects = wide_tree()
    objects["/"].append({"name": "big", "type": "child<container>"})
    objects["/big"] = [{"name": f"p{i}", "type": "int", "value": i} for i in range(80)]
    with (
        FakeQMP(objects) as fake,
        QMPClient(fake.path, timeout=0.3) as client,
    ):
        tree = QOMTree(client, ttl=30, clock=FakeClock())
        tree.readdir("/objects/m0")
        tree.get("/objects/m0/type")
        tree.get("/objects/m0/size")  # a walk of values: ls -lR, grep -r
        tree.listing("/big")  # cached, with no read-ahead
        assert tree.quiesce()
        fake.delay["qom-get"] = 2.0  # QEMU stops answering
        sent = client.command_counts()["qom-get"]
        tree.readdir("/big")  # 64 values to fetch ahead
        assert tree.quiesce(20)
        stalled = client.command_counts()["qom-get"] - sent
        # The commands read-ahead may have in flight time out; the rest is
        # dropped.
        assert stalled <= MAX_ASYNC, stalled
        with pytest.raises(CommandTimeout):  # the walker itself sees it
            tree.get("/big/p70")
        tree.close()


def regions_tree(n: int = N_CHILDREN) -> Tree:
    """:func:`wide_tree` with a child object in each mN (its memory region),
    as each memory backend of a big VM has."""
    tree = wide_tree(n)
    for i in range(n):
        tree[f"/objects/m{i}"].append({"name": "region", "type": "child<memory-region>"})
        tree[f"/objects/m{i}/region"] = [{"name": "size", "type": "uint64", "value": 1 << 20}]
    return tree


def preorder(objects: Tree, path: str = "/", sort: bool = True) -> Iterator[str]:
    """The objects in the order ``ls -R`` (sorted) or ``find`` lists them."""
    yield path
    names = [p["name"] for p in objects[path] if p["type"].startswith("child<")]
    for name in sorted(names) if sort else names:
        yield from preorder(objects, path.rstrip("/") + "/" + name, sort)


def listed_once(fake: FakeQMP, order: list[str]) -> int:
    """Check that ``qom-list-get`` asked for each object in ``order`` once
    (none fetched again on expiry); how many such commands it took."""
    requests = [r for r in fake.requests if r.get("execute") == "qom-list-get"]
    paths = [path for r in requests for path in r["arguments"]["paths"]]
    assert sorted(paths) == sorted(order)
    return len(requests)


@pytest.mark.parametrize("sort", [True, False], ids=["ls-R", "find"])
def test_batch_walk_lists_the_subtree_ahead_in_chunks(sort: bool) -> None:
    """With qom-list-get, once two neighbours have been listed, the walker
    finds every next object listed: the rest of the tree comes a level at a
    time, 64 objects a command, in the walker's order."""
    objects = regions_tree()
    order = list(preorder(objects, sort=sort))
    with (
        FakeQMP(objects, commands=WITH_BATCH) as fake,
        QMPClient(fake.path, timeout=3) as client,
    ):
        tree, spent = QOMTree(client, ttl=30, clock=FakeClock()), Spent(client)
        walk_finding_listed(tree, spent, order, after="/objects/m1")  # m0, m1: a walk
        # 202 objects, each listed once, at most 64 a command.  Without a
        # walk yet: the root; /objects; its first 64 mN and, at readdir of
        # /objects, the other 36 and their regions; m0's region.  Then
        # the walk: the 63 regions left, in one.
        used = listed_once(fake, order)
        assert used == 7, used
        tree.close()


def test_batch_walk_stays_near_a_slow_walker() -> None:
    """What is listed ahead of a walker is little until it finds what was
    listed for it, then at most SUBTREE_WINDOW objects; and nothing more
    while what it reads next has waited half the TTL."""
    objects = regions_tree(1000)
    order = list(preorder(objects))
    clock = FakeClock()
    with (
        FakeQMP(objects, commands=WITH_BATCH) as fake,
        QMPClient(fake.path, timeout=3) as client,
    ):
        tree, spent = QOMTree(client, ttl=30, clock=clock), Spent(client)
        first = order.index("/objects/m1") + 1  # m0, m1: a walk, maybe
        for i, path in enumerate(order[:400]):
            tree.readdir(path)
            settle(tree, spent)
            ahead = sum(listed(tree, p) for p in order[i + 1 :])
            assert ahead <= SUBTREE_WINDOW + 2 * BATCH_CHUNK, ahead
            if i + 1 == first:
                # As without a walk: 128 child objects of /objects and 64
                # of their own (readdir of / and of /objects); 64 more at
                # most, of the 2,002 objects.
                assert ahead <= 4 * BATCH_CHUNK, ahead
        assert ahead >= SUBTREE_WINDOW, ahead  # (the walk is on)
        clock.advance(30 * SUBTREE_LAG)
        for path in order[400:420]:
            assert listed(tree, path)
            tree.readdir(path)
        assert settle(tree, spent) == {}
        # Once the walker has read what waited, the listing ahead goes on.
        for path in order[420:]:
            tree.readdir(path)
        settle(tree, spent)
        assert sum(listed(tree, p) for p in order) == len(order)
        tree.close()


def test_batch_walk_lists_ahead_what_a_walker_reads_within_the_ttl() -> None:
    """A walker that lists 20 objects a second, with a TTL of 30 s, through
    1,002 objects (grep -r, reading files between directories, is ten
    times slower than ls -R): what is listed ahead of it is no more than it
    lists in half the TTL, so nothing expires before it gets there and every
    object is listed once, in commands of 64."""
    objects = regions_tree(500)
    order = list(preorder(objects, sort=False))
    step, ttl = 0.05, 30.0
    window = ttl * SUBTREE_LAG / step
    clock = FakeClock()
    with (
        FakeQMP(objects, commands=WITH_BATCH) as fake,
        QMPClient(fake.path, timeout=3) as client,
    ):
        tree, spent = QOMTree(client, ttl=ttl, clock=clock), Spent(client)
        most = 0
        for i, path in enumerate(order):
            tree.readdir(path)
            settle(tree, spent)
            clock.advance(step)
            if i > SUBTREE_PACE:  # (once its pace is known)
                most = max(most, sum(listed(tree, p) for p in order[i + 1 :]))
        # (and so much ahead of it: each listing comes before it is needed;
        # the window, and the 64 objects its first listings brought before
        # it was known to walk)
        assert window / 2 <= most <= window + BATCH_CHUNK, most
        used = listed_once(fake, order)
        assert used <= len(order) / BATCH_CHUNK + 8, used
        tree.close()


def test_listing_fetches_no_value_a_walker_reads_after_a_subtree() -> None:
    """A walker of values in QEMU's order (grep -r) reads an object's
    properties that come after a child object only once back from that
    child's subtree, which may take longer than the TTL: listing the object
    fetches the values before the child, and the rest wait for the walker."""
    objects: Tree = {
        "/": [
            {"name": "first", "type": "child<container>"},
            {"name": "top", "type": "child<container>"},
        ],
        # (not sorted: a walker reading them in a row reads in QEMU's order)
        "/first": [{"name": n, "type": "int", "value": 0} for n in ("z", "y", "x", "w")],
        "/top": [
            {"name": "type", "type": "string", "value": "container"},
            {"name": "a", "type": "int", "value": 1},
            {"name": "kid", "type": "child<container>"},
            {"name": "b", "type": "int", "value": 2},
            {"name": "c", "type": "int", "value": 3},
        ],
        "/top/kid": [{"name": "x", "type": "int", "value": 0}],
    }
    clock = FakeClock()
    with FakeQMP(objects) as fake, QMPClient(fake.path, timeout=3) as client:
        tree, spent = QOMTree(client, ttl=1.0, clock=clock), Spent(client)
        tree.readdir("/first")
        for name in ("z", "y"):  # two reads in a row: a walk of values
            tree.get(f"/first/{name}")
        settle(tree, spent)
        tree.readdir("/top")
        assert settle(tree, spent) == {"qom-list": 1, "qom-get": 2}  # type, a
        assert tree.get("/top/a") == 1
        clock.advance(2.0)  # the subtree of kid takes longer than the TTL
        tree.readdir("/top/kid")
        assert tree.get("/top/kid/x") == 0
        assert tree.get("/top/b") == 2
        assert tree.get("/top/c") == 3
        # kid's listing, x, b and c: nothing asked twice
        assert settle(tree, spent) == {"qom-list": 1, "qom-get": 3}
        tree.close()


def test_batch_walk_with_an_infinite_ttl() -> None:
    """--ttl inf: what a walker lists ahead has no pace limit (nothing
    expires), and each object is listed once."""
    objects = regions_tree(500)
    order = list(preorder(objects, sort=False))
    clock = FakeClock()
    with (
        FakeQMP(objects, commands=WITH_BATCH) as fake,
        QMPClient(fake.path, timeout=3) as client,
    ):
        tree, spent = QOMTree(client, ttl=float("inf"), clock=clock), Spent(client)
        for path in order:
            tree.readdir(path)
            settle(tree, spent)
            clock.advance(0.05)
        used = listed_once(fake, order)
        assert used <= len(order) / BATCH_CHUNK + 8, used
        tree.close()


# --- the frontier alone: no QMP, no threads but the test's own -------------------

#: Where a walker lists /a, /b and /x: in QEMU's order, and sorted.
PLACES = {
    QEMU_ORDER: {"/a": (0,), "/b": (1,), "/x": (5,)},
    SORTED: {"/a": (1,), "/b": (0,), "/x": (5,)},
}


def test_frontier_reorder_loses_nothing_added_meanwhile() -> None:
    """The walk goes on in another order while another thread adds to the
    frontier: what it adds is kept.  (The frontier used to be placed anew
    outside its lock and then written back whole, over what had been added
    in between.)"""
    frontier: Frontier
    racer = threading.Thread(target=lambda: frontier.add(SORTED, [((5,), "/x")], []))

    def place(path: str, order: int) -> tuple[int, ...]:
        if racer.ident is None:
            racer.start()
            # (The old frontier let it add here, then wrote the heap over.)
            racer.join(0.2)
        return PLACES[order][path]

    frontier = Frontier(1.0, place)
    frontier.add(QEMU_ORDER, [((0,), "/a"), ((1,), "/b")], [])
    frontier.add(SORTED, [], [])  # the walker now lists in sorted order
    racer.join()
    assert frontier.next_chunk(0.0, walking=True) == ["/b", "/a", "/x"]


def test_frontier_places_anew_what_it_holds_when_the_order_changes() -> None:
    frontier = Frontier(1.0, lambda path, order: PLACES[order][path])
    frontier.add(QEMU_ORDER, [((0,), "/a"), ((1,), "/b")], [])
    frontier.add(SORTED, [((5,), "/x")], [])
    assert frontier.next_chunk(0.0, walking=True) == ["/b", "/a", "/x"]


def test_frontier_is_dropped_once_the_walk_is_over() -> None:
    frontier = Frontier(1.0, lambda path, order: PLACES[order][path])
    frontier.add(QEMU_ORDER, [((0,), "/a")], [])
    assert frontier.next_chunk(0.0, walking=False) is None
    frontier.add(QEMU_ORDER, [((1,), "/b")], [])
    assert frontier.next_chunk(0.0, walking=True) == ["/b"]  # /a is gone
