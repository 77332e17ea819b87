"""Listening sockets (``--listen``): only a stale socket is replaced, and the new one is private."""

from __future__ import annotations

import grp
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qomfs.cli import main
from qomfs.errors import ConnectError
from qomfs.qmp import QMPClient, listen_unix


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="qomfs-listen-") as d:
        yield Path(d)


def listen_error(path: Path) -> str:
    client = QMPClient(str(path), listen=True)
    with pytest.raises(ConnectError) as info:
        client.connect()
    client.close()
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_regular_file_is_kept_and_refused(sockdir: Path) -> None:
    precious = sockdir / "precious.txt"
    precious.write_text("keep me\n")
    assert "not a socket" in listen_error(precious)
    assert precious.read_text() == "keep me\n"


def test_the_command_line_refuses_a_regular_file(
    sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious, mnt = sockdir / "precious.txt", sockdir / "mnt"
    precious.write_text("keep me\n")
    mnt.mkdir()
    assert main(["-f", "--listen", str(precious), str(mnt)]) == 1
    assert precious.read_text() == "keep me\n"
    err = capsys.readouterr().err
    assert "not a socket" in err and len(err.strip().splitlines()) == 1


def test_a_directory_is_refused(sockdir: Path) -> None:
    (sockdir / "d").mkdir()
    assert "directory" in listen_error(sockdir / "d")
    assert (sockdir / "d").is_dir()


def test_a_live_socket_is_refused_and_keeps_working(sockdir: Path) -> None:
    path = sockdir / "live.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen(4)
        assert "listens" in listen_error(path)
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))  # still the other program's socket
            conn, _ = other.accept()
            conn.close()


def test_a_stale_socket_is_replaced(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, then closed: connecting is refused
    listener = listen_unix(str(path))
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))
    finally:
        listener.close()
    assert not path.exists()  # its own socket is removed on close


def test_the_socket_is_private_whatever_the_umask(sockdir: Path) -> None:
    path = sockdir / "private.sock"
    old = os.umask(0)
    try:
        listener = listen_unix(str(path))
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        listener.close()


def test_a_group_may_be_let_in(sockdir: Path) -> None:
    """``--listen-group``: mode 0660 and that group, for a QEMU run as another user."""
    groups = [g for g in grp.getgrall() if g.gr_gid != os.getgid()]
    # Root may give a socket to any group; others to their own.
    group = groups[0] if os.geteuid() == 0 and groups else grp.getgrgid(os.getgid())
    path = sockdir / "group.sock"
    old = os.umask(0o077)
    try:
        listener = listen_unix(str(path), group=group.gr_name)
    finally:
        os.umask(old)
    try:
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
    finally:
        listener.close()


def test_an_unknown_group_is_refused(sockdir: Path) -> None:
    with pytest.raises(ConnectError, match="no such group"):
        listen_unix(str(sockdir / "x.sock"), group="no-such-group-qomfs")
    assert not (sockdir / "x.sock").exists()


def test_close_leaves_a_socket_that_is_no_longer_its_own(sockdir: Path) -> None:
    path = sockdir / "mine.sock"
    listener = listen_unix(str(path))
    os.unlink(path)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))  # someone else's now
        listener.close()
        assert path.exists()
