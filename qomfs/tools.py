# PYTHON_ARGCOMPLETE_OK  (argcomplete: these commands complete themselves)
"""``qom-get``, ``qom-set``, ``qom-list``, ``qom-tree`` and ``qom``: QEMU's QOM tools.

The command lines of QEMU's ``scripts/qmp/qom-*`` (``python/qemu/utils/qom.py``):
``PATH.PROPERTY`` (split at the *last* ``.``, so ``/machine/q35/pcie.0.type``
works), ``-s SOCKET`` or ``$QMP_SOCKET``, the same ``qom-list`` and ``qom-tree``
output.  Values are shown and converted as the filesystem does: the text
format of :mod:`qomfs.values`, the type-aware conversion of
:meth:`qomfs.model.QOMTree.write`.

Exit status: 0 on success; 1 when QEMU refuses or cannot be reached (one line
``PROG: message`` on stderr); 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from qomfs import __version__
from qomfs.argtypes import seconds_arg, silence_stdout
from qomfs.completion import autocomplete, path_completer, set_completer
from qomfs.errors import (
    ExecuteError,
    Guarded,
    InvalidValue,
    NotFound,
    QOMError,
    QomfsError,
)
from qomfs.model import QOMTree
from qomfs.qmp import QMPClient
from qomfs.tree import Property, join
from qomfs.values import format_value

SOCKET_HELP = "QMP socket: a unix socket path or HOST:PORT (default: $QMP_SOCKET)"
MONITOR_NOTE = """
A QMP monitor serves one client at a time: give these tools a monitor of their own, e.g.
  qemu-system-x86_64 ... -qmp unix:/tmp/vm.sock,server=on,wait=off
"""

EPILOG_GET = """\
examples:
  qom-get -s /tmp/vm.sock /machine.type             pc-q35-7.2-machine
  qom-get /machine/q35/pcie.0.type                  the last '.' separates the property
  QMP_SOCKET=/tmp/vm.sock qom-get /machine.smp      structs print as one line of JSON
"""
EPILOG_SET = """\
examples:
  qom-set -s /tmp/vm.sock /machine.graphics false   booleans: true/false, on/off, 1/0
  qom-set /machine/peripheral/disk0.bootindex 2     integers: decimal, 0x, 0o, 0b
  qom-set /machine.append 'console=ttyS0'           strings as they are

VALUE is converted with the property's type from qom-list, as a write to a
qom-fuse file is: sizes take K, M, G suffixes, structs and lists are JSON.
Nothing is printed on success.  Writes that can take the VM down (such as
realized=false, which unplugs a live device) need --force.
"""
EPILOG_LIST = """\
examples:
  qom-list -s /tmp/vm.sock                 the root: chardevs/ machine/ objects/ type
  qom-list /machine                        child<> objects as NAME/, link<> as @NAME/
"""
EPILOG_TREE = """\
examples:
  qom-tree -s /tmp/vm.sock                 the whole machine
  qom-tree /machine/q35                    one subtree
  qom-tree --format svg --depth 2 -o q35.svg /machine
                                           a picture (needs Graphviz's dot)
  qom-tree --format json /machine/q35 | jq '.children'

Each object: its path, one "  NAME: VALUE (TYPE)" line per property that is
not a child (a property that cannot be read shows "<EXCEPTION: REASON>"), a
blank line, then its children, depth-first.  On QEMU 10.1 and later one
qom-list-get per tree level fetches everything.
"""
EPILOG_QOM = """\
commands:
  get PATH.PROPERTY          print a property's value
  set PATH.PROPERTY VALUE    set a property
  list [PATH]                list an object's properties
  tree [PATH]                print a subtree with every value
  fuse MOUNTPOINT            mount the tree (qom-fuse)

examples:
  qom get -s /tmp/vm.sock /machine.type
  qom tree -s /tmp/vm.sock /machine/q35
  qom fuse -s /tmp/vm.sock /mnt/qom
  qom COMMAND --help         a command's own options
"""


# --- the work, callable in-process ----------------------------------------------


def split_path_prop(text: str) -> tuple[str, str]:
    """``PATH.PROPERTY`` -> (``PATH``, ``PROPERTY``), split at the last ``.``.

    Raises :class:`ValueError` when either part would be empty.
    """
    path, dot, prop = text.rpartition(".")
    if not dot or not path or not prop or "/" in prop:
        raise ValueError(
            f"{text!r} is not PATH.PROPERTY (e.g. /machine.type: the last '.' "
            "separates the property)"
        )
    return path, prop


def qom_get(tree: QOMTree, path: str, prop: str) -> str:
    """The value of ``prop`` of the object at ``path``, as text with a newline."""
    return tree.read_text(join(path, prop))


def qom_set(tree: QOMTree, path: str, prop: str, value: str) -> None:
    """Set ``prop`` from text, converted with its type (:meth:`QOMTree.write`).

    Raises :class:`InvalidValue` (text or value refused), :class:`NotWritable`,
    :class:`NotFound`, :class:`Guarded` (``realized=false`` and other writes
    that can take the VM down, unless ``tree.allow_unrealize``), or a QMP error.
    """
    where = join(path, prop)
    try:
        # fsencode gives back the very bytes of the command line, even when
        # they are not UTF-8, so that decode_text can say what is wrong.
        tree.write(where, os.fsencode(value))
    except InvalidValue as err:
        if err.cause is not None:
            raise  # QEMU's refusal, which already names the property
        raise InvalidValue(f"{where}: {err}") from err  # the text did not convert
    except Guarded as err:
        raise Guarded(f"{err} (give --force to do it anyway)", err.cause) from err


def qom_list(tree: QOMTree, path: str) -> Iterator[str]:
    """QEMU's ``qom-list`` lines: ``NAME/`` for a child, ``@NAME/`` for a link."""
    for prop in tree.listing(path).properties.values():
        if prop.is_child:
            yield f"{prop.name}/"
        elif prop.is_link:
            yield f"@{prop.name}/"
        else:
            yield prop.name


@dataclass
class _Object:
    """One object of a tree walk: its properties, and the values already known."""

    path: str
    properties: list[Property]
    values: dict[str, Any] = field(default_factory=dict)

    def children(self) -> list[str]:
        return [join(self.path, p.name) for p in self.properties if p.is_child]


def qom_tree(
    tree: QOMTree,
    path: str = "/",
    *,
    batch: bool | None = None,
    depth: int | None = None,
    links: bool = True,
) -> Iterator[str]:
    """QEMU's ``qom-tree`` output for the subtree at ``path``, line by line.

    With ``qom-list-get`` (QEMU >= 10.1; ``batch=None`` uses it when
    ``tree.batch``) the tree is fetched first with one command per level
    (:meth:`QOMTree.list_get`), then printed; without, it is printed while
    walked (``qom-list`` per object, ``qom-get`` per property).  A property
    whose value the batch lacks is asked for with ``qom-get``, so an
    unreadable one shows QEMU's reason either way.  ``depth``: objects at
    most that many levels below ``path`` (0: ``path`` alone); ``links=False``
    leaves ``link<>`` properties out.  Objects that vanish during the walk
    are left out; a ``path`` that is not an object raises :class:`NotFound`.
    QMP failures propagate.
    """
    if batch is None:
        batch = tree.batch
    if batch:
        fetched = _fetch_levels(tree, path, depth)
        return _tree_lines(tree, path, fetched.get, depth, links)
    return _tree_lines(tree, path, lambda p: _listed(tree, p, p == path), depth, links)


def _listed(tree: QOMTree, path: str, must_exist: bool) -> _Object | None:
    try:
        listing = tree.listing(path)
    except NotFound:
        if must_exist:
            raise
        return None  # vanished since its parent was listed
    return _Object(path, list(listing.properties.values()))


def _fetch_levels(tree: QOMTree, root: str, depth: int | None = None) -> dict[str, _Object]:
    """Every object under ``root`` (to ``depth``), with one ``qom-list-get`` per level."""
    out: dict[str, _Object] = {}
    level = [root]
    below = 0
    while level:
        for listing, values in tree.list_get(level, gone_ok=level != [root]):
            out[listing.path] = _Object(listing.path, list(listing.properties.values()), values)
        if depth is not None and below >= depth:
            break
        below += 1
        level = [child for path in level if path in out for child in out[path].children()]
    return out


def _tree_lines(
    tree: QOMTree,
    root: str,
    objects: Callable[[str], _Object | None],
    depth: int | None = None,
    links: bool = True,
) -> Iterator[str]:
    stack = [(root, 0)]
    while stack:
        path, below = stack.pop()
        obj = objects(path)
        if obj is None:
            continue
        yield obj.path
        for prop in obj.properties:
            if not prop.is_child and (links or not prop.is_link):
                yield f"  {prop.name}: {_value_text(tree, obj, prop)} ({prop.type})"
        yield ""
        if depth is None or below < depth:
            stack.extend((child, below + 1) for child in reversed(obj.children()))


# --- pictures and JSON --------------------------------------------------------------


@dataclass
class Picture:
    """The objects of a subtree and the edges between them, as DOT draws them.

    ``objects``: path -> (name, QOM type) of every object drawn, the root
    first, depth-first; ``outside``: link targets that are not in the
    subtree (drawn apart, labelled with their path); ``children`` and
    ``links``: (from, to) and (from, property, to) edges.  Unset links are
    not edges.
    """

    objects: dict[str, tuple[str, str]] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)
    children: list[tuple[str, str]] = field(default_factory=list)
    links: list[tuple[str, str, str]] = field(default_factory=list)


def _walk(
    tree: QOMTree, root: str, batch: bool | None, depth: int | None
) -> Iterator[tuple[_Object, int]]:
    """The objects of the subtree, depth-first, each with its depth below ``root``."""
    if batch is None:
        batch = tree.batch
    if batch:
        fetched = _fetch_levels(tree, root, depth)
        get: Callable[[str], _Object | None] = fetched.get
    else:

        def get(p: str) -> _Object | None:
            return _listed(tree, p, p == root)

    stack = [(root, 0)]
    while stack:
        path, below = stack.pop()
        obj = get(path)
        if obj is None:
            continue
        yield obj, below
        if depth is None or below < depth:
            stack.extend((child, below + 1) for child in reversed(obj.children()))


def _value(tree: QOMTree, obj: _Object, prop: Property) -> Any:
    """A property's value: from the batch, else ``qom-get``; QOMError when refused."""
    if prop.name in obj.values:
        return obj.values[prop.name]
    return tree.get(join(obj.path, prop.name))


def _root_type(tree: QOMTree, obj: _Object) -> str:
    try:
        value = _value(tree, obj, Property("type", "string"))
    except QOMError:
        return "object"
    return value if isinstance(value, str) else "object"


def _name(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2] or "/"


def picture(
    tree: QOMTree,
    path: str = "/",
    *,
    batch: bool | None = None,
    depth: int | None = None,
    links: bool = True,
) -> Picture:
    """What ``qom-tree --format dot`` draws of the subtree at ``path``.

    Fetches each object's listing and the value of each ``link<>`` property
    (not the other values); a link QEMU cannot read is left out, as an unset
    one is.  Raises :class:`NotFound` for a ``path`` that is not an object.
    """
    pic = Picture()
    types: dict[str, str] = {}
    for obj, _below in _walk(tree, path, batch, depth):
        kind = types.get(obj.path) or _root_type(tree, obj)
        pic.objects[obj.path] = (_name(obj.path), kind)
        for prop in obj.properties:
            if prop.is_child:
                child = join(obj.path, prop.name)
                types[child] = prop.target_type
                if depth is None or _below < depth:
                    pic.children.append((obj.path, child))
            elif prop.is_link and links:
                try:
                    target = _value(tree, obj, prop)
                except QOMError:
                    continue
                if isinstance(target, str) and target.startswith("/"):
                    pic.links.append((obj.path, prop.name, target))
    # A child that vanished during the walk has no node: drop its edge.
    pic.children = [(a, b) for a, b in pic.children if b in pic.objects]
    seen: set[str] = set()
    for _, _, target in pic.links:
        if target not in pic.objects and target not in seen:
            seen.add(target)
            pic.outside.append(target)
    return pic


def _dot_escape(text: str) -> str:
    r"""Text for a DOT label (an escString: ``\\`` is a backslash, ``\n`` a line break)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _dot_string(text: str) -> str:
    r"""A DOT ID: quoted, ``"`` escaped, backslashes kept as they are (DOT reads
    ``\x2f`` in a QOM name literally).  A name ending in a backslash gets a
    second one, or it would escape the closing quote."""
    quoted = text.replace('"', '\\"')
    if (len(quoted) - len(quoted.rstrip("\\"))) % 2:
        quoted += "\\"
    return f'"{quoted}"'


def dot_lines(pic: Picture) -> Iterator[str]:
    """Graphviz DOT of a :class:`Picture`: objects are boxes labelled with
    their name and QOM type, ``child<>`` edges solid, ``link<>`` edges
    dashed and labelled with the property's name."""
    yield "digraph qom {"
    yield "  rankdir=LR;"
    yield '  node [shape=box, fontname="Helvetica", fontsize=10];'
    yield '  edge [fontname="Helvetica", fontsize=9];'
    for path, (name, kind) in pic.objects.items():
        label = f'"{_dot_escape(name)}\\n{_dot_escape(kind)}"'  # \n: a line break in DOT
        yield f"  {_dot_string(path)} [label={label}];"
    for path in pic.outside:
        yield f"  {_dot_string(path)} [style=dashed];"
    for a, b in pic.children:
        yield f"  {_dot_string(a)} -> {_dot_string(b)};"
    for a, name, b in pic.links:
        label = f'"{_dot_escape(name)}"'
        yield f"  {_dot_string(a)} -> {_dot_string(b)} [style=dashed, label={label}];"
    yield "}"


def tree_json(
    tree: QOMTree,
    path: str = "/",
    *,
    batch: bool | None = None,
    depth: int | None = None,
    links: bool = True,
) -> dict[str, Any]:
    """The subtree at ``path`` as nested JSON-able dicts.

    Each object: ``{"path", "type", "properties": {NAME: {"type", "value"}},
    "children": {NAME: object}}``; a property QEMU cannot read has
    ``"error"`` (QEMU's reason) instead of ``"value"``; a child below
    ``depth`` has only ``path`` and ``type``.  ``links=False`` leaves
    ``link<>`` properties out.
    """
    made: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] | None = None
    for obj, below in _walk(tree, path, batch, depth):
        node = made.pop(obj.path, None)
        if node is None:  # the root
            node = {"path": obj.path, "type": _root_type(tree, obj)}
            top = node
        props: dict[str, Any] = {}
        kids: dict[str, Any] = {}
        for prop in obj.properties:
            if prop.is_child:
                child = {"path": join(obj.path, prop.name), "type": prop.target_type}
                kids[prop.name] = child
                if depth is None or below < depth:
                    made[child["path"]] = child
                continue
            if prop.is_link and not links:
                continue
            entry: dict[str, Any] = {"type": prop.type}
            try:
                entry["value"] = _value(tree, obj, prop)
            except QOMError as err:
                entry["error"] = err.cause.desc if isinstance(err.cause, ExecuteError) else str(err)
            props[prop.name] = entry
        node["properties"] = props
        node["children"] = kids
    assert top is not None  # _walk yields the root or raises NotFound
    return top


def _value_text(tree: QOMTree, obj: _Object, prop: Property) -> str:
    if prop.name in obj.values:
        value = obj.values[prop.name]
    else:
        try:
            value = tree.get(join(obj.path, prop.name))
        except QOMError as err:
            reason = err.cause.desc if isinstance(err.cause, ExecuteError) else str(err)
            return f"<EXCEPTION: {reason}>"
    return format_value(value)[:-1]  # one line each: no trailing newline


# --- command lines --------------------------------------------------------------


def _parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog + MONITOR_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-s", "--socket", help=SOCKET_HELP)
    p.add_argument(
        "--timeout",
        type=seconds_arg(timeout=True),
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the connection and for each answer (default 5)",
    )
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _socket(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    address: str | None = args.socket or os.environ.get("QMP_SOCKET")
    if not address:
        parser.error("no QMP socket: give -s SOCKET or set QMP_SOCKET")
    return address


def _path_prop(parser: argparse.ArgumentParser, text: str) -> tuple[str, str]:
    try:
        return split_path_prop(text)
    except ValueError as err:
        parser.error(str(err))


def _run(
    prog: str,
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    work: Callable[[QOMTree], Iterator[str] | None],
    *,
    force: bool = False,
    batch: bool = False,
) -> int:
    """Connect, run ``work``, print its lines; turn failures into one line and 1."""
    address = _socket(parser, args)
    # No reconnection: a tool that lost QEMU says so rather than retrying.
    client = QMPClient(address, timeout=args.timeout, connect_timeout=args.timeout, reconnect=False)
    try:
        client.connect()
        # ttl=0: every answer comes straight from QEMU.  ``batch``: whether
        # qom-list-get may be used (by qom-tree) where QEMU has it.
        tree = QOMTree(client, ttl=0, batch=None if batch else False, allow_unrealize=force)
        lines = work(tree)
        if lines is not None:
            _print_lines(lines, sys.stdout)
    except QomfsError as err:
        sys.stdout.flush()
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # qom-tree | head: the reader went away, which is not our error.
        silence_stdout()
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
    return 0


def _print_lines(lines: Iterator[str], out: TextIO) -> None:
    for line in lines:
        out.write(line + "\n")
    out.flush()


def main_get(argv: list[str] | None = None, prog: str = "qom-get") -> int:
    """``qom-get [-s SOCKET] PATH.PROPERTY``: print a property's value."""
    parser = _parser(prog, "Print a QOM property's value.", EPILOG_GET)
    set_completer(
        parser.add_argument("path_prop", metavar="PATH.PROPERTY", help="object path and property"),
        path_completer(properties=True),
    )
    autocomplete(parser)
    args = parser.parse_args(argv)
    path, prop = _path_prop(parser, args.path_prop)

    def work(tree: QOMTree) -> Iterator[str]:
        yield qom_get(tree, path, prop)[:-1]  # the text format's one newline

    return _run(prog, parser, args, work)


def main_set(argv: list[str] | None = None, prog: str = "qom-set") -> int:
    """``qom-set [-s SOCKET] PATH.PROPERTY VALUE``: set a property, converted by type."""
    parser = _parser(prog, "Set a QOM property's value.", EPILOG_SET)
    set_completer(
        parser.add_argument("path_prop", metavar="PATH.PROPERTY", help="object path and property"),
        path_completer(properties=True),
    )
    parser.add_argument("value", metavar="VALUE", help="the new value, as text")
    parser.add_argument(
        "--force",
        action="store_true",
        help="do writes that can take the VM down (realized=false unrealizes a live device)",
    )
    autocomplete(parser)
    args = parser.parse_args(argv)
    path, prop = _path_prop(parser, args.path_prop)

    def work(tree: QOMTree) -> None:
        qom_set(tree, path, prop, args.value)

    return _run(prog, parser, args, work, force=args.force)


def main_list(argv: list[str] | None = None, prog: str = "qom-list") -> int:
    """``qom-list [-s SOCKET] [PATH]``: list an object's properties."""
    parser = _parser(prog, "List a QOM object's properties.", EPILOG_LIST)
    set_completer(
        parser.add_argument("path", metavar="PATH", nargs="?", default="/", help="(default /)"),
        path_completer(properties=False),
    )
    autocomplete(parser)
    args = parser.parse_args(argv)
    return _run(prog, parser, args, lambda tree: qom_list(tree, args.path))


FORMATS = ("text", "json", "dot", "svg", "png")
GRAPHVIZ_MISSING = "Graphviz's dot is not installed (Debian: apt-get install graphviz)"


class GraphvizError(QomfsError):
    """Graphviz's ``dot`` is missing or refused the picture."""


def render(dot_text: str, fmt: str, output: str | None) -> bytes:
    """Run Graphviz's ``dot -T FMT`` on ``dot_text``: into ``output``, or the
    bytes returned.  Raises :class:`GraphvizError`."""
    exe = shutil.which("dot")
    if exe is None:
        raise GraphvizError(GRAPHVIZ_MISSING)
    cmd = [exe, f"-T{fmt}"] + (["-o", output] if output else [])
    try:
        done = subprocess.run(cmd, input=dot_text.encode(), capture_output=True, check=False)
    except OSError as err:
        raise GraphvizError(f"cannot run {exe}: {err}") from err
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise GraphvizError(f"dot -T{fmt} failed: {why[0] if why else done.returncode}")
    return done.stdout


def _depth_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a depth (0, 1, 2, ...)")
    return value


def main_tree(argv: list[str] | None = None, prog: str = "qom-tree") -> int:
    """``qom-tree [-s SOCKET] [--format F] [--depth N] [--no-links] [-o FILE] [PATH]``:
    print a subtree with every value, as text, JSON or a Graphviz picture."""
    parser = _parser(prog, "Print a QOM subtree with every property's value.", EPILOG_TREE)
    set_completer(
        parser.add_argument("path", metavar="PATH", nargs="?", default="/", help="(default /)"),
        path_completer(properties=False),
    )
    parser.add_argument(
        "--no-batch", action="store_true", help="do not use qom-list-get even where QEMU has it"
    )
    parser.add_argument(
        "-f",
        "--format",
        choices=FORMATS,
        default="text",
        help="text (qom-tree's own, the default), json (nested objects with typed values), "
        "dot (Graphviz), svg or png (drawn by Graphviz's dot)",
    )
    parser.add_argument(
        "-d",
        "--depth",
        type=_depth_arg,
        metavar="N",
        help="objects at most N levels below PATH (0: PATH alone)",
    )
    parser.add_argument(
        "--no-links", action="store_true", help="leave link<> properties (dashed edges) out"
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE, not stdout")
    autocomplete(parser)
    args = parser.parse_args(argv)
    fmt: str = args.format
    if fmt in ("svg", "png") and shutil.which("dot") is None:
        print(f"{prog}: {GRAPHVIZ_MISSING}", file=sys.stderr)
        return 1
    if fmt == "png" and not args.output and sys.stdout.isatty():
        parser.error("--format png writes binary: give -o FILE or redirect stdout")
    opts: dict[str, Any] = {"depth": args.depth, "links": not args.no_links}

    def lines(tree: QOMTree) -> Iterator[str]:
        if fmt == "text":
            return qom_tree(tree, args.path, **opts)
        if fmt == "json":
            return iter([json.dumps(tree_json(tree, args.path, **opts), indent=2)])
        return dot_lines(picture(tree, args.path, **opts))

    def work(tree: QOMTree) -> Iterator[str] | None:
        if fmt in ("svg", "png"):
            drawn = render("\n".join(lines(tree)) + "\n", fmt, args.output)
            if not args.output:
                sys.stdout.buffer.write(drawn)
                sys.stdout.flush()
            return None
        if not args.output:
            return lines(tree)
        text = "".join(line + "\n" for line in lines(tree))  # all fetched, then written
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as err:
            raise QomfsError(f"{args.output}: {err.strerror}") from err
        return None

    return _run(prog, parser, args, work, batch=not args.no_batch)


def _main_fuse(argv: list[str] | None = None, prog: str = "qom fuse") -> int:
    from qomfs import cli  # its own parser, prog "qom-fuse"

    return cli.main(argv)


COMMANDS: dict[str, Callable[[list[str] | None, str], int]] = {
    "get": main_get,
    "set": main_set,
    "list": main_list,
    "tree": main_tree,
    "fuse": _main_fuse,
}


def _complete_command() -> None:
    """``qom COMMAND ARGS<TAB>``: complete as ``qom-COMMAND ARGS<TAB>`` does (and exit).

    The shell's line is rewritten (``qom get`` and ``qom-get`` have the same
    length) and the command's own parser answers.  Returns when the cursor
    is still on COMMAND (then ``qom``'s parser offers the commands)."""
    line = os.environ.get("COMP_LINE", "")
    point = int(os.environ.get("COMP_POINT", len(line)))
    words = line[:point].split(" ")
    words = [w for w in words[:-1] if w] + words[-1:]  # the word under the cursor stays
    if len(words) < 3 or words[1] not in COMMANDS:
        return
    start = line.index(words[1], len(words[0]))
    head = f"{words[0]}-{words[1]}"
    new = head + line[start + len(words[1]) :]
    os.environ["COMP_LINE"] = new
    os.environ["COMP_POINT"] = str(point - (len(line) - len(new)))
    COMMANDS[words[1]](None, f"qom {words[1]}")


def main(argv: list[str] | None = None) -> int:
    """``qom COMMAND ...``: one entry point for get, set, list, tree and fuse."""
    parser = argparse.ArgumentParser(
        prog="qom",
        description="Query and change a running QEMU's object model (QOM) over QMP.",
        epilog=EPILOG_QOM + MONITOR_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="see below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments")
    if argv is None and "_ARGCOMPLETE" in os.environ:
        _complete_command()
    autocomplete(parser)
    args = parser.parse_args(argv)
    return COMMANDS[args.command](args.args, f"qom {args.command}")


if __name__ == "__main__":
    sys.exit(main())
