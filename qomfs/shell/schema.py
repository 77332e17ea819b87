"""What QEMU's ``query-qmp-schema`` says about its commands: their arguments,
the types of those arguments and which are optional, for help, completion and
typing values.

The schema's own type names are masked (``"291"``); :meth:`Schema.describe`
spells a type out instead (``enum (raw|qcow2|...)``, ``[str]``,
``object (driver, node-name?)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Builtin type -> the JSON it takes (older QEMUs list int8, size, ... too).
_INT_TYPES = {"int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
_INT_TYPES |= {"size"}


class SchemaError(ValueError):
    """A value that does not fit the type the schema asks for."""


@dataclass(frozen=True)
class Member:
    """One argument (or member of an object argument)."""

    name: str
    type: str
    optional: bool
    features: tuple[str, ...] = ()


class Schema:
    """A parsed ``query-qmp-schema`` reply.  Read-only once built: thread-safe."""

    def __init__(self, entries: Iterable[Mapping[str, Any]]) -> None:
        self._types: dict[str, Mapping[str, Any]] = {}
        self._commands: dict[str, Mapping[str, Any]] = {}
        self._events: dict[str, Mapping[str, Any]] = {}
        for entry in entries:
            name, meta = entry.get("name"), entry.get("meta-type")
            if not isinstance(name, str):
                continue
            if meta == "command":
                self._commands[name] = entry
            elif meta == "event":
                self._events[name] = entry
            else:
                self._types[name] = entry

    @classmethod
    def fetch(cls, execute: Any) -> Schema:
        """Ask QEMU: ``execute`` is :meth:`qomfs.qmp.QMPClient.execute` or alike."""
        reply = execute("query-qmp-schema")
        if not isinstance(reply, list):
            raise ValueError("query-qmp-schema did not return a list")
        return cls(e for e in reply if isinstance(e, dict))

    # --- commands --------------------------------------------------------------------

    @property
    def commands(self) -> list[str]:
        return sorted(self._commands)

    def has_command(self, name: str) -> bool:
        return name in self._commands

    @property
    def events(self) -> list[str]:
        """The names of the events QEMU may send."""
        return sorted(self._events)

    def arg_type(self, command: str) -> str | None:
        """The name of the object type that holds ``command``'s arguments."""
        entry = self._commands.get(command)
        arg = entry.get("arg-type") if entry else None
        return arg if isinstance(arg, str) else None

    def ret_type(self, command: str) -> str | None:
        entry = self._commands.get(command)
        ret = entry.get("ret-type") if entry else None
        return ret if isinstance(ret, str) else None

    def arguments(
        self, command: str, given: Mapping[str, Any] | None = None, *, every_variant: bool = True
    ) -> list[Member]:
        """``command``'s arguments (see :meth:`members`); [] for an unknown command."""
        arg = self.arg_type(command)
        return self.members(arg, given, every_variant=every_variant) if arg else []

    # --- types -----------------------------------------------------------------------

    def meta(self, type_name: str) -> str:
        """``builtin``, ``enum``, ``array``, ``object``, ``alternate``, or ``?``."""
        entry = self._types.get(type_name)
        return str(entry.get("meta-type", "?")) if entry else "?"

    def members(
        self,
        type_name: str,
        given: Mapping[str, Any] | None = None,
        *,
        every_variant: bool = True,
    ) -> list[Member]:
        """The members of an object type, base first.

        A union (an object with a ``tag`` and ``variants``) adds the members
        of the variant that ``given[tag]`` selects; with the tag not given,
        those of every variant, each name once (none with
        ``every_variant=False``).  Not an object: [].
        """
        entry = self._types.get(type_name)
        if not entry or entry.get("meta-type") != "object":
            return []
        out = [
            Member(str(m["name"]), str(m.get("type", "any")), "default" in m, _features(m))
            for m in entry.get("members", [])
            if isinstance(m, dict) and "name" in m
        ]
        variants = entry.get("variants") or []
        tag = entry.get("tag")
        if not variants or not isinstance(tag, str):
            return out
        chosen = given.get(tag) if given else None
        if chosen is None and not every_variant:
            return out
        cases = [v for v in variants if chosen is None or v.get("case") == chosen]
        seen = {m.name for m in out}
        for case in cases:
            for m in self.members(str(case.get("type")), given, every_variant=every_variant):
                if m.name not in seen:
                    seen.add(m.name)
                    out.append(m)
        return out

    def member(
        self,
        type_name: str,
        name: str,
        given: Mapping[str, Any] | None = None,
        *,
        every_variant: bool = True,
    ) -> Member | None:
        members = self.members(type_name, given, every_variant=every_variant)
        return next((m for m in members if m.name == name), None)

    def tag(self, type_name: str) -> str | None:
        """The member whose value selects a union's variant, or None."""
        entry = self._types.get(type_name)
        tag = entry.get("tag") if entry else None
        return tag if isinstance(tag, str) else None

    def enum_values(self, type_name: str) -> list[str]:
        """An enum's values ([] for any other type)."""
        entry = self._types.get(type_name)
        if not entry or entry.get("meta-type") != "enum":
            return []
        values = entry.get("values")
        if isinstance(values, list):
            return [str(v) for v in values]
        # Newer QEMUs may list only "members": [{"name": ...}].
        return [str(m["name"]) for m in entry.get("members", []) if isinstance(m, dict)]

    def element_type(self, type_name: str) -> str | None:
        entry = self._types.get(type_name)
        elem = entry.get("element-type") if entry else None
        return elem if isinstance(elem, str) else None

    def alternatives(self, type_name: str) -> list[str]:
        """The types an alternate may be ([] for any other type)."""
        entry = self._types.get(type_name)
        if not entry or entry.get("meta-type") != "alternate":
            return []
        return [str(m["type"]) for m in entry.get("members", []) if isinstance(m, dict)]

    def object_type(self, type_name: str) -> str | None:
        """``type_name`` if it is an object, or an alternate's object branch."""
        if self.meta(type_name) == "object":
            return type_name
        return next((t for t in self.alternatives(type_name) if self.meta(t) == "object"), None)

    def type_at(
        self, command: str, path: Sequence[str], given: Mapping[str, Any] | None = None
    ) -> str | None:
        """The type of the (dotted) argument ``path`` of ``command``, or None.

        ``given`` holds the arguments typed so far, so that a union's tag
        (``driver=null-co``) selects its variant, at each level.
        """
        arg = self.arg_type(command)
        return self.type_in(arg, path, given) if arg else None

    def type_in(
        self, type_name: str, path: Sequence[str], given: Mapping[str, Any] | None = None
    ) -> str | None:
        """The type of the member at the dotted ``path`` inside the object
        type ``type_name`` (see :meth:`type_at`); ``type_name`` for []."""
        node: Mapping[str, Any] | None = given
        current: str | None = type_name
        for name in path:
            obj = self.object_type(current) if current else None
            if obj is None:
                return None
            found = self.member(obj, name, node)
            if found is None:
                return None
            current = found.type
            child = node.get(name) if node else None
            node = child if isinstance(child, Mapping) else None
        return current

    def transaction_actions(self) -> dict[str, str]:
        """The action types of ``transaction`` -> the type of each one's ``data``."""
        actions = self.type_at("transaction", ["actions"])
        elem = self.element_type(actions) if actions else None
        tag = self.tag(elem) if elem else None
        if elem is None or tag is None:
            return {}
        tag_member = self.member(elem, tag, every_variant=False)
        out: dict[str, str] = {}
        for action in self.enum_values(tag_member.type) if tag_member else []:
            data = self.type_in(elem, ["data"], {tag: action})
            if data is not None:
                out[action] = data
        return out

    # --- words -----------------------------------------------------------------------

    def describe(self, type_name: str, depth: int = 1) -> str:
        """A type, spelled out for a person (its schema name is a number)."""
        entry = self._types.get(type_name)
        if entry is None:
            return type_name
        meta = entry.get("meta-type")
        if meta == "builtin":
            return type_name
        if meta == "enum":
            values = self.enum_values(type_name)
            shown = "|".join(values[:8]) + ("|..." if len(values) > 8 else "")
            return f"enum ({shown})"
        if meta == "array":
            elem = self.element_type(type_name)
            return f"[{self.describe(elem, depth) if elem else '?'}]"
        if meta == "alternate":
            return " or ".join(self.describe(t, depth) for t in self.alternatives(type_name))
        if meta == "object":
            tag = self.tag(type_name)
            if depth <= 0:
                return "object"
            members = self.members(type_name, every_variant=False)
            names = [m.name + ("?" if m.optional else "") for m in members]
            inner = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            union = f" union by {tag}" if tag else ""
            return f"object{union} ({inner})" if inner else "object {}"
        return type_name

    def help(self, command: str, given: Mapping[str, Any] | None = None) -> str:
        """What ``help COMMAND`` prints: each argument, its type, whether it is
        optional, and the features (``deprecated``, ``unstable``) of the
        command and of each argument.

        For a union (``blockdev-add``), ``given`` with its tag
        (``{"driver": "null-co"}``) adds that variant's arguments; without
        it, only the shared ones are listed, with a line that says so.
        """
        if command not in self._commands:
            raise KeyError(command)
        arg = self.arg_type(command)
        features = _features(self._commands[command])
        lines = [f"{command} ({', '.join(features)})" if features else command]
        members = self.members(arg, given, every_variant=False) if arg else []
        tag = self.tag(arg) if arg else None
        if not members:
            lines.append("  (no arguments)")
        width = max((len(m.name) for m in members), default=0)
        for m in members:
            notes = (["optional"] if m.optional else []) + list(m.features)
            note = f"  ({', '.join(notes)})" if notes else ""
            lines.append(f"  {m.name.ljust(width)}  {self.describe(m.type)}{note}")
        if tag and not (given and tag in given):
            lines.append(f"  ({tag} selects more arguments: help {command} {tag}=VALUE lists them)")
        ret = self.ret_type(command)
        if ret and not (self.meta(ret) == "object" and not self.members(ret)):
            lines.append(f"  returns {self.describe(ret)}")
        return "\n".join(lines)

    # --- typing values (for the qmp command) -----------------------------------------

    def convert(self, type_name: str | None, text: str) -> Any:
        """The JSON value of ``text`` for an argument of ``type_name``.

        ``int`` (and the sized ints) and ``number`` take a number, ``bool``
        true/false (also on/off, yes/no, 1/0), ``str`` and enums keep the
        text, ``null`` takes ``null``; objects and lists take JSON; ``any``
        and unknown types take JSON when it parses, else the text; an
        alternate the first branch that fits.  Raises :class:`SchemaError`
        naming the type needed.
        """
        from qomfs.shell.parse import ParseError, parse_json_value, parse_value

        if type_name is None:
            return parse_value(text)
        meta = self.meta(type_name)
        if meta == "builtin" or type_name in _INT_TYPES:
            return _convert_builtin(type_name, text)
        if meta == "enum":
            return text
        if meta in ("object", "array"):
            try:
                value = parse_json_value(text)
            except ParseError as err:
                raise SchemaError(f"needs {self.describe(type_name, 0)} as JSON ({err})") from None
            want = dict if meta == "object" else list
            if not isinstance(value, want):
                raise SchemaError(f"needs {self.describe(type_name, 0)} as JSON")
            return value
        if meta == "alternate":
            for branch in self.alternatives(type_name):
                try:
                    return self.convert(branch, text)
                except SchemaError:
                    continue
            raise SchemaError(f"needs {self.describe(type_name, 0)}")
        return parse_value(text)


def _features(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """An entry's features (``deprecated``, ``unstable``, ...)."""
    features = entry.get("features")
    return tuple(str(f) for f in features) if isinstance(features, list) else ()


_BOOLS = {"true": True, "on": True, "yes": True, "1": True}
_BOOLS |= {"false": False, "off": False, "no": False, "0": False}


def _convert_builtin(type_name: str, text: str) -> Any:
    from qomfs.shell.parse import parse_value

    if type_name in _INT_TYPES:
        try:
            return int(text, 0)
        except ValueError:
            raise SchemaError(f"needs an integer ({type_name}), got {text!r}") from None
    if type_name == "number":
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise SchemaError(f"needs a number, got {text!r}")
        as_int = _int_or_none(text)
        return as_int if as_int is not None else value
    if type_name == "bool":
        try:
            return _BOOLS[text.lower()]
        except KeyError:
            raise SchemaError(f"needs a boolean (true or false), got {text!r}") from None
    if type_name == "str":
        return text
    if type_name == "null":
        if text != "null":
            raise SchemaError(f"needs null, got {text!r}")
        return None
    return parse_value(text)  # any, QType, ...


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def typed_arguments(schema: Schema, command: str, words: Sequence[str]) -> dict[str, Any]:
    """``key=value`` words -> ``command``'s arguments, each value typed by the schema.

    Two passes: the first (JSON-or-string) finds the union tags given
    (``driver=null-co``), which decide the types the second pass uses.
    Raises :class:`~qomfs.shell.parse.ParseError` naming the argument and
    the type it needs.
    """
    from qomfs.shell.parse import ParseError, parse_arguments, parse_value

    def lenient(path: Sequence[str], text: str) -> Any:
        try:
            return parse_value(text)
        except ParseError:
            return text  # a str argument may look like broken JSON

    given = parse_arguments(words, lenient)
    return parse_arguments(
        words, lambda path, text: schema.convert(schema.type_at(command, path, given), text)
    )
