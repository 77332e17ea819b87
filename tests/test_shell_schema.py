"""The schema reader and the completer, on a small schema shaped like QEMU's
(masked type names, a flat union, an alternate, a transaction) and a fake
QOM tree: no QEMU."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from qomfs.shell.complete import Completer, parse_hmp_help, parse_hmp_info
from qomfs.shell.parse import ParseError
from qomfs.shell.schema import Schema, SchemaError, typed_arguments

ENTRIES: list[dict[str, Any]] = [
    {"name": "str", "meta-type": "builtin", "json-type": "string"},
    {"name": "int", "meta-type": "builtin", "json-type": "int"},
    {"name": "bool", "meta-type": "builtin", "json-type": "boolean"},
    {"name": "number", "meta-type": "builtin", "json-type": "number"},
    {"name": "any", "meta-type": "builtin", "json-type": "value"},
    {"name": "null", "meta-type": "builtin", "json-type": "null"},
    {"name": "0", "meta-type": "object", "members": []},
    # qom-get / qom-set / qom-list
    {"name": "qom-get", "meta-type": "command", "arg-type": "1", "ret-type": "any"},
    {"name": "qom-set", "meta-type": "command", "arg-type": "2", "ret-type": "0"},
    {"name": "qom-list", "meta-type": "command", "arg-type": "3", "ret-type": "[4]"},
    {"name": "1", "meta-type": "object", "members": [
        {"name": "path", "type": "str"}, {"name": "property", "type": "str"}]},
    {"name": "2", "meta-type": "object", "members": [
        {"name": "path", "type": "str"}, {"name": "property", "type": "str"},
        {"name": "value", "type": "any"}]},
    {"name": "3", "meta-type": "object", "members": [{"name": "path", "type": "str"}]},
    {"name": "4", "meta-type": "object", "members": [
        {"name": "name", "type": "str"}, {"name": "type", "type": "str"}]},
    {"name": "[4]", "meta-type": "array", "element-type": "4"},
    # blockdev-add: a flat union on "driver"
    {"name": "blockdev-add", "meta-type": "command", "arg-type": "10", "ret-type": "0"},
    {"name": "10", "meta-type": "object", "tag": "driver",
     "members": [{"name": "driver", "type": "11"},
                 {"name": "node-name", "type": "str", "default": None},
                 {"name": "read-only", "type": "bool", "default": None}],
     "variants": [{"case": "null-co", "type": "12"}, {"case": "raw", "type": "13"}]},
    {"name": "11", "meta-type": "enum", "values": ["null-co", "null-aio", "raw"]},
    {"name": "12", "meta-type": "object", "members": [
        {"name": "size", "type": "int", "default": None},
        {"name": "read-zeroes", "type": "bool", "default": None}]},
    {"name": "13", "meta-type": "object", "members": [
        {"name": "file", "type": "14"}, {"name": "offset", "type": "int", "default": None}]},
    {"name": "14", "meta-type": "alternate", "members": [{"type": "10"}, {"type": "str"}]},
    # an enum listed the newer way (members only)
    {"name": "set-action", "meta-type": "command", "arg-type": "20", "ret-type": "0",
     "features": ["unstable"]},
    {"name": "20", "meta-type": "object", "members": [
        {"name": "panic", "type": "21", "default": None},
        {"name": "ratio", "type": "number", "default": None},
        {"name": "tags", "type": "[str]", "default": None, "features": ["deprecated"]}],
     },
    {"name": "21", "meta-type": "enum", "members": [{"name": "pause"}, {"name": "shutdown"}]},
    {"name": "[str]", "meta-type": "array", "element-type": "str"},
    # transaction
    {"name": "transaction", "meta-type": "command", "arg-type": "30", "ret-type": "0"},
    {"name": "30", "meta-type": "object", "members": [{"name": "actions", "type": "[31]"}]},
    {"name": "[31]", "meta-type": "array", "element-type": "31"},
    {"name": "31", "meta-type": "object", "tag": "type",
     "members": [{"name": "type", "type": "32"}],
     "variants": [{"case": "abort", "type": "33"}, {"case": "bitmap-add", "type": "34"}]},
    {"name": "32", "meta-type": "enum", "values": ["abort", "bitmap-add"]},
    {"name": "33", "meta-type": "object", "members": [{"name": "data", "type": "0"}]},
    {"name": "34", "meta-type": "object", "members": [{"name": "data", "type": "35"}]},
    {"name": "35", "meta-type": "object", "members": [
        {"name": "node", "type": "str"}, {"name": "name", "type": "str"},
        {"name": "granularity", "type": "int", "default": None}]},
    {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
    {"name": "STOP", "meta-type": "event", "arg-type": "0"},
]  # fmt: skip

TREE = {
    "/": [{"name": "machine", "type": "child<pc-q35-7.2-machine>"},
          {"name": "objects", "type": "child<container>"},
          {"name": "type", "type": "string"}],
    "/machine": [{"name": "q35", "type": "child<q35-pcihost>"},
                 {"name": "peripheral", "type": "child<container>"},
                 {"name": "type", "type": "string"},
                 {"name": "graphics", "type": "bool"},
                 {"name": "kvm", "type": "link<kvm-accel>"}],
}  # fmt: skip


@pytest.fixture
def schema() -> Schema:
    return Schema(ENTRIES)


class FakeSource:
    def __init__(self, schema: Schema) -> None:
        self._schema = schema
        self.listed: list[str] = []

    def command_names(self) -> Sequence[str]:
        return self._schema.commands

    def schema(self) -> Schema | None:
        return self._schema

    def qom_list(self, path: str) -> Sequence[Mapping[str, Any]]:
        self.listed.append(path)
        return TREE.get(path.rstrip("/") or "/", [])

    def hmp_commands(self) -> Sequence[str]:
        return ["info", "help", "cont", "stop", "system_reset"]

    def hmp_info_commands(self) -> Sequence[str]:
        return ["status", "qtree", "version"]


def names(members: Any) -> list[str]:
    return [m.name for m in members]


def test_commands_and_events_are_apart(schema: Schema) -> None:
    assert "qom-get" in schema.commands and "STOP" not in schema.commands
    assert schema.has_command("transaction") and not schema.has_command("STOP")


def test_arguments_and_optional(schema: Schema) -> None:
    args = schema.arguments("qom-set")
    assert [(m.name, m.type, m.optional) for m in args] == [
        ("path", "str", False),
        ("property", "str", False),
        ("value", "any", False),
    ]
    assert [m.optional for m in schema.arguments("blockdev-add", every_variant=False)] == [
        False,
        True,
        True,
    ]
    assert schema.arguments("no-such-command") == []


def test_a_union_adds_the_variant_its_tag_selects(schema: Schema) -> None:
    base = ["driver", "node-name", "read-only"]
    assert names(schema.arguments("blockdev-add", every_variant=False)) == base
    assert names(schema.arguments("blockdev-add", {"driver": "null-co"})) == [
        *base,
        "size",
        "read-zeroes",
    ]
    assert names(schema.arguments("blockdev-add")) == [
        *base,
        "size",
        "read-zeroes",
        "file",
        "offset",
    ]


def test_type_at_follows_dotted_keys_through_unions_and_alternates(schema: Schema) -> None:
    assert schema.type_at("blockdev-add", ["size"], {"driver": "null-co"}) == "int"
    # file is an alternate whose object branch is the union again
    given = {"driver": "raw", "file": {"driver": "null-co"}}
    assert schema.type_at("blockdev-add", ["file", "size"], given) == "int"
    assert schema.type_at("blockdev-add", ["file", "nope"], given) is None
    assert schema.type_at("qom-get", ["path", "deeper"]) is None


def test_enum_values_old_and_new_style(schema: Schema) -> None:
    assert schema.enum_values("11") == ["null-co", "null-aio", "raw"]
    assert schema.enum_values("21") == ["pause", "shutdown"]


def test_transaction_actions(schema: Schema) -> None:
    assert schema.transaction_actions() == {"abort": "0", "bitmap-add": "35"}


def test_help_lists_arguments_types_and_optional(schema: Schema) -> None:
    text = schema.help("set-action")
    assert text.splitlines() == [
        "set-action (unstable)",
        "  panic  enum (pause|shutdown)  (optional)",
        "  ratio  number  (optional)",
        "  tags   [str]  (optional, deprecated)",
    ]
    union = schema.help("blockdev-add")
    assert "driver     enum (null-co|null-aio|raw)" in union
    assert "size" not in union
    assert "help blockdev-add driver=VALUE" in union
    chosen = schema.help("blockdev-add", {"driver": "null-co"})
    assert "  size         int  (optional)" in chosen
    assert "driver=VALUE" not in chosen
    assert "(no arguments)" in schema.help("query-status")
    assert "returns [object (name, type)]" in schema.help("qom-list")
    with pytest.raises(KeyError):
        schema.help("STOP")


@pytest.mark.parametrize(
    ("type_name", "text", "value"),
    [
        ("int", "4096", 4096),
        ("int", "0x10", 16),
        ("number", "1.5", 1.5),
        ("number", "2", 2),
        ("bool", "false", False),
        ("bool", "on", True),
        ("str", "4096", "4096"),  # a string stays a string
        ("str", "true", "true"),
        ("11", "raw", "raw"),
        ("any", "false", False),
        ("any", "hello", "hello"),
        ("[str]", '["a"]', ["a"]),
        ("null", "null", None),
        ("14", '{"driver": "raw"}', {"driver": "raw"}),
        ("14", "node0", "node0"),  # the alternate's str branch
        (None, "12", 12),  # unknown to the schema: JSON or a string
    ],
)
def test_convert_types_values(schema: Schema, type_name: str | None, text: str, value: Any) -> None:
    got = schema.convert(type_name, text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("type_name", "text", "why"),
    [
        ("int", "x", "needs an integer"),
        ("number", "nan", "needs a number"),
        ("bool", "maybe", "needs a boolean"),
        ("[str]", "a", "needs [str] as JSON"),
        ("10", "[1]", "needs object"),
        ("null", "0", "needs null"),
    ],
)
def test_convert_refuses_what_does_not_fit(
    schema: Schema, type_name: str, text: str, why: str
) -> None:
    with pytest.raises(SchemaError, match=why.replace("[", r"\[")):
        schema.convert(type_name, text)


def test_typed_arguments_follow_the_union_tag_wherever_it_is(schema: Schema) -> None:
    words = ["size=4096", "node-name=1234", "driver=null-co", "read-zeroes=on"]
    assert typed_arguments(schema, "blockdev-add", words) == {
        "size": 4096,
        "node-name": "1234",  # a str stays a string
        "driver": "null-co",
        "read-zeroes": True,
    }
    assert typed_arguments(schema, "qom-set", ["path=/m", "property=p", "value=false"]) == {
        "path": "/m",
        "property": "p",
        "value": False,  # any: JSON when it parses
    }
    assert typed_arguments(schema, "qom-get", ["path=[x", "property=p"])["path"] == "[x"


def test_typed_arguments_name_the_argument_and_the_type(schema: Schema) -> None:
    with pytest.raises(ParseError, match=r"^size: needs an integer \(int\), got 'big'$"):
        typed_arguments(schema, "blockdev-add", ["driver=null-co", "size=big"])


# --- completion ----------------------------------------------------------------------


@pytest.fixture
def source(schema: Schema) -> FakeSource:
    return FakeSource(schema)


def complete(source: FakeSource, line: str, **kw: Any) -> list[str]:
    return Completer(source, **kw).candidates(line)


def test_command_names(source: FakeSource) -> None:
    assert complete(source, "qom-") == ["qom-get ", "qom-list ", "qom-set "]
    assert complete(source, "tr") == ["transaction ", "transaction("]
    assert complete(source, "he") == ["help "]
    assert complete(source, "help qom-s") == ["qom-set "]


def test_argument_names_from_the_schema(source: FakeSource) -> None:
    assert complete(source, "qom-set ") == ["path=", "property=", "value="]
    assert complete(source, "qom-set path=/m pr") == ["property="]
    # given keys are not offered again
    assert complete(source, "qom-set path=/m ") == ["property=", "value="]
    assert complete(source, "blockdev-add ") == ["driver=", "node-name=", "read-only="]
    assert complete(source, "blockdev-add driver=null-co ") == [
        "node-name=",
        "read-only=",
        "read-zeroes=",
        "size=",
    ]


def test_dotted_argument_names(source: FakeSource) -> None:
    assert complete(source, "blockdev-add driver=raw file.") == [
        "file.driver=",
        "file.node-name=",
        "file.read-only=",
    ]
    line = "blockdev-add driver=raw file.driver=null-co file.s"
    assert complete(source, line) == ["file.size="]


def test_enum_and_bool_values(source: FakeSource) -> None:
    assert complete(source, "blockdev-add driver=nu") == ["driver=null-aio ", "driver=null-co "]
    assert complete(source, "blockdev-add read-only=") == ["read-only=false ", "read-only=true "]
    assert complete(source, "set-action panic=s") == ["panic=shutdown "]


def test_qom_paths_are_listed_live(source: FakeSource) -> None:
    assert complete(source, "qom-get path=/mach") == ["path=/machine/"]
    assert source.listed == ["/"]
    # child objects only, below the last slash
    assert complete(source, "qom-list path=/machine/") == [
        "path=/machine/peripheral/",
        "path=/machine/q35/",
    ]
    assert complete(source, "qom-get path=") == ["path=/"]
    # path= of other commands is not a QOM path
    assert complete(source, "blockdev-add path=/mach") == []


def test_property_names_of_the_path_given(source: FakeSource) -> None:
    assert complete(source, "qom-get path=/machine property=") == [
        "property=graphics ",
        "property=kvm ",
        "property=peripheral ",
        "property=q35 ",
        "property=type ",
    ]
    assert complete(source, "qom-set path=/machine property=g") == ["property=graphics "]
    assert complete(source, "qom-get property=t") == []  # no path yet


def test_transaction_lines_complete_actions_and_their_data(source: FakeSource) -> None:
    inside = {"in_transaction": lambda: True}
    assert complete(source, "", **inside) == [")", "abort ", "bitmap-add "]
    assert complete(source, "bitmap-add ", **inside) == ["granularity=", "name=", "node="]
    assert complete(source, "transaction( bitmap-add n") == ["name=", "node="]


def test_hmp_names(source: FakeSource) -> None:
    assert complete(source, "s", hmp=True) == ["stop ", "system_reset "]
    assert complete(source, "info q", hmp=True) == ["qtree "]
    assert complete(source, "help co", hmp=True) == ["cont "]


def test_no_completion_inside_quotes_or_json(source: FakeSource) -> None:
    assert complete(source, "qom-get path='/mach") == []
    assert complete(source, 'blockdev-add file={"dr') == []


def test_matches_are_cut_where_readline_splits(source: FakeSource) -> None:
    completer = Completer(source)
    # readline's word is what follows the last of " =/"
    assert completer.matches("qom-get path=/machine/q", "q") == ["q35/"]
    assert completer.matches("qom-get path=/ma", "ma") == ["machine/"]
    assert completer.matches("qom-set pa", "pa") == ["path="]


def test_hmp_help_text_is_parsed() -> None:
    text = (
        "announce_self [interfaces] [id] -- Trigger GARP/RARP announcements\r\n"
        "block_job_cancel [-f] device -- stop an active background block operation (use -f\r\n"
        "\t\t\t if you want to abort the operation immediately\r\n"
        "c|cont  -- resume emulation\r\n"
        "info [subcommand] -- show various information about the system state\r\n"
        "q|quit  -- quit the emulator\r\n"
    )
    assert parse_hmp_help(text) == ["announce_self", "block_job_cancel", "cont", "info", "quit"]
    info = "info balloon  -- show balloon information\r\ninfo status  -- show the VM status\r\n"
    assert parse_hmp_info(info) == ["balloon", "status"]
