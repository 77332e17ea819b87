"""The raw client's view of a VM's tree: a depth-first qom-list walk, its levels,
links and plain properties, and the targets the short workloads use."""

from __future__ import annotations

from dataclasses import dataclass, field

from qomfs.vm import RawQMP

from .common import N_OPS


@dataclass
class Tree:
    objects: dict[str, list[dict[str, str]]]
    levels: list[list[str]]
    links: list[tuple[str, str]] = field(default_factory=list)
    plain: list[tuple[str, str]] = field(default_factory=list)

    @property
    def nprops(self) -> int:
        return sum(len(v) for v in self.objects.values())


def join(obj: str, name: str) -> str:
    return obj.rstrip("/") + "/" + name


def raw_walk(qmp: RawQMP) -> Tree:
    """qom-list of every object, depth first (what a plain client does)."""
    objects: dict[str, list[dict[str, str]]] = {}
    todo = ["/"]
    while todo:
        path = todo.pop()
        props = qmp.cmd("qom-list", path=path)
        objects[path] = props
        for p in reversed(props):
            if p["type"].startswith("child<"):
                todo.append(join(path, p["name"]))
    return tree_of(objects)


def tree_of(objects: dict[str, list[dict[str, str]]]) -> Tree:
    levels: list[list[str]] = []
    level = ["/"]
    while level:
        levels.append(level)
        level = [
            join(o, p["name"])
            for o in level
            for p in objects.get(o, [])
            if p["type"].startswith("child<")
        ]
    tree = Tree(objects, levels)
    for o, props in objects.items():
        for p in props:
            if p["type"].startswith("link<"):
                tree.links.append((o, p["name"]))
            elif not p["type"].startswith("child<"):
                tree.plain.append((o, p["name"]))
    return tree


def pick_targets(qmp: RawQMP, tree: Tree) -> tuple[str, list[str], list[str]]:
    """The property cat reads, the files stat'ed and their directories."""
    by_size = sorted(
        tree.objects,
        key=lambda o: (-sum(not p["type"].startswith("child<") for p in tree.objects[o]), o),
    )
    cat = ""
    for name in [p["name"] for p in tree.objects[by_size[0]]]:
        ptype = next(p["type"] for p in tree.objects[by_size[0]] if p["name"] == name)
        if ptype.startswith(("child<", "link<")):
            continue
        try:
            value = qmp.cmd("qom-get", path=by_size[0], property=name)
        except RuntimeError:
            continue
        if isinstance(value, bool | int | str):
            cat = join(by_size[0], name)
            break
    files: list[str] = []
    dirs: list[str] = []
    for obj in by_size:
        dirs.append(obj)
        for p in tree.objects[obj]:
            if not p["type"].startswith("child<"):
                files.append(join(obj, p["name"]))
        if len(files) >= N_OPS:
            break
    return cat, files[:N_OPS], dirs
