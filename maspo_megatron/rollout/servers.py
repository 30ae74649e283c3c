"""Start, stop, health-check and restart rollout servers and the sglang-router, or attach to URLs.

:class:`ServerManager` runs any command factory (the rollout backend's ``server_command``; the
router's command is built here). Under Slurm heterogeneous jobs the servers are started by the
job script and :meth:`ServerManager.attach` only health-checks the given URLs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

logger = logging.getLogger(__name__)


def router_command(worker_urls: Sequence[str], port: int, *, host: str = "127.0.0.1",
                   policy: str = "round_robin", api_key: str | None = None,
                   extra_args: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    if not worker_urls:
        raise ValueError("router_command needs at least one worker URL")
    cmd = [python, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
           "--policy", policy, "--worker-urls", *worker_urls]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + list(extra_args)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout_s: float = 5.0, api_key: str | None = None) -> bool:
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM it when its parent dies.

    The servers run in their own session (so ``stop`` can end their children), which also
    shields them from the signals that end the trainer; without this, a trainer killed with
    SIGKILL (OOM killer, scancel, a crashed torchrun rank) would leave them running.
    Linux ties this to the *thread* that forked, hence ``_SPAWNER``.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# Every server is forked from this one long-lived thread, so the parent-death signal fires when
# the process ends and not when, say, the watcher thread that restarted a server is stopped.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-spawner")


class ManagedProcess:
    """One server process: started in its own process group so stop() also ends its children."""

    def __init__(self, cmd: list[str], url: str, log_path: str | None, env: dict | None = None):
        self.cmd, self.url, self.log_path, self.env = cmd, url, log_path, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = _SPAWNER.submit(
                subprocess.Popen, self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None).result()
        finally:
            if self.log_path:
                out.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Ends the process group at once (also used by fault tests to simulate a crash)."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace_s: float = 10.0) -> None:
        if not self.alive:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no log)"
        with open(self.log_path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")


class ServerManager:
    """A fixed set of rollout servers: start, wait healthy, detect and restart dead ones.

    ``command_factory(port, host)`` returns the command line for a server on ``host:port``, or
    ``(command, extra_env)``. A restarted server keeps its port, hence its URL; ``on_down(url)`` /
    ``on_up(url)`` tell the client (``RolloutClient.mark_down`` / ``mark_up``).
    """

    def __init__(self, command_factory: Callable[[int, str], list[str] | tuple[list[str], dict]] | None,
                 num_servers: int = 0, *,
                 host: str = "127.0.0.1", ports: Sequence[int] | None = None,
                 startup_timeout_s: float = 600.0, health_path: str = "/health",
                 api_key: str | None = None, log_dir: str | None = None, env: dict | None = None,
                 urls: Sequence[str] | None = None, log_name: str = "server"):
        self.command_factory = command_factory
        self.startup_timeout_s = startup_timeout_s
        self.health_path = health_path
        self.api_key = api_key
        self.procs: list[ManagedProcess] = []
        self._attached = list(urls or [])
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if command_factory is not None:
            ports = list(ports) if ports is not None else [free_port(host) for _ in range(num_servers)]
            if len(ports) != num_servers:
                raise ValueError(f"ServerManager: {len(ports)} ports for {num_servers} servers")
            for i, port in enumerate(ports):
                log = os.path.join(log_dir, f"{log_name}{i}_{port}.log") if log_dir else None
                made = command_factory(port, host)
                cmd, extra = made if isinstance(made, tuple) else (made, {})
                proc_env = {**os.environ, **(env or {}), **extra} if (env or extra) else None
                self.procs.append(ManagedProcess(cmd, f"http://{host}:{port}", log, proc_env))

    @classmethod
    def attach(cls, urls: Sequence[str], **kw) -> "ServerManager":
        """Servers started elsewhere (e.g. a Slurm het-job component): health checks only."""
        return cls(None, urls=[u.rstrip("/") for u in urls], **kw)

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.procs] or list(self._attached)

    def start(self) -> list[str]:
        for p in self.procs:
            p.start()
        self.wait_healthy(self.urls)
        return self.urls

    def healthy(self, url: str) -> bool:
        return http_ok(url + self.health_path, api_key=self.api_key)

    def wait_healthy(self, urls: Sequence[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(urls)
        by_url = {p.url: p for p in self.procs}
        while pending:
            for url in list(pending):
                proc = by_url.get(url)
                if proc is not None and not proc.alive:
                    raise RuntimeError(f"server {url} exited during start-up (code "
                                       f"{proc.proc.returncode}); log tail:\n{proc.log_tail()}")
                if self.healthy(url):
                    pending.remove(url)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"{u}:\n{by_url[u].log_tail()}" for u in pending if u in by_url)
                raise TimeoutError(f"servers {pending} not healthy after {self.startup_timeout_s:.0f}s"
                                   + (f"; log tails:\n{tails}" if tails else ""))
            if pending:
                time.sleep(0.5)

    def dead(self) -> list[str]:
        """URLs whose process exited (managed) or whose health check fails (attached)."""
        if self.procs:
            return [p.url for p in self.procs if not p.alive]
        return [u for u in self._attached if not self.healthy(u)]

    def restart(self, url: str) -> None:
        proc = next((p for p in self.procs if p.url == url), None)
        if proc is None:
            raise ValueError(f"cannot restart {url}: not started by this manager (attached URLs "
                             "are restarted by whoever launched them)")
        proc.stop()
        proc.start()
        self.wait_healthy([url])

    def restart_dead(self, on_down: Callable[[str], None] | None = None,
                     on_up: Callable[[str], None] | None = None) -> list[str]:
        dead = self.dead()
        for url in dead:
            logger.warning("rollout server %s is down; restarting", url)
            if on_down:
                on_down(url)
            self.restart(url)
            if on_up:
                on_up(url)
        return dead

    def watch(self, on_down: Callable[[str], None], on_up: Callable[[str], None],
              interval_s: float = 2.0) -> None:
        """Background thread: restart dead servers and tell the client, until stop()."""
        def loop():
            while not self._watch_stop.wait(interval_s):
                try:
                    self.restart_dead(on_down, on_up)
                except Exception:  # noqa: BLE001 - keep watching; the log says why
                    logger.exception("restarting a rollout server failed")

        self._watcher = threading.Thread(target=loop, name="server-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        for p in self.procs:
            p.stop()


class RouterManager(ServerManager):
    """The sglang-router in front of the servers (a single managed process)."""

    def __init__(self, worker_urls: Sequence[str], *, host: str = "127.0.0.1", port: int | None = None,
                 policy: str = "round_robin", api_key: str | None = None,
                 extra_args: Sequence[str] = (), **kw):
        # The router's /health answers before workers register; this one needs a healthy worker.
        kw.setdefault("health_path", "/health_generate")
        # Its Prometheus exporter binds a fixed port (29000) unless told otherwise, which
        # collides between routers on one host.
        if "--prometheus-port" not in extra_args:
            extra_args = [*extra_args, "--prometheus-port", str(free_port(host))]
        super().__init__(
            lambda p, h: router_command(worker_urls, p, host=h, policy=policy, api_key=api_key,
                                        extra_args=extra_args),
            1, host=host, ports=None if port is None else [port], api_key=api_key, log_name="router", **kw,
        )

    @property
    def url(self) -> str:
        return self.urls[0]
