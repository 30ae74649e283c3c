"""Rollout generation for training and evaluation: servers up, prompts out, scored groups back.

Runs on the driver (global rank 0). Wires ``rollout/`` (HTTP to the rollout backend's servers) to
``reward/`` (verifiers in worker processes); knows nothing of Megatron.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from maspo_megatron.rollout.backend import SamplingConfig, SamplingParams, ServerSpec, get_backend
from maspo_megatron.rollout.client import RolloutClient, RolloutClientConfig, RolloutRequest
from maspo_megatron.rollout.servers import RouterManager, ServerManager


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
    client: RolloutClientConfig = field(default_factory=RolloutClientConfig)

    def __post_init__(self):
        get_backend(self.engine)  # raises naming the valid engines
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"rollout.device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.n_samples < 2:
            raise ValueError("rollout.n_samples must be >= 2 (group-relative advantages need a group)")
        if self.num_servers < 1 and not self.server_urls:
            raise ValueError("rollout.num_servers must be >= 1 (or give rollout.server_urls)")

    def server_spec(self, model_path: str) -> ServerSpec:
        return ServerSpec(model_path=model_path, tp_size=self.sglang_tp, device=self.device,
                          dtype=self.dtype, mem_fraction_static=self.mem_fraction_static,
                          max_total_tokens=self.max_total_tokens)


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
            spec = cfg.server_spec(model_path)
            with open(os.path.join(model_path, "config.json")) as f:
                self.backend.check_model(spec, json.load(f))
            self.servers = ServerManager(lambda port, host: self.backend.server_command(spec, port, host),
                                         cfg.num_servers, log_dir=log_dir,
                                         startup_timeout_s=cfg.startup_timeout_s,
                                         health_path=self.backend.health_path)
            self.servers.start()
        gen_urls = self.servers.urls
        if cfg.router_url:
            gen_urls = [cfg.router_url]
        elif cfg.use_router:
            self.router = RouterManager(self.servers.urls, log_dir=log_dir)
            self.router.start()
            gen_urls = [self.router.url]
        self.client = RolloutClient(gen_urls, cfg.client, backend=self.backend, vocab_size=vocab_size)
        if self.servers.procs and self.router is None:
            # Without a router the client picks servers itself: tell it about restarts.
            self.servers.watch(self.client.mark_down, self.client.mark_up)

    def restart_dead(self) -> list[str]:
        """Restarts managed servers that died (attached servers are their launcher's business)."""
        if not self.servers.procs:
            return []
        return self.servers.restart_dead(self.client.mark_down, self.client.mark_up)

    @property
    def server_urls(self) -> list[str]:
        """Each server's own URL (weight updates never go through the router)."""
        return self.servers.urls

    def _sampling(self, seed: int) -> SamplingParams:
        eos = self.tokenizer.eos_token_id
        return SamplingParams.from_config(self.cfg.sampling, sampling_seed=seed,
                                          stop_token_ids=[eos] if eos is not None else None)

    def sample(self, prompts, n: int, seed_base: int) -> list[RolloutGroup]:
        """n responses per prompt (one request each, so a retry never duplicates a sample)."""
        requests = [
            RolloutRequest(index=i * n + j, input_ids=tuple(p.prompt_ids),
                           sampling=self._sampling(seed_base + i * n + j))
            for i, p in enumerate(prompts) for j in range(n)
        ]
        samples = self.client.run(requests, progress=_progress_bar("rollout"))
        # Special tokens stay in: a verifier must not see a response that began with <unk> as correct.
        texts = [self.tokenizer.decode(s.output_ids, skip_special_tokens=False) for s in samples]
        scored = self.rewards.score(texts, [prompts[s.index // n].answer for s in samples])
        groups = []
        for i, p in enumerate(prompts):
            chunk, res = samples[i * n:(i + 1) * n], scored[i * n:(i + 1) * n]
            groups.append(RolloutGroup(
                prompt_index=p.index, prompt_ids=list(p.prompt_ids), answer=p.answer,
                outputs=[s.output_ids for s in chunk], logprobs=[s.logprobs for s in chunk],
                finish=[s.finish_reason for s in chunk],
                rewards=[r.reward for r in res], correct=[r.reward > 0 for r in res],
                errors=[r.error for r in res], timeouts=[r.timeout for r in res],
            ))
        return groups

    def evaluate(self, prompts, k: int, seed_base: int) -> dict[str, float]:
        """Avg@k (mean accuracy over k samples per prompt) and Pass@k (any of k correct)."""
        groups = self.sample(prompts, k, seed_base)
        acc = np.array([g.correct for g in groups], dtype=float)
        return {f"eval/avg@{k}": float(acc.mean()), f"eval/pass@{k}": float(acc.max(axis=1).mean())}

    def close(self) -> None:
        self.servers.stop()
        if self.router is not None:
            self.router.stop()


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
