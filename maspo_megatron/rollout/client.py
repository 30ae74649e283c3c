"""Async generation client: bounded concurrency, load spreading, retries (any rollout backend).

Design: one HTTP request per sample (``n == 1``), identified by the caller's ``index``. A group of
G samples for one prompt is G requests with distinct indices (and, for reproducibility, distinct
``sampling_seed``). This makes every request idempotent: a request that fails (connection error,
5xx, timeout, or ``finish_reason == "abort"`` because the server was paused) is re-sent, possibly to
another server, and at most one attempt per index is in flight, so a killed server never loses
or duplicates a sample. With ``n > 1`` a failure half-way would leave a partial group.

Errors: 4xx answers are the caller's fault and fail the batch at once, quoting the server's
message; a 200 answer that does not parse fails at once too (a protocol bug, not bad luck).

Servers: give the server URLs (the client spreads requests to the least-loaded healthy one and
moves retries elsewhere) or a single sglang-router URL (the router spreads; retries go back to
it). The rollout engine (``generation.RolloutEngine``) calls ``mark_down`` when a server dies (or,
with a router, when no server is left behind it) and ``mark_up`` once a restarted server holds the
current weights again; a server marked down after a connection error is also retried by itself
once ``down_cooldown_s`` has passed (a longer mark-down is never shortened by that). While no URL
is up, samples wait for one, at most ``unavailable_timeout_s``.

Full servers: with per-server limits (``max_running_per_server``, or each server's own, read by
the rollout engine: ``read_server_limits``) the client keeps that many requests in flight on
every server, each new one going to the server with the most room, and the rollout's concurrency
is their sum: no server idles while another queues requests it cannot run yet. Without them,
``max_concurrency`` requests are in flight over all servers, spread to the least loaded.

Messages name the process behind a URL where the caller says how (``describe``: URL, pid, log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import aiohttp
import torch

from maspo_megatron.rollout.backend import (
    GenerateOutput, ProtocolError, RolloutBackend, SamplingParams, get_backend,
)

logger = logging.getLogger(__name__)


@dataclass
class RolloutClientConfig:
    max_concurrency: int = 64  # requests in flight over all servers (without per-server limits)
    max_running_per_server: int | None = None
    """Requests in flight per server: each is kept at this many (instead of ``max_concurrency``
    over all), so none idles while another queues. None: no per-server limit, unless
    ``read_server_limits``."""
    read_server_limits: bool = False
    """Read each server's own limit (SGLang: its scheduler's max running requests, from
    ``/server_info``) when the rollout engine starts, and keep each server at it."""
    request_timeout_s: float = 1800.0  # one /generate call, connect to last byte
    connect_timeout_s: float = 10.0
    max_attempts: int = 8  # per sample, first try included
    backoff_initial_s: float = 0.5  # doubles per failed attempt of the same sample
    backoff_max_s: float = 15.0
    down_cooldown_s: float = 5.0  # skip a server this long after a connection-level failure
    progress_interval_s: float = 30.0  # seconds between progress log lines
    unavailable_timeout_s: float = 900.0
    """How long a sample waits while no server is up (e.g. the only one restarting and
    re-syncing) before the rollout fails."""

    def __post_init__(self):
        for key in ("max_concurrency", "max_attempts"):
            if getattr(self, key) < 1:
                raise ValueError(f"rollout.client.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.max_running_per_server is not None and self.max_running_per_server < 1:
            raise ValueError(f"rollout.client.max_running_per_server must be >= 1 or None, "
                             f"got {self.max_running_per_server!r}")
        if self.read_server_limits and self.max_running_per_server is not None:
            raise ValueError("rollout.client.read_server_limits and max_running_per_server are exclusive "
                             "(read each server's limit, or set one for all)")
        for key in ("request_timeout_s", "connect_timeout_s", "progress_interval_s", "unavailable_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"rollout.client.{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("backoff_initial_s", "backoff_max_s", "down_cooldown_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"rollout.client.{key} must be >= 0, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class RolloutRequest:
    index: int  # caller's id; results come back ordered by it
    input_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass
class Sample:
    index: int
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]  # SGLang output_token_logprobs: log_softmax(logits / T)
    finish_reason: str  # "stop" | "length"
    weight_version: str | None  # the server's when it answered
    token_versions: list[str] | None  # per output token, the version it was sampled under (engine's record)
    server: str
    attempts: int
    routed_experts: torch.Tensor | None = None
    """Routing replay: int32 ``[len(prompt_ids) + len(output_ids) - 1, layers, topk]``."""


class RolloutError(RuntimeError):
    """A rollout that cannot complete; the message says which sample, server and why."""


class RolloutRequestError(RolloutError):
    """The server rejected a request (4xx): retrying cannot help."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"{url} answered HTTP {status}: {message}")
        self.url, self.status, self.message = url, status, message


class _Retryable(Exception):
    def __init__(self, message: str, server_down: bool = False):
        super().__init__(message)
        self.server_down = server_down


class RolloutClient:
    def __init__(self, urls: Sequence[str], config: RolloutClientConfig | None = None,
                 api_key: str | None = None, accepted_weight_versions: Sequence[str] | None = None,
                 backend: RolloutBackend | str = "sglang", vocab_size: int | None = None,
                 describe: Callable[[str], str] | None = None,
                 outage: Callable[[], str] | None = None, routes: tuple[int, int] | None = None):
        if not urls:
            raise ValueError("RolloutClient needs at least one server or router URL")
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        # The real SGLang server crashes (the whole process) on an out-of-vocabulary input id:
        # such a request is refused here, naming it.
        self.vocab_size = vocab_size
        self.urls = [u.rstrip("/") for u in urls]
        self.config = config or RolloutClientConfig()
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # When set, a sample with a token from other weights (e.g. a server restarted from the
        # initial checkpoint and not yet re-synced) is discarded and re-sent elsewhere. More than
        # one version is accepted while a pipelined rollout spans a weight sync.
        self.accepted_weight_versions = None if accepted_weight_versions is None \
            else frozenset(accepted_weight_versions)
        # ``describe(url)`` names the process behind a URL in messages; ``outage()`` says why no
        # server is up (e.g. which one is restarting) when samples time out waiting.
        self.describe = describe or (lambda url: url)
        self.outage = outage
        # Routing replay: (layers, topk) of the MoE model. Every request then asks for its
        # routed experts, and a sample whose answer lacks them (or has another shape) fails.
        self.routes = routes
        self._lock = threading.Lock()  # mark_down/up come from the server-watch thread
        self._down_until: dict[str, float] = {}
        self._inflight = {u: 0 for u in self.urls}
        self.peak_inflight = {u: 0 for u in self.urls}  # the most requests a URL had in flight at once
        # Per-URL limits (None: only max_concurrency over all): from the config or set_limits().
        self._limit: dict[str, int] | None = None
        if self.config.max_running_per_server is not None:
            self._limit = {u: self.config.max_running_per_server for u in self.urls}
        self.retries = 0  # failed attempts that were retried, over the client's life
        self._warned: dict[str, tuple[float, int]] = {}  # url -> (last warning, suppressed since)

    # ------------------------------------------------------------------ server health
    def mark_down(self, url: str, for_s: float | None = None) -> None:
        """Skips ``url`` for ``for_s`` seconds (None: until :meth:`mark_up`); never shortens an
        earlier, longer mark-down."""
        url = url.rstrip("/")
        until = time.monotonic() + (float("inf") if for_s is None else for_s)
        with self._lock:
            self._down_until[url] = max(until, self._down_until.get(url, 0.0))

    def mark_up(self, url: str) -> None:
        with self._lock:
            self._down_until.pop(url.rstrip("/"), None)

    def set_limits(self, limits: dict[str, int]) -> None:
        """Requests in flight per URL (e.g. each server's own limit; a router's: the sum of its
        workers'); every URL needs one."""
        limits = {u.rstrip("/"): int(n) for u, n in limits.items()}
        missing = [u for u in self.urls if u not in limits]
        if missing or any(n < 1 for n in limits.values()):
            raise ValueError(f"set_limits needs a limit >= 1 for every URL; got {limits} for {self.urls}")
        self._limit = {u: limits[u] for u in self.urls}

    def _capacity(self) -> int:
        """Requests in flight over all URLs: the sum of the per-URL limits, else max_concurrency."""
        return sum(self._limit.values()) if self._limit is not None else self.config.max_concurrency

    def _pick(self, avoid: str | None) -> str | None:
        now = time.monotonic()
        with self._lock:
            up = [u for u in self.urls if self._down_until.get(u, 0.0) <= now]
            if not up:
                return None
            preferred = [u for u in up if u != avoid] or up
            limit = self._limit
            # The least full: relative to each URL's limit when there are limits.
            url = min(preferred, key=lambda u: self._inflight[u] / (limit[u] if limit else 1))
            self._inflight[url] += 1
            self.peak_inflight[url] = max(self.peak_inflight[url], self._inflight[url])
            return url

    def _release(self, url: str) -> None:
        with self._lock:
            self._inflight[url] -= 1

    # ------------------------------------------------------------------ requests
    async def _post(self, session: aiohttp.ClientSession, url: str, payload: dict) -> object:
        """The parsed JSON body of one generate call; retryable failures raise _Retryable."""
        try:
            async with session.post(url + self.backend.generate_path, json=payload,
                                    headers=self.headers) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise _Retryable(f"connection to {self.describe(url)} failed: {e!r}", server_down=True) from e
        except asyncio.TimeoutError as e:
            raise _Retryable(f"{self.describe(url)} did not answer within {self.config.request_timeout_s:.0f}s") from e
        if status >= 500:
            raise _Retryable(f"{self.describe(url)} answered HTTP {status}: "
                             f"{self.backend.error_message(status, text)}")
        if status >= 400:
            raise RolloutRequestError(url, status, self.backend.error_message(status, text))
        try:
            return json.loads(text)
        except ValueError as e:
            raise RolloutError(f"{url} sent a response that is not JSON: {text[:500]!r}") from e

    async def _generate_one(self, session, url: str, payload: dict, req: RolloutRequest) -> GenerateOutput:
        body = await self._post(session, url, payload)
        try:
            out = self.backend.parse_generate(body, 1, True, self.routes)[0]
        except ProtocolError as e:
            raise RolloutError(f"sample {req.index}: {url} sent a malformed generate response: {e}") from e
        if out.routed_experts is not None:
            want = (len(req.input_ids) + len(out.output_ids) - 1, *self.routes)
            if tuple(out.routed_experts.shape) != want:
                raise RolloutError(f"sample {req.index}: {url} returned routed experts of shape "
                                   f"{tuple(out.routed_experts.shape)}, expected {want} (tokens - 1, "
                                   "layers, topk)")
        return out

    async def _one(self, session, req: RolloutRequest, on_done: Callable[[], None]) -> Sample:
        cfg = self.config
        payload = self.backend.generate_request(req.input_ids, req.sampling, routed_experts=self.routes is not None)
        avoid = None
        for attempt in range(1, cfg.max_attempts + 1):
            url = self._pick(avoid)
            waited_since = time.monotonic()
            while url is None:  # every server is down: wait for a restart (and re-sync) or the cooldown
                if time.monotonic() - waited_since > cfg.unavailable_timeout_s:
                    why = f" ({self.outage()})" if self.outage else ""
                    raise RolloutError(
                        f"sample {req.index}: no rollout server available for {cfg.unavailable_timeout_s:.0f}s "
                        f"(rollout.client.unavailable_timeout_s){why}")
                await asyncio.sleep(min(cfg.down_cooldown_s, 0.5))
                url = self._pick(avoid)
            try:
                out = await self._generate_one(session, url, payload, req)
                if out.finish_reason == "abort":
                    raise _Retryable(f"{self.describe(url)} aborted the request: "
                                     f"{out.finish_detail.get('message', out.finish_detail)}")
                accepted = self.accepted_weight_versions
                seen = {out.weight_version, *(out.token_versions or ())}
                if accepted is not None and not seen <= accepted:
                    raise _Retryable(f"{self.describe(url)} sampled with weight_version {sorted(seen - accepted)}, "
                                     f"accepted: {sorted(accepted)} (restarted and not re-synced?)",
                                     server_down=True)
            except _Retryable as e:
                if e.server_down:
                    self.mark_down(url, cfg.down_cooldown_s)
                if attempt == cfg.max_attempts:
                    raise RolloutError(f"sample {req.index} failed after {attempt} attempts; "
                                       f"last error: {e}") from e
                self._warn_retry(url, req.index, attempt, e)
                avoid = url
                await asyncio.sleep(min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (attempt - 1)))
                continue
            finally:
                self._release(url)
            on_done()
            return Sample(req.index, list(req.input_ids), out.output_ids, out.output_logprobs,
                          out.finish_reason, out.weight_version, out.token_versions, url, attempt,
                          out.routed_experts)
        raise AssertionError("unreachable")

    def _warn_retry(self, url: str, index: int, attempt: int, error: Exception) -> None:
        """One warning per URL per 10 s, with the count of retries it stands for (a dead server
        fails every request it held at once)."""
        now = time.monotonic()
        with self._lock:
            self.retries += 1
            last, quiet = self._warned.get(url, (-1e9, 0))
            if now - last < 10.0:
                self._warned[url] = (last, quiet + 1)
                return
            self._warned[url] = (now, 0)
        more = f" (and {quiet} more retries since the last warning)" if quiet else ""
        logger.warning("sample %d attempt %d: %s; retrying%s", index, attempt, error, more)

    async def generate(self, requests: Sequence[RolloutRequest],
                       progress: Callable[[int, int], None] | None = None,
                       until: Callable[[Sample], bool] | None = None) -> list[Sample]:
        """Generates every request; returns samples ordered by ``index``.

        ``until(sample)`` is called with each sample as it completes; True ends the rollout there
        (over-sampling): the requests not finished are cancelled, their connections closed (on
        which SGLang aborts them), and only the finished samples are returned."""
        indices = [r.index for r in requests]
        if len(set(indices)) != len(indices):
            raise ValueError("RolloutRequest.index values must be unique within a batch")
        for r in requests:
            if r.sampling.n != 1:
                raise ValueError(f"request {r.index}: sampling.n={r.sampling.n}; send one request "
                                 "per sample (distinct index) so retries stay idempotent")
            self.check_ids(r.input_ids, f"request {r.index}")
        total, done = len(requests), 0
        t0 = last_log = time.monotonic()

        def on_done():
            nonlocal done, last_log
            done += 1
            if progress:
                progress(done, total)
            now = time.monotonic()
            if now - last_log >= self.config.progress_interval_s or done == total:
                last_log = now
                logger.info("rollout: %d/%d samples in %.1fs", done, total, now - t0)

        cfg = self.config
        timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s, sock_connect=cfg.connect_timeout_s)
        capacity = self._capacity()
        sem = asyncio.Semaphore(capacity)

        async def bounded(req):
            async with sem:
                return await self._one(session, req, on_done)

        connector = aiohttp.TCPConnector(limit=capacity)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            tasks = [asyncio.create_task(bounded(r)) for r in requests]
            try:
                if until is None:
                    samples = await asyncio.gather(*tasks)
                else:
                    samples = []
                    for next_done in asyncio.as_completed(tasks):
                        samples.append(await next_done)
                        if until(samples[-1]):
                            break
            finally:
                for t in tasks:
                    t.cancel()
                # Cancelled requests unwind (and release their server) before the session closes.
                await asyncio.gather(*tasks, return_exceptions=True)
        return sorted(samples, key=lambda s: s.index)

    def run(self, requests: Sequence[RolloutRequest],
            progress: Callable[[int, int], None] | None = None,
            until: Callable[[Sample], bool] | None = None) -> list[Sample]:
        """Synchronous wrapper of :meth:`generate` (for the trainer's rank 0)."""
        return asyncio.run(self.generate(requests, progress, until))

    def check_ids(self, ids: Sequence[int], what: str) -> None:
        if self.vocab_size is None:
            return
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RolloutError(f"{what}: token ids {bad[:5]} are outside the model's vocabulary "
                               f"[0, {self.vocab_size}) (the server would crash on them)")

    async def score(self, sequences: Sequence[Sequence[int]], url: str) -> list[list[float]]:
        """Per sequence, the server's untempered log-prob of every token after the first
        (``len - 1`` values), all in one prefill batch: the probe of the weight-sync proof."""
        for i, ids in enumerate(sequences):
            self.check_ids(ids, f"score request to {url}, sequence {i}")
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s,
                                        sock_connect=self.config.connect_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                body = await self._post(session, url.rstrip("/"), self.backend.score_request(sequences))
            except _Retryable as e:
                raise RolloutError(str(e)) from e
        try:
            return self.backend.parse_score(body, [len(s) for s in sequences])
        except ProtocolError as e:
            raise RolloutError(f"{url}: {e}") from e
