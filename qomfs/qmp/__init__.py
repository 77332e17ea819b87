"""The QMP client package: framing (bytes <-> JSON), transport (sockets), client (commands, events).

Everything other modules import from ``qomfs.qmp`` is re-exported here.
"""

from __future__ import annotations

from qomfs.qmp.client import (
    MAX_ASYNC,
    MAX_BATCH,
    MAX_IN_FLIGHT,
    STUCK_GRACE,
    Event,
    QMPClient,
    State,
)
from qomfs.qmp.framing import MAX_MESSAGE, MAX_NESTING, MAX_REQUEST, JSONStreamDecoder
from qomfs.qmp.transport import describe_address, is_unix_address, listen_unix

__all__ = [
    "MAX_ASYNC",
    "MAX_BATCH",
    "MAX_IN_FLIGHT",
    "MAX_MESSAGE",
    "MAX_NESTING",
    "MAX_REQUEST",
    "STUCK_GRACE",
    "Event",
    "JSONStreamDecoder",
    "QMPClient",
    "State",
    "describe_address",
    "is_unix_address",
    "listen_unix",
]
