"""Tab completion for qmp-shell: command names, argument names and enum values
from the schema, live QOM paths and property names, HMP command names.

:meth:`Completer.candidates` works on the text before the cursor and knows
nothing of readline, so tests call it directly; :meth:`Completer.readline`
adapts it to readline's ``completer(text, state)`` protocol.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from qomfs.shell.parse import (
    TRANSACTION_CLOSE,
    TRANSACTION_OPEN,
    ParseError,
    parse_value,
    set_path,
    split_pair,
    split_words,
)
from qomfs.shell.schema import Schema

#: Readline splits words at these; each candidate is cut to what follows the
#: last of them (so a list of paths shows names, not whole paths).
DELIMS = " \t\n=/"
#: Commands whose ``path=`` is a QOM object and ``property=`` one of its properties.
QOM_PATH_COMMANDS = frozenset({"qom-get", "qom-set", "qom-list"})
QOM_PROPERTY_COMMANDS = frozenset({"qom-get", "qom-set"})
#: Shell words that are not QMP commands.
SHELL_WORDS = ("help",)


class Source(Protocol):
    """Where completions come from (the shell's connection, or a test's fake).

    Each method returns what it can, [] or None when QEMU cannot answer:
    completion never raises.
    """

    def command_names(self) -> Sequence[str]: ...

    def schema(self) -> Schema | None: ...

    def qom_list(self, path: str) -> Sequence[Mapping[str, Any]]: ...

    def hmp_commands(self) -> Sequence[str]: ...

    def hmp_info_commands(self) -> Sequence[str]: ...


class Completer:
    """Completion for one shell; ``in_transaction()`` tells whether a
    ``transaction(`` block is open (its lines start with an action type)."""

    def __init__(
        self,
        source: Source,
        hmp: bool = False,
        in_transaction: Callable[[], bool] = lambda: False,
    ) -> None:
        self.source = source
        self.hmp = hmp
        self.in_transaction = in_transaction
        self._matches: list[str] = []

    # --- readline ---------------------------------------------------------------------

    def readline(self, text: str, state: int) -> str | None:
        """readline's completer: the ``state``-th completion of ``text``."""
        if state == 0:
            import readline

            line = readline.get_line_buffer()[: readline.get_endidx()]
            self._matches = self.matches(line, text)
        return self._matches[state] if state < len(self._matches) else None

    def matches(self, line: str, text: str) -> list[str]:
        """Candidates for ``line`` cut to the part readline replaces (``text``,
        what follows the last of :data:`DELIMS`)."""
        try:
            words = self.candidates(line)
        except Exception:  # completion must never break the prompt
            return []
        current = _current_word(line)
        cut = len(current) - len(text)
        if cut < 0:
            return []
        return [w[cut:] for w in words]

    # --- the work ---------------------------------------------------------------------

    def candidates(self, line: str) -> list[str]:
        """Completions of the last word of ``line`` (the text before the
        cursor), each a whole word that begins with it, sorted."""
        current = _current_word(line)
        before = line[: len(line) - len(current)]
        try:
            words = split_words(before)
        except ParseError:
            return []
        if any(q in current for q in "'\"[{"):
            return []  # inside a quote or a JSON value
        found = self._hmp(words, current) if self.hmp else self._qmp(words, current)
        return sorted({w for w in found if w.startswith(current)})

    def _hmp(self, words: list[str], current: str) -> list[str]:
        if not words:
            return [n + " " for n in self.source.hmp_commands()]
        if len(words) == 1 and words[0] == "info":
            return [n + " " for n in self.source.hmp_info_commands()]
        if len(words) == 1 and words[0] == "help":
            return [n + " " for n in self.source.hmp_commands()]
        return []

    def _qmp(self, words: list[str], current: str) -> list[str]:
        schema = self.source.schema()
        in_block = self.in_transaction()
        if words and words[0] == TRANSACTION_OPEN:
            words, in_block = words[1:], True
        if not words:
            if in_block:
                actions = schema.transaction_actions() if schema else {}
                return [a + " " for a in actions] + [TRANSACTION_CLOSE]
            names = list(self.source.command_names()) + list(SHELL_WORDS)
            return [n + " " for n in names] + [TRANSACTION_OPEN]
        command = words[0]
        if command == "help" and not in_block:
            if len(words) == 1:
                return [n + " " for n in self.source.command_names()]
            command, words = words[1], words[1:]
        given = _given(words[1:])
        if in_block:
            data = schema.transaction_actions().get(command) if schema else None
            type_name = data
        else:
            type_name = schema.arg_type(command) if schema else None
        key, eq, value = current.partition("=")
        if eq:
            return [f"{key}={v}" for v in self._values(command, type_name, key, value, given)]
        if schema is None or type_name is None:
            return []
        path = key.split(".")
        parent = path[:-1]
        if parent and not all(parent):
            return []
        node = schema.type_in(type_name, parent, given) if parent else type_name
        obj = schema.object_type(node) if node else None
        if obj is None:
            return []
        level: Mapping[str, Any] | None = given
        for name in parent:
            child = level.get(name) if level else None
            level = child if isinstance(child, Mapping) else None
        prefix = "".join(p + "." for p in parent)
        return [
            f"{prefix}{m.name}="
            for m in schema.members(obj, level, every_variant=False)
            if not (level and m.name in level)
        ]

    def _values(
        self,
        command: str,
        type_name: str | None,
        key: str,
        value: str,
        given: Mapping[str, Any],
    ) -> list[str]:
        if key == "path" and command in QOM_PATH_COMMANDS:
            return self._qom_paths(value)
        if key == "property" and command in QOM_PROPERTY_COMMANDS:
            path = given.get("path")
            if not isinstance(path, str) or not path.startswith("/"):
                return []
            return [str(p["name"]) + " " for p in self.source.qom_list(path) if "name" in p]
        schema = self.source.schema()
        if schema is None or type_name is None:
            return []
        parts = key.split(".")
        if not all(parts):
            return []
        arg = schema.type_in(type_name, parts, given)
        return [v + " " for v in _choices(schema, arg)] if arg else []

    def _qom_paths(self, value: str) -> list[str]:
        """Child objects below the part of ``value`` up to its last slash,
        each with a slash after it, as a shell completes directories (QEMU
        takes ``/machine/`` for ``/machine``)."""
        if not value.startswith("/"):
            return ["/"] if not value else []
        parent, _, _ = value.rpartition("/")
        entries = self.source.qom_list(parent or "/")
        return [
            f"{parent}/{e['name']}/"
            for e in entries
            if "name" in e and str(e.get("type", "")).startswith("child<")
        ]


def _choices(schema: Schema, type_name: str) -> list[str]:
    """The values an argument of ``type_name`` can be completed to."""
    meta = schema.meta(type_name)
    if meta == "enum":
        return schema.enum_values(type_name)
    if type_name == "bool":
        return ["true", "false"]
    if meta == "alternate":
        return [v for t in schema.alternatives(type_name) for v in _choices(schema, t)]
    return []


_LAST_WORD = re.compile(r"\S*\Z")


def _current_word(line: str) -> str:
    """The word the cursor is in: what follows the last blank."""
    match = _LAST_WORD.search(line)
    return match.group(0) if match else ""


def _given(words: Sequence[str]) -> dict[str, Any]:
    """The arguments typed so far, as far as they parse (for union tags,
    ``path=`` and the keys not to offer again)."""
    given: dict[str, Any] = {}
    for word in words:
        try:
            path, text = split_pair(word)
            set_path(given, path, parse_value(text))
        except ParseError:
            continue
    return given


def parse_hmp_help(text: str) -> list[str]:
    """HMP command names from the text of ``help`` (``name|alias args -- what``).

    Takes the long name of ``c|cont``-style pairs, as upstream does.
    """
    names = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line or line[0] in "[\t ":
            continue
        name = line.split()[0]
        if "|" in name:
            parts = name.split("|")
            name = max(parts, key=len)
        names.append(name)
    return names


def parse_hmp_info(text: str) -> list[str]:
    """``info`` subcommand names from the text of ``info`` (``info NAME -- what``)."""
    names = []
    for line in text.replace("\r\n", "\n").split("\n"):
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "info":
            names.append(parts[1])
    return names
