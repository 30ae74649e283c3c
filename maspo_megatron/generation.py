"""Rollout generation for training and evaluation: servers up, prompts out, scored groups back.

Runs on the driver (global rank 0). Wires ``rollout/`` (HTTP to SGLang-protocol servers) to
``reward/`` (verifiers in worker processes); knows nothing of Megatron.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from maspo_megatron.rollout.client import RolloutClient, RolloutClientConfig, RolloutRequest
from maspo_megatron.rollout.protocol import SamplingParams
from maspo_megatron.rollout.servers import (
    RouterManager,
    ServerManager,
    SGLangServerConfig,
    cpu_server_command,
    sglang_server_command,
)


@dataclass
class RolloutConfig:
    server_urls: list[str] = field(default_factory=list)
    """Running servers to attach to (e.g. a Slurm het-job component); empty: launch ``engine``."""
    engine: str = "sglang"
    """What to launch when ``server_urls`` is empty: ``sglang`` or ``cpu`` (the CPU server)."""
    cpu_server_device: str = "cpu"
    """Where the ``cpu`` engine's HF model runs: ``cpu``, or ``cuda`` (small-scale GPU runs,
    and colocated CUDA-IPC weight sync without SGLang)."""
    num_servers: int = 1
    sglang_tp: int = 1
    """Tensor-parallel size of each SGLang server."""
    mem_fraction_static: float | None = None
    use_router: bool = True
    """Send /generate through sglang-router (weight updates always go to each server)."""
    router_url: str | None = None
    """An already running router (with ``server_urls``)."""
    n_samples: int = 8
    """Responses per prompt (the GRPO group size)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    startup_timeout_s: float = 900.0
    client: RolloutClientConfig = field(default_factory=RolloutClientConfig)

    def __post_init__(self):
        if self.engine not in ("sglang", "cpu"):
            raise ValueError(f"rollout.engine must be 'sglang' or 'cpu', got {self.engine!r}")
        if self.n_samples < 2:
            raise ValueError("rollout.n_samples must be >= 2 (group-relative advantages need a group)")
        if self.temperature <= 0:
            raise ValueError("rollout.temperature must be > 0 (the trainer's log-probs use it)")
        if self.cpu_server_device not in ("cpu", "cuda"):
            raise ValueError(f"rollout.cpu_server_device must be 'cpu' or 'cuda', got {self.cpu_server_device!r}")


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


class RolloutEngine:
    """Launches (or attaches to) the servers and router, samples prompt groups and scores them."""

    def __init__(self, cfg: RolloutConfig, model_path: str, tokenizer, rewards, log_dir: str):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rewards = rewards
        self.router = None
        os.makedirs(log_dir, exist_ok=True)
        if cfg.server_urls:
            self.servers = ServerManager.attach(cfg.server_urls, startup_timeout_s=cfg.startup_timeout_s)
            self.servers.wait_healthy(self.servers.urls)
        else:
            if cfg.engine == "cpu":
                factory = lambda port: cpu_server_command(  # noqa: E731
                    model_path, port, extra_args=["--device", cfg.cpu_server_device])
            else:
                scfg = SGLangServerConfig(model_path=model_path, tp_size=cfg.sglang_tp,
                                          mem_fraction_static=cfg.mem_fraction_static)
                factory = lambda port: sglang_server_command(scfg, port)  # noqa: E731
            self.servers = ServerManager(factory, cfg.num_servers, log_dir=log_dir,
                                         startup_timeout_s=cfg.startup_timeout_s)
            self.servers.start()
        gen_urls = self.servers.urls
        if cfg.router_url:
            gen_urls = [cfg.router_url]
        elif cfg.use_router:
            self.router = RouterManager(self.servers.urls, log_dir=log_dir)
            self.router.start()
            gen_urls = [self.router.url]
        self.client = RolloutClient(gen_urls, cfg.client)
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

    def _sampling(self, seed: int, temperature: float | None) -> SamplingParams:
        eos = self.tokenizer.eos_token_id
        return SamplingParams(
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=self.cfg.top_p, top_k=self.cfg.top_k,
            stop_token_ids=[eos] if eos is not None else None, sampling_seed=seed,
        )

    def sample(self, prompts, n: int, seed_base: int, temperature: float | None = None) -> list[RolloutGroup]:
        """n responses per prompt (one request each, so a retry never duplicates a sample)."""
        requests = [
            RolloutRequest(index=i * n + j, input_ids=tuple(p.prompt_ids),
                           sampling=self._sampling(seed_base + i * n + j, temperature))
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
    }


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
