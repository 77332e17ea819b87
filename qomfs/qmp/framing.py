"""QMP framing: a byte stream to JSON messages and back, with size and nesting limits.

Nothing here touches a socket or knows QMP's commands, so the guest-agent
client (same JSON framing, no greeting) can use it as it is.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

from qomfs.errors import ProtocolError

#: A message larger than this is not QMP (QEMU's own limit is far lower).
MAX_MESSAGE = 64 * 1024 * 1024
#: QEMU's JSON parser gives up on a message nested deeper than 1024, of more
#: than 2M tokens or with a token over 64 MiB, and then answers with errors
#: that carry no id, possibly several.  Requests never come near: checked.
MAX_NESTING = 100  # no QOM value comes near
MAX_REQUEST = 1024 * 1024

_JSON_SPACE = " \t\r\n"
_FIRST_CHAR = re.compile(r"[ \t\r\n]*(.)", re.DOTALL)


class JSONStreamDecoder:
    """Split a byte stream into JSON objects, whatever the line breaks.

    QMP messages are JSON objects; a monitor with ``pretty=on`` spreads each
    over many lines, and a read from the socket may end anywhere, even inside a
    UTF-8 sequence.  Not thread-safe: one reader feeds it.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._buf = ""
        self._decoder = json.JSONDecoder()

    @property
    def pending(self) -> str:
        """Text received but not yet decoded into a whole message."""
        return self._buf

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return the messages they complete, in order.

        Raises :class:`ProtocolError` when the stream cannot be QMP: a message
        that is not a JSON object, is not valid JSON, or grows past
        :data:`MAX_MESSAGE`.  The stream cannot be resynchronised after that:
        the caller drops the connection.
        """
        text = self._utf8.decode(data)
        self._buf += text
        out: list[dict[str, Any]] = []
        first = _FIRST_CHAR.match(self._buf)
        if first and first.group(1) == "{" and "\n" not in text and text.rstrip()[-1:] != "}":
            # No message ends in these bytes (QEMU ends each with a newline):
            # a large reply comes in many reads, and decoding what has come
            # so far at each would cost time quadratic in its size.
            if len(self._buf) > MAX_MESSAGE:
                raise ProtocolError("message too large or not valid JSON")
            return out
        buf, pos, end = self._buf, 0, len(self._buf)
        while True:
            while pos < end and buf[pos] in _JSON_SPACE:
                pos += 1
            if pos == end:
                self._buf = ""
                return out
            if buf[pos] != "{":
                raise ProtocolError(f"expected a JSON object, got {buf[pos : pos + 40]!r}")
            try:
                obj, pos = self._decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                # No JSON token holds a raw line break, so an error with a
                # line break after it is not cured by more bytes: garbage.
                # Without one the message is most likely still incomplete.
                if "\n" in buf[err.pos :]:
                    near = buf[max(pos, err.pos - 30) : err.pos + 30]
                    raise ProtocolError(f"not valid JSON ({err.msg}): {near!r}") from None
                self._buf = buf[pos:]
                if len(self._buf) > MAX_MESSAGE:
                    raise ProtocolError("message too large or not valid JSON") from None
                return out
            out.append(obj)


def too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether ``value`` nests lists and objects ``limit`` levels or deeper."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth + 1 >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def encode(message: dict[str, Any]) -> bytes:
    """``message`` as one line on the wire.

    Raises :class:`ValueError` (with a reason fit for a user) for what QEMU's
    parser would reject with errors that carry no id: nesting of
    :data:`MAX_NESTING` or more, more than :data:`MAX_REQUEST` bytes, or a
    value JSON cannot carry.
    """
    if too_deep(message, MAX_NESTING + 1):  # (the message itself is one level)
        raise ValueError("value nested too deeply")
    try:
        data = json.dumps(message, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot be sent as JSON: {err}") from None
    if len(data) > MAX_REQUEST:
        raise ValueError(f"request of {len(data)} bytes is too large")
    return data
