"""A fake QEMU monitor speaking the QMP wire protocol on a real unix socket.

It serves an in-memory QOM tree (object path -> list of ``{name, type,
value?}``) with QEMU 7.2's error classes and descriptions, one client at a
time like a real monitor, on a background thread.  Extra keys on a property:
``readonly`` (refuse ``qom-set``), ``error`` (the getter fails with this text),
``enum`` (the accepted strings).  A property without ``value`` is not readable.

Fault knobs (plain attributes, may change while running): ``pretty``,
``chunk`` (write in pieces of 1..chunk bytes), ``delay`` (seconds before the
reply, by command), ``inject`` (messages sent before the reply, by command),
``drop_after`` (answer N commands on a connection, then hang up on the next
one; fires once), ``greeting`` ("qmp", "none" for a busy monitor, or raw bytes),
``reading`` (False: stop reading the socket, as a stopped QEMU does, so the
client's sends fill the socket buffer), ``rewrite`` (``rewrite(request,
reply)`` returns what is sent instead of the reply: messages or raw bytes, in
order; it may keep a reply back and send it later, out of order).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import copy
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

Tree = dict[str, list[dict[str, Any]]]
#: What a ``rewrite`` hook sends instead of a reply.
Outgoing = list[dict[str, Any] | bytes]

GREETING: dict[str, Any] = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
        "capabilities": ["oob"],
    }
}
IDLESS_ERROR: dict[str, Any] = {
    "error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'nope'"}
}
GARBAGE = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
BASE_COMMANDS = ("qmp_capabilities", "query-commands", "qom-list", "qom-get", "qom-set")
_RANGES = {f"int{b}": (-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in (8, 16, 32, 64)}
_RANGES |= {f"uint{b}": (0, 2**b - 1) for b in (8, 16, 32, 64)}
_RANGES |= {"int": _RANGES["int64"], "uint": _RANGES["uint64"], "size": _RANGES["uint64"]}


def event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """An event message as QEMU sends it."""
    now = time.time()
    ts = {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}
    return {"event": name, "data": data, "timestamp": ts}


def _sendall(sock: socket.socket, data: bytes, limit: float = 10.0) -> None:
    """``sock.sendall(data)`` that outlasts the socket's short timeout (the
    one its reads use): a slow client must not get half a message."""
    deadline = time.monotonic() + limit
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
        except BlockingIOError:
            time.sleep(0.001)


class QMPFailure(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls, self.desc = cls, desc


class FakeQMP:
    """Use as a context manager; ``path`` is where clients connect.

    With ``connect_to`` the fake is the connecting side (QEMU's ``-qmp
    unix:PATH`` client mode): it connects to ``connect_to`` until it succeeds.
    """

    def __init__(
        self,
        tree: Tree | None = None,
        *,
        path: str | None = None,
        connect_to: str | None = None,
        commands: Iterable[str] = BASE_COMMANDS,
        pretty: bool = False,
        chunk: int = 0,
        greeting: Literal["qmp", "none"] | bytes = "qmp",
    ) -> None:
        self.tree: Tree = copy.deepcopy(tree) if tree is not None else {"/": []}
        self.commands = list(commands)
        self.pretty, self.chunk, self.greeting = pretty, chunk, greeting
        self.delay: dict[str, float] = {}
        self.inject: dict[str, list[dict[str, Any]]] = {}
        self.drop_after: int | None = None
        self.reading = True
        self._paused = threading.Event()  # the server saw reading = False
        self.rewrite: Callable[[dict[str, Any], dict[str, Any]], Outgoing] | None = None
        self.connections = 0
        self._counts: collections.Counter[str] = collections.Counter()
        self.requests: list[dict[str, Any]] = []  # every message received, as sent
        self._tmpdir = None if path or connect_to else tempfile.mkdtemp(prefix="fakeqmp-")
        self.path = connect_to or path or os.path.join(str(self._tmpdir), "qmp.sock")
        self._client_mode = connect_to is not None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # counts, tree, the current connection
        self._send_lock = threading.Lock()  # one whole message at a time
        self._conn: socket.socket | None = None
        self._negotiated = False
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="fakeqmp", daemon=True)
        self._rng = random.Random(1)

    # --- life cycle ----------------------------------------------------------

    def __enter__(self) -> FakeQMP:
        if not self._client_mode:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a stale socket, as QEMU does
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(self.path)
            self._listener.listen(4)
            self._listener.settimeout(0.02)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hang up, stop listening and remove the socket (the server is gone)."""
        self._stop.set()
        self.drop()
        self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def drop(self) -> None:
        """Hang up on the current client now."""
        with self._lock:
            conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def command_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def send(self, msg: dict[str, Any]) -> bool:
        """Send ``msg`` to the current negotiated client; whether there was one."""
        with self._lock:
            conn = self._conn if self._negotiated else None
        if conn is None:
            return False
        return self._send(conn, msg)

    def stop_reading(self) -> None:
        """Set ``reading`` to False and wait until the server has stopped reading."""
        self._paused.clear()
        self.reading = False
        if not self._paused.wait(5):
            raise TimeoutError("the fake server did not stop reading")

    def send_raw(self, data: bytes) -> bool:
        """Send bytes as they are to the current negotiated client."""
        with self._lock:
            conn = self._conn if self._negotiated else None
        return conn is not None and self._write(conn, data)

    def delete(self, path: str) -> None:
        """Remove the object at ``path`` and below, then send DEVICE_DELETED."""
        parent, _, name = path.rpartition("/")
        with self._lock:
            for obj in [p for p in self.tree if p == path or p.startswith(path + "/")]:
                del self.tree[obj]
            self.tree[parent or "/"] = [p for p in self.tree[parent or "/"] if p["name"] != name]
        self.send(event("DEVICE_DELETED", {"device": name, "path": path}))

    # --- the wire ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            sock = self._next_client()
            if sock is not None:
                with sock:
                    self._serve(sock)

    def _next_client(self) -> socket.socket | None:
        if self._client_mode:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError:  # not there yet, or not listening yet
                sock.close()
                self._stop.wait(0.01)
                return None
            return sock
        assert self._listener is not None
        try:
            return self._listener.accept()[0]
        except (TimeoutError, OSError):
            return None

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self._conn, self._negotiated = sock, False
            self.connections += 1
        if self.greeting == "qmp":
            self._send(sock, GREETING)
        elif isinstance(self.greeting, bytes):
            self._write(sock, self.greeting)
        sock.settimeout(0.02)
        text, utf8, seen = "", codecs.getincrementaldecoder("utf-8")(), 0
        decoder = json.JSONDecoder()
        while not self._stop.is_set():
            if not self.reading:
                self._paused.set()
                self._stop.wait(0.01)
                continue
            try:
                data = sock.recv(65536)
            except TimeoutError:
                self._idle(sock)
                continue
            except OSError:
                break
            if not data:
                break
            if self.greeting != "qmp":
                continue  # a busy monitor or a non-QMP peer: read and ignore
            text += utf8.decode(data)
            while text.strip():
                try:
                    msg, end = decoder.raw_decode(text.lstrip())
                except json.JSONDecodeError:
                    break  # incomplete: wait for more
                text, seen = text.lstrip()[end:], seen + 1
                name = str(msg.get("execute"))
                with self._lock:
                    self._counts[name] += 1
                    self.requests.append(msg)
                if self.drop_after is not None and seen > self.drop_after:
                    self.drop_after = None
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    break
                self._answer(sock, name, msg)
        with self._lock:
            self._conn = None

    def _answer(self, sock: socket.socket, name: str, msg: dict[str, Any]) -> None:
        if self.delay.get(name):
            self._stop.wait(self.delay[name])
        for extra in self.inject.get(name, []):
            self._send(sock, extra)
        reply: dict[str, Any]
        try:
            with self._lock:
                reply = {"return": self._execute(name, msg.get("arguments") or {})}
        except QMPFailure as err:
            reply = {"error": {"class": err.cls, "desc": err.desc}}
        if "id" in msg:
            reply["id"] = msg["id"]
        rewrite = self.rewrite
        for out in rewrite(msg, reply) if rewrite is not None else [reply]:
            if isinstance(out, bytes):
                self._write(sock, out)
            else:
                self._send(sock, out)

    def _idle(self, sock: socket.socket) -> None:
        """Called when no request came for a moment (subclasses send what they held)."""

    def _send(self, sock: socket.socket, msg: dict[str, Any]) -> bool:
        text = json.dumps(msg, indent=4 if self.pretty else None, ensure_ascii=False)
        # QEMU's monitor turns every "\n" into "\r\n" (none occur inside strings).
        return self._write(sock, (text + "\n").replace("\n", "\r\n").encode())

    def _write(self, sock: socket.socket, data: bytes) -> bool:
        with self._send_lock:
            try:
                if not self.chunk:
                    _sendall(sock, data)
                    return True
                while data:
                    n = self._rng.randint(1, self.chunk)
                    _sendall(sock, data[:n])
                    data = data[n:]
                    time.sleep(0.0002)
            except OSError:
                return False
        return True

    # --- QMP and QOM commands (called with _lock held) -------------------------

    def _execute(self, name: str, args: dict[str, Any]) -> Any:
        if not self._negotiated:
            if name == "qmp_capabilities":
                self._negotiated = True
                return {}
            desc = "Expecting capabilities negotiation with 'qmp_capabilities'"
            raise QMPFailure(desc, "CommandNotFound")
        if name not in self.commands or name == "qmp_capabilities":
            raise QMPFailure(f"The command {name} has not been found", "CommandNotFound")
        if name == "query-commands":
            return [{"name": c} for c in self.commands]
        if name == "qom-list":
            return [{"name": p["name"], "type": p["type"]} for p in self._object(args["path"])]
        if name == "qom-get":
            return self._get(args["path"], self._property(args["path"], args["property"]))
        if name == "qom-set":
            self._set(args["path"], self._property(args["path"], args["property"]), args["value"])
            return {}
        if name == "qom-list-get":
            objs = [(path, self._object(path)) for path in args["paths"]]  # all or nothing
            return [{"properties": [self._entry(path, p) for p in props]} for path, props in objs]
        raise QMPFailure(f"The fake does not implement {name}", "CommandNotFound")

    def _object(self, path: str) -> list[dict[str, Any]]:
        if path not in self.tree:
            raise QMPFailure(f"Device '{path}' not found", "DeviceNotFound")
        return self.tree[path]

    def _typename(self, path: str) -> str:
        parent, _, name = path.rpartition("/")
        for prop in self.tree.get(parent or "/", []) if path != "/" else []:
            if prop["name"] == name and prop["type"].startswith("child<"):
                return str(prop["type"][6:-1])
        return "container"

    def _property(self, path: str, name: str) -> dict[str, Any]:
        for prop in self._object(path):
            if prop["name"] == name:
                return prop
        raise QMPFailure(f"Property '{self._typename(path)}.{name}' not found")

    def _get(self, path: str, prop: dict[str, Any]) -> Any:
        if prop["type"].startswith("child<"):
            return path.rstrip("/") + "/" + prop["name"]
        if "error" in prop:
            raise QMPFailure(prop["error"])
        if "value" not in prop:
            raise QMPFailure(f"Property '{self._typename(path)}.{prop['name']}' is not readable")
        return copy.deepcopy(prop["value"])

    def _entry(self, path: str, prop: dict[str, Any]) -> dict[str, Any]:
        entry = {"name": prop["name"], "type": prop["type"]}
        with contextlib.suppress(QMPFailure):
            entry["value"] = self._get(path, prop)
        return entry

    def _set(self, path: str, prop: dict[str, Any], value: Any) -> None:
        name, qom_type = prop["name"], prop["type"]
        if prop.get("readonly") or qom_type.startswith("child<"):
            raise QMPFailure(f"Property '{self._typename(path)}.{name}' is not writable")
        expected = None
        if qom_type == "bool" and not isinstance(value, bool):
            expected = "boolean"
        elif qom_type in _RANGES:
            if not isinstance(value, int) or isinstance(value, bool):
                expected = "integer"
            elif not _RANGES[qom_type][0] <= value <= _RANGES[qom_type][1]:
                raise QMPFailure(f"Parameter '{name}' expects {qom_type}")
        elif qom_type in ("str", "string") or qom_type.startswith("link<") or "enum" in prop:
            expected = None if isinstance(value, str) else "string"
        if expected:
            raise QMPFailure(f"Invalid parameter type for '{name}', expected: {expected}")
        if "enum" in prop and value not in prop["enum"]:
            raise QMPFailure(f"Parameter '{name}' does not accept value '{value}'")
        if qom_type.startswith("link<") and value and value not in self.tree:
            raise QMPFailure(f"Device '{value}' not found", "DeviceNotFound")
        prop["value"] = copy.deepcopy(value)
