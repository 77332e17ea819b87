# PYTHON_ARGCOMPLETE_OK  (argcomplete: this command completes itself)
"""``qmp-shell``: QEMU's interactive QMP shell on qomfs's thread-safe client.

Interactive on a terminal (prompt, readline, history, completion, events
above the prompt); on piped input it prints one JSON line per reply and
event, and its exit status says whether every command succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from qomfs import __version__
from qomfs.argtypes import MAX_TIMEOUT, wait_seconds
from qomfs.errors import CommandTimeout, ConnectError, ConnectionLost, ExecuteError, QMPError
from qomfs.qmp import Event, QMPClient, State, describe_address
from qomfs.shell.complete import DELIMS, Completer, parse_hmp_help, parse_hmp_info
from qomfs.shell.parse import LineParser, ParseError, Request, parse_arguments, split_words
from qomfs.shell.schema import Schema
from qomfs.shell.screen import QemuGone, Screen, readline_redraw

PROG = "qmp-shell"
HISTORY_FILE = ".qmp-shell_history"
HISTORY_LENGTH = 1024
#: ``--timeout 0`` means no limit; Python's waits overflow past about 1e6 s.
NO_LIMIT = MAX_TIMEOUT
#: How long completion waits for QEMU (a prompt must not hang on a busy VM).
COMPLETION_TIMEOUT = 2.0
#: How long a qom-list answer serves completion before it is asked again.
COMPLETION_TTL = 2.0
#: How often an interactive shell looks whether its connection is gone.
WATCH_INTERVAL = 0.2

DESCRIPTION = """\
QEMU's QMP shell.  Type a command and its arguments:

  qom-get path=/machine property=type
  blockdev-add driver=raw node-name=d0 file.driver=null-co file.size=4096
  {"execute": "query-status"}                a raw JSON request, sent as it is
  transaction(                               one transaction, one action a line
  block-dirty-bitmap-add node=d0 name=b0
  )

A value that parses as JSON is JSON (4096, true, null, [1, 2], {"a": 1}), else a
string; quote it to force a string: value='"1.5"'.  Dotted keys nest.
"""
EPILOG = """\
On a terminal: TAB completes commands, argument names, enum values, QOM paths
(path=/ma<TAB>) and property names; 'help' lists commands, 'help COMMAND' shows
its arguments; history is kept in ~/.qmp-shell_history; events show above the
prompt.  Without a terminal: no banner, no prompt, one JSON line per reply and
per event (events have an "event" key); the exit status is 1 if any command
failed or did not parse.

examples:
  qmp-shell /tmp/vm.sock
  qmp-shell -p localhost:4444
  echo query-status | QMP_SOCKET=/tmp/vm.sock qmp-shell
  qmp-shell -H /tmp/vm.sock <<< 'info status'

A QMP monitor serves one client at a time: give the shell a monitor of its own, e.g.
  qemu-system-x86_64 ... -qmp unix:/tmp/vm.sock,server=on,wait=off
"""


@dataclass
class Options:
    """How the shell talks and prints (the common flags of both commands)."""

    hmp: bool = False
    negotiate: bool = True
    verbose: bool = False
    pretty: bool = False
    logfile: str | None = None
    timeout: float = 30.0


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """The flags that qmp-shell and qmp-shell-wrap share (upstream's)."""
    parser.add_argument("-H", "--hmp", action="store_true", help="HMP mode: human monitor commands")
    parser.add_argument(
        "-N",
        "--skip-negotiation",
        action="store_true",
        help="do not negotiate capabilities: type qmp_capabilities yourself",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="echo each QMP message sent")
    parser.add_argument("-p", "--pretty", action="store_true", help="indent JSON replies")
    parser.add_argument(
        "-l",
        "--logfile",
        metavar="LOGFILE",
        help="append every command and reply to LOGFILE as JSON lines",
    )
    parser.add_argument(
        "--timeout",
        type=wait_seconds,
        default=30.0,
        metavar="S",
        help="seconds to wait for a reply, and to connect (default 30; 0: no limit)",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        hmp=args.hmp,
        negotiate=not args.skip_negotiation,
        verbose=args.verbose,
        pretty=args.pretty,
        logfile=args.logfile,
        timeout=args.timeout,
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_options(parser)
    parser.add_argument(
        "socket",
        nargs="?",
        metavar="SOCKET",
        help="QMP socket: a unix socket path or HOST:PORT (default: $QMP_SOCKET)",
    )
    return parser


# --- the shell ----------------------------------------------------------------------


def format_json(value: Any, pretty: bool) -> str:
    return json.dumps(value, indent=4 if pretty else None)


def event_message(event: Event) -> dict[str, Any]:
    """The event as QEMU sent it: ``event``, ``data`` (left out when empty, as
    QEMU leaves it out of events that have none) and ``timestamp``."""
    seconds = math.floor(event.timestamp)
    micro = round((event.timestamp - seconds) * 1e6)
    if micro >= 1_000_000:
        seconds, micro = seconds + 1, micro - 1_000_000
    message: dict[str, Any] = {"event": event.name}
    if event.data:
        message["data"] = event.data
    message["timestamp"] = {"seconds": seconds, "microseconds": micro}
    return message


def event_line(event: Event) -> str:
    """How an event shows above the prompt: its time, name and data."""
    when = time.strftime("%H:%M:%S", time.localtime(event.timestamp))
    frac = f"{event.timestamp % 1:.6f}"[1:]
    data = f" {json.dumps(event.data)}" if event.data else ""
    return f"[{when}{frac}] {event.name}{data}"


class LiveSource:
    """Completion's view of QEMU, through the shell's connection (main thread)."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self._lists: dict[str, tuple[float, list[Mapping[str, Any]]]] = {}
        self._hmp: list[str] | None = None
        self._info: list[str] | None = None

    def command_names(self) -> Sequence[str]:
        names = self.shell.client.commands
        if names:
            return sorted(names)
        schema = self.shell.schema()
        return schema.commands if schema else []

    def schema(self) -> Schema | None:
        return self.shell.schema()

    def qom_list(self, path: str) -> Sequence[Mapping[str, Any]]:
        now = time.monotonic()
        hit = self._lists.get(path)
        if hit and now - hit[0] < COMPLETION_TTL:
            return hit[1]
        try:
            reply = self.shell.client.execute("qom-list", {"path": path}, COMPLETION_TIMEOUT)
        except QMPError:
            return []
        entries: list[Mapping[str, Any]] = []
        if isinstance(reply, list):
            entries = [e for e in reply if isinstance(e, dict)]
        self._lists[path] = (now, entries)
        return entries

    def _hmp_text(self, line: str) -> str:
        try:
            text = self.shell.client.execute(
                "human-monitor-command", {"command-line": line}, COMPLETION_TIMEOUT
            )
        except QMPError:
            return ""
        return text if isinstance(text, str) else ""

    def hmp_commands(self) -> Sequence[str]:
        if self._hmp is None:
            self._hmp = parse_hmp_help(self._hmp_text("help"))
        return self._hmp

    def hmp_info_commands(self) -> Sequence[str]:
        if self._info is None:
            self._info = parse_hmp_info(self._hmp_text("info"))
        return self._info


class Shell:
    """One shell session on a connected client.

    :meth:`run` reads lines until end of input and returns the exit status.
    ``qemu_gone()``, when given (qmp-shell-wrap), says why the connection
    cannot come back (QEMU exited), or None while QEMU runs.
    """

    def __init__(
        self,
        client: QMPClient,
        options: Options,
        *,
        stdin: TextIO,
        screen: Screen,
        qemu_gone: Callable[[], str | None] | None = None,
    ) -> None:
        self.client = client
        self.options = options
        self.stdin = stdin
        self.screen = screen
        self.interactive = screen.interactive
        self.qemu_gone = qemu_gone
        self.parser = LineParser(strict=not self.interactive)
        self.failures = 0
        self.cpu_index: int | None = None
        self._schema: Schema | None = None
        self._schema_failed = False
        self._log: TextIO | None = None
        self._log_lock = threading.Lock()
        self._lineno = 0
        self._ended = False
        client.subscribe(self._on_event)
        client.on_reconnect(self._forget_schema)

    # --- running ---

    def run(self) -> int:
        """Read and run lines until end of input; the exit status."""
        if self.options.logfile:
            try:
                self._log = open(self.options.logfile, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as err:
                self.screen.error(f"cannot open the log file: {err}")
                return 1
        try:
            if self.interactive:
                return self._interactive()
            return self._batch()
        except QemuGone as gone:
            self.screen.error(str(gone))
            return 1
        finally:
            self._ended = True  # events after the end (quit's SHUTDOWN) are not shown
            if self._log is not None:
                with self._log_lock:
                    self._log.close()
                    self._log = None

    def _batch(self) -> int:
        while True:
            line = self.stdin.readline()
            if not line:
                break
            self._lineno += 1
            self.handle(line)
        if self.parser.in_transaction:
            self._complain("input ended inside a transaction: it was not sent")
        return 1 if self.failures else 0

    def _interactive(self) -> int:
        import readline

        history = os.path.join(os.path.expanduser("~"), HISTORY_FILE)
        completer = Completer(
            LiveSource(self), self.options.hmp, lambda: self.parser.in_transaction
        )
        readline.set_history_length(HISTORY_LENGTH)
        readline.set_completer(completer.readline)
        readline.set_completer_delims(DELIMS)
        readline.parse_and_bind("tab: complete")
        readline.set_pre_input_hook(self.screen.prompt_shown)
        with contextlib.suppress(OSError):
            readline.read_history_file(history)
        self._banner()
        stop = threading.Event()
        watcher = threading.Thread(
            target=self._watch, args=(stop,), name="qmp-shell-watch", daemon=True
        )
        watcher.start()
        try:
            with self.screen.prompting(readline_redraw()):
                while True:
                    prompt = "TRANS> " if self.parser.in_transaction else "(QEMU) "
                    try:
                        line = input(prompt)
                    except QemuGone:
                        self.screen.write("\n")
                        raise
                    except EOFError:
                        self.screen.stop_prompting()
                        self.screen.write("\n")
                        return 0
                    except KeyboardInterrupt:
                        self.screen.stop_prompting()
                        self.screen.write(
                            "^C\n"
                            if not self.parser.in_transaction
                            else "^C (transaction dropped)\n"
                        )
                        self.parser.reset()
                        continue
                    self.screen.stop_prompting()
                    try:
                        self.handle(line)
                    except KeyboardInterrupt:
                        self.screen.error("interrupted (a late reply is dropped)")
        finally:
            stop.set()
            readline.set_pre_input_hook(None)
            try:
                readline.write_history_file(history)
            except OSError as err:
                self.screen.error(f"cannot save the history in {history}: {err}")

    def _banner(self) -> None:
        what = "HMP" if self.options.hmp else "QMP low-level"
        lines = [f"Welcome to the {what} shell!"]
        if self.client.greeting:
            lines.append(f"Connected to QEMU {self.client.version}")
        else:
            lines.append(f"Connected to {describe_address(self.client.address)}")
        lines.append("TAB completes; 'help' lists commands; Ctrl-D quits.\n")
        self.screen.write("\n".join(lines) + "\n")

    def _watch(self, stop: threading.Event) -> None:
        """Say at once when QEMU goes away (interactive)."""
        state = self.client.state
        while not stop.wait(WATCH_INTERVAL):
            now = self.client.state
            if now is State.LOST and state is State.READY:
                gone = self.qemu_gone() if self.qemu_gone else None
                if gone is not None:
                    self.screen.fatal(gone)
                    return
                self.screen.show(f"{PROG}: QEMU closed the connection; the next command reconnects")
            state = now

    # --- one line ---

    def handle(self, line: str) -> None:
        """Run one input line; failures are counted and reported, never raised
        (except :class:`QemuGone`)."""
        fatal = self.screen.take_fatal()
        if fatal is not None:
            raise QemuGone(fatal)
        if self.options.hmp:
            self._hmp(line)
            return
        stripped = line.strip()
        if not self.parser.in_transaction and (stripped == "help" or stripped.startswith("help ")):
            self._help(stripped)
            return
        try:
            request = self.parser.feed(line)
        except ParseError as err:
            self._complain(str(err))
            return
        if request is not None:
            self._send(request)

    def _complain(self, why: str) -> None:
        """A failed line: one line on stderr (with its number, in a script)."""
        self.failures += 1
        where = f"line {self._lineno}: " if not self.interactive else ""
        self.screen.error(f"{where}{why}")

    def _send(self, request: Request) -> None:
        if self.options.verbose:
            self.screen.write(format_json(request.message, self.options.pretty) + "\n")
        reply = self.request(request.message)
        if reply is None:
            return
        self.screen.write(format_json(reply, self.options.pretty) + "\n")
        if "error" in reply:
            self.failures += 1
        elif request.command == "qmp_capabilities":
            self._forget_schema()  # -N: the schema can be asked for now

    def request(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Send ``message``; its reply, logged, or None (a failure, reported)."""
        was_lost = self.client.state is State.LOST
        try:
            reply = self.client.request(message, timeout=self.options.timeout)
        except ConnectionLost as err:
            self._connection_lost(err, was_lost)
            return None
        except CommandTimeout as err:
            self._complain(str(err))
            return None
        except ExecuteError as err:  # refused before sending
            reply = {"error": {"class": err.error_class, "desc": err.desc}}
        self._log_line({**message, **reply})
        return reply

    def _connection_lost(self, err: ConnectionLost, was_lost: bool) -> None:
        gone = self.qemu_gone() if self.qemu_gone else None
        if gone is not None:
            raise QemuGone(gone)
        if was_lost or not self.client.reconnect:
            raise QemuGone(f"QEMU is gone and does not come back: {err}")
        self._complain(f"QEMU is gone: {err} (the next command reconnects)")

    def _log_line(self, record: dict[str, Any]) -> None:
        with self._log_lock:
            if self._log is not None:
                self._log.write(json.dumps(record) + "\n")
                self._log.flush()

    def _on_event(self, event: Event) -> None:
        if self._ended:
            return
        message = event_message(event)
        self._log_line(message)
        if self.interactive:
            self.screen.show(event_line(event))
        else:
            self.screen.show(format_json(message, self.options.pretty))

    # --- schema and help ---

    def schema(self) -> Schema | None:
        """QEMU's schema, asked for once (again after a reconnection)."""
        if self._schema is None and not self._schema_failed:
            try:
                self._schema = Schema.fetch(self.client.execute)
            except (QMPError, ValueError):
                self._schema_failed = True
        return self._schema

    def _forget_schema(self) -> None:
        self._schema, self._schema_failed = None, False

    def _help(self, line: str) -> None:
        try:
            words = split_words(line)[1:]
        except ParseError as err:
            self._complain(str(err))
            return
        schema = self.schema()
        if schema is None:
            self._complain("help: QEMU did not answer query-qmp-schema")
            return
        if not words:
            self.screen.write(_columns(schema.commands) + "\n")
            return
        try:
            given = parse_arguments(words[1:])
            text = schema.help(words[0], given)
        except ParseError as err:
            self._complain(f"help: {err}")
            return
        except KeyError:
            self._complain(f"help: QEMU has no command named {words[0]!r}")
            return
        self.screen.write(text + "\n")

    # --- HMP ---

    def _hmp(self, line: str) -> None:
        text = line.strip()
        if not text:
            return
        words = text.split()
        if words[0] == "cpu" and len(words) == 2:
            self._hmp_cpu(words[1])
            return
        arguments: dict[str, Any] = {"command-line": text}
        if self.cpu_index is not None:
            arguments["cpu-index"] = self.cpu_index
        message = {"execute": "human-monitor-command", "arguments": arguments}
        if self.options.verbose:
            self.screen.write(format_json(message, self.options.pretty) + "\n")
        reply = self.request(message)
        if reply is None:
            return
        if "error" in reply:
            self.failures += 1
            error = reply["error"]
            self.screen.write(f"{error.get('class')}: {error.get('desc')}\n")
            return
        out = str(reply.get("return", "")).replace("\r\n", "\n")
        if out.startswith("unknown command:"):
            self.failures += 1
        self.screen.write(out)

    def _hmp_cpu(self, arg: str) -> None:
        """``cpu N`` picks the CPU later commands act on (HMP keeps none per client)."""
        try:
            index = int(arg)
        except ValueError:
            self._complain("cpu takes a CPU index")
            return
        probe = {
            "execute": "human-monitor-command",
            "arguments": {"command-line": "info version", "cpu-index": index},
        }
        reply = self.request(probe)
        if reply is None:
            return
        if "error" in reply:
            self._complain(f"no CPU {index}: {reply['error'].get('desc')}")
            return
        self.cpu_index = index


def _columns(names: Sequence[str], width: int = 0) -> str:
    """Names in columns across the terminal, as ls prints them."""
    if not names:
        return ""
    import shutil

    width = width or shutil.get_terminal_size((80, 24)).columns
    cell = max(len(n) for n in names) + 2
    per_row = max(1, width // cell)
    rows = -(-len(names) // per_row)
    lines = []
    for r in range(rows):
        row = [names[c * rows + r] for c in range(per_row) if c * rows + r < len(names)]
        lines.append("".join(n.ljust(cell) for n in row).rstrip())
    return "\n".join(lines)


# --- entry point ----------------------------------------------------------------------


def make_client(address: str, options: Options, *, listen: bool = False) -> QMPClient:
    """The client the shell stands on: reconnects unless it listens."""
    return QMPClient(
        address,
        timeout=options.timeout,
        connect_timeout=min(options.timeout, 10.0),
        reconnect=not listen,
        listen=listen,
        negotiate=options.negotiate,
    )


def run_shell(
    client: QMPClient,
    options: Options,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    interactive: bool | None = None,
    qemu_gone: Callable[[], str | None] | None = None,
) -> int:
    """Run a shell on a connected ``client``; its exit status."""
    stdin = stdin or sys.stdin
    if interactive is None:
        # readline edits only when both ends are a terminal (as input() decides)
        interactive = stdin is sys.stdin and stdin.isatty() and sys.stdout.isatty() and not stdout
    screen = Screen(stdout or sys.stdout, stderr or sys.stderr, interactive, PROG)
    shell = Shell(client, options, stdin=stdin, screen=screen, qemu_gone=qemu_gone)
    return shell.run()


def quiet_client_log() -> None:
    """The shell says itself what the client would log (losses, reconnections)."""
    logging.getLogger("qomfs").addHandler(logging.NullHandler())


def main(argv: list[str] | None = None) -> int:
    quiet_client_log()
    parser = make_parser()
    from qomfs.completion import autocomplete  # a <TAB> in the shell: answer, exit

    autocomplete(parser)
    args = parser.parse_args(argv)
    address = args.socket or os.environ.get("QMP_SOCKET")
    if not address:
        parser.error("no QMP socket: give SOCKET or set QMP_SOCKET")
    options = options_from(args)
    client = make_client(address, options)
    try:
        client.connect()
    except ConnectError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    try:
        return run_shell(client, options)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (| head): no traceback, and none at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        client.close()
