"""A client for the QEMU guest agent (qemu-ga) on the host end of its channel.

The agent speaks QMP-shaped JSON with no greeting and no ``qmp_capabilities``;
before the first command and after any timeout the client re-synchronises with
``guest-sync-delimited`` so that a stale reply is never taken for its own.
"""

from __future__ import annotations

import logging
import math
import os
import random
import select
import socket
import time
from typing import Any

from qomfs.errors import ConnectError, ProtocolError, QomfsError
from qomfs.qmp import transport
from qomfs.qmp.framing import JSONStreamDecoder, encode

log = logging.getLogger("qomfs.ga")

#: The byte the agent sends before its reply to ``guest-sync-delimited``.  It
#: never occurs in UTF-8 text, so it cannot be part of a JSON reply; sent to
#: the agent it resets the agent's JSON parser.
SENTINEL = b"\xff"

#: The default time a command may take.
DEFAULT_TIMEOUT = 5.0

#: Commands that take long on a busy guest: freezing waits for every
#: filesystem to flush (QEMU's own client raised this from 3 s to 60 s).
LONG_TIMEOUTS: dict[str, float] = {
    "guest-fsfreeze-freeze": 60.0,
    "guest-fsfreeze-freeze-list": 60.0,
    "guest-fsfreeze-thaw": 60.0,
}

#: Commands that send no reply when they succeed (the guest goes away).
NO_REPLY = frozenset(
    {"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"}
)

_READ_SIZE = 1 << 16


class AgentError(QomfsError):
    """Root of the guest-agent client's errors; ``str()`` is one readable line."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(message)
        self.address = address


class AgentConnectError(AgentError):
    """The agent's socket could not be reached (missing, refused, bad address)."""


class AgentTimeout(AgentError):
    """No reply within the command's timeout; the client re-syncs before its next command."""

    def __init__(self, address: str, command: str, timeout: float) -> None:
        where = describe(address)
        if command == "guest-sync-delimited":
            message = (
                f"no guest agent answered guest-sync on {where} within {timeout:g} s: "
                "is qemu-ga running in the guest?"
            )
        else:
            message = (
                f"no reply to {command} from the guest agent on {where} within {timeout:g} s: "
                "is the guest busy? (try a larger --timeout)"
            )
        super().__init__(address, message)
        self.command = command
        self.timeout = timeout


class AgentClosed(AgentError):
    """The channel closed while the client waited for a reply."""


class AgentCommandError(AgentError):
    """The agent answered ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(
        self, address: str, command: str, arguments: dict[str, Any], error_class: str, desc: str
    ) -> None:
        where = describe(address)
        if error_class == "CommandNotFound" and "disabled" in desc:
            message = (
                f"{command}: the guest agent on {where} has this command disabled: {desc} "
                "(qemu-ga's block list, -b or block-rpcs)"
            )
        elif error_class == "CommandNotFound":
            message = f"{command}: the guest agent on {where} does not know it: {desc}"
        else:
            message = f"{command} failed in the guest agent on {where}: {error_class}: {desc}"
        super().__init__(address, message)
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc


class AgentProtocolError(AgentError):
    """What came back is not the agent's protocol."""


def describe(address: str) -> str:
    """How an address is named in messages: a path, or ``tcp:HOST:PORT``."""
    return address if transport.is_unix_address(address) else f"tcp:{address}"


def timeout_for(command: str, timeout: float) -> float:
    """The time ``command`` may take when the default is ``timeout``."""
    return max(timeout, LONG_TIMEOUTS.get(command, 0.0))


def _connect(address: str, timeout: float) -> socket.socket:
    """A non-blocking socket connected to ``address``, or :class:`AgentConnectError`."""
    where = describe(address)
    if transport.is_unix_address(address) and not os.path.exists(address):
        # Said here: the transport's own message names QMP's -qmp option.
        raise AgentConnectError(
            address,
            f"{where}: no such socket: is QEMU running with the agent's channel "
            f"(-chardev socket,path={address},server=on,...)?",
        )
    if not transport.is_unix_address(address) and not address.rpartition(":")[2].isdigit():
        raise AgentConnectError(
            address, f"{address}: neither an existing socket path nor HOST:PORT"
        )
    try:
        sock = transport.connect(address, timeout)
    except ConnectError as err:
        raise AgentConnectError(address, str(err)) from err
    sock.setblocking(False)
    return sock


class AgentClient:
    """One connection to one guest agent.  Not thread-safe: one caller at a time.

    ``timeout`` bounds every command (and the connect) unless
    :data:`LONG_TIMEOUTS` grants the command more.  Every method raises only
    :class:`AgentError` subclasses.
    """

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.address = address
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = JSONStreamDecoder()
        self._replies: list[dict[str, Any]] = []
        self._synced = False
        self._serial = 0
        self._random = random.SystemRandom()
        #: Every command sent, in order (``guest-sync-delimited`` included).
        self.sent: list[str] = []

    def __enter__(self) -> AgentClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def synced(self) -> bool:
        """Whether the next reply on the channel is known to answer the next command."""
        return self._synced

    def connect(self) -> None:
        """Open the socket (no traffic yet: the agent sends no greeting)."""
        if self._sock is None:
            self._sock = _connect(self.address, self.timeout)

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._synced = False

    # --- commands ---------------------------------------------------------

    def sync(self, timeout: float | None = None) -> None:
        """``guest-sync-delimited`` with a random id; drop whatever came before its reply.

        Raises :class:`AgentTimeout` (no agent answered) or :class:`AgentClosed`.
        """
        limit = timeout or self.timeout
        deadline = time.monotonic() + limit
        token = self._random.randrange(1, 1 << 31)
        self._synced = False
        self._replies.clear()
        # A leading 0xFF resets the agent's parser, should an earlier client
        # have left half a command in it; the agent answers that with a parse
        # error, which arrives before the sentinel and is dropped with the rest.
        msg = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        self._send(SENTINEL + encode(msg), "guest-sync-delimited", deadline, limit)
        seen_sentinel = False
        while True:
            data = self._recv("guest-sync-delimited", deadline, limit)
            cut = data.rfind(SENTINEL)
            if cut >= 0:
                seen_sentinel = True
                self._decoder = JSONStreamDecoder()
                data = data[cut + 1 :]
            if not seen_sentinel:
                continue  # stale output of an earlier client
            try:
                msgs = self._decoder.feed(data)
            except ProtocolError:
                # Garbage after an old sentinel: wait for the next one.
                seen_sentinel = False
                self._decoder = JSONStreamDecoder()
                continue
            for i, reply in enumerate(msgs):
                ret = reply.get("return")
                if type(ret) is int and ret == token:  # not True, which == 1
                    self._replies = msgs[i + 1 :]
                    self._synced = True
                    return
                log.debug("dropped a stale message while syncing: %.200r", reply)

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``command``; return its ``return`` value.

        Syncs first when needed.  For the commands in :data:`NO_REPLY` a quiet
        or closing channel after the command means success and returns None.
        Raises :class:`AgentCommandError` for an error reply,
        :class:`AgentTimeout`, :class:`AgentClosed` or :class:`AgentConnectError`.
        """
        self.connect()
        limit = timeout or timeout_for(command, self.timeout)
        if not self._synced:
            self.sync(min(limit, self.timeout))
        self._serial += 1
        ident = f"qomfs-ga-{self._serial}-{self._random.randrange(1 << 30)}"
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        try:
            data = encode(msg)
        except ValueError as err:
            raise AgentError(self.address, f"{command}: cannot be sent: {err}") from err
        deadline = time.monotonic() + limit
        self._send(data, command, deadline, limit)
        try:
            reply = self._reply(ident, command, deadline, limit)
        except (AgentTimeout, AgentClosed):
            if command in NO_REPLY:
                self._synced = False
                return None
            raise
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise AgentCommandError(
                self.address,
                command,
                arguments or {},
                str(error.get("class", "GenericError")),
                str(error.get("desc", "")),
            )
        if "return" not in reply:
            raise AgentProtocolError(
                self.address, f"{describe(self.address)}: a reply with neither return nor error"
            )
        return reply["return"]

    # --- the wire ---------------------------------------------------------

    def _reply(self, ident: str, command: str, deadline: float, limit: float) -> dict[str, Any]:
        while True:
            while self._replies:
                reply = self._replies.pop(0)
                if reply.get("id") == ident:
                    return reply
                log.debug("dropped a message that is no reply to %s: %.200r", command, reply)
            data = self._recv(command, deadline, limit)
            cut = data.rfind(SENTINEL)
            if cut >= 0:
                # Another client's guest-sync-delimited reply: start afresh after it.
                self._decoder = JSONStreamDecoder()
                data = data[cut + 1 :]
            try:
                self._replies.extend(self._decoder.feed(data))
            except ProtocolError as err:
                self._synced = False
                raise AgentProtocolError(
                    self.address, f"{describe(self.address)}: not a guest agent reply: {err}"
                ) from err

    def _send(self, data: bytes, command: str, deadline: float, limit: float) -> None:
        sock = self._socket()
        try:
            transport.send_all(sock, data, deadline)
        except TimeoutError:
            # Part of the command may be on the wire: the next sync's leading
            # 0xFF makes the agent drop it, so the connection stays usable.
            self._synced = False
            raise AgentTimeout(self.address, command, limit) from None
        except OSError as err:
            self.close()
            raise AgentClosed(
                self.address,
                f"{describe(self.address)}: the connection failed sending {command}: "
                f"{err.strerror or err}",
            ) from err
        self.sent.append(command)

    def _recv(self, command: str, deadline: float, limit: float) -> bytes:
        sock = self._socket()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(max(1, math.ceil(remaining * 1000))):
                if time.monotonic() < deadline:
                    continue  # woken early
                self._synced = False
                raise AgentTimeout(self.address, command, limit)
            try:
                data = sock.recv(_READ_SIZE)
            except BlockingIOError:
                continue
            except OSError as err:
                self.close()
                raise AgentClosed(
                    self.address,
                    f"{describe(self.address)}: the connection failed waiting for {command}: "
                    f"{err.strerror or err}",
                ) from err
            if not data:
                self.close()
                raise AgentClosed(
                    self.address,
                    f"{describe(self.address)}: the channel closed while waiting for {command}: "
                    "is QEMU (or the agent) still running?",
                )
            return data

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise AgentClosed(self.address, f"{describe(self.address)}: not connected")
        return self._sock
