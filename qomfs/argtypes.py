"""Command-line values shared by ``qom-fuse`` and the ``qom-*`` tools: seconds
for a TTL or a timeout, checked the same way and refused in the same words;
and how a tool goes quiet when its reader closes stdout."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

#: The longest wait for QEMU: Python's own waits overflow at about 1e12 s.
MAX_TIMEOUT = 1e6


def seconds(text: str, *, timeout: bool = False) -> float:
    """A TTL: seconds >= 0, ``inf`` for never; or with ``timeout``, a time
    to wait: seconds > 0, at most :data:`MAX_TIMEOUT`.

    Raises :class:`ValueError` with a one-line message.
    """
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if timeout and not 0 < value <= MAX_TIMEOUT:
        raise ValueError(f"{text!r}: a timeout is from 0 (not included) to {MAX_TIMEOUT:g} s")
    if not value >= 0:  # (nan too)
        raise ValueError(f"{text!r}: a TTL is 0 or more seconds, or inf")
    return value


def seconds_arg(timeout: bool) -> Callable[[str], float]:
    """An argparse ``type=`` for :func:`seconds` (usage error, exit 2)."""

    def parse(text: str) -> float:
        try:
            return seconds(text, timeout=timeout)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def wait_seconds(text: str) -> float:
    """An argparse ``type=`` for a time to wait where 0 means no limit:
    seconds >= 0, with 0 (and anything longer) becoming :data:`MAX_TIMEOUT`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return MAX_TIMEOUT if value == 0 else min(value, MAX_TIMEOUT)


def silence_stdout() -> None:
    """Point stdout at /dev/null after a BrokenPipeError (``| head``), so
    Python's own flush at exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
