"""The input syntax of qmp-shell: ``command key=value ...`` lines, raw JSON requests
and multi-line ``transaction(`` ... ``)`` blocks, turned into QMP request objects.

Shared with the one-shot ``qmp`` command, which gets its words from the OS
shell and hands them to :func:`parse_arguments`.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: Words that open and close a transaction block (upstream's syntax).
TRANSACTION_OPEN = "transaction("
TRANSACTION_CLOSE = ")"

#: ``convert(path, text)``: the value of the dotted key ``path`` given as ``text``.
Converter = Callable[[Sequence[str], str], Any]


class ParseError(ValueError):
    """A line that cannot be a QMP request; the message says why, in one line."""


# --- words ------------------------------------------------------------------------


def split_words(line: str) -> list[str]:
    """Split a line into words the way a POSIX shell would, with one addition.

    Words are separated by blanks.  ``'...'`` quotes literally; ``"..."``
    quotes with ``\\"`` and ``\\\\`` escapes; the quotes themselves are
    removed.  A backslash outside quotes is an ordinary character (QOM names
    contain them: ``/machine/fw_cfg/\\x2from@etc``).  The addition: a value
    that begins with ``[`` or ``{`` (at the start of a word or right after
    its first ``=``) runs to its matching bracket, blanks and quotes kept, so
    ``arg={"a": "b c"}`` is one word with its JSON intact.

    Raises :class:`ParseError` for an unterminated quote or bracket.
    """
    words: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            return words
        start = i
        word: list[str] = []
        value_start = True  # at the word's start, or just after its first '='
        seen_eq = False
        while i < n and not line[i].isspace():
            c = line[i]
            at_value, value_start = value_start, False
            if c in "[{" and at_value:
                end = _bracket_end(line, i)
                word.append(line[i:end])
                i = end
            elif c == "'":
                end = line.find("'", i + 1)
                if end < 0:
                    raise ParseError(f"unterminated ' in {line[start:]!r}")
                word.append(line[i + 1 : end])
                i = end + 1
            elif c == '"':
                i = _double_quoted(line, i, word, start)
            else:
                if c == "=" and not seen_eq:
                    seen_eq = value_start = True
                word.append(c)
                i += 1
        words.append("".join(word))


def _double_quoted(line: str, i: int, word: list[str], start: int) -> int:
    """Append the text of the ``"..."`` at ``line[i]``; return the index after it."""
    i += 1
    while i < len(line):
        c = line[i]
        if c == '"':
            return i + 1
        if c == "\\" and i + 1 < len(line) and line[i + 1] in '"\\':
            word.append(line[i + 1])
            i += 2
            continue
        word.append(c)
        i += 1
    raise ParseError(f'unterminated " in {line[start:]!r}')


def _bracket_end(line: str, i: int) -> int:
    """The index just past the bracket that closes the one at ``line[i]``.

    Strings in double or single quotes (JSON's, or Python's as upstream
    accepts) may hold brackets and blanks.
    """
    closing = {"[": "]", "{": "}"}
    stack: list[str] = []
    start = i
    while i < len(line):
        c = line[i]
        if c in "\"'":
            j = i + 1
            while j < len(line) and line[j] != c:
                j += 2 if line[j] == "\\" else 1
            if j >= len(line):
                raise ParseError(f"unterminated {c} in {line[start:]!r}")
            i = j + 1
            continue
        if c in closing:
            stack.append(closing[c])
        elif c in "]}":
            if not stack or stack.pop() != c:
                raise ParseError(f"unbalanced {c!r} in {line[start : i + 1]!r}")
            if not stack:
                return i + 1
        i += 1
    raise ParseError(
        f"unbalanced {line[start]!r}: no closing {closing[line[start]]!r} in {line[start:]!r}"
    )


# --- values -----------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    # json.loads would take NaN and Infinity, which QEMU's parser refuses.
    raise ValueError(f"{name} is not JSON")


def _json(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constant)


class _FuzzyJSON(ast.NodeTransformer):
    """JSON's true, false and null in a Python literal (upstream accepts
    ``{'a': true}``)."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        names = {"true": True, "false": False, "null": None}
        if node.id in names:
            return ast.Constant(value=names[node.id])
        return node


def parse_json_value(text: str) -> Any:
    """A ``[...]`` or ``{...}`` value: JSON, or a Python literal of lists, dicts,
    strings, numbers, booleans and None as upstream's qmp-shell accepts.

    Raises :class:`ParseError` with JSON's own complaint.
    """
    try:
        return _json(text)
    except ValueError as err:
        complaint = str(err)
    try:
        tree = _FuzzyJSON().visit(ast.parse(text, mode="eval"))
        value = ast.literal_eval(tree)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        raise ParseError(f"not valid JSON: {complaint}") from None
    if not _plain(value):
        raise ParseError(f"not valid JSON: {complaint}")
    return value


def _plain(value: Any) -> bool:
    """Whether a Python literal maps onto JSON (no tuples, sets, bytes, ...)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def parse_value(text: str) -> Any:
    """A value as typed after ``key=``: JSON when it parses as JSON, else the text.

    ``4096`` is a number, ``true`` a boolean, ``null`` null, ``"1.5"`` (typed
    as ``'"1.5"'`` on the line) the string ``1.5``, ``null-co`` the string
    ``null-co``.  A value that begins with ``[`` or ``{`` must be valid JSON
    (:func:`parse_json_value`); anything else falls back to the string.
    """
    if text.startswith(("[", "{")):
        return parse_json_value(text)
    if text and text == text.strip():
        try:
            return _json(text)
        except ValueError:
            pass
    return text


def _default_convert(path: Sequence[str], text: str) -> Any:
    return parse_value(text)


# --- arguments --------------------------------------------------------------------


def split_pair(word: str) -> tuple[list[str], str]:
    """``a.b=text`` -> (``["a", "b"]``, ``"text"``).

    Raises :class:`ParseError` when there is no ``=`` or a key part is empty.
    """
    key, eq, text = word.partition("=")
    if not eq:
        raise ParseError(f"expected key=value, got {word!r}")
    if not key:
        raise ParseError(f"no key before '=' in {word!r}")
    path = key.split(".")
    if not all(path):
        raise ParseError(f"empty name in the dotted key {key!r}")
    return path, text


def set_path(arguments: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """Store ``value`` at the dotted ``path``, making the objects on the way.

    Each key starts again from the top: ``file.driver=x driver=raw`` gives
    ``{"file": {"driver": "x"}, "driver": "raw"}``.  Raises
    :class:`ParseError` when a key is given twice or is both a value and an
    object.
    """
    node = arguments
    for depth, name in enumerate(path[:-1]):
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ParseError(f"{where!r} is given both as a value and as an object")
        node = child
    last = path[-1]
    if last in node:
        key = ".".join(path)
        if isinstance(node[last], dict) and not isinstance(value, dict):
            raise ParseError(f"{key!r} is given both as a value and as an object")
        raise ParseError(f"{key!r} is given twice")
    node[last] = value


def parse_arguments(words: Sequence[str], convert: Converter | None = None) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b": {"c": "x"}}``.

    ``convert(path, text)`` turns each value's text into its value (default:
    :func:`parse_value`; the ``qmp`` command passes one typed from the
    schema).  It may raise :class:`ParseError` or :class:`ValueError`.
    """
    conv = convert or _default_convert
    arguments: dict[str, Any] = {}
    for word in words:
        path, text = split_pair(word)
        try:
            value = conv(path, text)
        except ParseError as err:
            raise ParseError(f"{'.'.join(path)}: {err}") from None
        except ValueError as err:
            raise ParseError(f"{'.'.join(path)}: {err}") from None
        set_path(arguments, path, value)
    return arguments


# --- requests ---------------------------------------------------------------------


@dataclass
class Request:
    """One QMP request object, ready to send (``raw``: typed as JSON)."""

    message: dict[str, Any]
    raw: bool = False

    @property
    def command(self) -> str:
        return str(self.message.get("execute", self.message.get("exec-oob", "")))

    @property
    def arguments(self) -> dict[str, Any]:
        args = self.message.get("arguments")
        return args if isinstance(args, dict) else {}


def parse_raw(line: str) -> Request:
    """A raw JSON request line, sent as it is."""
    try:
        message = _json(line)
    except ValueError as err:
        raise ParseError(f"not a JSON object: {err}") from None
    if not isinstance(message, dict):
        raise ParseError("a JSON request must be an object")
    name = message.get("execute", message.get("exec-oob"))
    if not isinstance(name, str):
        raise ParseError('a JSON request needs "execute": "COMMAND"')
    if "arguments" in message and not isinstance(message["arguments"], dict):
        raise ParseError('"arguments" must be a JSON object')
    return Request(message, raw=True)


def parse_command(words: Sequence[str]) -> Request:
    """``["name", "key=value", ...]`` -> the request for ``name``."""
    name = words[0]
    if "=" in name or name.startswith(("[", "{")):
        raise ParseError(f"expected a command name first, got {name!r}")
    message: dict[str, Any] = {"execute": name}
    arguments = parse_arguments(words[1:])
    if arguments:
        message["arguments"] = arguments
    return Request(message)


@dataclass
class LineParser:
    """Turns input lines into requests; keeps the state of a transaction block.

    :meth:`feed` returns a :class:`Request`, or None when the line asks for
    nothing (blank, a comment, or an action inside an open transaction).  It
    raises :class:`ParseError` for a bad line.  In a transaction, a bad line
    is left out and the block goes on (the user types it again); with
    ``strict`` (input that is not a terminal) the block is then refused at
    its ``)`` rather than sent without the action.
    """

    strict: bool = False
    actions: list[dict[str, Any]] | None = None
    broken: int = 0

    @property
    def in_transaction(self) -> bool:
        return self.actions is not None

    def reset(self) -> None:
        """Drop an open transaction."""
        self.actions = None
        self.broken = 0

    def feed(self, line: str) -> Request | None:
        text = line.strip()
        if not text or text.startswith("#"):
            return None
        if text.startswith("{") and not self.in_transaction:
            return parse_raw(text)
        try:
            words = split_words(text)
            return self._words(words)
        except ParseError:
            if self.in_transaction:
                self.broken += 1
            raise

    def _words(self, words: list[str]) -> Request | None:
        if words[0] == TRANSACTION_OPEN:
            if self.in_transaction:
                raise ParseError("a transaction is already open (end it with ')')")
            self.actions, self.broken = [], 0
            words = words[1:]
            if not words:
                return None
        if not self.in_transaction:
            if words[0] == TRANSACTION_CLOSE:
                raise ParseError("')' outside a transaction")
            return parse_command(words)
        close = words[-1] == TRANSACTION_CLOSE
        if close:
            words = words[:-1]
        if TRANSACTION_CLOSE in words:
            raise ParseError("unexpected input after ')'")
        if words:
            action = parse_command(words)
            assert self.actions is not None
            self.actions.append({"type": action.command, "data": action.arguments})
        if not close:
            return None
        actions, broken = self.actions or [], self.broken
        self.reset()
        if broken and self.strict:
            raise ParseError(f"transaction not sent: {broken} of its lines had errors")
        return Request({"execute": "transaction", "arguments": {"actions": actions}})
