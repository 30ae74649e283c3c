"""Start, stop, health-check and restart rollout servers and the sglang-router, or attach to URLs.

:class:`ServerManager` runs any command factory (the rollout backend's ``server_command``; the
router's command is built here). Under Slurm heterogeneous jobs the servers are started by the
job script and :meth:`ServerManager.attach` only health-checks the given URLs.

Lifetime: every managed process runs in its own session (so ``stop`` ends its children too) and
gets SIGKILL when the process that launched it dies (Linux ``PR_SET_PDEATHSIG``), so servers and
the router never outlive a killed trainer. :func:`kill_all_managed` ends every one this process
started, e.g. from an interrupt watchdog when the main thread is stuck in a collective.

Restarts: :meth:`ServerManager.watch` notices a process that exited within ``interval_s``,
reports it (``on_down``), restarts it on the same port on its own thread (several dead servers
restart at once) and reports it healthy again (``on_up``). Messages name the process: URL, pid,
exit status and log file (:meth:`ManagedProcess.describe`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from maspo_megatron.rollout.router_shim import router_env

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


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Asks Linux to send ``sig`` to this process when its parent dies (no-op elsewhere).

    Linux ties it to the parent *thread* that forked this process. Call it in a child (as a
    ``preexec_fn``, or first thing in a launched program such as a torchrun rank).
    """
    if sys.platform != "linux":
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, int(sig))


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGKILL it when its parent dies.

    The servers run in their own session (so ``stop`` can end their children), which also
    shields them from the signals that end the trainer; without this, a trainer killed with
    SIGKILL (OOM killer, scancel, a crashed torchrun rank) would leave them running. SIGKILL,
    not SIGTERM: SGLang's graceful shutdown drains and waits 15 s for its scheduler (measured
    16 s on a busy CPU), and with the trainer gone there is nothing to drain for; SGLang's
    scheduler and detokenizer die with the server (their own parent-death SIGKILL).
    Linux ties this to the *thread* that forked, hence ``_SPAWNER``.
    """
    set_parent_death_signal(signal.SIGKILL)


# Every server is forked from this one long-lived thread, so the parent-death signal fires when
# the process ends and not when, say, the watcher thread that restarted a server is stopped.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-spawner")

# Every ManagedProcess started by this process and not yet reaped (for kill_all_managed).
_LIVE: "weakref.WeakSet[ManagedProcess]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def kill_all_managed() -> None:
    """SIGKILLs the process group of every managed process this process started (servers and
    routers, their children included). For emergencies: an interrupted trainer whose main thread
    cannot run its clean-up. Safe from any thread."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            try:
                os.killpg(p.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def exit_status(code: int | None) -> str:
    """``exited with code 1`` / ``was killed by SIGKILL`` / ``is running``."""
    if code is None:
        return "is running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class ManagedProcess:
    """One server process: started in its own process group so stop() also ends its children."""

    def __init__(self, cmd: list[str], url: str, log_path: str | None, env: dict | None = None,
                 name: str = "rollout server"):
        self.cmd, self.url, self.log_path, self.env, self.name = cmd, url, log_path, env, name
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0

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
        self.started_at = time.monotonic()
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def describe(self) -> str:
        """``rollout server http://h:p (pid 123, log /path/server0_p.log)``."""
        details = [f"pid {self.pid}" if self.pid else "not started"]
        if self.log_path:
            details.append(f"log {self.log_path}")
        return f"{self.name} {self.url} ({', '.join(details)})"

    def status(self) -> str:
        return exit_status(self.proc.poll() if self.proc is not None else None)

    def terminate(self) -> None:
        """SIGTERM to the process group, without waiting."""
        if self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        """Ends the process group at once (also used by fault tests to simulate a crash)."""
        if self.proc is None:
            return
        if self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        self._reap_group()

    def _reap_group(self) -> None:
        # Its children (scheduler, detokenizer) may outlive the leader for a moment: end them.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if not self.alive:
            self._reap_group()
            return
        self.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no log)"
        with open(self.log_path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")


class ServerStopped(RuntimeError):
    """The manager was stopped while waiting for a server (e.g. during a restart)."""


class ServerManager:
    """A fixed set of rollout servers: start, wait healthy, detect and restart dead ones.

    ``command_factory(port, host)`` returns the command line for a server on ``host:port``, or
    ``(command, extra_env)``. A restarted server keeps its port, hence its URL; ``on_down(url)`` /
    ``on_up(url)`` tell the client (``RolloutClient.mark_down`` / ``mark_up``), or the rollout
    engine, which puts a restarted server back in service only after re-syncing its weights.
    """

    kind = "rollout server"

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
        self._restarting: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()  # starts vs stop(): no server starts after stop()
        self._stopped = False
        self._host, self._log_dir, self._log_name, self._env = host, log_dir, log_name, env
        self._ports_chosen_here = ports is None  # only then may a server move to another port
        if command_factory is not None:
            ports = list(ports) if ports is not None else [free_port(host) for _ in range(num_servers)]
            if len(ports) != num_servers:
                raise ValueError(f"ServerManager: {len(ports)} ports for {num_servers} servers")
            for i, port in enumerate(ports):
                log = os.path.join(log_dir, f"{log_name}{i}_{port}.log") if log_dir else None
                made = command_factory(port, host)
                cmd, extra = made if isinstance(made, tuple) else (made, {})
                proc_env = {**os.environ, **(env or {}), **extra} if (env or extra) else None
                self.procs.append(ManagedProcess(cmd, f"http://{host}:{port}", log, proc_env, name=self.kind))

    @classmethod
    def attach(cls, urls: Sequence[str], **kw) -> "ServerManager":
        """Servers started elsewhere (e.g. a Slurm het-job component): health checks only."""
        return cls(None, urls=[u.rstrip("/") for u in urls], **kw)

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.procs] or list(self._attached)

    def process(self, url: str) -> ManagedProcess | None:
        return next((p for p in self.procs if p.url == url.rstrip("/")), None)

    def describe(self, url: str) -> str:
        """The process behind ``url`` (URL, pid, log file), or the bare URL of an attached one."""
        proc = self.process(url)
        return proc.describe() if proc is not None else f"{self.kind} {url} (attached)"

    def start(self) -> list[str]:
        """Starts every server and waits until each is healthy. A server that could not bind its
        port (another process took it since ``free_port``: a busy machine) moves to a new one;
        only here, before anyone has been told the URLs, and only with ports chosen here (given
        ports are known elsewhere, e.g. by the other nodes of a Slurm job)."""
        with self._lock:
            if self._stopped:
                raise ServerStopped(f"{self.kind}s: start() after stop()")
            for p in self.procs:
                p.start()
        for attempt in range(3):
            try:
                self.wait_healthy(self.urls)
                return self.urls
            except RuntimeError:
                clashed = [p for p in self.procs if not p.alive and "address already in use" in p.log_tail(50).lower()]
                if not clashed or attempt == 2 or self.command_factory is None or not self._ports_chosen_here:
                    raise
                for p in clashed:
                    self._move(p)
        raise AssertionError("unreachable")

    def _new_ports(self) -> None:
        """Hook: pick new values for any other fixed port of the command (the router's metrics)."""

    def _move(self, proc: ManagedProcess) -> None:
        i = self.procs.index(proc)
        old = proc.describe()
        port = free_port(self._host)
        self._new_ports()
        made = self.command_factory(port, self._host)
        cmd, extra = made if isinstance(made, tuple) else (made, {})
        proc.cmd, proc.url = cmd, f"http://{self._host}:{port}"
        proc.env = {**os.environ, **(self._env or {}), **extra} if (self._env or extra) else None
        if self._log_dir:
            proc.log_path = os.path.join(self._log_dir, f"{self._log_name}{i}_{port}.log")
        with self._lock:
            if self._stopped:
                raise ServerStopped(f"{self.kind}s: stopped during start-up")
            proc.start()
        logger.warning("%s could not bind its port (taken meanwhile); moved to %s", old, proc.describe())

    def healthy(self, url: str) -> bool:
        return http_ok(url + self.health_path, api_key=self.api_key)

    def wait_healthy(self, urls: Sequence[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(urls)
        by_url = {p.url: p for p in self.procs}
        while pending:
            if self._stopped:
                raise ServerStopped(f"stopped while waiting for {pending} to become healthy")
            for url in list(pending):
                proc = by_url.get(url)
                if proc is not None and not proc.alive:
                    raise RuntimeError(f"{proc.describe()} {proc.status()} during start-up; log tail:\n"
                                       f"{proc.log_tail()}")
                if self.healthy(url):
                    pending.remove(url)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"{by_url[u].describe()}:\n{by_url[u].log_tail()}" for u in pending if u in by_url)
                raise TimeoutError(f"{self.kind}s {pending} not healthy after {self.startup_timeout_s:.0f}s"
                                   + (f"; log tails:\n{tails}" if tails else ""))
            if pending:
                time.sleep(0.5)

    def dead(self) -> list[str]:
        """URLs whose process exited (managed) or whose health check fails (attached)."""
        if self.procs:
            return [p.url for p in self.procs if not p.alive]
        return [u for u in self._attached if not self.healthy(u)]

    def restart(self, url: str) -> None:
        proc = self.process(url)
        if proc is None:
            raise ValueError(f"cannot restart {url}: not started by this manager (attached URLs "
                             "are restarted by whoever launched them)")
        with self._lock:
            if self._stopped:
                raise ServerStopped(f"not restarting {proc.describe()}: the manager is stopped")
            proc.stop()
            proc.restarts += 1
            proc.start()
        logger.warning("%s: restart %d started (new pid %s)", proc.describe(), proc.restarts, proc.pid)
        self.wait_healthy([url])

    def restart_dead(self, on_down: Callable[[str], None] | None = None,
                     on_up: Callable[[str], None] | None = None) -> list[str]:
        dead = self.dead()
        for url in dead:
            self._report_dead(url)
            if on_down:
                on_down(url)
            self.restart(url)
            self._report_back(url)
            if on_up:
                on_up(url)
        return dead

    def _report_dead(self, url: str) -> None:
        proc = self.process(url)
        if proc is not None:
            lived = time.monotonic() - proc.started_at
            logger.warning("%s %s after %.0fs; restarting it", proc.describe(), proc.status(), lived)

    def _report_back(self, url: str) -> None:
        proc = self.process(url)
        if proc is not None:
            logger.warning("%s is healthy again, %.0fs after its restart", proc.describe(),
                           time.monotonic() - proc.started_at)

    def watch(self, on_down: Callable[[str], None], on_up: Callable[[str], None],
              interval_s: float = 2.0) -> None:
        """Background thread: notice dead servers within ``interval_s``, call ``on_down(url)``,
        restart each on a thread of its own, call ``on_up(url)`` once healthy; until stop()."""
        def restart_one(url: str) -> None:
            try:
                self.restart(url)
                self._report_back(url)
                on_up(url)
            except ServerStopped:
                pass
            except Exception as e:  # noqa: BLE001 - the next round tries again; the log says why
                if not self._stopped:
                    logger.warning("restarting %s failed: %s; trying again", self.describe(url), e)
                    self._watch_stop.wait(min(5.0, 2 * interval_s))
            finally:
                with self._lock:
                    self._restarting.pop(url, None)

        def loop():
            while not self._watch_stop.wait(interval_s):
                for url in self.dead():
                    with self._lock:
                        if self._stopped or url in self._restarting:
                            continue
                        t = threading.Thread(target=restart_one, args=(url,), daemon=True,
                                             name=f"restart-{url.rsplit(':', 1)[-1]}")
                        self._restarting[url] = t
                    self._report_dead(url)
                    try:
                        on_down(url)
                    except Exception:  # noqa: BLE001 - still restart it
                        logger.exception("on_down(%s) failed", url)
                    t.start()

        self._watcher = threading.Thread(target=loop, name="server-watch", daemon=True)
        self._watcher.start()

    def stop(self, grace_s: float = 10.0) -> None:
        """Stops watching and ends every server: SIGTERM to all at once, SIGKILL to any still
        running after ``grace_s``. No server starts afterwards (a restart in progress is ended)."""
        with self._lock:
            self._stopped = True
            restarting = list(self._restarting.values())
        self._watch_stop.set()
        for p in self.procs:
            p.terminate()
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            if p.proc is not None:
                try:
                    p.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for p in self.procs:
            p.kill()
        for t in [self._watcher, *restarting]:
            if t is not None and t is not threading.current_thread():
                t.join(timeout=5)


class RouterManager(ServerManager):
    """The sglang-router in front of the servers (a single managed process).

    Its workers can change while it runs (:meth:`add_worker`, :meth:`remove_worker`: sglang-router
    0.3's ``POST /workers`` and ``DELETE /workers/{id}``); a restarted router starts with the
    workers it had last (:attr:`worker_urls`).
    """

    kind = "router"

    def __init__(self, worker_urls: Sequence[str], *, host: str = "127.0.0.1", port: int | None = None,
                 policy: str = "round_robin", api_key: str | None = None,
                 extra_args: Sequence[str] = (), **kw):
        # The router's /health answers before workers register; this one needs a healthy worker.
        kw.setdefault("health_path", "/health_generate")
        # Its launcher would import all of SGLang for an unused tracing hook (router_shim).
        env = dict(kw.get("env") or {})
        kw["env"] = {**env, **router_env(env.get("PYTHONPATH"))}
        # Its Prometheus exporter binds a fixed port (29000) unless told otherwise, which
        # collides between routers on one host.
        self._own_metrics_port = "--prometheus-port" not in extra_args
        if self._own_metrics_port:
            extra_args = [*extra_args, "--prometheus-port", str(free_port(host))]
        self.worker_urls = [u.rstrip("/") for u in worker_urls]
        self._router_args = dict(host=host, policy=policy, api_key=api_key, extra_args=list(extra_args))
        self._http_timeout_s = 10.0
        super().__init__(
            lambda p, h: router_command(self.worker_urls, p, **{**self._router_args, "host": h}),
            1, host=host, ports=None if port is None else [port], api_key=api_key, log_name="router", **kw,
        )

    def _new_ports(self) -> None:
        if self._own_metrics_port:
            args = self._router_args["extra_args"]
            args[args.index("--prometheus-port") + 1] = str(free_port(self._host))

    @property
    def url(self) -> str:
        return self.urls[0]

    def restart(self, url: str | None = None) -> None:
        """Restarts the router with the current :attr:`worker_urls` (waits while there are none:
        the router cannot be healthy without a worker)."""
        proc = self.procs[0]
        while not self.worker_urls:
            if self._watch_stop.wait(0.5) or self._stopped:
                raise ServerStopped("router: stopped while waiting for a worker to restart it with")
        port = int(proc.url.rsplit(":", 1)[1])
        proc.cmd = router_command(list(self.worker_urls), port, **self._router_args,
                                  python=proc.cmd[0])
        super().restart(proc.url)
        try:
            self.reconcile()
        except Exception as e:  # noqa: BLE001 - it runs; the engine reconciles again when told
            logger.warning("%s: could not reconcile its workers after the restart: %s", self.describe(self.url), e)

    # ---------------------------------------------------------------- worker management
    def _request(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=self._http_timeout_s) as resp:
            text = resp.read().decode()
        return json.loads(text) if text.strip() else None

    def workers(self) -> dict[str, str]:
        """The router's registered workers: URL -> worker id."""
        listing = self._request("GET", "/workers") or {}
        return {w["url"].rstrip("/"): w.get("id") or w.get("worker_id") for w in listing.get("workers", [])}

    def add_worker(self, url: str, timeout_s: float = 30.0) -> None:
        """Registers ``url`` with the router and waits until the router lists it. Raises
        ``OSError`` when the router cannot be reached (the URL is kept for its restart)."""
        url = url.rstrip("/")
        if url not in self.worker_urls:
            self.worker_urls.append(url)
        if url in self.workers():
            return
        self._request("POST", "/workers", {"url": url})
        deadline = time.monotonic() + timeout_s
        while url not in self.workers():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.describe(self.url)} did not list worker {url} within "
                                   f"{timeout_s:.0f}s of POST /workers")
            time.sleep(0.2)

    def remove_worker(self, url: str) -> None:
        """Takes ``url`` out of the router's rotation (and out of its restart command)."""
        url = url.rstrip("/")
        if url in self.worker_urls:
            self.worker_urls.remove(url)
        worker_id = self.workers().get(url)
        if worker_id is not None:
            self._request("DELETE", f"/workers/{urllib.parse.quote(str(worker_id), safe='')}")

    def reconcile(self) -> None:
        """Makes the router's workers equal :attr:`worker_urls` (after a restart, a worker may
        have been added or removed while the router was down)."""
        registered = self.workers()
        for url in list(self.worker_urls):
            if url not in registered:
                self.add_worker(url)
        for url in registered:
            if url not in self.worker_urls:
                self.remove_worker(url)
