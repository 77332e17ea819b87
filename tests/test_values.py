"""Property values as text and back: format_value, decode_text, parse_value."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qomfs.errors import InvalidValue
from qomfs.values import INT_RANGES, decode_text, format_value, parse_value


def round_trip(value: Any, qom_type: str) -> Any:
    """What writing back the text a read showed sends to qom-set."""
    return parse_value(decode_text(format_value(value).encode()), qom_type)


# --- round trips -----------------------------------------------------------------


@given(st.booleans(), st.sampled_from(["bool", "boolean"]))
def test_bool_round_trip(value: bool, qom_type: str) -> None:
    assert round_trip(value, qom_type) is value


@given(st.data())
@pytest.mark.parametrize("qom_type", sorted(INT_RANGES))
def test_int_round_trip(qom_type: str, data: st.DataObject) -> None:
    low, high = INT_RANGES[qom_type]
    value = data.draw(st.integers(low, high) | st.sampled_from([low, high]))
    result = round_trip(value, qom_type)
    assert result == value and type(result) is int


@given(st.text(), st.sampled_from(["string", "str"]))
def test_string_round_trip(value: str, qom_type: str) -> None:
    """Any text, with newlines anywhere, including at the end."""
    assert round_trip(value, qom_type) == value
    assert round_trip(value + "\n", qom_type) == value + "\n"


@given(st.floats(allow_nan=False), st.sampled_from(["number", "double", "float"]))
def test_float_round_trip(value: float, qom_type: str) -> None:
    assert round_trip(value, qom_type) == value


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(), json_values), st.sampled_from(["SMPConfiguration", "struct tm"]))
def test_struct_round_trip(value: dict[str, Any], qom_type: str) -> None:
    text = format_value(value)
    assert text.count("\n") == 1  # one line, whatever the strings hold
    assert round_trip(value, qom_type) == value


@given(st.lists(json_values), st.sampled_from(["strList", "X86CPUFeatureWordInfo"]))
def test_list_round_trip(value: list[Any], qom_type: str) -> None:
    assert round_trip(value, qom_type) == value


@given(st.from_regex(r"[a-z][a-z0-9_-]*", fullmatch=True))
def test_enum_round_trip(value: str) -> None:
    assert round_trip(value, "OnOffAuto") == value


@given(st.sampled_from(["", "/machine/q35/pcie.0", "/machine/unattached/device[0]"]))
def test_link_round_trip(value: str) -> None:
    assert round_trip(value, "link<PCIBus>") == value


# --- the text format -----------------------------------------------------------


def test_format_value() -> None:
    assert format_value(True) == "true\n"
    assert format_value(False) == "false\n"
    assert format_value(-12) == "-12\n"
    assert format_value("a\nb") == "a\nb\n"
    assert format_value(None) == "null\n"
    assert format_value({"cpus": 1, "name": "é"}) == '{"cpus": 1, "name": "é"}\n'
    assert format_value(["a", 1]) == '["a", 1]\n'


def test_decode_text() -> None:
    assert decode_text(b"on\n") == "on"
    assert decode_text(b"on\n\n") == "on\n"
    assert decode_text(b"on") == "on"
    assert decode_text("日本\n".encode()) == "日本"
    assert decode_text(b"") == ""


@pytest.mark.parametrize("data", [b"\xff\n", b"abc\xc3", b"\xed\xa0\x80"])
def test_decode_text_refuses_non_utf8(data: bytes) -> None:
    with pytest.raises(InvalidValue, match="UTF-8"):
        decode_text(data)


# --- accepted spellings ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("on", True),
        ("off", False),
        ("yes", True),
        ("no", False),
        ("TRUE", True),
        (" Off ", False),
    ],
)
def test_bool_spellings(text: str, expected: bool) -> None:
    assert parse_value(text, "bool") is expected


@pytest.mark.parametrize("qom_type", sorted(INT_RANGES))
def test_hex_for_every_int_type(qom_type: str) -> None:
    assert parse_value("0x10", qom_type) == 16
    assert parse_value(" 42 ", qom_type) == 42


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1M", 1 << 20), ("2G", 2 << 30), ("4k", 4096), ("1MiB", 1 << 20), ("0x1000", 4096)],
)
def test_size_suffixes(text: str, expected: int) -> None:
    assert parse_value(text, "size") == expected


def test_other_types_take_json_or_text() -> None:
    assert parse_value("auto", "OnOffAuto") == "auto"
    assert parse_value('{"cpus": 2}', "SMPConfiguration") == {"cpus": 2}
    assert parse_value('["a"]', "strList") == ["a"]
    assert parse_value('"quoted"', "OnOffAuto") == "quoted"


def test_uint64_t_is_an_integer_type() -> None:
    """q35's /machine/bus-lock-ratelimit has type "uint64_t"; QEMU refuses "10" there."""
    assert parse_value("10", "uint64_t") == 10
    with pytest.raises(InvalidValue):
        parse_value("-1", "uint64_t")


# --- rejected text ---------------------------------------------------------------


@pytest.mark.parametrize("text", ["maybe", "", "2", "truee", "on off"])
def test_bool_rejects(text: str) -> None:
    with pytest.raises(InvalidValue):
        parse_value(text, "bool")


@pytest.mark.parametrize("qom_type", sorted(INT_RANGES))
def test_int_rejects_out_of_range(qom_type: str) -> None:
    low, high = INT_RANGES[qom_type]
    for value in (low - 1, high + 1):
        with pytest.raises(InvalidValue, match="out of range"):
            parse_value(str(value), qom_type)
    with pytest.raises(InvalidValue):
        parse_value("twelve", qom_type)
    with pytest.raises(InvalidValue):
        parse_value("1.5", qom_type)


def test_size_rejects_negative_and_junk() -> None:
    for text in ("-1", "-1M", "1X", "M", "1.5G", ""):
        with pytest.raises(InvalidValue):
            parse_value(text, "size")


def test_suffixes_only_for_size() -> None:
    with pytest.raises(InvalidValue):
        parse_value("1M", "uint64")


@pytest.mark.parametrize("text", ['{"cpus": ', "[1, 2", '{"a": nope}', '"unterminated'])
def test_struct_rejects_bad_json(text: str) -> None:
    with pytest.raises(InvalidValue, match="invalid JSON"):
        parse_value(text, "SMPConfiguration")


def test_float_rejects_junk() -> None:
    with pytest.raises(InvalidValue):
        parse_value("fast", "double")
