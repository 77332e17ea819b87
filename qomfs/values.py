"""Property values as text, and text back to typed JSON.

The text format (README, "Text format"):

* strings as they are; booleans ``true``/``false``; numbers in decimal;
  anything else (structs, lists, null) as one line of JSON;
* :func:`format_value` adds one trailing newline, :func:`parse_value` strips one;
* writing back exactly what was read sets the same value.

Writes are converted with the property's type from ``qom-list``, because QEMU
refuses a JSON string where it wants a boolean or a number.  :func:`judge` says
whether text written so far is a whole value, may become one, or never can.
"""

from __future__ import annotations

import enum
import json
import math
import re
from typing import Any

from qomfs.errors import InvalidValue

#: Integer types and their ranges, as QOM names them.
INT_RANGES: dict[str, tuple[int, int]] = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "int": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "uint": (0, 2**64 - 1),
    "size": (0, 2**64 - 1),
}
# QEMU also names a few integer properties with C type names (``uint64_t``).
INT_RANGES.update({f"{name}_t": span for name, span in list(INT_RANGES.items()) if "int" in name})
FLOAT_TYPES = frozenset({"number", "double", "float"})
BOOL_TYPES = frozenset({"bool", "boolean"})
STRING_TYPES = frozenset({"string", "str"})

_TRUE = frozenset({"true", "on", "yes", "1"})
_FALSE = frozenset({"false", "off", "no", "0"})
_SIZE_SUFFIX = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_RE = re.compile(r"(\d+)\s*([kmgtpe]?)(?:i?b)?", re.IGNORECASE)


def format_value(value: Any) -> str:
    """The text a property file shows for a ``qom-get`` value (with newline)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else json.dumps(value)
    else:
        text = json.dumps(value, ensure_ascii=False)
    return text + "\n"


def decode_text(data: bytes) -> str:
    """Bytes written to a file as text: UTF-8, one trailing newline dropped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidValue(f"value is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if text.endswith("\n"):
        text = text[:-1]
    return text


def parse_value(text: str, qom_type: str) -> Any:
    """Convert written text to the JSON value ``qom-set`` wants for ``qom_type``.

    ``text`` has had its trailing newline removed (:func:`decode_text`).
    Raises :class:`InvalidValue` when the text cannot be of that type.
    """
    if qom_type in STRING_TYPES:
        return text
    if qom_type.startswith("link<"):
        return text
    stripped = text.strip()
    if qom_type in BOOL_TYPES:
        word = stripped.lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise InvalidValue(f"{text!r} is not a boolean (write true or false)")
    if qom_type in INT_RANGES:
        return _parse_int(stripped, qom_type)
    if qom_type in FLOAT_TYPES:
        try:
            return float(stripped)
        except ValueError:
            raise InvalidValue(f"{text!r} is not a number") from None
    # Enums, structs, lists and types we do not know: JSON when it looks like
    # JSON, else the text as a string (an enum such as OnOffAuto takes "on").
    if stripped[:1] in ("{", "[", '"') or stripped == "null":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as err:
            raise InvalidValue(f"invalid JSON for {qom_type}: {err}") from None
    return text


def _parse_int(text: str, qom_type: str) -> int:
    low, high = INT_RANGES[qom_type]
    value: int | None = None
    try:
        value = int(text, 10)
    except ValueError:
        try:
            value = int(text, 0)  # 0x10, 0o17, 0b101
        except ValueError:
            match = _SIZE_RE.fullmatch(text) if qom_type == "size" else None
            if match:
                value = int(match.group(1)) << _SIZE_SUFFIX[match.group(2).lower()]
    if value is None:
        raise InvalidValue(f"{text!r} is not an integer ({qom_type})")
    if not low <= value <= high:
        raise InvalidValue(f"{value} is out of range for {qom_type} ({low} to {high})")
    return value


# --- a value written in pieces ----------------------------------------------


class Verdict(enum.Enum):
    """What the bytes an open file has written so far make, for a property's type."""

    VALID = "valid"  # a whole value that converts (QEMU may still refuse it)
    INCOMPLETE = "incomplete"  # not a value yet; more bytes may make one
    INVALID = "invalid"  # no bytes appended can ever make a value


#: Each possible start of an integer's text (decimal, 0x/0o/0b, a size's
#: suffix): text that is no such start can never become an integer.
_INT_START = re.compile(
    r"\s*[+-]?(?:0[xX][0-9a-fA-F_]*|0[oO][0-7_]*|0[bB][01_]*|[0-9_]*)"
    r"(?:\s*[kmgtpeKMGTPE]?[iI]?[bB]?)?\s*"
)
_FLOAT_START = re.compile(r"\s*[+-]?[0-9_.eEinfatyINFATY+-]*\s*")
#: What a boolean may be written as.
_BOOL_WORDS = _TRUE | _FALSE
#: A JSON number cut short at the end of the text ("1.", "-", "2e-").
_JSON_NUMBER_CUT = re.compile(r"-?[0-9]*\.?[0-9]*(?:[eE][+-]?[0-9]*)?")
#: A \\u escape cut short, or a surrogate pair's first half waiting for its second.
_JSON_ESCAPE_CUT = re.compile(r"\\?u[0-9a-fA-F]{0,4}(?:\\(?:u[0-9a-fA-F]{0,3})?)?")
_JSON_WORDS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")


def judge(data: bytes, qom_type: str) -> tuple[Verdict, InvalidValue | None]:
    """Whether ``data`` is a whole value of ``qom_type``, may become one, or never can.

    INVALID is said only when certain: a chunk of a longer value is never
    refused for being cut short (a JSON struct, a UTF-8 sequence, a number).
    The error is :func:`~qomfs.values.parse_value`'s, for INCOMPLETE too.
    """
    try:
        parse_value(decode_text(data), qom_type)
    except InvalidValue as err:
        return (Verdict.INVALID if _never(data, qom_type) else Verdict.INCOMPLETE), err
    return Verdict.VALID, None


def _never(data: bytes, qom_type: str) -> bool:
    """``data`` does not convert: is that so whatever follows it?"""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.end < len(data) or err.reason != "unexpected end of data":
            return True  # a bad byte inside, not a sequence cut at the end
        text = data[: err.start].decode("utf-8")
    if qom_type in STRING_TYPES or qom_type.startswith("link<"):
        return False  # any text is a string; only its UTF-8 can be cut
    start = text.lstrip()
    if qom_type in BOOL_TYPES or qom_type in INT_RANGES or qom_type in FLOAT_TYPES:
        if "\n" in start:
            return True  # a newline ends a number or a boolean
        if qom_type in BOOL_TYPES:
            word = start.rstrip()
            if word != start:
                return True  # a space ends a boolean, and this one is no word
            return not any(w.startswith(word.lower()) for w in _BOOL_WORDS)
        if qom_type in INT_RANGES:
            if _is_integer(start.strip()):
                return True  # out of range: more digits only make it larger
            return _INT_START.fullmatch(start) is None
        return _FLOAT_START.fullmatch(start) is None
    if start[:1] in ("{", "[", '"'):
        return not _json_may_continue(start)
    return False


def _is_integer(text: str) -> bool:
    for base in (10, 0):
        try:
            int(text, base)
        except ValueError:
            continue
        return True
    return False


def _json_may_continue(text: str) -> bool:
    """Whether invalid JSON ``text`` is the start of some valid JSON text."""
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg.startswith("Unterminated string"):
            return True
        rest = text[err.pos :]
        if not rest.strip():
            return True  # it ran out of text between two tokens
        # A number, a literal or a \u escape cut short ("Unterminated
        # string" above is what most cut strings give).
        return (
            _JSON_NUMBER_CUT.fullmatch(rest) is not None
            or _JSON_ESCAPE_CUT.fullmatch(rest) is not None
            or any(w.startswith(rest) for w in _JSON_WORDS)
        )
    return True  # it parses: then parse_value failed for another reason
