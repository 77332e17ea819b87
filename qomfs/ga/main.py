# PYTHON_ARGCOMPLETE_OK  (argcomplete: this command completes itself)
"""The ``qemu-ga-client`` command line: run guest agent commands from the host.

Upstream's commands with their output (``cat`` writes the file's bytes,
``fsfreeze`` prints "thawed" or "2 filesystems frozen"), more commands, and
``--json`` for every one.  Every failure is one line on stderr and a non-zero
exit status.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

from qomfs.argtypes import silence_stdout
from qomfs.ga.client import (
    DEFAULT_TIMEOUT,
    AgentClient,
    AgentError,
    describe,
)

PROG = "qemu-ga-client"
ENV_ADDRESS = "QGA_CLIENT_ADDRESS"
#: Bytes asked for per guest-file-read (the agent caps a read at 48 MiB).
READ_CHUNK = 1 << 20
#: How long ``exec`` lets the program run unless told otherwise.
EXEC_TIMEOUT = 60.0
#: Exit status of ``exec`` when the program outlives its time (as timeout(1)).
EXEC_TIMED_OUT = 124

EPILOG = """\
commands:
  ping [TIMEOUT]              is the agent answering? (no output; status 0 if so)
  info                        agent version and its enabled/disabled commands
  cat FILE                    the guest file's bytes, unchanged, to stdout
  fsfreeze status|freeze|thaw freeze state, or freeze/thaw every filesystem (60 s)
  fstrim [MINIMUM]            discard unused blocks of mounted filesystems
  ifconfig                    the guest's network interfaces
  halt | powerdown | reboot | shutdown   (shutdown = powerdown)
  suspend disk|ram|hybrid
  osinfo | hostname | users | fsinfo | time
  exec [--timeout S] -- PROG [ARGS...]   run PROG in the guest; its output and exit status
  call COMMAND [KEY=VALUE...] | call '{"execute": ..., "arguments": ...}'
                              any agent command; VALUE is JSON if it parses, else a string

The agent's channel in QEMU:
  -chardev socket,path=/tmp/qga.sock,server=on,wait=off,id=qga0
  -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
"""


class UsageError(Exception):
    """A bad argument to a command (reported with the command's usage)."""


Command = Callable[[AgentClient, list[str], bool, TextIO], int]


def _usage(text: str) -> NoReturn:
    raise UsageError(text)


def _no_args(args: list[str], name: str) -> None:
    if args:
        _usage(f"{name} takes no arguments (got {' '.join(args)!r})")


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=False) + "\n")


def _query(name: str, command: str, show: Callable[[Any, TextIO], None]) -> Command:
    """A command that takes no arguments and prints one agent reply: as
    JSON with ``--json``, else as ``show`` writes it."""

    def run(client: AgentClient, args: list[str], as_json: bool, out: TextIO) -> int:
        _no_args(args, name)
        ret = client.execute(command)
        if as_json:
            _print_json(ret, out)
        else:
            show(ret, out)
        return 0

    return run


# --- upstream's commands ----------------------------------------------------------


def cmd_ping(client: AgentClient, args: list[str], as_json: bool, out: TextIO) -> int:
    if len(args) > 1:
        _usage("usage: ping [TIMEOUT]")
    if args:
        client.timeout = _seconds(args[0], "ping's TIMEOUT")
    value = client.execute("guest-ping")
    if as_json:
        _print_json(value, out)
    return 0


def show_info(info: Any, out: TextIO) -> None:
    commands = info.get("supported_commands", [])
    enabled = [c["name"] for c in commands if c.get("enabled")]
    disabled = [c["name"] for c in commands if not c.get("enabled")]
    out.write(f"version: {info.get('version', '?')}\n")
    out.write("supported_commands:\n")
    out.write("\tenabled: " + ", ".join(enabled) + "\n")
    out.write("\tdisabled: " + ", ".join(disabled) + "\n")


def read_file(client: AgentClient, path: str) -> bytes:
    """The whole of a guest file, through guest-file-open/read/close."""
    handle = client.execute("guest-file-open", {"path": path, "mode": "r"})
    chunks: list[bytes] = []
    try:
        while True:
            ret = client.execute("guest-file-read", {"handle": handle, "count": READ_CHUNK})
            chunks.append(base64.b64decode(ret.get("buf-b64", "")))
            if ret.get("eof") or not ret.get("count"):
                break
    except BaseException:
        # Close the handle, but report the read's error, not the close's.
        with contextlib.suppress(AgentError):
            client.execute("guest-file-close", {"handle": handle})
        raise
    client.execute("guest-file-close", {"handle": handle})
    return b"".join(chunks)


def cmd_cat(client: AgentClient, args: list[str], as_json: bool, out: TextIO) -> int:
    if len(args) != 1:
        _usage("usage: cat FILE")
    data = read_file(client, args[0])
    if as_json:
        b64 = base64.b64encode(data).decode()
        _print_json({"path": args[0], "count": len(data), "buf-b64": b64}, out)
        return 0
    out.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def cmd_fsfreeze(client: AgentClient, args: list[str], as_json: bool, out: TextIO) -> int:
    if len(args) != 1 or args[0] not in ("status", "freeze", "thaw"):
        _usage("usage: fsfreeze status|freeze|thaw")
    ret = client.execute(f"guest-fsfreeze-{args[0]}")
    if as_json:
        _print_json(ret, out)
    elif args[0] == "status":
        out.write(f"{ret}\n")
    else:
        verb = "frozen" if args[0] == "freeze" else "thawed"
        out.write(f"{ret:d} filesystems {verb}\n")
    return 0


def cmd_fstrim(client: AgentClient, args: list[str], as_json: bool, out: TextIO) -> int:
    if len(args) > 1:
        _usage("usage: fstrim [MINIMUM]")
    try:
        minimum = int(args[0]) if args else 0
    except ValueError:
        _usage(f"fstrim: MINIMUM must be a number of bytes, not {args[0]!r}")
    ret = client.execute("guest-fstrim", {"minimum": minimum})
    if as_json:
        _print_json(ret, out)
        return 0
    status = 0
    for entry in ret.get("paths", []):
        if "error" in entry:
            out.write(f"{entry.get('path')}: error: {entry['error']}\n")
            status = 1
        else:
            out.write(f"{entry.get('path')}: {entry.get('trimmed', 0)} bytes trimmed\n")
    return status


def _netmask(prefix: int) -> str:
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0
    return ".".join(str((mask >> shift) & 0xFF) for shift in (24, 16, 8, 0))


def show_ifconfig(nifs: Any, out: TextIO) -> None:
    for nif in nifs:
        out.write(f"{nif.get('name')}:\n")
        for ip in nif.get("ip-addresses", []):
            if ip.get("ip-address-type") == "ipv4":
                out.write(f"\tinet {ip['ip-address']}  netmask {_netmask(int(ip['prefix']))}\n")
            elif ip.get("ip-address-type") == "ipv6":
                out.write(f"\tinet6 {ip['ip-address']}  prefixlen {ip['prefix']}\n")
        hwaddr = nif.get("hardware-address")
        if hwaddr and hwaddr != "00:00:00:00:00:00":
            out.write(f"\tether {hwaddr}\n")


def _shutdown(mode: str) -> Command:
    def run(client: AgentClient, args: list[str], as_json: bool, out: TextIO) -> int:
        _no_args(args, mode)
        ret = client.execute("guest-shutdown", {"mode": mode})
        if as_json:
            _print_json(ret, out)
        return 0

    return run


def cmd_suspend(client: AgentClient, args: list[str], as_json: bool, out: TextIO) -> int:
    if len(args) != 1 or args[0] not in ("disk", "ram", "hybrid"):
        _usage("usage: suspend disk|ram|hybrid")
    ret = client.execute(f"guest-suspend-{args[0]}")
    if as_json:
        _print_json(ret, out)
    return 0


# --- beyond upstream ------------------------------------------------------------


def show_osinfo(info: Any, out: TextIO) -> None:
    for key, value in info.items():
        out.write(f"{key}: {value}\n")


def show_hostname(ret: Any, out: TextIO) -> None:
    out.write(f"{ret.get('host-name', '')}\n")


def _when(seconds: float) -> str:
    stamp = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")


def show_users(users: Any, out: TextIO) -> None:
    for user in users:
        name = user.get("user", "?")
        if user.get("domain"):
            name = f"{user['domain']}\\{name}"
        out.write(f"{name}\tsince {_when(float(user.get('login-time', 0)))}\n")


def show_fsinfo(filesystems: Any, out: TextIO) -> None:
    for fs in filesystems:
        line = f"{fs.get('mountpoint')}\t{fs.get('type')}\t{fs.get('name')}"
        if "total-bytes" in fs:
            line += f"\t{fs.get('used-bytes', 0)} of {fs['total-bytes']} bytes used"
        out.write(line + "\n")
        for disk in fs.get("disk", []):
            dev = disk.get("dev") or disk.get("serial") or ""
            bus = disk.get("bus-type", "")
            out.write(f"\tdisk {dev} ({bus})\n".replace(" ()", ""))


def show_time(nanoseconds: Any, out: TextIO) -> None:
    seconds, ns = divmod(int(nanoseconds), 1_000_000_000)
    stamp = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    out.write(f"{stamp:%Y-%m-%d %H:%M:%S}.{ns // 1000:06d} UTC\n")


def cmd_exec(client: AgentClient, args: list[str], as_json: bool, out: TextIO) -> int:
    usage = "usage: exec [--timeout S] -- PROG [ARGS...]"
    limit = EXEC_TIMEOUT
    rest = list(args)
    while rest and rest[0] != "--":
        opt = rest.pop(0)
        if opt == "--timeout" and rest:
            limit = _seconds(rest.pop(0), "exec --timeout")
        elif opt.startswith("--timeout="):
            limit = _seconds(opt.partition("=")[2], "exec --timeout")
        else:
            # PROG without "--" is accepted too.
            rest.insert(0, opt)
            break
    if rest and rest[0] == "--":
        rest.pop(0)
    if not rest:
        _usage(usage)
    prog, *argv = rest
    started = client.execute("guest-exec", {"path": prog, "arg": argv, "capture-output": True})
    pid = started["pid"]
    deadline = time.monotonic() + limit
    pause = 0.05
    while True:
        status = client.execute("guest-exec-status", {"pid": pid})
        if status.get("exited"):
            break
        if time.monotonic() >= deadline:
            raise AgentError(
                client.address,
                f"exec: {prog} (pid {pid}) still runs in the guest after {limit:g} s "
                f"(try exec --timeout S)",
            )
        time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, 0.5)
    if as_json:
        _print_json(status, out)
    else:
        out.flush()
        sys.stdout.buffer.write(base64.b64decode(status.get("out-data", "")))
        sys.stdout.buffer.flush()
        sys.stderr.buffer.write(base64.b64decode(status.get("err-data", "")))
        sys.stderr.buffer.flush()
        for stream in ("out", "err"):
            if status.get(f"{stream}-truncated"):
                sys.stderr.write(f"{PROG}: exec: the guest agent cut {prog}'s std{stream}\n")
    if "signal" in status:
        return 128 + int(status["signal"])
    return int(status.get("exitcode", 0)) & 0xFF


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_call(client: AgentClient, args: list[str], as_json: bool, out: TextIO) -> int:
    usage = 'usage: call COMMAND [KEY=VALUE...]  or  call \'{"execute": ..., "arguments": ...}\''
    if not args:
        _usage(usage)
    arguments: dict[str, Any] = {}
    if args[0].lstrip().startswith("{"):
        if len(args) != 1:
            _usage(usage)
        try:
            msg = json.loads(args[0])
        except ValueError as err:
            _usage(f"call: not a JSON object: {err}")
        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            _usage('call: the JSON object needs "execute": COMMAND')
        command = msg["execute"]
        arguments = msg.get("arguments") or {}
        if not isinstance(arguments, dict):
            _usage('call: "arguments" must be a JSON object')
    else:
        command = args[0]
        for pair in args[1:]:
            key, eq, text = pair.partition("=")
            if not eq or not key:
                _usage(f"call: {pair!r} is no KEY=VALUE")
            arguments[key] = _value(text)
    if not command.startswith("guest-"):
        command = "guest-" + command
    _print_json(client.execute(command, arguments or None), out)
    return 0


COMMANDS: dict[str, Command] = {
    "ping": cmd_ping,
    "info": _query("info", "guest-info", show_info),
    "cat": cmd_cat,
    "fsfreeze": cmd_fsfreeze,
    "fstrim": cmd_fstrim,
    "ifconfig": _query("ifconfig", "guest-network-get-interfaces", show_ifconfig),
    "halt": _shutdown("halt"),
    "powerdown": _shutdown("powerdown"),
    "reboot": _shutdown("reboot"),
    "shutdown": _shutdown("powerdown"),
    "suspend": cmd_suspend,
    "osinfo": _query("osinfo", "guest-get-osinfo", show_osinfo),
    "hostname": _query("hostname", "guest-get-host-name", show_hostname),
    "users": _query("users", "guest-get-users", show_users),
    "fsinfo": _query("fsinfo", "guest-get-fsinfo", show_fsinfo),
    "time": _query("time", "guest-get-time", show_time),
    "exec": cmd_exec,
    "call": cmd_call,
}


def _seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value <= 1e6):
        raise UsageError(f"{what} must be a number of seconds above 0, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talk to the QEMU guest agent (qemu-ga) from the host.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--address",
        default=os.environ.get(ENV_ADDRESS),
        help=f"the agent's socket: a unix path or HOST:PORT (default ${ENV_ADDRESS})",
    )
    parser.add_argument(
        "--timeout",
        default=str(DEFAULT_TIMEOUT),
        metavar="S",
        help=f"seconds a command may take (default {DEFAULT_TIMEOUT:g}; fsfreeze: 60)",
    )
    parser.add_argument("--json", action="store_true", help="print the agent's reply as JSON")
    from qomfs import __version__

    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status (0 ok, 1 failed, 2 bad usage)."""
    parser = _parser()
    from qomfs.completion import autocomplete  # a <TAB> in the shell: answer, exit

    autocomplete(parser)
    args = parser.parse_args(argv)
    if not args.address:
        parser.error(f"no agent address: give --address or set ${ENV_ADDRESS}")
    try:
        timeout = _seconds(args.timeout, "--timeout")
    except UsageError as err:
        parser.error(str(err))
    # The client connects at its first command, so a bad argument is reported
    # as such even when the address is wrong too.
    client = AgentClient(args.address, timeout)
    try:
        return COMMANDS[args.command](client, list(args.args), args.json, sys.stdout)
    except UsageError as err:
        sys.stderr.write(f"{PROG}: {args.command}: {err}\n")
        return 2
    except AgentError as err:
        sys.stderr.write(f"{PROG}: {err}\n")
        return 1
    except (KeyError, TypeError, ValueError) as err:
        # The agent answered with a shape this command does not expect.
        where = describe(args.address)
        sys.stderr.write(f"{PROG}: {args.command}: unexpected reply from {where}: {err!r}\n")
        return 1
    except BrokenPipeError:
        # stdout closed early (| head): nothing more to say.
        silence_stdout()
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
