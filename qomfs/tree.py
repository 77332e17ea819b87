"""What a QOM tree is: objects, properties and links, the paths that name them,
and the :class:`Tree` protocol the filesystem adapter reads through.  No I/O.
"""

from __future__ import annotations

import enum
import functools
import itertools
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from qomfs.errors import ReadFailed

#: What ``readlink`` shows for a link property that points nowhere (value "").
UNSET_LINK = "(unset)"
#: The largest value a write may carry.
MAX_WRITE = 64 * 1024

#: The orders a walker may read a directory in: readdir's, and ls's.
QEMU_ORDER = 1
SORTED = 2


class Kind(enum.Enum):
    OBJECT = "object"  # a directory
    PROPERTY = "property"  # a regular file
    LINK = "link"  # a symlink


class Property(NamedTuple):
    """One entry of ``qom-list``: a property's name and QOM type.

    A named tuple: a big VM's walk makes ~50,000 of them, and a frozen
    dataclass costs several times as much to build.
    """

    name: str
    type: str

    @property
    def is_child(self) -> bool:
        return self.type.startswith("child<")

    @property
    def is_link(self) -> bool:
        return self.type.startswith("link<")

    @property
    def kind(self) -> Kind:
        """What the property is in the filesystem: a directory (``child<>``),
        a symlink (``link<>``) or a file."""
        if self.is_child:
            return Kind.OBJECT
        return Kind.LINK if self.is_link else Kind.PROPERTY

    @property
    def target_type(self) -> str:
        """``T`` of ``child<T>`` or ``link<T>``; the type itself otherwise."""
        if self.is_child or self.is_link:
            return self.type[self.type.index("<") + 1 : -1]
        return self.type

    @classmethod
    def from_wire(cls, item: Any) -> Property:
        try:
            name, qom_type = item["name"], item.get("type", "")
        except (TypeError, KeyError, AttributeError):
            name = qom_type = None
        if not isinstance(name, str) or not isinstance(qom_type, str):
            raise ReadFailed(f"malformed qom-list entry {item!r}")
        return cls(name, qom_type)


@dataclass(frozen=True)
class Node:
    """What a filesystem path names."""

    path: str
    kind: Kind
    prop: Property | None  # None only for the root


@dataclass(frozen=True)
class Listing:
    """An object's properties, in QEMU's order."""

    path: str
    properties: dict[str, Property]

    @functools.cached_property
    def _groups(self) -> dict[Kind, tuple[str, ...]]:
        groups: dict[Kind, list[str]] = {kind: [] for kind in Kind}
        for prop in self.properties.values():
            groups[prop.kind].append(prop.name)
        return {kind: tuple(names) for kind, names in groups.items()}

    @functools.cached_property
    def _order(self) -> dict[str, tuple[tuple[str, ...], int, tuple[str, ...], int]]:
        """name -> the names of its kind in QEMU's order and sorted, and its
        index in each."""
        out = {}
        for names in self._groups.values():
            ordered = tuple(sorted(names))
            where = {name: i for i, name in enumerate(ordered)}
            for i, name in enumerate(names):
                out[name] = (names, i, ordered, where[name])
        return out

    def names(self, kind: Kind) -> tuple[str, ...]:
        """The names of one kind of entry, in QEMU's order."""
        return self._groups[kind]

    def index(self, name: str, order: int) -> int | None:
        """Where ``name`` is among the names of its kind in ``order``."""
        hit = self._order.get(name)
        if hit is None:
            return None
        return hit[1] if order & QEMU_ORDER else hit[3]

    def in_order(self, kind: Kind, order: int) -> tuple[str, ...]:
        """The names of one kind of entry in ``order`` (QEMU's if it has
        :data:`QEMU_ORDER`, else sorted)."""
        names = self._groups[kind]
        if order & QEMU_ORDER or not names:
            return names
        return self._order[names[0]][2]

    def after(self, name: str, order: int) -> Iterator[str]:
        """The names of ``name``'s kind that come after it in ``order``."""
        hit = self._order.get(name)
        if hit is None:
            return iter(())
        names, i, ordered, j = hit
        if order & QEMU_ORDER:
            return itertools.islice(names, i + 1, None)
        return itertools.islice(ordered, j + 1, None)

    def adjacent(self, before: str, name: str) -> int:
        """The orders (:data:`QEMU_ORDER` | :data:`SORTED`) in which ``name``
        comes right after ``before`` among the names of its kind; 0 if none."""
        hit = self._order.get(before)
        if hit is None:
            return 0
        names, i, ordered, j = hit
        return (QEMU_ORDER if names[i + 1 : i + 2] == (name,) else 0) | (
            SORTED if ordered[j + 1 : j + 2] == (name,) else 0
        )

    @functools.cached_property
    def _runs(self) -> tuple[dict[Kind, int], dict[str, int]]:
        """The runs of names between child objects, in QEMU's order: how many
        names of each kind come before the first child object; and for each
        name but a child object's, where among the names of its kind those
        after the next child object begin."""
        leading: dict[Kind, int] | None = None
        cut: dict[str, int] = {}
        seen = dict.fromkeys(Kind, 0)
        since: list[tuple[str, Kind]] = []  # names since the last child object
        for prop in self.properties.values():
            kind = prop.kind
            if kind is Kind.OBJECT:
                if leading is None:
                    leading = dict(seen)
                cut.update((name, seen[k]) for name, k in since)
                since = []
            else:
                since.append((prop.name, kind))
                seen[kind] += 1
        cut.update((name, seen[k]) for name, k in since)
        return (seen if leading is None else leading), cut

    def first(self, kind: Kind, count: int, order: int) -> tuple[str, ...]:
        """The first ``count`` names of one kind in each of ``order``; in
        QEMU's order, only those before the first child object: a walker in
        that order (``grep -r``) goes down into it before it reads on, and
        may come back after the TTL."""
        names = self.names(kind)
        leading, _ = self._runs
        ahead = names[: min(count, leading[kind])] if order & QEMU_ORDER else ()
        if order & SORTED:
            ahead += tuple(n for n in sorted(names)[:count] if n not in ahead)
        return ahead

    def following(self, name: str, count: int, order: int) -> tuple[str, ...]:
        """The ``count`` names after ``name`` among those of its kind (objects,
        links or plain properties) in each of ``order``; in QEMU's order, a
        link's or a plain property's up to the next child object (see
        :meth:`first`)."""
        hit = self._order.get(name)
        if hit is None:
            return ()
        names, i, ordered, j = hit
        _, cut = self._runs
        end = min(i + 1 + count, cut.get(name, len(names)))
        ahead = names[i + 1 : end] if order & QEMU_ORDER else ()
        if order & SORTED:
            ahead += tuple(n for n in ordered[j + 1 : j + 1 + count] if n not in ahead)
        return ahead


def is_destructive(name: str, value: Any) -> bool:
    """Writes that tear a live device out of the guest, or that crash QEMU.

    ``realized=false`` unrealizes a running device; any write to
    ``cpu-hotplug-legacy`` aborts QEMU 7.2 (seen: setting it to its own
    value, true, killed the VM).
    """
    return (name == "realized" and value is False) or name == "cpu-hotplug-legacy"


def parse_list_get(paths: list[str], reply: Any) -> list[tuple[Listing, dict[str, Any]]]:
    """Check a ``qom-list-get`` reply; each object's listing and the values it has.

    A property whose getter failed has no value (it is absent from the dict).
    """
    if not isinstance(reply, list) or len(reply) != len(paths):
        raise ReadFailed(f"qom-list-get: unexpected reply {reply!r:.200}")
    out = []
    for path, obj in zip(paths, reply, strict=True):
        items = obj.get("properties") if isinstance(obj, dict) else None
        if not isinstance(items, list):
            raise ReadFailed(f"qom-list-get {path}: unexpected reply {obj!r:.200}")
        props: dict[str, Property] = {}
        values: dict[str, Any] = {}
        for item in items:
            prop = Property.from_wire(item)
            props[prop.name] = prop
            if "value" in item:
                values[prop.name] = item["value"]
        out.append((Listing(path, props), values))
    return out


def parse_list(path: str, reply: Any) -> Listing:
    """Check a ``qom-list`` reply: the listing of the object at ``path``."""
    if not isinstance(reply, list):
        raise ReadFailed(f"qom-list {path}: unexpected reply {reply!r}")
    props = [Property.from_wire(item) for item in reply]
    return Listing(path, {p.name: p for p in props})


def climbs_out(base: str, rel: str) -> bool:
    """Whether ``rel`` from directory ``base`` goes above the root."""
    depth = len([p for p in base.split("/") if p])
    for part in rel.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def split(path: str) -> tuple[str, str]:
    """``/a/b/c`` -> (``/a/b``, ``c``)."""
    parent, _, name = path.rpartition("/")
    return parent or "/", name


def join(obj: str, name: str) -> str:
    return obj.rstrip("/") + "/" + name


def relative_link(link_path: str, target: str) -> str:
    """The relative symlink text that reaches ``target`` from ``link_path``."""
    return posixpath.relpath(target, posixpath.dirname(link_path))


class Tree(Protocol):
    """What the filesystem adapter needs: one QOM tree, or several (a forest)."""

    def lookup(self, path: str) -> Node: ...
    def readdir(self, path: str, ahead: bool = True) -> list[Property]: ...
    def read_text(self, path: str) -> str: ...
    def readlink(self, path: str) -> str: ...
    def write(self, path: str, data: bytes) -> None: ...
    def write_link(self, path: str, text: str, mountpoint: str = "") -> None: ...
    def object_type(self, path: str) -> str: ...
    def description(self, path: str) -> str: ...
    def stats(self) -> dict[str, Any]: ...
