# PYTHON_ARGCOMPLETE_OK  (argcomplete: this command completes itself)
"""``qmp``: one QMP command per call, its arguments typed from QEMU's schema and its
reply printed one leaf per line (or as JSON), for scripts; ``qmp NAME`` runs the
program ``qmp-NAME`` when QEMU has no command of that name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from qomfs import __version__
from qomfs.argtypes import wait_seconds
from qomfs.errors import ConnectError, ExecuteError, QMPError
from qomfs.qmp import Event, QMPClient
from qomfs.shell.main import event_message, format_json, quiet_client_log
from qomfs.shell.parse import ParseError, parse_arguments
from qomfs.shell.schema import Schema, typed_arguments

PROG = "qmp"
DEFAULT_TIMEOUT = 5.0
#: Exit statuses: QEMU said no, could not be reached, or --wait timed out; usage.
FAILED, USAGE = 1, 2

USAGE_TEXT = (
    "%(prog)s [-s ADDR | --path=ADDR] [--json | -p] [--timeout S] [--wait EVENT[,EVENT...]] "
    "COMMAND [ARG ...]"
)

DESCRIPTION = """\
Run one QMP command on a running QEMU and print its reply, one leaf per line:

  $ qmp -s /tmp/vm.sock query-status
  status: prelaunch
  running: false

ARG is --key=value or key=value; --key alone is true; dotted keys nest
(file.driver=null-co).  Values are typed from QEMU's query-qmp-schema: an int
or number argument gets a number, a bool true or false, a str stays a string,
and an argument of type any (qom-set's value) takes JSON when it parses, else
a string.  'qmp help' lists QEMU's commands, 'qmp help COMMAND' shows one.
"""

EPILOG = """\
output:
  The return value flattened, one line per leaf: key.sub[0].leaf: value, with
  item[N] for the elements of a list at the top.  Strings are printed as they
  are; numbers, booleans and null as JSON.  An empty return prints nothing.

commands:
  qmp help              list QEMU's commands
  qmp help COMMAND      COMMAND's arguments, their types, which are optional
  qmp COMMAND --help    the same
  qmp NAME [ARGS]       NAME is no QMP command: run qmp-NAME ARGS from PATH with
                        $QMP_SOCKET set (qmp shell runs qmp-shell)

exit status:
  0 success; 1 QEMU returned an error, could not be reached, or --wait timed
  out; 2 usage error (also a value that does not fit its argument's type).

examples:
  qmp -s /tmp/vm.sock qom-set --path=/machine --property=graphics --value=false
  qmp blockdev-add driver=null-co node-name=n1 size=4096
  qmp query-cpus-fast | grep cpu-index
  qmp --wait RESUME cont
  qmp --wait DEVICE_DELETED device_del id=nic1
  qmp --json query-block | jq .

More examples: man qmp.
"""


class UsageError(Exception):
    """A command line that cannot be run (exit status 2)."""


def _event_names(text: str) -> frozenset[str]:
    names = frozenset(n.strip().upper() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("--wait needs an event name, e.g. --wait RESUME")
    return names


def make_parser() -> argparse.ArgumentParser:
    """``qmp``'s own options (those before COMMAND; the rest is COMMAND's)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=USAGE_TEXT,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-s",
        "--path",
        dest="address",
        metavar="ADDR",
        help="QMP socket: a unix socket path or HOST:PORT (default: $QMP_SOCKET, then $QMP_PATH)",
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the return value as one JSON line")
    out.add_argument("-p", "--pretty", action="store_true", help="print it as indented JSON")
    parser.add_argument(
        "--timeout",
        type=wait_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds to connect, to wait for the reply and for --wait's event "
        f"(default {DEFAULT_TIMEOUT:g}; 0: no limit)",
    )
    parser.add_argument(
        "--wait",
        type=_event_names,
        metavar="EVENT[,EVENT...]",
        help="after the command succeeds, wait for the first of these events and print it; "
        "one that arrives with the reply counts",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="a QMP command, or help")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, metavar="ARG", help="--key=value, key=value or --key"
    )
    return parser


# --- arguments ----------------------------------------------------------------------


def argument_words(args: Sequence[str]) -> tuple[list[str], bool]:
    """``--key=value``, ``key=value`` and ``--key`` -> qmp-shell's ``key=value`` words,
    and whether ``--help`` (or ``-h``) was among them.

    Raises :class:`UsageError` for anything else.
    """
    words: list[str] = []
    wants_help = False
    for arg in args:
        if arg in ("--help", "-h"):
            wants_help = True
        elif arg.startswith("--") and len(arg) > 2:
            body = arg[2:]
            words.append(body if "=" in body else body + "=true")
        elif "=" in arg and not arg.startswith("-"):
            words.append(arg)
        else:
            raise UsageError(f"expected --key=value, key=value or --key, got {arg!r}")
    return words, wants_help


# --- output -------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(``key.sub[0].leaf``, leaf) for each leaf of ``value``; ``item[N]`` names
    the elements of a list at the top.  An empty object or list is a leaf; an
    empty one at the top yields nothing."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from flatten(item, f"{prefix or 'item'}[{index}]")
    elif prefix or value not in ({}, []):
        yield prefix, value


def leaf_text(value: Any) -> str:
    """A string as it is; anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def render(value: Any, *, as_json: bool, pretty: bool) -> str:
    """What the command prints for ``value`` (with its final newline, or "")."""
    if as_json or pretty:
        return format_json(value, pretty) + "\n"
    lines = []
    for key, leaf in flatten(value):
        text = leaf_text(leaf)
        if not key:  # a string return: HMP's text ends its lines with \r\n
            text = text.replace("\r\n", "\n").removesuffix("\n")
        lines.append(f"{key}: {text}" if key else text)
    return "".join(line + "\n" for line in lines)


# --- events -------------------------------------------------------------------------


class EventWaiter:
    """Keeps the first event of the wanted names that comes once armed.

    Subscribed before the command is sent and armed just before it, so an
    event QEMU sends before or right after the reply is not missed.
    """

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.armed = False
        self.event: Event | None = None
        self._got = threading.Event()

    def __call__(self, event: Event) -> None:  # on the client's reader thread
        if self.armed and self.event is None and event.name in self.names:
            self.event = event
            self._got.set()

    def wait(self, timeout: float) -> Event | None:
        self._got.wait(timeout)
        return self.event


# --- git-style dispatch -------------------------------------------------------------


def external_program(name: str) -> str | None:
    """The path of ``qmp-NAME`` on PATH, or None."""
    if not name or "/" in name or name.startswith("-"):
        return None
    return shutil.which(f"{PROG}-{name}")


def run_external(program: str, args: Sequence[str], address: str) -> int:
    """Run ``program args`` with ``$QMP_SOCKET`` (and the original's ``$QMP_PATH``)
    set to ``address``; its exit status (128+N for a signal, as a shell says)."""
    env = dict(os.environ, QMP_SOCKET=address, QMP_PATH=address)
    try:
        proc = subprocess.Popen([program, *args], env=env)
    except OSError as err:
        raise UsageError(f"cannot run {program}: {err.strerror or err}") from None
    # Ctrl-C is for the program (qmp shell): this process only waits for it.
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        status = proc.wait()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old)
    return status if status >= 0 else 128 - status


# --- the command --------------------------------------------------------------------


class Call:
    """One call of ``qmp``: one connection, the schema once, one command."""

    def __init__(self, args: argparse.Namespace, address: str, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.address = address
        self.out = out
        self.err = err
        self.waiter = EventWaiter(args.wait) if args.wait else None
        self.client = QMPClient(
            address,
            timeout=args.timeout,
            connect_timeout=min(args.timeout, 10.0),
            reconnect=False,
            negotiate=False,  # qmp_capabilities here: no query-commands, the schema says it all
        )

    def run(self) -> int:
        command: str = self.args.command
        if self.waiter is not None:
            self.client.subscribe(self.waiter)  # before anything is sent
        try:
            self.client.connect()
            self.client.execute("qmp_capabilities")
            try:
                schema = Schema.fetch(self.client.execute)
            except ValueError as why:
                raise QMPError(f"query-qmp-schema: {why}") from None
            if command == "help":
                return self.help(schema, self.args.args)
            if not schema.has_command(command):
                self.client.close()  # a monitor serves one client: free it for qmp-NAME
                return self.dispatch(command)
            words, wants_help = argument_words(self.args.args)
            if wants_help:
                return self.help(schema, [command, *words])
            if self.waiter is not None:
                unknown = sorted(self.waiter.names - set(schema.events))
                if unknown and schema.events:
                    raise UsageError(f"QEMU has no event named {', '.join(unknown)}")
            try:
                arguments = typed_arguments(schema, command, words)
            except ParseError as why:
                raise UsageError(f"{command}: {why}") from None
            return self.execute(command, arguments)
        finally:
            self.client.close()

    def execute(self, command: str, arguments: dict[str, Any]) -> int:
        if self.waiter is not None:
            self.waiter.armed = True
        result = self.client.execute(command, arguments or None)
        self.out.write(render(result, as_json=self.args.json, pretty=self.args.pretty))
        self.out.flush()
        if self.waiter is None:
            return 0
        timeout = self.args.timeout
        event = self.waiter.wait(timeout)
        if event is None:
            names = ",".join(sorted(self.waiter.names))
            self.err.write(f"{PROG}: no {names} event within {timeout:g} s\n")
            return FAILED
        self.out.write(
            render(event_message(event), as_json=self.args.json, pretty=self.args.pretty)
        )
        return 0

    def help(self, schema: Schema, words: Sequence[str]) -> int:
        if not words:
            self.out.write("".join(name + "\n" for name in schema.commands))
            return 0
        name = words[0]
        if not schema.has_command(name):
            program = external_program(name)
            if program is not None:
                self.client.close()
                return run_external(program, ["--help"], self.address)
            raise UsageError(f"QEMU has no command named {name!r}")
        try:
            given = parse_arguments([w.removeprefix("--") for w in words[1:]])
        except ParseError as why:
            raise UsageError(f"help: {why}") from None
        self.out.write(schema.help(name, given) + "\n")
        return 0

    def dispatch(self, name: str) -> int:
        program = external_program(name)
        if program is None:
            raise UsageError(f"no QMP command or {PROG}-COMMAND program named {name}")
        return run_external(program, self.args.args, self.address)


def main(argv: list[str] | None = None) -> int:
    quiet_client_log()
    parser = make_parser()
    from qomfs.completion import autocomplete  # a <TAB> in the shell: answer, exit

    autocomplete(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as leave:  # --help, --version, or a usage error (2)
        return leave.code if isinstance(leave.code, int) else USAGE
    err = sys.stderr
    if not args.command:
        parser.print_usage(err)
        err.write(f"{PROG}: no COMMAND given ('{PROG} help' lists them)\n")
        return USAGE
    address = args.address or os.environ.get("QMP_SOCKET") or os.environ.get("QMP_PATH")
    if not address:
        err.write(f"{PROG}: no QMP socket: give -s ADDR or set $QMP_SOCKET\n")
        return USAGE
    call = Call(args, address, sys.stdout, err)
    try:
        return call.run()
    except UsageError as why:
        err.write(f"{PROG}: {why}\n")
        return USAGE
    except ExecuteError as why:
        err.write(f"{PROG}: {why.error_class}: {why.desc}\n")
        return FAILED
    except ConnectError as why:
        err.write(f"{PROG}: cannot reach QEMU: {why}\n")
        return FAILED
    except QMPError as why:
        err.write(f"{PROG}: {why}\n")
        return FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (| head): no traceback, and none at exit's flush
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILED


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["argument_words", "flatten", "main", "make_parser", "render"]
