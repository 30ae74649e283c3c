"""A run's processes end together: SIGTERM/SIGINT become a clean exit, bounded by a watchdog.

Every process of a run is tied to the one that started it. The CLI starts torchrun in a session
of its own with a parent-death signal and forwards SIGINT/SIGTERM/SIGHUP to it; torchrun
forwards them to the ranks; each rank asks for a parent-death SIGTERM from torchrun
(``rollout.servers.set_parent_death_signal``); servers, the router and reward workers get a
parent-death SIGKILL from the rank that started them. So a signal to the CLI or to torchrun, or
a SIGKILL of either, reaches every rank, and a rank's end ends what it started.

In a rank, :class:`InterruptGuard` turns the first SIGTERM or SIGINT into :class:`Interrupted`
(a ``SystemExit`` with code 128 + signal, so ``except Exception`` blocks let it through and
``finally`` blocks stop servers and workers); later ones are ignored while that clean-up runs.
The main thread may be unable to run a Python signal handler at all (blocked in C++, e.g. a
collective whose peer already exited): ``signal.set_wakeup_fd`` wakes a watchdog thread
regardless, and if the process is still there ``grace_s`` after the signal, the watchdog calls
``on_force`` (the rank-0 message), SIGKILLs every managed server and child process and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Callable


class Interrupted(SystemExit):
    """The run got SIGTERM or SIGINT; ``code`` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class InterruptGuard:
    """SIGTERM/SIGINT handling for a rank; install from the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float = 10.0, on_force: Callable[[int], None] | None = None):
        self.grace_s = grace_s
        self.on_force = on_force  # called by the watchdog just before it ends the process
        self.signum: int | None = None
        self.done = threading.Event()
        self._previous: dict = {}
        self._previous_fd = -1
        self._sockets: tuple[socket.socket, socket.socket] | None = None

    def install(self) -> "InterruptGuard":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("InterruptGuard.install() must run in the main thread")
        r, w = socket.socketpair()
        w.setblocking(False)
        self._sockets = (r, w)
        self._previous_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        threading.Thread(target=self._watch, daemon=True, name="interrupt-watchdog").start()
        return self

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            return  # clean-up is running; the watchdog bounds it
        self.signum = signum
        raise Interrupted(signum)

    def _watch(self) -> None:
        r = self._sockets[0]
        wanted = {int(s) for s in self.SIGNALS}
        first = None
        while first is None:
            try:
                data = r.recv(64)
            except OSError:
                return
            if not data:
                return
            first = next((b for b in data if b in wanted), None)
        if self.done.wait(self.grace_s):
            return
        try:
            if self.on_force is not None:
                self.on_force(first)
        except Exception:  # noqa: BLE001 - ending the process matters more
            pass
        from maspo_megatron.rollout.servers import kill_all_managed

        kill_all_managed()
        try:
            import multiprocessing

            for child in multiprocessing.active_children():
                child.kill()
        except Exception:  # noqa: BLE001
            pass
        os._exit(128 + first)

    def close(self) -> None:
        """Clean-up finished: stand the watchdog down and restore the previous handlers."""
        self.done.set()
        if threading.current_thread() is threading.main_thread():
            for s, h in self._previous.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(self._previous_fd)
