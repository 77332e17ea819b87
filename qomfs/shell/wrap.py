# PYTHON_ARGCOMPLETE_OK  (argcomplete: this command completes itself)
"""``qmp-shell-wrap``: start QEMU connected to a fresh qmp-shell, with no race.

The shell listens on a unix socket in a private temporary directory and
starts ``QEMU_BINARY QEMU_ARGS... -qmp unix:SOCK``; QEMU connects to it.
When the shell ends, QEMU is told to ``quit``, then signalled after a grace
period, and the socket and directory are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from qomfs.errors import ConnectError, QMPError
from qomfs.qmp import QMPClient, State
from qomfs.shell.main import (
    add_common_options,
    make_client,
    options_from,
    quiet_client_log,
    run_shell,
)

PROG = "qmp-shell-wrap"
#: After ``quit``, how long QEMU has to exit before SIGTERM, then SIGKILL.
QUIT_GRACE = 5.0
TERM_GRACE = 3.0
#: How much of QEMU's output is shown when it dies.
OUTPUT_TAIL = 20

EPILOG = """\
examples:
  qmp-shell-wrap qemu-system-x86_64 -S -display none -machine q35
  printf 'query-status\\n' |
      qmp-shell-wrap qemu-system-x86_64 -S -display none -nodefaults -machine none

QEMU's standard input is /dev/null and its output goes to a file that is shown
if QEMU exits on its own.  At the end of input QEMU is sent 'quit'.
"""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Start QEMU with its QMP monitor connected to qmp-shell (no socket race).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(parser)
    parser.add_argument("qemu", metavar="QEMU_BINARY", help="the QEMU to run")
    parser.add_argument(
        "qemu_args", nargs=argparse.REMAINDER, metavar="QEMU_ARGS", help="QEMU's arguments"
    )
    return parser


class Qemu:
    """The QEMU process qmp-shell-wrap runs, and its output file."""

    def __init__(self, argv: list[str], output: Path) -> None:
        self.argv = argv
        self.output = output
        self.proc: subprocess.Popen[bytes] | None = None
        self.reported = False  # its end was told to the user

    def start(self) -> None:
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group: Ctrl-C at the shell's prompt is for
                # the shell, not for QEMU.
                process_group=0,
                preexec_fn=_end_with_parent(),
            )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def report(self) -> str | None:
        """Why the connection cannot come back (QEMU's status and output), or None."""
        if self.proc is None:
            return None
        try:
            status = self.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            return None
        self.reported = True
        return describe_exit(status) + self.tail()

    def tail(self) -> str:
        try:
            lines = self.output.read_text(errors="replace").splitlines()[-OUTPUT_TAIL:]
        except OSError:
            return ""
        return "".join(f"\n  {line}" for line in lines if line.strip())

    def stop(self, client: QMPClient) -> None:
        """``quit``, then SIGTERM and SIGKILL after their grace periods."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if client.state is State.READY:
            with contextlib.suppress(QMPError):
                client.execute("quit", None, QUIT_GRACE)
        try:
            proc.wait(timeout=QUIT_GRACE)
            return
        except subprocess.TimeoutExpired:
            pass
        for sig, grace in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue


def _end_with_parent() -> Callable[[], None] | None:
    """For the child between fork and exec: SIGTERM when qmp-shell-wrap dies.

    A QEMU whose client-mode monitor loses its peer runs on; without this, a
    wrapper killed by SIGKILL would leave it behind for good.  The child
    runs only this closure, over objects made before the fork (a libc call
    through ctypes, no import, no lock), which keeps preexec_fn safe beside
    the client's threads.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()
    getppid = os.getppid
    exit_now = os._exit

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if getppid() != parent:  # the wrapper died before the line above
            exit_now(1)

    return in_child


_PR_SET_PDEATHSIG = 1


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"QEMU was killed by {name}"
    return f"QEMU exited with status {status}"


def _end_on(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _ended_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the shell through the clean-up path (QEMU stopped,
    socket removed) instead of killing it on the spot."""
    old = {s: signal.signal(s, _end_on) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def wait_for_qemu(client: QMPClient, qemu: Qemu, timeout: float) -> str | None:
    """Wait until QEMU has connected: None, or why it did not."""
    deadline = time.monotonic() + timeout
    while client.state is not State.READY:
        status = qemu.exited()
        if status is not None:
            return f"{describe_exit(status)} before it connected{qemu.tail()}"
        if time.monotonic() > deadline:
            return f"QEMU did not connect within {timeout:g} s{qemu.tail()}"
        time.sleep(0.02)
    return None


def wrap_main(argv: list[str] | None = None) -> int:
    quiet_client_log()
    parser = make_parser()
    from qomfs.completion import autocomplete  # a <TAB> in the shell: answer, exit

    autocomplete(parser)
    args = parser.parse_args(argv)
    options = options_from(args)
    tmpdir = Path(tempfile.mkdtemp(prefix="qmp-shell-wrap-"))  # mode 0700
    sock = tmpdir / "qmp.sock"
    qemu = Qemu([args.qemu, *args.qemu_args, "-qmp", f"unix:{sock}"], tmpdir / "qemu.out")
    client = make_client(str(sock), options, listen=True)
    try:
        with _ended_by_signals():
            try:
                client.connect()
                qemu.start()
            except (ConnectError, OSError) as err:
                print(f"{PROG}: {err}", file=sys.stderr)
                return 1
            why = wait_for_qemu(client, qemu, options.timeout)
            if why is not None:
                print(f"{PROG}: {why}", file=sys.stderr)
                return 1
            try:
                status = run_shell(client, options, qemu_gone=qemu.report)
            except KeyboardInterrupt:
                status = 130
            except BrokenPipeError:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                status = 1
            if qemu.exited() not in (None, 0) and not qemu.reported:
                # It died while the shell ran and no command noticed.
                print(f"{PROG}: {qemu.report()}", file=sys.stderr)
                status = status or 1
            return status
    finally:
        try:
            qemu.stop(client)
        finally:
            client.close()
            shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(wrap_main())
