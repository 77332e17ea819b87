"""The shell's output: replies from the main thread, events from the client's
reader thread, and text shown above a readline prompt without breaking it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TextIO

#: How often a waiting text asks the main thread again (a wake-up that lands
#: while readline handles a keystroke, not in its select(), is missed).
RETRY = 0.1


class QemuGone(Exception):
    """QEMU went away for good: the shell ends with status 1 and this message."""


class Screen:
    """Where the shell writes; thread-safe.

    Text from other threads is printed at once, except while a prompt waits
    for input: then it is queued and a notifier thread wakes the main thread
    with SIGUSR1.  Python runs the handler inside readline's wait for a key
    (its select() fails with EINTR), on the main thread: it prints the text
    above the prompt and draws the prompt and the line typed so far again.
    So only the main thread ever touches readline.  :meth:`fatal` ends a
    waiting prompt the same way, with :class:`QemuGone`.
    """

    WAKE = signal.SIGUSR1

    def __init__(self, out: TextIO, err: TextIO, interactive: bool, prog: str) -> None:
        self.out = out
        self.err = err
        self.interactive = interactive
        self.prog = prog
        self._lock = threading.RLock()  # RLock: the handler may interrupt a write
        self._changed = threading.Condition(self._lock)
        self._prompting = False
        self._stopped = True
        self._queue: list[str] = []
        self._fatal: str | None = None
        self._redraw: Callable[[], None] | None = None
        self._main = threading.main_thread().ident

    # --- from the main thread ---------------------------------------------------------

    def write(self, text: str) -> None:
        with self._lock:
            self.out.write(text)
            self.out.flush()

    def error(self, text: str) -> None:
        """``PROG: text`` on stderr."""
        with self._lock:
            self.out.flush()
            self.err.write(f"{self.prog}: {text}\n")
            self.err.flush()

    @contextlib.contextmanager
    def prompting(self, redraw: Callable[[], None]) -> Iterator[None]:
        """Around the main thread's loop of ``input()`` calls; ``redraw()``
        draws readline's prompt and line again."""
        self._redraw = redraw
        old = signal.signal(self.WAKE, self._on_wake)
        with self._lock:
            self._stopped = False
        notifier = threading.Thread(target=self._notify, name="qmp-shell-notify", daemon=True)
        notifier.start()
        try:
            yield
        finally:
            with self._lock:
                self._prompting = False
                self._stopped = True
                self._changed.notify_all()
            notifier.join()
            signal.signal(self.WAKE, old)

    def prompt_shown(self) -> None:
        """readline's pre-input hook: the prompt is on the screen."""
        with self._lock:
            self._prompting = True
            self._changed.notify_all()

    def stop_prompting(self) -> None:
        """``input()`` has returned."""
        with self._lock:
            self._prompting = False

    def take_fatal(self) -> str | None:
        with self._lock:
            text, self._fatal = self._fatal, None
            return text

    # --- from any thread --------------------------------------------------------------

    def show(self, text: str) -> None:
        """Print ``text`` (one or more lines, no final newline), above a waiting prompt."""
        with self._lock:
            if not self._prompting:
                self.out.write(text + "\n")
                self.out.flush()
                return
            self._queue.append(text)
            self._changed.notify_all()

    def fatal(self, text: str) -> None:
        """End a waiting prompt with :class:`QemuGone`, or else the next command."""
        with self._lock:
            self._fatal = text
            self._changed.notify_all()

    # --- the wake-up ------------------------------------------------------------------

    def _pending(self) -> bool:
        return self._prompting and (bool(self._queue) or self._fatal is not None)

    def _notify(self) -> None:
        with self._lock:
            while not self._stopped:
                if not self._pending():
                    self._changed.wait()
                    continue
                if self._main is not None:
                    with contextlib.suppress(OSError, ValueError):
                        signal.pthread_kill(self._main, self.WAKE)
                self._changed.wait(RETRY)

    def _on_wake(self, signum: int, frame: FrameType | None) -> None:
        with self._lock:
            lines, self._queue = self._queue, []
            fatal = self._fatal if self._prompting else None
            if fatal is not None:
                self._fatal = None
            if lines and self._prompting:
                self.out.write("\r\x1b[K" + "".join(line + "\n" for line in lines))
                self.out.flush()
                if self._redraw is not None:
                    self._redraw()
            elif lines:
                self.out.write("".join(line + "\n" for line in lines))
                self.out.flush()
        if fatal is not None:
            raise QemuGone(fatal)


def readline_redraw() -> Callable[[], None]:
    """A function that draws readline's prompt and line again from scratch
    (``rl_forced_update_display``: Python's ``redisplay()`` draws only what
    readline thinks has changed, and the screen was cleared behind its back)."""
    import readline

    forced: Callable[[], object] | None
    try:
        import ctypes

        forced = ctypes.CDLL(readline.__file__).rl_forced_update_display
    except (OSError, AttributeError):
        forced = None

    def redraw() -> None:
        if forced is not None:
            forced()
        else:
            readline.redisplay()

    return redraw
