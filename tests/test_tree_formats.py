"""qom-tree's pictures and JSON (--format dot|svg|png|json, --depth, --no-links, -o)
on real QEMUs.

The tool runs as a subprocess on the VM's first monitor.  What it should show
comes from the second monitor through the harness's independent RawQMP; the
DOT is read back by Graphviz itself (``dot -Tjson``), not by a parser of ours.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, VM, RawQMP, missing, walk_qmp
from tests.qemus import VERSIONS, any_qemu_vm

ENV = {k: v for k, v in os.environ.items() if k != "QMP_SOCKET"} | {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module", params=VERSIONS)
def qvm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    """A bare q35 on each QEMU the suite covers (11.1 takes the qom-list-get path)."""
    with any_qemu_vm(request.param, tmp_path_factory.mktemp("vm"), "tf") as machine:
        yield machine


@pytest.fixture(scope="module")
def raw(qvm: VM) -> Iterator[RawQMP]:
    with qvm.qmp() as q:
        yield q


def need_dot() -> str:
    exe = shutil.which("dot")
    if exe is None:
        missing("Graphviz's dot is not installed (apt-get install graphviz)")
    assert exe is not None
    return exe


def qom_tree(
    vm: VM, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    code = "import sys; from qomfs.tools import main_tree; sys.exit(main_tree())"
    return subprocess.run(
        [sys.executable, "-c", code, "-s", str(vm.socket), *args],
        capture_output=True,
        timeout=120,
        env=env or ENV,
        stdin=subprocess.DEVNULL,
    )


def ok(res: subprocess.CompletedProcess[bytes]) -> bytes:
    assert res.returncode == 0, res.stderr.decode()
    assert res.stderr == b""
    return res.stdout


def graphviz_json(dot_text: bytes) -> dict[str, Any]:
    """The graph as Graphviz reads it: ``dot -Tjson`` fails on DOT it cannot parse."""
    res = subprocess.run([need_dot(), "-Tjson"], input=dot_text, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    graph: dict[str, Any] = json.loads(res.stdout)
    return graph


def depth_of(path: str, root: str) -> int:
    rel = path[len(root) :].strip("/")
    return rel.count("/") + 1 if rel else 0


def expected_graph(
    raw: RawQMP, root: str, depth: int | None, links: bool
) -> tuple[set[str], set[tuple[str, str]], set[tuple[str, str, str]]]:
    """Objects, child edges and set-link edges of the subtree, by plain QMP."""
    tree = walk_qmp(raw, root)
    objects = {p for p in tree if depth is None or depth_of(p, root) <= depth}
    children: set[tuple[str, str]] = set()
    link_edges: set[tuple[str, str, str]] = set()
    for path in objects:
        for prop in tree[path]:
            where = posixpath.join(path, prop["name"])
            if prop["type"].startswith("child<") and where in objects:
                children.add((path, where))
            elif prop["type"].startswith("link<") and links:
                try:
                    target = raw.cmd("qom-get", path=path, property=prop["name"])
                except RuntimeError:
                    continue
                if target:
                    link_edges.add((path, prop["name"], target))
    return objects, children, link_edges


def unescape(label: str) -> str:
    """A DOT label as shown: ``\\\\`` is one backslash (Graphviz's escString)."""
    return label.replace("\\\\", "\\")


def drawn_graph(
    graph: dict[str, Any],
) -> tuple[dict[str, dict[str, Any]], set[tuple[str, str]], set[tuple[str, str, str]]]:
    nodes = {o["_gvid"]: o for o in graph.get("objects", [])}
    children: set[tuple[str, str]] = set()
    link_edges: set[tuple[str, str, str]] = set()
    for e in graph.get("edges", []):
        a, b = nodes[e["tail"]]["name"], nodes[e["head"]]["name"]
        if e.get("style") == "dashed":
            link_edges.add((a, unescape(e["label"]), b))
        else:
            assert e.get("label", "") == "", e
            children.add((a, b))
    return {o["name"]: o for o in nodes.values()}, children, link_edges


@pytest.mark.parametrize(
    ("root", "args", "depth", "links"),
    [
        ("/", [], None, True),
        ("/machine/q35", ["--depth", "1"], 1, True),
        ("/machine", ["--depth", "2", "--no-links"], 2, False),
        ("/machine/q35", ["--depth", "0"], 0, True),
    ],
    ids=["whole", "q35-depth1", "machine-depth2-nolinks", "depth0"],
)
def test_dot_matches_the_tree(
    qvm: VM, raw: RawQMP, root: str, args: list[str], depth: int | None, links: bool
) -> None:
    """Graphviz parses the DOT; its nodes and edges are the objects, child<>
    properties and set link<> properties QMP shows, no more, no fewer."""
    graph = graphviz_json(ok(qom_tree(qvm, "--format", "dot", *args, root)))
    nodes, children, link_edges = drawn_graph(graph)
    objects, want_children, want_links = expected_graph(raw, root, depth, links)

    assert children == want_children
    assert link_edges == want_links
    outside = {target for _, _, target in want_links} - objects
    assert set(nodes) == objects | outside
    assert len(graph.get("edges", [])) == len(want_children) + len(want_links)
    if root == "/":
        assert len(objects) > 200 and len(want_links) > 200  # a bare q35: ~250 each
    for path in objects:  # labelled with name and QOM type
        kind = raw.cmd("qom-get", path=path, property="type")
        name = posixpath.basename(path) or "/"
        assert nodes[path]["label"].split("\\n") == [name.replace("\\", "\\\\"), kind], path
    for path in outside:  # drawn apart: dashed, labelled with their path
        assert nodes[path].get("style") == "dashed", path
        assert nodes[path]["label"] == "\\N", path  # Graphviz's default: the node's name


def test_json_round_trips_and_matches_qom_get(qvm: VM, raw: RawQMP) -> None:
    """Every object of the subtree with every property: the values qom-get gives,
    the reason QEMU gives for one it cannot read."""
    root = "/machine"
    top = json.loads(ok(qom_tree(qvm, "--format", "json", root)))
    tree = walk_qmp(raw, root)
    seen: list[str] = []
    values = errors = 0

    def check(obj: dict[str, Any]) -> None:
        nonlocal values, errors
        path = obj["path"]
        seen.append(path)
        assert obj["type"] == raw.cmd("qom-get", path=path, property="type")
        listed = tree[path]
        assert sorted(obj["children"]) == sorted(
            p["name"] for p in listed if p["type"].startswith("child<")
        )
        props = {p["name"]: p["type"] for p in listed if not p["type"].startswith("child<")}
        assert {n: e["type"] for n, e in obj["properties"].items()} == props
        for name, entry in obj["properties"].items():
            try:
                want = raw.cmd("qom-get", path=path, property=name)
            except RuntimeError as err:
                assert "value" not in entry and entry["error"] == err.args[1], (path, name)
                errors += 1
                continue
            assert "error" not in entry, (path, name, entry)
            if entry["value"] != want:  # a value that moves on its own (rtc-time)
                time.sleep(1.1)
                assert raw.cmd("qom-get", path=path, property=name) != want, (path, name)
            values += 1
        for child in obj["children"].values():
            check(child)

    check(top)
    assert sorted(seen) == sorted(tree)
    assert values > 1000 and errors >= 1, (values, errors)
    # and it is JSON all the way: loading what it dumps gives the same
    assert json.loads(json.dumps(top)) == top


def test_json_depth_and_no_links(qvm: VM, raw: RawQMP) -> None:
    top = json.loads(
        ok(qom_tree(qvm, "--format", "json", "--depth", "1", "--no-links", "/machine"))
    )
    listed = raw.cmd("qom-list", path="/machine")
    kids = {p["name"]: p["type"][6:-1] for p in listed if p["type"].startswith("child<")}
    assert {n: c["type"] for n, c in top["children"].items()} == kids
    for name, child in top["children"].items():
        assert "properties" in child  # depth 1: fetched
        for grandchild in child["children"].values():
            assert set(grandchild) == {"path", "type"}  # depth 2: named only
        assert not any(e["type"].startswith("link<") for e in child["properties"].values()), name
    assert set(top["properties"]) == {
        p["name"] for p in listed if not p["type"].startswith(("child<", "link<"))
    }


def test_text_depth(qvm: VM, raw: RawQMP) -> None:
    text = ok(qom_tree(qvm, "--depth", "1", "/machine")).decode()
    heads = [line for line in text.splitlines() if line.startswith("/")]
    kids = [
        p["name"] for p in raw.cmd("qom-list", path="/machine") if p["type"].startswith("child<")
    ]
    assert sorted(heads) == sorted(["/machine"] + [f"/machine/{k}" for k in kids])


def test_svg_and_png_files(qvm: VM, tmp_path: Path) -> None:
    need_dot()
    svg, png = tmp_path / "q35.svg", tmp_path / "q35.png"
    assert (
        ok(qom_tree(qvm, "--format", "svg", "--depth", "1", "-o", str(svg), "/machine/q35")) == b""
    )
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    titles = {t.text for t in root.iter("{http://www.w3.org/2000/svg}title")}
    assert {"/machine/q35", "/machine/q35/pcie.0", "/machine/q35/mch"} <= titles
    assert (
        ok(qom_tree(qvm, "--format", "png", "-o", str(png), "--depth", "0", "/machine/q35")) == b""
    )
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # svg on stdout is the same picture
    out = ok(qom_tree(qvm, "--format", "svg", "--depth", "1", "/machine/q35"))
    assert out == svg.read_bytes()


def test_dot_to_a_file(qvm: VM, tmp_path: Path) -> None:
    out = tmp_path / "tree.dot"
    assert ok(qom_tree(qvm, "--format", "dot", "--depth", "1", "-o", str(out), "/machine")) == b""
    assert out.read_bytes() == ok(qom_tree(qvm, "--format", "dot", "--depth", "1", "/machine"))


def test_without_graphviz_one_line_names_the_package(qvm: VM, tmp_path: Path) -> None:
    env = ENV | {"PATH": str(tmp_path)}  # no dot there
    res = qom_tree(qvm, "--format", "svg", "-o", str(tmp_path / "x.svg"), env=env)
    assert res.returncode == 1 and res.stdout == b""
    assert res.stderr.decode().splitlines() == [
        "qom-tree: Graphviz's dot is not installed (Debian: apt-get install graphviz)"
    ]
    assert not (tmp_path / "x.svg").exists()


def test_bad_depth_is_a_usage_error(qvm: VM) -> None:
    res = qom_tree(qvm, "--depth", "-1")
    assert res.returncode == 2 and b"is not a depth" in res.stderr


def test_the_committed_picture_is_a_q35_drawing() -> None:
    """docs/q35.svg (scripts/picture) is an SVG of /machine/q35 and its children."""
    root = ET.parse(ROOT / "docs" / "q35.svg").getroot()
    titles = {t.text for t in root.iter("{http://www.w3.org/2000/svg}title")}
    assert {"/machine/q35", "/machine/q35/pcie.0", "/machine/q35/mch"} <= titles
