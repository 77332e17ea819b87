"""QOMTree against the fake monitor through a real QMPClient.

Cache behaviour is asserted by counting the QMP commands the client sent
(``Spent``) and by moving an injected clock instead of sleeping.
"""

from __future__ import annotations

import contextlib
import posixpath
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from qomfs.errors import (
    ExecuteError,
    InvalidValue,
    NotADirectory,
    NotFound,
    NotReadable,
    NotWritable,
    QOMError,
    ReadFailed,
)
from qomfs.model import UNSET_LINK, Kind, QOMTree, join
from qomfs.qmp import Event, QMPClient, State
from tests.fakeqmp import BASE_COMMANDS, FakeQMP, Tree, event
from tests.test_cache import FakeClock

MACHINE = "pc-q35-7.2-machine"
PERIPHERAL = "/machine/peripheral"
NIC0 = "/machine/peripheral/nic0"
NIC1 = "/machine/peripheral/nic1"
PCIE = "/machine/q35/pcie.0"
WITH_BATCH = [*BASE_COMMANDS, "qom-list-get"]


def device(typename: str, addr: int) -> list[dict[str, Any]]:
    return [
        {"name": "type", "type": "string", "value": typename, "readonly": True},
        {"name": "realized", "type": "bool", "value": True},
        {"name": "addr", "type": "int32", "value": addr},
        {"name": "mac", "type": "str", "value": f"52:54:00:12:34:{addr:02x}"},
        {"name": "parent_bus", "type": "link<bus>", "value": PCIE},
    ]


def make_tree() -> Tree:
    return {
        "/": [
            {"name": "type", "type": "string", "value": "container"},
            {"name": "machine", "type": f"child<{MACHINE}>"},
        ],
        "/machine": [
            {"name": "type", "type": "string", "value": MACHINE, "readonly": True},
            {"name": "smm", "type": "OnOffAuto", "value": "auto", "enum": ["on", "off", "auto"]},
            {"name": "dump-guest-core", "type": "bool", "value": True},
            {"name": "phandle-start", "type": "int", "value": 0},
            {"name": "smp", "type": "SMPConfiguration", "value": {"cpus": 1, "sockets": 1}},
            {"name": "secret", "type": "string"},  # no getter
            {"name": "crash-information", "type": "GuestPanicInformation", "error": "No crash"},
            {"name": "memory-backend", "type": "link<memory-backend>", "value": ""},
            {"name": "q35", "type": "child<q35-pcihost>"},
            {"name": "peripheral", "type": "child<container>"},
        ],
        "/machine/q35": [
            {"name": "type", "type": "string", "value": "q35-pcihost", "readonly": True},
            {"name": "pcie.0", "type": "child<PCIE>"},
        ],
        PCIE: [{"name": "type", "type": "string", "value": "PCIE", "readonly": True}],
        PERIPHERAL: [
            {"name": "type", "type": "string", "value": "container", "readonly": True},
            {"name": "nic0", "type": "child<virtio-net-pci>"},
            {"name": "nic1", "type": "child<e1000e>"},
        ],
        NIC0: device("virtio-net-pci", 0x18),
        NIC1: device("e1000e", 0x20),
    }


class Spent:
    """Commands the client sent since the last call."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client
        self.base = client.command_counts()

    def __call__(self) -> dict[str, int]:
        now = self.client.command_counts()
        delta = {k: v - self.base.get(k, 0) for k, v in now.items() if v != self.base.get(k, 0)}
        self.base = now
        return delta


class Env:
    def __init__(self, fake: FakeQMP, client: QMPClient, ttl: float, batch: bool | None) -> None:
        self.fake, self.client, self.clock = fake, client, FakeClock()
        self.tree = QOMTree(client, ttl=ttl, batch=batch, clock=self.clock)
        self.spent = Spent(client)

    def value(self, path: str) -> Any:
        """The fake's current value of the property at ``path``."""
        obj, _, name = path.rpartition("/")
        return next(p["value"] for p in self.fake.tree[obj] if p["name"] == name)


@contextlib.contextmanager
def env(
    ttl: float = 1.0, batch: bool | None = None, commands: Iterable[str] = BASE_COMMANDS
) -> Iterator[Env]:
    """A fake server, a client connected to it, and a tree on the client."""
    with FakeQMP(make_tree(), commands=commands) as fake, QMPClient(fake.path, timeout=3) as c:
        yield Env(fake, c, ttl, batch)


@pytest.fixture
def e() -> Iterator[Env]:
    with env() as it:
        yield it


@pytest.fixture
def eb() -> Iterator[Env]:
    """The server offers qom-list-get (QEMU >= 10.1)."""
    with env(commands=WITH_BATCH) as it:
        yield it


# --- what paths are ---------------------------------------------------------------


def test_lookup_objects_properties_links(e: Env) -> None:
    assert e.tree.lookup("/").kind is Kind.OBJECT
    machine = e.tree.lookup("/machine")
    assert machine.kind is Kind.OBJECT and machine.prop is not None
    assert machine.prop.target_type == MACHINE
    smm = e.tree.lookup("/machine/smm")
    assert smm.kind is Kind.PROPERTY and smm.prop is not None and smm.prop.type == "OnOffAuto"
    bus = e.tree.lookup(f"{NIC0}/parent_bus")
    assert bus.kind is Kind.LINK and bus.prop is not None and bus.prop.target_type == "bus"
    assert e.tree.lookup("/machine/memory-backend").kind is Kind.LINK
    assert e.tree.lookup(PCIE).kind is Kind.OBJECT


def test_lookup_missing(e: Env) -> None:
    with pytest.raises(NotFound):
        e.tree.lookup("/machine/nope")
    with pytest.raises(NotFound):
        e.tree.lookup("/machine/nope/deeper")
    with pytest.raises(NotADirectory):
        e.tree.lookup("/machine/smm/x")


def test_readdir_in_qemu_order(e: Env) -> None:
    assert [p.name for p in e.tree.readdir(PERIPHERAL)] == ["type", "nic0", "nic1"]
    assert [p.is_child for p in e.tree.readdir(PERIPHERAL)] == [False, True, True]
    with pytest.raises(NotFound):
        e.tree.readdir("/machine/nope")


def test_values_and_text(e: Env) -> None:
    assert e.tree.get("/machine/smp") == {"cpus": 1, "sockets": 1}
    assert e.tree.read_text("/machine/dump-guest-core") == "true\n"
    assert e.tree.read_text(f"{NIC0}/addr") == "24\n"


# --- QEMU's errors, classified ----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "error", "qemu_class"),
    [
        ("/machine/nope", NotFound, "GenericError"),
        ("/machine/gone/type", NotFound, "DeviceNotFound"),
        ("/machine/secret", NotReadable, "GenericError"),
        ("/machine/crash-information", ReadFailed, "GenericError"),
    ],
)
def test_read_errors(e: Env, path: str, error: type[QOMError], qemu_class: str) -> None:
    with pytest.raises(error) as info:
        e.tree.get(path)
    assert type(info.value) is error
    assert isinstance(info.value.cause, ExecuteError)
    assert info.value.cause.error_class == qemu_class
    assert info.value.__cause__ is info.value.cause


@pytest.mark.parametrize(
    ("path", "data", "error", "sent"),
    [
        ("/machine/type", b"other\n", NotWritable, 1),
        ("/machine/q35", b"x\n", NotWritable, 0),  # an object
        (f"{NIC0}/parent_bus", b"x", InvalidValue, 1),  # QEMU: DeviceNotFound 'x'
        ("/machine/memory-backend", b"/objects/nope\n", InvalidValue, 1),
        ("/machine/smm", b"maybe\n", InvalidValue, 1),  # QEMU refuses the enum value
        ("/machine/dump-guest-core", b"maybe\n", InvalidValue, 0),  # refused before QEMU
        ("/machine/phandle-start", b"\xff\n", InvalidValue, 0),
        ("/machine/nope", b"1\n", NotFound, 0),
    ],
)
def test_write_errors(e: Env, path: str, data: bytes, error: type[QOMError], sent: int) -> None:
    e.tree.readdir("/machine")
    e.tree.readdir(NIC0)
    e.spent()
    with pytest.raises(error):
        e.tree.write(path, data)
    assert e.spent().get("qom-set", 0) == sent


@pytest.mark.parametrize(
    ("path", "value", "error", "desc"),
    [
        ("/machine/dump-guest-core", "true", InvalidValue, "expected: boolean"),
        ("/machine/phandle-start", "7", InvalidValue, "expected: integer"),
        ("/machine/smm", "maybe", InvalidValue, "does not accept value 'maybe'"),
        ("/machine/memory-backend", "/nope", InvalidValue, "Device '/nope' not found"),
        (NIC0, "x", NotWritable, "is not writable"),  # a child<>
        ("/machine/nope", 1, NotFound, "not found"),
        ("/machine/gone/x", 1, NotFound, "Device '/machine/gone' not found"),
    ],
)
def test_set_errors(e: Env, path: str, value: Any, error: type[QOMError], desc: str) -> None:
    with pytest.raises(error) as info:
        e.tree.set(path, value)
    assert type(info.value) is error
    assert isinstance(info.value.cause, ExecuteError) and desc in info.value.cause.desc


# --- command counts ---------------------------------------------------------------


def test_lookups_after_readdir_are_free(e: Env) -> None:
    entries = e.tree.readdir("/machine")
    assert e.spent() == {"qom-list": 1}
    for prop in entries:
        assert e.tree.lookup(join("/machine", prop.name)).prop == prop
    with pytest.raises(NotFound):
        e.tree.lookup("/machine/nope")
    assert e.spent() == {}


def test_second_read_within_ttl_is_free(e: Env) -> None:
    assert e.tree.read_text("/machine/smm") == "auto\n"
    assert e.spent() == {"qom-get": 1}
    e.clock.advance(0.5)
    assert e.tree.read_text("/machine/smm") == "auto\n"
    assert e.spent() == {}


def test_ttl_zero_asks_every_time() -> None:
    with env(ttl=0) as e:
        for _ in range(3):
            assert e.tree.read_text("/machine/smm") == "auto\n"
            e.tree.lookup("/machine/smm")
        assert e.spent() == {"qom-get": 3, "qom-list": 3}


def test_write_invalidates(e: Env) -> None:
    assert e.tree.read_text("/machine/smm") == "auto\n"
    e.tree.lookup("/machine/smm")
    e.spent()
    e.tree.write("/machine/smm", b"on\n")
    assert e.spent() == {"qom-set": 1}
    assert e.value("/machine/smm") == "on"
    assert e.tree.read_text("/machine/smm") == "on\n"
    assert e.spent() == {"qom-get": 1}
    e.tree.write("/machine/dump-guest-core", b"off\n")
    assert e.value("/machine/dump-guest-core") is False
    assert e.tree.get("/machine/dump-guest-core") is False


def test_cache_expires_after_ttl(e: Env) -> None:
    e.tree.readdir("/machine")
    e.tree.get("/machine/smm")
    e.spent()
    e.clock.advance(0.75)
    e.tree.lookup("/machine/smm")
    e.tree.get("/machine/smm")
    assert e.spent() == {}
    e.clock.advance(0.25)
    e.tree.lookup("/machine/smm")
    assert e.spent() == {"qom-list": 1}
    e.tree.get("/machine/smm")
    assert e.spent() == {"qom-get": 1}


def test_ancestor_checked_again_after_the_ttl(e: Env) -> None:
    """The kernel looks a walker's ancestors up again every second: a listing
    just fetched below an ancestor answers for it; nothing else does."""
    e.tree.readdir("/")
    e.tree.readdir("/machine")
    e.tree.readdir("/machine/peripheral")
    e.clock.advance(1.5)  # everything expired
    e.spent()
    e.tree.readdir(NIC0)  # the walker goes on below /machine/peripheral
    assert e.spent() == {"qom-list": 1}
    assert e.tree.lookup("/machine/peripheral").kind is Kind.OBJECT
    assert e.tree.lookup("/machine").kind is Kind.OBJECT
    assert e.spent() == {}
    # Not an ancestor of what was just listed: the parent is asked again.
    assert e.tree.lookup("/machine/q35").kind is Kind.OBJECT
    assert e.spent() == {"qom-list": 1}
    # Nor a property, even of an ancestor.
    e.clock.advance(1.5)
    e.tree.readdir(NIC1)
    e.spent()
    assert e.tree.lookup("/machine/smm").kind is Kind.PROPERTY
    assert e.spent() == {"qom-list": 1}


def test_object_with_a_fresh_listing_needs_no_parent_listing(e: Env) -> None:
    """The kernel looks up the objects of a big directory as a walker gets
    to them, after the directory's listing has expired: an object whose own
    listing was fetched within the TTL (ahead of the walker) is there."""
    e.tree.readdir("/machine/peripheral")
    e.clock.advance(0.6)
    e.tree.readdir(NIC0)  # fetched ahead, say
    e.tree.readdir("/machine/q35")
    e.clock.advance(0.6)  # /machine/peripheral expired, nic0 not
    e.spent()
    assert e.tree.lookup(NIC0).kind is Kind.OBJECT
    assert e.spent() == {}
    # nic1 was never listed: its parent is asked again.
    assert e.tree.lookup(NIC1).kind is Kind.OBJECT
    assert e.spent() == {"qom-list": 1}


def test_concurrent_reads_share_one_command(e: Env) -> None:
    e.fake.delay["qom-get"] = 0.1
    texts: list[str] = []
    threads = [
        threading.Thread(target=lambda: texts.append(e.tree.read_text(f"{NIC1}/mac")))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert texts == ["52:54:00:12:34:20\n"] * 8
    assert e.spent() == {"qom-get": 1}


# --- qom-list-get -------------------------------------------------------------------


def walk_children(e: Env, directory: str) -> None:
    """Read every property of every child object of ``directory``, checking values."""
    for entry in e.tree.readdir(directory):
        if entry.is_child:
            child = join(directory, entry.name)
            for prop in e.tree.readdir(child):
                assert e.tree.lookup(join(child, prop.name)).prop == prop
                if not prop.is_child:
                    assert e.tree.get(join(child, prop.name)) == e.value(join(child, prop.name))


def test_batch_readdir_prefetches_children(eb: Env) -> None:
    assert eb.tree.batch
    eb.tree.readdir(PERIPHERAL)
    assert eb.tree.quiesce()
    assert eb.spent() == {"qom-list-get": 2}  # the directory, then both children
    walk_children(eb, PERIPHERAL)
    assert eb.spent() == {}
    assert eb.fake.command_counts().get("qom-get", 0) == 0


@pytest.mark.parametrize("readahead", [True, False])
def test_batch_readdir_lists_two_levels_ahead(eb: Env, readahead: bool) -> None:
    """Listing a directory brings its child objects' listings and, once they
    come, theirs: the walker going into the first child finds its own
    listed.  With --no-readahead, only the first level."""
    tree = QOMTree(eb.client, ttl=1.0, readahead=readahead, clock=eb.clock)
    tree.readdir("/machine")
    assert tree.quiesce()
    below = ["/machine/q35/pcie.0", NIC0, f"{PERIPHERAL}/nic1"]
    assert eb.spent() == {"qom-list-get": 3 if readahead else 2}
    assert all(tree._listings.peek(path)[0] is readahead for path in below)
    for path in below:
        tree.readdir(path, ahead=False)
    # (Without, each is one command of its own.)
    assert eb.spent() == ({} if readahead else {"qom-list-get": 3})


def test_batch_readdir_of_a_leaf_is_one_command(eb: Env) -> None:
    eb.tree.readdir(NIC0)
    assert eb.spent() == {"qom-list-get": 1}
    for prop in eb.tree.readdir(NIC0):
        eb.tree.get(join(NIC0, prop.name))
    assert eb.spent() == {}


def test_batch_unreadable_property_still_asks(eb: Env) -> None:
    eb.tree.readdir("/machine")
    assert eb.tree.quiesce()
    eb.spent()
    assert eb.tree.get("/machine/smp") == {"cpus": 1, "sockets": 1}
    assert eb.spent() == {}
    with pytest.raises(NotReadable):
        eb.tree.get("/machine/secret")  # qom-list-get brought no value for it
    assert eb.spent() == {"qom-get": 1}


def test_batch_missing_object(eb: Env) -> None:
    with pytest.raises(NotFound):
        eb.tree.readdir("/machine/nope")


def test_batch_false_uses_list_and_get() -> None:
    with env(batch=False, commands=WITH_BATCH) as e:
        assert not e.tree.batch
        walk_children(e, PERIPHERAL)
        props = [p for obj in (NIC0, NIC1) for p in e.fake.tree[obj]]
        assert e.spent() == {"qom-list": 3, "qom-get": len(props)}


# --- events and reconnection --------------------------------------------------------


def subscribe_marker(client: QMPClient, name: str) -> threading.Event:
    """Set once the client delivered event ``name`` (after the tree's subscriber)."""
    seen = threading.Event()

    def on_event(ev: Event) -> None:
        if ev.name == name:
            seen.set()

    client.subscribe(on_event)
    return seen


def test_device_deleted_drops_cached_listing(e: Env) -> None:
    for directory in (PERIPHERAL, NIC0, NIC1):
        e.tree.readdir(directory)
    e.spent()
    deleted = subscribe_marker(e.client, "DEVICE_DELETED")
    # The device is still there (e.g. the backend's event): only the cache drops.
    assert e.fake.send(event("DEVICE_DELETED", {"path": NIC1}))
    assert deleted.wait(3)
    assert e.tree.lookup(f"{NIC0}/mac").kind is Kind.PROPERTY
    assert e.spent() == {}
    assert e.tree.lookup(f"{NIC1}/mac").kind is Kind.PROPERTY
    assert e.spent() == {"qom-list": 1}

    deleted.clear()
    e.fake.delete(NIC0)
    assert deleted.wait(3)
    with pytest.raises(NotFound):
        e.tree.lookup(NIC0)
    assert e.spent() == {"qom-list": 1}  # the parent's listing, asked again
    with pytest.raises(NotFound):
        e.tree.lookup(f"{NIC0}/mac")
    assert e.spent() == {"qom-list": 1}


def test_reconnection_drops_the_cache(e: Env) -> None:
    e.tree.readdir("/machine")
    e.fake.tree["/machine"].append({"name": "new", "type": "bool", "value": False})
    with pytest.raises(NotFound):
        e.tree.lookup("/machine/new")  # served from the cache
    assert e.spent() == {"qom-list": 1}
    e.fake.drop()
    deadline = time.monotonic() + 3
    while e.client.state is not State.LOST:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert e.spent() == {}
    assert e.tree.get("/machine/phandle-start") == 0  # reconnects
    assert e.tree.lookup("/machine/new").kind is Kind.PROPERTY
    assert e.spent() == {"qmp_capabilities": 1, "query-commands": 1, "qom-get": 1, "qom-list": 1}


# --- links ----------------------------------------------------------------------


def test_readlink(e: Env) -> None:
    text = e.tree.readlink(f"{NIC0}/parent_bus")
    assert text == "../../q35/pcie.0"
    assert posixpath.normpath(posixpath.join(NIC0, text)) == PCIE
    assert e.tree.readlink("/machine/memory-backend") == UNSET_LINK == "(unset)"
    e.tree.write("/machine/memory-backend", PCIE.encode() + b"\n")
    assert e.tree.readlink("/machine/memory-backend") == "q35/pcie.0"


# --- invalidation while a batch is in flight (bugs) -------------------------------


def run_during_batch(
    e: Env, monkeypatch: pytest.MonkeyPatch, action: Any, among: str | None = None
) -> list[threading.Thread]:
    """Run ``action`` in another thread right after the first qom-list-get
    (the first for ``among``, if given) was sent: waited for (its reply
    arrived) or sent ahead (its reply may come before or after what
    ``action`` causes).

    That is the interleaving of a write (or a DEVICE_DELETED) racing a
    directory listing, made deterministic.  Sent by the QMP reader thread,
    which ``action`` needs, it is not waited for: the caller joins the
    threads returned.
    """
    real_execute, real_submit = e.client.execute, e.client.submit
    done: list[bool] = []
    threads: list[threading.Thread] = []

    def during(command: str, arguments: Any) -> None:
        paths = (arguments or {}).get("paths", [])
        if command == "qom-list-get" and not done and (among is None or among in paths):
            done.append(True)
            other = threading.Thread(target=action)
            threads.append(other)
            other.start()
            if threading.current_thread().name != "qmp-reader":
                other.join(5)

    def execute(command: str, arguments: Any = None, timeout: Any = None) -> Any:
        reply = real_execute(command, arguments, timeout)
        during(command, arguments)
        return reply

    def submit(calls: list[tuple[str, Any]], callback: Any) -> bool:
        sent = real_submit(calls, callback)
        if sent:
            during(*calls[0])
        return sent

    monkeypatch.setattr(e.client, "execute", execute)
    monkeypatch.setattr(e.client, "submit", submit)
    return threads


def test_write_during_batch_is_not_undone(eb: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    run_during_batch(eb, monkeypatch, lambda: eb.tree.set(f"{NIC0}/addr", 40))
    eb.tree.readdir(NIC0)
    assert eb.value(f"{NIC0}/addr") == 40
    assert eb.tree.get(f"{NIC0}/addr") == 40


def test_device_deleted_during_prefetch(eb: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    deleted = subscribe_marker(eb.client, "DEVICE_DELETED")

    def delete() -> None:
        eb.fake.delete(NIC0)
        assert deleted.wait(3)

    threads = run_during_batch(eb, monkeypatch, delete, among=NIC0)
    # /machine; ahead, q35 and peripheral; then pcie.0, nic0 and nic1, while
    # nic0 is deleted.
    eb.tree.readdir("/machine")
    assert eb.tree.quiesce()
    (thread,) = threads
    thread.join(5)
    assert deleted.wait(0)
    assert eb.spent() == {"qom-list-get": 3}
    with pytest.raises(NotFound):
        eb.tree.lookup(f"{NIC0}/mac")


# --- list_get: the one fallback for qom-list-get ------------------------------------


@pytest.mark.parametrize("ttl", [0, 1.0])
def test_list_get_brings_values_in_one_command(ttl: float) -> None:
    with env(ttl=ttl, commands=WITH_BATCH) as eb:
        got = eb.tree.list_get([NIC0, NIC1])
        assert [listing.path for listing, _ in got] == [NIC0, NIC1]
        assert got[0][1]["addr"] == eb.value(f"{NIC0}/addr")
        assert eb.spent() == {"qom-list-get": 1}


def test_list_get_asks_each_alone_when_one_is_gone() -> None:
    with env(ttl=0, commands=WITH_BATCH) as eb:
        paths = [NIC0, "/machine/nope", NIC1]
        got = eb.tree.list_get(paths, gone_ok=True)
        assert [listing.path for listing, _ in got] == [NIC0, NIC1]
        assert got[1][1]["addr"] == eb.value(f"{NIC1}/addr")
        # The batch, each path alone, and qom-list for QEMU's reason.
        assert eb.spent() == {"qom-list-get": 1 + len(paths), "qom-list": 1}
        with pytest.raises(NotFound):
            eb.tree.list_get(paths)


def test_list_get_without_qom_list_get_lists_with_no_values() -> None:
    with env(ttl=0) as e0:
        got = e0.tree.list_get([NIC0, "/machine/nope"], gone_ok=True)
        assert [(listing.path, values) for listing, values in got] == [(NIC0, {})]
        assert e0.spent() == {"qom-list": 2}
