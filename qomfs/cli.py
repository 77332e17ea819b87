# PYTHON_ARGCOMPLETE_OK  (argcomplete: this command completes itself)
"""``qom-fuse``: mount a QEMU's QOM tree.

Compatible with QEMU's ``scripts/qmp/qom-fuse``: ``qom-fuse [-s SOCKET]
MOUNTPOINT``, with ``$QMP_SOCKET`` as the default socket.  Like sshfs it
returns once the mount is ready, or fails with a message and a non-zero
status before it detaches; ``-f`` stays in the foreground.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable

from qomfs import __version__, memory
from qomfs.argtypes import seconds, seconds_arg
from qomfs.errors import QomfsError
from qomfs.qmp import QMPClient

log = logging.getLogger("qomfs")

EPILOG = """\
examples:
  qom-fuse -s /tmp/vm.sock /mnt/qom        mount, return when ready
  QMP_SOCKET=/tmp/vm.sock qom-fuse /mnt/qom
  qom-fuse -f -v -s localhost:4444 /mnt/qom   QMP over TCP, stay in the foreground
  qom-fuse -o ro,allow_other -s /tmp/vm.sock /mnt/qom
  qom-fuse /tmp/vm.sock /mnt/qom -o ro     the form mount.fuse and /etc/fstab use
  qom-fuse --listen /tmp/vm.sock /mnt/qom && qemu-system-x86_64 -qmp unix:/tmp/vm.sock ...
  qom-fuse --socket-dir /run/qemu /mnt/qom     every VM socket in /run/qemu, one directory each
  fusermount -u /mnt/qom                   unmount

QEMU needs a QMP monitor of its own for qomfs, e.g.
  qemu-system-x86_64 ... -qmp unix:/tmp/vm.sock,server=on,wait=off
"""


#: Options of ours that may also come through ``-o`` (as /etc/fstab gives them).
OWN_OPTIONS = {
    "ttl": "ttl",
    "timeout": "timeout",
    "connect_timeout": "connect_timeout",
    "no_batch": "no_batch",
    "no_readahead": "no_readahead",
    "no_sizes": "no_sizes",
    "allow_unrealize": "allow_unrealize",
    "listen": "listen",
    "listen_group": "listen_group",
}


def parse_options(text: str) -> dict[str, str | bool]:
    """``-o a,b=c`` -> ``{"a": True, "b": "c"}`` (repeated -o accumulate)."""
    out: dict[str, str | bool] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        out[key] = value if eq else True
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qom-fuse",
        description="Mount a running QEMU's object model (QOM) as a filesystem over QMP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="[SOCKET] MOUNTPOINT",
        help="the directory to mount on; a QMP socket may come first (as mount.fuse gives it)",
    )
    p.add_argument(
        "-s", "--socket", help="QMP socket: a unix socket path or HOST:PORT (default: $QMP_SOCKET)"
    )
    p.add_argument(
        "--listen",
        metavar="PATH",
        help="create a unix socket at PATH and let QEMU connect to it (QEMU: -qmp unix:PATH "
        "without server=on); the race-free launch, and QEMU may come and go. Only a stale "
        "socket at PATH is replaced; the new one has mode 0600",
    )
    p.add_argument(
        "--listen-group",
        metavar="GROUP",
        help="with --listen: give the socket to GROUP with mode 0660, so that a QEMU running "
        "as another user in GROUP can connect",
    )
    p.add_argument(
        "--socket-dir",
        metavar="DIR",
        help="mount every QMP socket in DIR as a top directory named after the socket "
        "(many VMs in one mount)",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: ro, allow_other, noauto_unmount, ..., and ours: ttl=S, "
        "timeout=S, no_batch, no_readahead, no_sizes, allow_unrealize",
    )
    p.add_argument(
        "--ttl",
        type=seconds_arg(timeout=False),
        default=1.0,
        metavar="SECONDS",
        help="how long listings and values may be served from the cache "
        "(default 1; 0 always asks QEMU; inf: never again, a snapshot)",
    )
    p.add_argument(
        "--timeout",
        type=seconds_arg(timeout=True),
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for QEMU to answer a command (default 5)",
    )
    p.add_argument(
        "--connect-timeout",
        type=seconds_arg(timeout=True),
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the socket and QEMU's greeting (default 5)",
    )
    p.add_argument(
        "--no-batch", action="store_true", help="do not use qom-list-get even where QEMU has it"
    )
    p.add_argument(
        "--no-readahead",
        action="store_true",
        help="do not fetch values or listings ahead of a reader that walks the tree "
        "(grep -r, ls -R); with qom-list-get a listed directory still brings its children",
    )
    p.add_argument(
        "--no-sizes",
        action="store_true",
        help="show every file as 4096 bytes (as sysfs does) instead of its text's length: "
        "before QEMU 10.1 an exact size costs a qom-get per file stat'ed (ls -l)",
    )
    p.add_argument(
        "--allow-unrealize",
        action="store_true",
        help="let 'echo false > DEVICE/realized' unrealize a device (refused by default)",
    )
    p.add_argument("--log", metavar="FILE", help="log here once detached (default: nowhere)")
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)"
    )
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _take_own_options(args: argparse.Namespace, options: dict[str, str | bool]) -> None:
    """Move our options out of the FUSE mount options into ``args``."""
    for key, attr in OWN_OPTIONS.items():
        if key not in options:
            continue
        value = options.pop(key)
        default = getattr(args, attr)
        if isinstance(default, bool):
            setattr(args, attr, value is True or str(value).lower() in ("1", "yes", "true", "on"))
        elif isinstance(default, float):
            setattr(args, attr, seconds(str(value), timeout=attr != "ttl"))
        else:
            setattr(args, attr, str(value))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    from qomfs.completion import autocomplete  # a <TAB> in the shell: answer, exit

    autocomplete(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="qom-fuse: %(levelname)s: %(name)s: %(message)s",
    )
    if len(args.paths) > 2:
        parser.error("too many arguments: give [SOCKET] MOUNTPOINT")
    if len(args.paths) == 2:
        if args.socket:
            parser.error("a socket was given both with -s and as an argument")
        args.socket = args.paths[0]
    options: dict[str, str | bool] = {}
    for text in args.options:
        options.update(parse_options(text))
    try:
        _take_own_options(args, options)
    except ValueError as err:
        return _fail(f"bad -o option: {err}")
    # A killed daemon must not leave "Transport endpoint is not connected".
    if not options.pop("noauto_unmount", False):
        options.setdefault("auto_unmount", True)
    socket_path = args.socket_dir or args.listen or args.socket or os.environ.get("QMP_SOCKET")
    if args.listen_group and not args.listen:
        return _fail("--listen-group needs --listen")
    if args.socket_dir and not os.path.isdir(args.socket_dir):
        return _fail(f"{args.socket_dir}: not a directory")
    if not socket_path:
        return _fail("no QMP socket: give -s SOCKET or set QMP_SOCKET")
    mountpoint_arg = args.paths[-1]
    mountpoint = os.path.abspath(mountpoint_arg)
    if not os.path.isdir(mountpoint):
        return _fail(f"{mountpoint_arg}: not a directory")
    if os.path.ismount(mountpoint):
        return _fail(f"{mountpoint_arg}: already a mount point")
    if args.foreground:
        return _serve(args, socket_path, mountpoint, options, None)
    return _daemonize(lambda ready: _serve(args, socket_path, mountpoint, options, ready), args.log)


def _fail(message: str) -> int:
    print(f"qom-fuse: {message}", file=sys.stderr)
    return 1


def _serve(
    args: argparse.Namespace,
    socket_path: str,
    mountpoint: str,
    options: dict[str, str | bool],
    ready: Callable[[], None] | None,
) -> int:
    # Imported here so that --help works where no FUSE library is installed.
    from qomfs._fuse import FUSE
    from qomfs.forest import Forest
    from qomfs.fs import QOMFS
    from qomfs.model import QOMTree, Tree

    def make_tree(client: QMPClient) -> QOMTree:
        return QOMTree(
            client,
            ttl=args.ttl,
            batch=False if args.no_batch else None,
            readahead=not args.no_readahead,
            allow_unrealize=args.allow_unrealize,
        )

    tree: Tree
    if args.socket_dir:
        tree = forest = Forest(
            args.socket_dir,
            make_tree,
            ttl=args.ttl,
            timeout=args.timeout,
            connect_timeout=args.connect_timeout,
        )
        close = forest.close
    else:
        client = QMPClient(
            socket_path,
            timeout=args.timeout,
            connect_timeout=args.connect_timeout,
            listen=bool(args.listen),
            listen_group=args.listen_group,
        )
        try:
            client.connect()
        except QomfsError as err:
            return _fail(str(err))
        tree = single = make_tree(client)

        def close() -> None:
            client.close()
            single.close()

        if not args.listen:
            log.info(
                "QEMU %s, qom-list-get %s", client.version, "used" if single.batch else "unused"
            )
    trimmer = memory.keep_rss_down()  # (RSS that creeps with the cache's churn)
    try:
        ops = QOMFS(
            tree,
            read_only=bool(options.get("ro")),
            on_ready=ready,
            mountpoint=mountpoint,
            sizes=not args.no_sizes,
        )
        kwargs: dict[str, object] = {
            "fsname": f"qom:{socket_path}",
            "subtype": "qom-fuse",
            "default_permissions": True,
            # The kernel's own caches must not outlive ours.
            "entry_timeout": min(args.ttl, 1.0),
            "attr_timeout": min(args.ttl, 1.0),
        }
        kwargs.update(options)
        try:
            FUSE(ops, mountpoint, foreground=True, raw_fi=True, use_ino=True, **kwargs)
        except RuntimeError as err:
            if ops.mounted:
                # libfuse reports an exit by SIGINT/SIGTERM as an error (8),
                # after it has unmounted cleanly: that is a normal stop.
                log.info("stopped by a signal; unmounted")
                return 0
            return _fail(f"mounting {mountpoint} failed (libfuse status {err})")
    finally:
        close()
        if trimmer is not None:
            trimmer.stop()
    return 0


def _daemonize(serve: Callable[[Callable[[], None]], int], logfile: str | None) -> int:
    """Fork; the parent returns 0 once the child's mount is ready, or its failure.

    The child does all the work (threads do not survive a fork) and reports
    readiness through a pipe when the kernel has sent FUSE INIT.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as pipe:
            ok = pipe.read(1) == b"1"
        if ok:
            return 0
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return code if code > 0 else 1
    os.close(rfd)
    os.setsid()
    os.chdir("/")

    def ready() -> None:
        # Detach from the terminal: the mount is up, the parent may go.
        devnull = os.open(os.devnull, os.O_RDWR)
        out = (
            os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if logfile else devnull
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        with contextlib.suppress(OSError):
            os.write(wfd, b"1")
            os.close(wfd)

    try:
        code = serve(ready)
    except BaseException:
        code = 1
        logging.getLogger("qomfs").exception("qom-fuse failed")
    os._exit(code)
