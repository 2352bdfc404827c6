"""Ctrl-C for the long-running commands: the first asks to stop, the second stops at once.

Python's default SIGINT handler raises ``KeyboardInterrupt`` in whatever bytecode the main
thread happens to run. When that is a finalizer (``__del__``, a weakref callback: TensorFlow
and Keras objects have many, and the demo's coordinator evaluates with Keras every round),
CPython prints "Exception ignored" and drops the exception: the Ctrl-C is lost. And when it
lands inside ``subprocess.Popen`` after the fork, the child runs on with nobody holding its
handle, so nothing stops it.

So the handler here never raises. The first SIGINT or SIGTERM only records the request and
runs the stop callbacks (each sets an event that some loop waits on); the command checks
:meth:`StopSignals.check` at its own safe points, which raises :class:`Interrupted` there.
A second signal runs the force callbacks (e.g. SIGKILL to every child) and ends the process
with :data:`INTERRUPTED_EXIT_STATUS` at once. A command stopped by SIGINT exits with 130 (the
shell's convention for Ctrl-C); one stopped by SIGTERM, the way service managers stop a
daemon, exits with 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

__all__ = ["INTERRUPTED_EXIT_STATUS", "Interrupted", "StopSignals"]

INTERRUPTED_EXIT_STATUS = 130
_HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by :meth:`StopSignals.check` once a stop was asked for.

    A ``KeyboardInterrupt`` so that no ``except Exception`` on the way up can swallow it.
    """


class StopSignals:
    """SIGINT and SIGTERM handlers for one command, installed by ``with StopSignals() as s``.

    ``on_stop`` callbacks run (in the main thread, from the handler) on the first signal; they
    must only set flags or events. ``on_force`` callbacks run on the second, just before the
    process exits. Outside the main thread (tests that call a command in a thread) nothing is
    installed and the object only answers ``requested`` False.
    """

    def __init__(self) -> None:
        self._stop_callbacks: list[Callable[[], None]] = []
        self._force_callbacks: list[Callable[[], None]] = []
        self._requested = threading.Event()
        self._signum: int | None = None
        self._previous: dict[int, object] = {}

    # --- what the command registers and asks --------------------------------------------
    def on_stop(self, callback: Callable[[], None]) -> None:
        self._stop_callbacks.append(callback)
        if self._requested.is_set():
            callback()

    def on_force(self, callback: Callable[[], None]) -> None:
        self._force_callbacks.append(callback)

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    @property
    def by_ctrl_c(self) -> bool:
        """Whether the stop came from SIGINT (so the command should exit with 130)."""
        return self._signum == signal.SIGINT

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``; True (early) once a stop was asked for."""
        return self._requested.wait(timeout_s)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop was asked for: call it at safe points."""
        if self._requested.is_set():
            raise Interrupted

    def exit_if_interrupted(self) -> None:
        """After a clean stop: leave with 130 if it was Ctrl-C (SIGTERM leaves normally)."""
        if self.by_ctrl_c:
            raise SystemExit(INTERRUPTED_EXIT_STATUS)

    # --- the handler --------------------------------------------------------------------
    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self._requested.is_set():
            for callback in self._force_callbacks:
                with contextlib.suppress(Exception):  # exiting anyway: best effort
                    callback()
            sys.stderr.write("stopped at once (second signal)\n")
            sys.stderr.flush()
            os._exit(INTERRUPTED_EXIT_STATUS)
        self._signum = signum
        self._requested.set()
        for callback in self._stop_callbacks:
            callback()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in _HANDLED:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
