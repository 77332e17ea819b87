"""qmp-shell's input syntax, without QEMU: words, values, dotted keys, raw JSON
and transaction blocks."""

from __future__ import annotations

from typing import Any

import pytest

from qomfs.shell.parse import (
    LineParser,
    ParseError,
    parse_arguments,
    parse_value,
    split_words,
)


def feed(*lines: str, strict: bool = False) -> list[dict[str, Any] | None]:
    parser = LineParser(strict=strict)
    out = []
    for line in lines:
        request = parser.feed(line)
        out.append(None if request is None else request.message)
    return out


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("-3", -3),
        ("1.5", 1.5),
        ("true", True),
        ("false", False),
        ("null", None),
        ('"1.5"', "1.5"),
        ('"true"', "true"),
        ("null-co", "null-co"),
        ("/machine/q35", "/machine/q35"),
        ("", ""),
        ("0x10", "0x10"),  # not JSON: a string, as typed
        ("NaN", "NaN"),  # Python's json would take it; QEMU would not
        ("Infinity", "Infinity"),
        ("[1, 2]", [1, 2]),
        ('{"a": {"b": null}}', {"a": {"b": None}}),
        ("{'a': true, 'b': [None]}", {"a": True, "b": [None]}),  # upstream's Python literals
    ],
)
def test_values_are_json_when_they_parse(text: str, value: Any) -> None:
    got = parse_value(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["[1, 2", "{oops}", "{'a': {1, 2}}", "[1] x"])
def test_a_bracketed_value_must_be_json(text: str) -> None:
    with pytest.raises(ParseError, match="not valid JSON"):
        parse_value(text)


def test_words_follow_shell_quoting() -> None:
    line = """cmd a='"1.5"' b="x y" c='it is' d=plain e="q\\"uote" f=/fw_cfg/\\x2from@etc[0]"""
    assert split_words(line) == [
        "cmd",
        'a="1.5"',
        "b=x y",
        "c=it is",
        "d=plain",
        'e=q"uote',
        "f=/fw_cfg/\\x2from@etc[0]",  # a backslash outside quotes stays
    ]


def test_json_values_keep_their_blanks_and_quotes() -> None:
    words = split_words('cmd a={"k": "v w", "l": [1, "]"]} b=[ 1 , 2 ] c=x')
    assert words == ["cmd", 'a={"k": "v w", "l": [1, "]"]}', "b=[ 1 , 2 ]", "c=x"]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("cmd a='x", "unterminated '"),
        ('cmd a="x', 'unterminated "'),
        ("cmd a=[1, 2", "no closing ']'"),
        ("cmd a={[}", "unbalanced"),
    ],
)
def test_bad_quoting_says_what(line: str, why: str) -> None:
    with pytest.raises(ParseError, match=why.replace("[", r"\[")):
        split_words(line)


def test_dotted_keys_each_start_from_the_top() -> None:
    # Upstream (qemu.qmp 0.0.6) nests driver=raw inside "file" here.
    args = parse_arguments(["file.driver=null-co", "file.size=4096", "driver=raw"])
    assert args == {"file": {"driver": "null-co", "size": 4096}, "driver": "raw"}


def test_deep_dotted_keys() -> None:
    args = parse_arguments(["a.b.c=1", "a.b.d=x", "a.e=[]", "f=2"])
    assert args == {"a": {"b": {"c": 1, "d": "x"}, "e": []}, "f": 2}


@pytest.mark.parametrize(
    ("words", "why"),
    [
        (["a=1", "a=2"], "'a' is given twice"),
        (["a=1", "a.b=2"], "'a' is given both as a value and as an object"),
        (["a.b=2", "a=1"], "'a' is given both as a value and as an object"),
        (["noequals"], "expected key=value, got 'noequals'"),
        (["=5"], "no key before '='"),
        (["a..b=1"], "empty name in the dotted key 'a..b'"),
        (["a=[1"], "a: not valid JSON"),
    ],
)
def test_bad_arguments_say_what(words: list[str], why: str) -> None:
    with pytest.raises(ParseError) as err:
        parse_arguments(words)
    assert why in str(err.value)
    assert "\n" not in str(err.value)


def test_a_converter_types_values() -> None:
    seen = []

    def convert(path: Any, text: str) -> Any:
        seen.append((tuple(path), text))
        return text.upper()

    assert parse_arguments(["a.b=x", "c=4"], convert) == {"a": {"b": "X"}, "c": "4"}
    assert seen == [(("a", "b"), "x"), (("c",), "4")]


def test_a_command_line() -> None:
    assert feed("qom-get path=/machine property=type") == [
        {"execute": "qom-get", "arguments": {"path": "/machine", "property": "type"}}
    ]
    assert feed("query-status") == [{"execute": "query-status"}]


def test_blank_lines_and_comments_ask_nothing() -> None:
    assert feed("", "   ", "# a comment") == [None, None, None]


def test_raw_json_is_sent_as_it_is() -> None:
    line = '{"execute": "qom-list", "arguments": {"path": "/"}, "id": "x1"}'
    request = LineParser().feed(line)
    assert request is not None and request.raw
    assert request.message == {"execute": "qom-list", "arguments": {"path": "/"}, "id": "x1"}


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"execute": "x",', "not a JSON object"),
        ('{"arguments": {}}', '"execute"'),
        ('{"execute": "x", "arguments": [1]}', '"arguments" must be'),
    ],
)
def test_bad_raw_json(line: str, why: str) -> None:
    with pytest.raises(ParseError, match=why):
        LineParser().feed(line)


def test_transaction_block() -> None:
    got = feed(
        "transaction(",
        "block-dirty-bitmap-add node=d0 name=b0",
        "block-dirty-bitmap-clear node=d0 name=b1",
        ")",
    )
    assert got[:3] == [None, None, None]
    assert got[3] == {
        "execute": "transaction",
        "arguments": {
            "actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b0"}},
                {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "b1"}},
            ]
        },
    }


def test_one_line_transaction() -> None:
    (got,) = feed("transaction( abort )")
    assert got == {
        "execute": "transaction",
        "arguments": {"actions": [{"type": "abort", "data": {}}]},
    }


def test_transaction_with_the_close_on_the_last_action() -> None:
    got = feed("transaction( abort", "block-dirty-bitmap-add node=d0 name=b0 )")
    assert got[0] is None
    assert got[1] is not None
    assert [a["type"] for a in got[1]["arguments"]["actions"]] == [
        "abort",
        "block-dirty-bitmap-add",
    ]


def test_a_bad_line_in_a_transaction_is_left_out_interactively() -> None:
    parser = LineParser()
    parser.feed("transaction(")
    with pytest.raises(ParseError):
        parser.feed("abort x")
    assert parser.in_transaction  # the user types the line again
    parser.feed("abort")
    request = parser.feed(")")
    assert request is not None
    assert request.message["arguments"]["actions"] == [{"type": "abort", "data": {}}]


def test_a_bad_line_in_a_transaction_refuses_it_in_a_script() -> None:
    parser = LineParser(strict=True)
    parser.feed("transaction(")
    with pytest.raises(ParseError):
        parser.feed("abort x")
    parser.feed("abort")
    with pytest.raises(ParseError, match="transaction not sent: 1 of its lines had errors"):
        parser.feed(")")
    assert not parser.in_transaction
    assert parser.feed("query-status") is not None


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        ([")"], "')' outside a transaction"),
        (["transaction(", "transaction("], "already open"),
        (["transaction(", "abort ) x"], "unexpected input after ')'"),
        (["a=1"], "expected a command name first"),
    ],
)
def test_misplaced_words(lines: list[str], why: str) -> None:
    parser = LineParser()
    with pytest.raises(ParseError, match=why.replace("(", r"\(").replace(")", r"\)")):
        for line in lines:
            parser.feed(line)
