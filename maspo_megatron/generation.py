"""Rollout generation for training and evaluation: servers up, prompts out, scored groups back.

Runs on the driver (global rank 0). Wires ``rollout/`` (HTTP to the rollout backend's servers) to
``reward/`` (verifiers in worker processes); knows nothing of Megatron.

Faults (launched servers and router): a watcher thread notices a server that exited within
``rollout.watch_interval_s``, takes it out of service at once (out of the client's rotation, or
out of the router's: ``DELETE /workers/{id}``) and restarts it on its port. Its in-flight
requests fail and are retried on the servers still in service; with none left, samples wait
(``rollout.client.unavailable_timeout_s``). A restarted server comes back with the checkpoint's
weights, so it is only *ready*: the trainer re-syncs it to the current weights and proves it
(a collective over all ranks, see ``Trainer._resync``), then :meth:`RolloutEngine.back_in_service`
returns it to the rotation (``POST /workers`` on the router). A dead router is restarted with the
servers in service. The client also refuses any sample with a token of a weight version it does
not accept (the current one; with ``rollout.pipeline=one_step_off`` also the one before, while a
rollout spans a sync), so a server that slipped back early can never feed stale samples.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from maspo_megatron.rollout.backend import SamplingConfig, SamplingParams, ServerSpec, get_backend
from maspo_megatron.rollout.client import RolloutClient, RolloutClientConfig, RolloutRequest
from maspo_megatron.rollout.servers import RouterManager, ServerManager

logger = logging.getLogger(__name__)


@dataclass
class RolloutConfig:
    server_urls: list[str] = field(default_factory=list)
    """Running servers to attach to (e.g. a Slurm het-job component); empty: launch them."""
    engine: str = "sglang"
    """The rollout backend (``rollout/backend.py``); SGLang is the one there is."""
    device: str = "cuda"
    """Where launched servers run: ``cuda``, or ``cpu`` (SGLang's CPU engine: demo, CI, laptop)."""
    num_servers: int = 1
    sglang_tp: int = 1
    """Tensor-parallel size of each server."""
    dtype: str | None = None
    """Server dtype (e.g. ``bfloat16``); None: the checkpoint's."""
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    """KV-cache capacity per server in tokens (None: the engine's choice; CPU: 16384)."""
    use_router: bool = True
    """Send generate requests through sglang-router (weight updates always go to each server)."""
    router_url: str | None = None
    """An already running router (with ``server_urls``)."""
    n_samples: int = 8
    """Responses per prompt (the GRPO group size)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    startup_timeout_s: float = 900.0
    watch_interval_s: float = 1.0
    """Seconds between checks that launched servers and the router are alive (a dead one is
    taken out of service and restarted)."""
    client: RolloutClientConfig = field(default_factory=RolloutClientConfig)
    pipeline: str = "sync"
    """``sync``: each step's rollout runs, then training waits for it. ``one_step_off``: step
    k+1's rollout is generated while step k trains, so its samples are at most one weight
    version older than the trainer's (the staleness bound, checked before every update)."""
    partial: str | None = None
    """With ``one_step_off``, what a weight sync does to the responses in flight: None (the sync
    waits until they are finished), ``continue`` (paused by retraction, then continued under the
    new weights; each token's version is the server's record) or ``abort`` (aborted, and
    sampled again from the start under the new weights)."""
    routing_replay: bool = False
    """Routing replay (R3) for MoE models: the servers return each token's routed experts and
    the trainer's routers use them in the old-log-prob and train passes (launched servers get
    the engine's flag; attached ``server_urls`` must have been started with it). Refused for a
    dense model, and with a router (sglang-router 0.3.2 drops the request field)."""

    def __post_init__(self):
        get_backend(self.engine)  # raises naming the valid engines
        if self.pipeline not in ("sync", "one_step_off"):
            raise ValueError(f"rollout.pipeline must be 'sync' or 'one_step_off', got {self.pipeline!r}")
        if self.partial not in (None, "continue", "abort"):
            raise ValueError(f"rollout.partial must be None, 'continue' or 'abort', got {self.partial!r}")
        if self.partial is not None and self.pipeline != "one_step_off":
            raise ValueError(f"rollout.partial={self.partial!r} needs rollout.pipeline=one_step_off "
                             "(in sync mode no response is in flight at a weight sync)")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"rollout.device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.n_samples < 2:
            raise ValueError("rollout.n_samples must be >= 2 (group-relative advantages need a group)")
        if self.num_servers < 1 and not self.server_urls:
            raise ValueError("rollout.num_servers must be >= 1 (or give rollout.server_urls)")
        if not self.watch_interval_s > 0:
            raise ValueError(f"rollout.watch_interval_s must be > 0, got {self.watch_interval_s}")
        if self.routing_replay and (self.use_router or self.router_url):
            # Found by running it: sglang-router 0.3.2 parses /generate into its own request type,
            # which has no return_routed_experts, so the servers never see it.
            raise ValueError(
                "rollout.routing_replay=True needs rollout.use_router=False and no rollout.router_url: "
                "sglang-router 0.3.2 drops return_routed_experts from /generate requests, so no routes "
                "would come back; without a router the client spreads requests over the servers itself")

    def server_spec(self, model_path: str) -> ServerSpec:
        extra = get_backend(self.engine).routing_replay_args() if self.routing_replay else []
        return ServerSpec(model_path=model_path, tp_size=self.sglang_tp, device=self.device,
                          dtype=self.dtype, mem_fraction_static=self.mem_fraction_static,
                          max_total_tokens=self.max_total_tokens, extra_args=extra)


def routing_replay_shape(model_path: str) -> tuple[int, int]:
    """``(layers, topk)`` of the routes an MoE model's rollouts carry (HF ``config.json``:
    ``num_hidden_layers``, ``num_experts_per_tok``); ValueError for a dense model."""
    with open(os.path.join(model_path, "config.json")) as f:
        hf = json.load(f)
    hf = hf.get("text_config", hf)
    if not hf.get("num_experts_per_tok"):
        raise ValueError(f"rollout.routing_replay=True needs an MoE model, but {model_path} is dense "
                         f"(its config.json has no num_experts_per_tok; architectures "
                         f"{hf.get('architectures')}); set rollout.routing_replay=False")
    return int(hf["num_hidden_layers"]), int(hf["num_experts_per_tok"])


@dataclass
class RolloutGroup:
    """The responses to one prompt, scored."""

    prompt_index: int
    prompt_ids: list[int]
    answer: str
    outputs: list[list[int]]
    logprobs: list[list[float]]
    finish: list[str]
    rewards: list[float]
    correct: list[bool]
    errors: list[str | None] = field(default_factory=list)
    """Per sample: the reward function's error (its traceback) when it raised or its worker died."""
    timeouts: list[bool] = field(default_factory=list)
    """Per sample: the reward function ran past ``reward.timeout_s`` (the reward is then 0)."""
    versions: list[list[str] | None] = field(default_factory=list)
    """Per sample, the weight version of each response token as the server recorded it (None:
    the server sent no per-token record; ``answered`` then holds the version it answered with)."""
    answered: list[str | None] = field(default_factory=list)
    """Per sample, the server's weight version when it answered."""
    routed_experts: list = field(default_factory=list)
    """Per sample (routing replay only): int32 ``[prompt + output - 1, layers, topk]``."""


def launch_servers(cfg: RolloutConfig, model_path: str, log_dir: str) -> ServerManager:
    """Starts ``cfg.num_servers`` rollout servers of ``model_path`` (checked against the engine
    first) and waits until they are healthy: how a run launches its own."""
    backend = get_backend(cfg.engine)
    spec = cfg.server_spec(model_path)
    with open(os.path.join(model_path, "config.json")) as f:
        backend.check_model(spec, json.load(f))
    servers = ServerManager(lambda port, host: backend.server_command(spec, port, host),
                            cfg.num_servers, log_dir=log_dir, startup_timeout_s=cfg.startup_timeout_s,
                            health_path=backend.health_path)
    servers.start()
    return servers


class RolloutEngine:
    """Launches (or attaches to) the servers and router, samples prompt groups and scores them."""

    def __init__(self, cfg: RolloutConfig, model_path: str, tokenizer, rewards, log_dir: str,
                 vocab_size: int | None = None):
        self.cfg = cfg
        self.backend = get_backend(cfg.engine)
        self.tokenizer = tokenizer
        self.rewards = rewards
        self.router = None
        os.makedirs(log_dir, exist_ok=True)
        if cfg.server_urls:
            self.servers = ServerManager.attach(cfg.server_urls, startup_timeout_s=cfg.startup_timeout_s,
                                                health_path=self.backend.health_path)
            self.servers.wait_healthy(self.servers.urls)
        else:
            self.servers = launch_servers(cfg, model_path, log_dir)
        gen_urls = self.servers.urls
        if cfg.router_url:
            gen_urls = [cfg.router_url]
        elif cfg.use_router:
            self.router = RouterManager(self.servers.urls, log_dir=log_dir)
            self.router.start()
            gen_urls = [self.router.url]
        # Fleet state (the watcher threads and the trainer's main thread both change it).
        self._lock = threading.Lock()
        self._order = list(self.servers.urls)
        self._in_service = list(self.servers.urls)  # serving, with the current weights
        self._ready: list[str] = []  # restarted and healthy, waiting for the current weights
        self._generation = {u: 0 for u in self._order}  # restarts: a new weight-update group each
        self._down_since: dict[str, float] = {}
        self.client = RolloutClient(gen_urls, cfg.client, backend=self.backend, vocab_size=vocab_size,
                                    describe=self.describe, outage=self.outage,
                                    routes=routing_replay_shape(model_path) if cfg.routing_replay else None)
        if cfg.client.read_server_limits:  # each server kept at its own limit; a router at their sum
            limits = {u: self.backend.max_running_requests(u) for u in self.servers.urls}
            self.client.set_limits(limits if gen_urls == self.servers.urls else {gen_urls[0]: sum(limits.values())})
            logger.info("rollout: requests in flight per server %s", limits)
        #: How a rollout's requests are run (the trainer swaps in its collective-aware runner).
        self.runner = self.client.run
        if self.servers.procs:
            self.servers.watch(self._server_down, self._server_up, interval_s=cfg.watch_interval_s)
        if self.router is not None:
            self.router.watch(self._router_down, self._router_up, interval_s=cfg.watch_interval_s)

    # ------------------------------------------------------------------ fleet
    def describe(self, url: str) -> str:
        """The process behind a URL: ``rollout server http://h:p (pid N, log F)`` or the router."""
        url = url.rstrip("/")
        if self.router is not None and url == self.router.url:
            return self.router.describe(url)
        if url in self.servers.urls:
            return self.servers.describe(url)
        return url

    def outage(self) -> str:
        """Which servers are out of service and since when (for a rollout that waits too long)."""
        now = time.monotonic()
        with self._lock:
            down = [(u, now - t) for u, t in self._down_since.items()]
            ready = list(self._ready)
        parts = [f"{self.describe(u)} out of service for {s:.0f}s"
                 + (" (restarted, waiting for its re-sync)" if u in ready else "") for u, s in down]
        if self.router is not None and not self.router.procs[0].alive:
            parts.append(f"{self.router.describe(self.router.url)} {self.router.procs[0].status()}")
        return "; ".join(parts) or "every server is up"

    def _server_down(self, url: str) -> None:
        """Watcher thread: ``url``'s process exited. Out of service at once."""
        with self._lock:
            if url in self._in_service:
                self._in_service.remove(url)
            if url in self._ready:
                self._ready.remove(url)
            self._down_since.setdefault(url, time.monotonic())
            left = list(self._in_service)
        logger.warning("%s taken out of service (%d of %d servers left in service)", self.describe(url),
                       len(left), len(self._order))
        if self.router is None:
            self.client.mark_down(url)
            return
        if not left:  # nothing behind the router: samples wait instead of spending attempts
            self.client.mark_down(self.router.url)
        try:
            self.router.remove_worker(url)
            logger.warning("router: removed worker %s", url)
        except Exception as e:  # noqa: BLE001 - a dead router restarts with the in-service workers
            logger.warning("router: could not remove worker %s (%s); it restarts without it", url, e)

    def _server_up(self, url: str) -> None:
        """Watcher thread: ``url`` restarted and is healthy, with the checkpoint's weights."""
        with self._lock:
            self._generation[url] += 1
            if url not in self._ready:
                self._ready.append(url)
        logger.warning("%s is back; it serves again once re-synced to the current weights", self.describe(url))

    def take_ready(self) -> list[tuple[str, int]]:
        """Restarted servers waiting for the current weights, as ``(url, generation)``; each is
        handed out once (the caller re-syncs it, then :meth:`back_in_service`)."""
        with self._lock:
            out = [(u, self._generation[u]) for u in self._ready]
            self._ready.clear()
        return out

    def sync_targets(self) -> list[tuple[str, int]]:
        """The servers a weight sync goes to now: those in service, as ``(url, generation)``
        (a changed list means a new weight-update group)."""
        with self._lock:
            return [(u, self._generation[u]) for u in self._order if u in self._in_service]

    def alive(self, url: str) -> bool:
        proc = self.servers.process(url)
        return proc.alive if proc is not None else self.servers.healthy(url)

    def wait_dead(self, urls, timeout_s: float = 10.0) -> list[str]:
        """Which of ``urls`` died (their process exited), waiting up to ``timeout_s`` for a failure
        seen over the network to show as an exit. Attached servers: failing health checks."""
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [u for u in urls if not self.alive(u)]
            if dead or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for url in dead:  # out of service now, whether or not the watcher has seen it yet
            with self._lock:
                serving = url in self._in_service
            if serving:
                self._server_down(url)
        return dead

    def back_in_service(self, url: str) -> None:
        """After its re-sync: ``url`` serves again (client rotation, or the router's workers)."""
        with self._lock:
            if url not in self._in_service:
                self._in_service.append(url)
            self._down_since.pop(url, None)
        if self.router is None:
            self.client.mark_up(url)
        else:
            try:
                self.router.add_worker(url)
                logger.warning("router: added worker %s back", url)
            except Exception as e:  # noqa: BLE001 - the router restarts with its worker list
                logger.warning("router: could not add worker %s back (%s); it restarts with it", url, e)
            if self.router.procs[0].alive:
                self.client.mark_up(self.router.url)
        logger.warning("%s is back in service", self.describe(url))

    def _router_down(self, url: str) -> None:
        self.client.mark_down(url)
        with self._lock:
            self.router.worker_urls = [u for u in self._order if u in self._in_service]

    def _router_up(self, url: str) -> None:
        with self._lock:
            workers = [u for u in self._order if u in self._in_service]
        self.router.worker_urls = workers
        try:
            self.router.reconcile()
        except Exception as e:  # noqa: BLE001 - requests find out; a later restart reconciles again
            logger.warning("%s: could not set its workers to %s: %s", self.router.describe(url), workers, e)
        if workers:
            self.client.mark_up(url)
        logger.warning("%s serves again, with workers %s", self.router.describe(url), workers)

    @property
    def server_urls(self) -> list[str]:
        """Each server's own URL (weight updates never go through the router)."""
        return self.servers.urls

    def _sampling(self, seed: int) -> SamplingParams:
        eos = self.tokenizer.eos_token_id
        return SamplingParams.from_config(self.cfg.sampling, sampling_seed=seed,
                                          stop_token_ids=[eos] if eos is not None else None)

    def sample(self, prompts, n: int, seed_base: int, runner=None, enough=None) -> list[RolloutGroup]:
        """n responses per prompt (one request each, so a retry never duplicates a sample).
        ``runner`` runs the requests (default :attr:`runner`).

        Over-sampling: with ``enough(groups)`` each prompt's group is scored as soon as its n
        responses are in, and ``enough`` is asked with the groups complete so far (in prompt
        order); True aborts the requests still running or waiting, and only complete groups are
        returned (the aborted prompts' are not)."""
        requests = [
            RolloutRequest(index=i * n + j, input_ids=tuple(p.prompt_ids),
                           sampling=self._sampling(seed_base + i * n + j))
            for i, p in enumerate(prompts) for j in range(n)
        ]
        run = runner or self.runner
        if enough is None:
            return self._groups(prompts, n, run(requests, progress=_progress_bar("rollout")))
        pending: dict[int, list] = {}
        done: dict[int, RolloutGroup] = {}

        def until(sample) -> bool:
            i = sample.index // n
            pending.setdefault(i, []).append(sample)
            if len(pending[i]) < n:
                return False
            (done[i],) = self._groups([prompts[i]], n, sorted(pending.pop(i), key=lambda s: s.index))
            return enough([done[k] for k in sorted(done)])

        run(requests, progress=_progress_bar("rollout"), until=until)
        return [done[k] for k in sorted(done)]

    def _groups(self, prompts, n: int, samples) -> list[RolloutGroup]:
        """Scored groups of ``prompts``; ``samples``: n per prompt, in prompt order."""
        # Special tokens stay in: a verifier must not see a response that began with <unk> as correct.
        texts = [self.tokenizer.decode(s.output_ids, skip_special_tokens=False) for s in samples]
        scored = self.rewards.score(texts, [prompts[k // n].answer for k in range(len(samples))])
        groups = []
        for i, p in enumerate(prompts):
            chunk, res = samples[i * n:(i + 1) * n], scored[i * n:(i + 1) * n]
            groups.append(RolloutGroup(
                prompt_index=p.index, prompt_ids=list(p.prompt_ids), answer=p.answer,
                outputs=[s.output_ids for s in chunk], logprobs=[s.logprobs for s in chunk],
                finish=[s.finish_reason for s in chunk],
                versions=[s.token_versions for s in chunk], answered=[s.weight_version for s in chunk],
                rewards=[r.reward for r in res], correct=[r.correct for r in res],
                errors=[r.error for r in res], timeouts=[r.timeout for r in res],
                routed_experts=[s.routed_experts for s in chunk] if self.cfg.routing_replay else [],
            ))
        return groups

    def evaluate(self, prompts, k: int, seed_base: int) -> dict[str, float]:
        """Avg@k (mean accuracy over k samples per prompt) and Pass@k (any of k correct)."""
        groups = self.sample(prompts, k, seed_base)
        acc = np.array([g.correct for g in groups], dtype=float)
        return {f"eval/avg@{k}": float(acc.mean()), f"eval/pass@{k}": float(acc.max(axis=1).mean())}

    def close(self, grace_s: float = 5.0) -> None:
        """Stops the router and the launched servers (SIGTERM, SIGKILL after ``grace_s``)."""
        if self.router is not None:
            self.router.stop(grace_s)
        self.servers.stop(grace_s)


def rollout_stats(groups: list[RolloutGroup]) -> dict[str, float]:
    rewards = [r for g in groups for r in g.rewards]
    if not rewards:
        return {}
    lengths = [len(o) for g in groups for o in g.outputs]
    return {
        "reward/mean": float(np.mean(rewards)),
        "reward/accuracy": float(np.mean([c for g in groups for c in g.correct])),
        "response/length_mean": float(np.mean(lengths)),
        "response/length_max": float(np.max(lengths)),
        "response/truncated_frac": float(np.mean([f == "length" for g in groups for f in g.finish])),
        # Samples the reward function could not score (they count as reward 0).
        "reward/error_rate": sum(bool(e) for g in groups for e in g.errors) / len(rewards),
        "reward/timeout_rate": sum(bool(t) for g in groups for t in g.timeouts) / len(rewards),
    }


class RewardFailure(RuntimeError):
    """Too many samples of a step could not be scored (``reward.max_error_rate``)."""


def check_reward_failures(groups: list[RolloutGroup], reward_cfg, step: int) -> str | None:
    """Stops the run when more than ``reward.max_error_rate`` of the samples of ``groups`` (one
    step) could not be scored: raises :class:`RewardFailure` with the counts and the first error's
    traceback. Below the limit, a one-line summary when any failed (else None)."""
    total = sum(len(g.rewards) for g in groups)
    errors = [e for g in groups for e in g.errors if e]
    timeouts = sum(bool(t) for g in groups for t in g.timeouts)
    failed = len(errors) + timeouts
    if not total or not failed:
        return None
    summary = (f"step {step}: reward.fn={reward_cfg.fn!r} could not score {failed}/{total} samples "
               f"({len(errors)} raised, {timeouts} ran past reward.timeout_s={reward_cfg.timeout_s:g}); "
               "they count as reward 0")
    if failed / total > reward_cfg.max_error_rate:
        first = errors[0] if errors else (f"no traceback: every failing sample ran past reward.timeout_s="
                                          f"{reward_cfg.timeout_s:g}s (raise it, or make the function faster)")
        raise RewardFailure(f"{summary}, over reward.max_error_rate={reward_cfg.max_error_rate:g}: stopping. "
                            f"First error:\n{first}")
    return summary


def _progress_bar(label: str):
    """A one-line progress display on a terminal; silent when output is a file or pipe."""
    if not sys.stdout.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        end = "\n" if done == total else ""
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, flush=True)

    return show
