"""Many VMs in one mount: every QMP socket in a directory is a top directory.

``/NAME/...`` is ``/...`` of the QEMU listening on ``DIR/NAME``.  Each VM has
its own :class:`~qomfs.qmp.QMPClient` and :class:`~qomfs.model.QOMTree`, made
on first use, so a VM that hangs or dies costs only the operations that touch
it.  Sockets that appear show up, and sockets that go away or stop answering
vanish, within the TTL.  FUSE-free, like the rest of the core.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from qomfs.cache import TTLCache
from qomfs.errors import NotFound, NotWritable
from qomfs.model import Kind, Node, Property, QOMTree
from qomfs.qmp import QMPClient, State

log = logging.getLogger("qomfs.forest")

#: The type a VM's directory reports (user.qom.type) in the forest's root.
VM_TYPE = "qemu-vm"


@dataclass(frozen=True)
class _VM:
    """One VM of the forest: the connection the forest made, and its tree."""

    client: QMPClient
    tree: QOMTree

    def close(self) -> None:
        self.client.close()
        self.tree.close()


def is_listening(path: str) -> bool:
    """Whether a unix socket at ``path`` accepts connections (quick, no QMP)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.2)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


class Forest:
    """The trees of all QMP sockets in ``socket_dir``.  Thread-safe."""

    def __init__(
        self,
        socket_dir: str,
        make_tree: Callable[[QMPClient], QOMTree],
        *,
        ttl: float = 1.0,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket_dir = socket_dir
        self.ttl = ttl
        self._make_tree = make_tree
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._scan: TTLCache[str, list[str]] = TTLCache(ttl, clock)
        self._vms: dict[str, _VM] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    # --- which VMs ------------------------------------------------------------

    def names(self) -> list[str]:
        """The sockets in the directory whose QEMU is alive (cached for ``ttl``)."""
        return self._scan.get("", self._scan_dir)

    def _scan_dir(self) -> list[str]:
        found = []
        try:
            entries = sorted(os.scandir(self.socket_dir), key=lambda e: e.name)
        except OSError as err:
            log.warning("cannot read %s: %s", self.socket_dir, err)
            return []
        for entry in entries:
            with contextlib.suppress(OSError):
                if not stat.S_ISSOCK(entry.stat().st_mode):
                    continue
                vm = self._vms.get(entry.name)
                # Our own live connection says enough; otherwise a connect()
                # tells a live QEMU from a stale socket left by a dead one.
                if (vm is not None and vm.client.state is State.READY) or is_listening(entry.path):
                    found.append(entry.name)
        with self._lock:
            gone = [n for n in self._vms if n not in found]
            dropped = [self._vms.pop(n) for n in gone]
        for vm in dropped:
            log.info("VM %s is gone", vm.client.address)
            vm.close()
        return found

    def close(self) -> None:
        with self._lock:
            vms, self._vms = list(self._vms.values()), {}
        for vm in vms:
            vm.close()

    def _require(self, name: str) -> None:
        if name not in self.names():
            raise NotFound(f"/{name}: no such VM socket in {self.socket_dir}")

    def _tree(self, name: str) -> QOMTree:
        self._require(name)
        with self._lock:
            vm = self._vms.get(name)
            if vm is not None:
                return vm.tree
            lock = self._locks.setdefault(name, threading.Lock())
        # Connect outside the forest's lock: a hung VM holds up only itself.
        with lock:
            with self._lock:
                vm = self._vms.get(name)
            if vm is not None:
                return vm.tree
            client = QMPClient(
                os.path.join(self.socket_dir, name),
                timeout=self._timeout,
                connect_timeout=self._connect_timeout,
            )
            client.connect()  # ConnectError: EIO for this VM only
            vm = _VM(client, self._make_tree(client))
            with self._lock:
                self._vms[name] = vm
            return vm.tree

    def _route(self, path: str) -> tuple[str, str]:
        """``/vm/a/b`` -> (``vm``, ``/a/b``)."""
        parts = path.split("/", 2)
        return parts[1], "/" + (parts[2] if len(parts) > 2 else "")

    def _in(self, name: str, node: Node) -> Node:
        return replace(node, path=f"/{name}{node.path}".rstrip("/") or "/")

    # --- the Tree protocol ------------------------------------------------------

    def lookup(self, path: str) -> Node:
        if path == "/":
            return Node("/", Kind.OBJECT, None)
        name, rest = self._route(path)
        if rest == "/":
            self._require(name)
            return Node(path, Kind.OBJECT, Property(name, f"child<{VM_TYPE}>"))
        return self._in(name, self._tree(name).lookup(rest))

    def readdir(self, path: str, ahead: bool = True) -> list[Property]:
        if path == "/":
            return [Property(n, f"child<{VM_TYPE}>") for n in self.names()]
        name, rest = self._route(path)
        return self._tree(name).readdir(rest, ahead)

    def read_text(self, path: str) -> str:
        name, rest = self._route(path)
        return self._tree(name).read_text(rest)

    def readlink(self, path: str) -> str:
        # Relative link text stays inside the VM's own directory.
        name, rest = self._route(path)
        return self._tree(name).readlink(rest)

    def write(self, path: str, data: bytes) -> None:
        name, rest = self._route(path)
        if rest == "/":
            raise NotWritable(f"{path} is a VM, not a property")
        self._tree(name).write(rest, data)

    def write_link(self, path: str, text: str, mountpoint: str = "") -> None:
        name, rest = self._route(path)
        vm_root = f"{mountpoint.rstrip('/')}/{name}" if mountpoint else ""
        self._tree(name).write_link(rest, text, vm_root)

    def object_type(self, path: str) -> str:
        name, rest = self._route(path)
        if path == "/":
            return "container"
        if rest == "/":
            return VM_TYPE
        return self._tree(name).object_type(rest)

    def description(self, path: str) -> str:
        name, rest = self._route(path)
        return self._tree(name).description(rest)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            vms = dict(self._vms)
        per_vm = {name: vm.tree.stats() for name, vm in vms.items()}
        commands: dict[str, int] = {}
        for s in per_vm.values():
            for cmd, n in s["commands"].items():
                commands[cmd] = commands.get(cmd, 0) + n
        return {
            "vms": per_vm,
            "ttl": self.ttl,
            "commands": commands,
            "total": sum(commands.values()),
        }
