"""A randomized protocol test: a fake monitor that, from a seed, reorders,
duplicates, delays, drops and garbles replies and hangs up, against many
threads sending commands.  Every answer a caller gets must be its own
command's, or an error; no call may wait past its bound.

Set ``QOMFS_RANDOM_SEED`` to replay a run; the seed is printed on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
from typing import Any

from qomfs.errors import QMPError
from qomfs.qmp import MAX_BATCH, QMPClient
from tests.fakeqmp import BASE_COMMANDS, IDLESS_ERROR, FakeQMP

THREADS = 6
PER_THREAD = 1500  # sync commands per thread
ASYNC_COMMANDS = 1500  # and this many through submit()
TIMEOUT = 0.5
CONNECT_TIMEOUT = 1.0
#: No call may take longer: a reconnect, then its command, plus scheduling.
BOUND = CONNECT_TIMEOUT + TIMEOUT + 2.0


def expected(arguments: dict[str, Any]) -> dict[str, Any]:
    """What the fake answers to ``calc``: derived from the arguments alone."""
    return {"tag": arguments["tag"], "value": arguments["a"] * 7919 + arguments["b"]}


class ChaosQMP(FakeQMP):
    """Answers ``calc`` commands, misbehaving at random (from ``seed``)."""

    def __init__(self, seed: int) -> None:
        super().__init__({"/": []}, commands=[*BASE_COMMANDS, "calc"])
        self.rng = random.Random(seed)
        self.held: list[tuple[socket.socket, dict[str, Any]]] = []
        self.faults: dict[str, int] = dict.fromkeys(
            ("reorder", "duplicate", "delay", "drop", "garble", "hangup", "stray", "event"), 0
        )

    def _answer(self, sock: socket.socket, name: str, msg: dict[str, Any]) -> None:
        if name != "calc":
            super()._answer(sock, name, msg)
            return
        reply = {"return": expected(msg["arguments"]), "id": msg.get("id")}
        roll = self.rng.random()
        if roll < 0.002:
            self.faults["hangup"] += 1
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            return
        if roll < 0.004:
            self.faults["drop"] += 1  # never answered
            return
        if roll < 0.007:
            self.faults["garble"] += 1
            text = json.dumps(reply)
            self._write(sock, text[: self.rng.randrange(1, len(text))].encode() + b"#\r\n")
            return
        if roll < 0.012:
            self.faults["duplicate"] += 1
            self._send(sock, reply)
        elif roll < 0.02:
            self.faults["stray"] += 1
            self._send(sock, IDLESS_ERROR)
        elif roll < 0.03:
            self.faults["event"] += 1
            stamp: Any = self.rng.choice([{"seconds": 1, "microseconds": 2}, "garbage", None])
            self._send(sock, {"event": "X", "data": {"n": roll}, "timestamp": stamp})
        elif roll < 0.04:
            self.faults["delay"] += 1
            time.sleep(self.rng.random() * 0.03)
        if roll > 0.9:
            self.faults["reorder"] += 1
            self.held.append((sock, reply))  # sent after a later reply
            return
        self._send(sock, reply)
        self._flush(sock)

    def _flush(self, sock: socket.socket) -> None:
        held, self.held = self.held, []
        self.rng.shuffle(held)
        for owner, reply in held:
            if owner is sock:
                self._send(sock, reply)

    def _idle(self, sock: socket.socket) -> None:
        self._flush(sock)


def test_random_faults_never_give_a_caller_another_commands_answer() -> None:
    seed = int(os.environ.get("QOMFS_RANDOM_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"QOMFS_RANDOM_SEED={seed}")
    wrong: list[str] = []
    outcomes = {"right": 0, "error": 0}
    longest = [0.0]
    lock = threading.Lock()

    def judge(arguments: dict[str, Any], result: Any, took: float) -> None:
        with lock:
            longest[0] = max(longest[0], took)
            if isinstance(result, QMPError):
                outcomes["error"] += 1
            elif result == expected(arguments):
                outcomes["right"] += 1
            else:
                wrong.append(f"{arguments} -> {result!r}")

    with (
        ChaosQMP(seed) as fake,
        QMPClient(fake.path, timeout=TIMEOUT, connect_timeout=CONNECT_TIMEOUT) as client,
    ):
        client.subscribe(lambda event: None)

        def sync_worker(t: int) -> None:
            for k in range(PER_THREAD):
                arguments = {"a": t, "b": k, "tag": f"s{t}-{k}"}
                started = time.monotonic()
                try:
                    result = client.execute("calc", arguments)
                except QMPError as err:
                    result = err
                judge(arguments, result, time.monotonic() - started)

        def async_worker() -> None:
            sent, k = 0, 0
            while sent < ASYNC_COMMANDS:
                calls = []
                for _ in range(MAX_BATCH):
                    k += 1
                    calls.append(("calc", {"a": -1, "b": k, "tag": f"a{k}"}))
                started = time.monotonic()

                def answered(
                    i: int, result: Any, calls: list[Any] = calls, started: float = started
                ) -> None:
                    judge(calls[i][1], result, time.monotonic() - started)

                if client.submit(calls, answered):
                    sent += len(calls)
                else:
                    time.sleep(0.002)
                    with contextlib.suppress(QMPError):
                        client.execute("calc", {"a": 0, "b": 0, "tag": "reconnect"})

        workers = [threading.Thread(target=sync_worker, args=(t,)) for t in range(THREADS)]
        workers.append(threading.Thread(target=async_worker))
        for w in workers:
            w.start()
        for w in workers:
            w.join(300)
        assert not any(w.is_alive() for w in workers), f"hung; seed {seed}"
        # Every async command is answered within its bound too.
        deadline = time.monotonic() + BOUND
        want = THREADS * PER_THREAD + ASYNC_COMMANDS
        while sum(outcomes.values()) < want and time.monotonic() < deadline:
            time.sleep(0.01)
        faults = dict(fake.faults)
    total = sum(outcomes.values())
    print(f"outcomes {outcomes}, faults {faults}, longest call {longest[0]:.2f} s")
    assert not wrong, f"seed {seed}: {len(wrong)} wrong answers, e.g. {wrong[:3]}"
    assert total >= want >= 10_000, f"seed {seed}: {total} of {want} answered"
    assert longest[0] <= BOUND, f"seed {seed}: a call took {longest[0]:.2f} s"
    assert outcomes["right"] > total * 0.8, f"seed {seed}: {outcomes}"
    assert all(faults.values()), f"seed {seed}: some faults never happened: {faults}"
