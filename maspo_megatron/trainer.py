"""The RL loop: rollouts -> rewards -> advantages -> old log-probs -> MASPO step -> weight sync.

SPMD under torchrun. Global rank 0 owns everything that is not the model: the prompt data and
its cursor, the rollout servers and client, the reward workers and the metric sinks. It builds
the step's batch and sends each data-parallel rank only its share of the rows, packed
(``megatron.batch_share``); every rank then runs the Megatron actor on its share, and metrics
over the old log-probs are reduced across data-parallel ranks, never gathered. After
the optimizer step, the first data-parallel replica sends its weights to the servers (one sender
per pipeline stage, so no GPU ever holds the whole model).

Rollout faults heal inside the step (see ``generation.py`` for the servers' side). Re-syncing a
restarted server is collective (the weights are sharded over TP/PP ranks, and the proof runs the
actor's forward), while only rank 0 drives rollouts. The choice here: during a rollout the other
ranks wait in a command loop (:meth:`Trainer._rollout_phase`) instead of in one long broadcast.
Rank 0 runs the rollout's HTTP requests on a thread and, from its main thread, tells the other
ranks ``resync`` as soon as a restarted server is healthy: all ranks then send it the current
weights in a weight-update group of its own (the servers in service are not paused and keep
generating) and prove them (:meth:`_resync`), and only then does it serve again. With one server
the rollout simply waits for that (``rollout.client.unavailable_timeout_s``); with several, the
others take the dead one's requests meanwhile. Waiting for the rollout to end before re-syncing
(the simpler alternative) would fail the one-server case and leave a restarted server idle for
the rest of the step. A ``wait`` command every ``_HEARTBEAT_S`` keeps the other ranks' collective
timeout from firing during long rollouts. The step's weight sync then goes to the servers in
service (:meth:`_sync`); one that dies during it is dropped and the others are synced again.

Pipelining (``rollout.pipeline``): in ``sync`` mode each step's rollout runs while the trainer
waits. In ``one_step_off`` rank 0 starts the next step's rollout on a thread (the whole of
:meth:`Trainer.collect`, dynamic sampling rounds and rewards included) right after taking the
current step's, so it is generated while the step trains, with the weights the servers hold:
its samples are one version behind when they are trained (the decoupled objective of
``algo/objective.py`` corrects for it). Before the weight sync the trainer waits for that rollout
(``rollout.partial`` None), or the sync lands while it is in flight: ``continue`` retracts the
running requests and continues them under the new weights (SGLang records each token's version),
``abort`` aborts them and the client samples them again. Every trained token's version (the
server's record) is checked against the staleness bound before the update
(:meth:`Trainer._check_versions`) and written to ``prompts.jsonl``; a checkpoint taken while a
rollout is prefetched stores the data cursor from before it, so a resume draws those prompts
again. A server restarted meanwhile is re-synced when the trainer next waits for a rollout.

Interrupts: SIGTERM/SIGINT on any rank (forwarded by the CLI and torchrun) end the run cleanly,
rank 0 printing ``interrupted at step N; last checkpoint: step M`` (``runtime/lifetime.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from maspo_megatron.algo.advantages import AdvantageConfig, group_advantages
from maspo_megatron.algo.filters import OverlongConfig, dynamic_sampling_keep, overlong_penalty
from maspo_megatron.config import to_dict
from maspo_megatron.data import DataConfig
from maspo_megatron.algo.metrics import mean_metric
from maspo_megatron.megatron.actor import ActorConfig, SequenceBatch
from maspo_megatron.megatron.routing_replay import filler_routes
from maspo_megatron.megatron.batch_share import reduce_over_dp, send_shares
from maspo_megatron.megatron.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    vocab_multiple_for,
)
from maspo_megatron.reward import RewardConfig
from maspo_megatron.generation import (
    RolloutConfig,
    RolloutEngine,
    RolloutGroup,
    check_reward_failures,
    rollout_stats,
    routing_replay_shape,
)
from maspo_megatron.rollout.backend import WeightSyncError
from maspo_megatron.rollout.weight_sync import WeightSyncConfig
from maspo_megatron.runtime import ParallelConfig, device
from maspo_megatron.runtime.lifetime import Interrupted, InterruptGuard
from maspo_megatron.weight_publisher import WeightProof, WeightProofError, WeightPublisher

_HEARTBEAT_S = 60.0  # rank 0 tells the waiting ranks this often during a rollout that it is alive

logger = logging.getLogger("maspo_megatron")


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face model directory (config.json, safetensors, tokenizer files)."""
    dtype: str = "bf16"
    """Parameter dtype: bf16 (GPU), fp32 (CPU tests and the demo)."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding multiple (times TP), megatron's convention."""
    fp8: str | None = None
    """FP8 training through Transformer Engine: ``hybrid`` (e4m3 forward, e5m2 backward) or
    ``e4m3``; None trains in ``dtype``. GPU with TE only."""
    fp8_recipe: str = "blockwise"
    """TE scaling recipe: ``delayed``, ``tensorwise``, ``blockwise`` (Hopper) or ``mxfp8`` (Blackwell)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1; GPU)."""
    recompute_granularity: str | None = None
    """Activation recomputation: ``full`` or ``selective``; None keeps activations."""
    moe_aux_loss_coeff: float | None = None
    """Mixture-of-experts models: coefficient of the load-balancing loss (megatron's per-layer
    ``aux_loss``) added to the objective; None: the checkpoint's ``router_aux_loss_coef``; 0
    turns it off. Rejected for dense models."""
    transformer_overrides: dict = field(default_factory=dict)
    """Any other megatron ``TransformerConfig`` fields, as JSON on the command line."""

    def __post_init__(self):
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"model.dtype must be 'bf16' or 'fp32', got {self.dtype!r}")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ValueError(f"model.fp8 must be None, 'hybrid' or 'e4m3', got {self.fp8!r}")
        if self.fp8_recipe not in ("delayed", "tensorwise", "blockwise", "mxfp8"):
            raise ValueError(f"model.fp8_recipe must be delayed/tensorwise/blockwise/mxfp8, got {self.fp8_recipe!r}")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError("model.recompute_granularity must be None, 'full' or 'selective'")
        if self.moe_aux_loss_coeff is not None and not (
                isinstance(self.moe_aux_loss_coeff, (int, float)) and 0 <= self.moe_aux_loss_coeff < math.inf):
            raise ValueError(f"model.moe_aux_loss_coeff must be None or a finite number >= 0, "
                             f"got {self.moe_aux_loss_coeff!r}")

    def megatron_overrides(self) -> dict:
        """TransformerConfig fields this config sets beyond the HF translation."""
        out = dict(sequence_parallel=self.sequence_parallel)
        if self.fp8:
            from maspo_megatron.megatron.model import te_available

            if not te_available():
                raise RuntimeError("model.fp8 needs Transformer Engine on a CUDA device "
                                   "(use the NGC PyTorch/NeMo container); unset model.fp8 on CPU")
            out.update(fp8=self.fp8, fp8_recipe=self.fp8_recipe)
        if self.recompute_granularity:
            out.update(recompute_granularity=self.recompute_granularity)
            if self.recompute_granularity == "full":
                out.update(recompute_method="uniform", recompute_num_layers=1)
        if self.moe_aux_loss_coeff is not None:
            out.update(moe_aux_loss_coeff=float(self.moe_aux_loss_coeff))
        out.update(self.transformer_overrides)
        return out


@dataclass
class AlgorithmConfig:
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal (no signal) and sample more prompts (DAPO)."""
    max_sampling_rounds: int = 4
    """Rollout rounds per step to fill the batch with informative groups."""
    oversample: float = 1.0
    """Over-sampling for dynamic sampling: each round draws this many times the prompts it still
    needs, and aborts the requests left once enough informative groups are complete (1.0: off)."""
    overlong_penalty: bool = False
    """DAPO's soft length penalty added to rewards (see ``overlong``)."""
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    mask_truncated: bool = False
    """Drop the loss on responses cut at max_new_tokens."""

    def __post_init__(self):
        if self.max_sampling_rounds < 1:
            raise ValueError(f"algorithm.max_sampling_rounds must be >= 1, got {self.max_sampling_rounds}")
        if not self.oversample >= 1.0:
            raise ValueError(f"algorithm.oversample must be >= 1.0 (1.0: off), got {self.oversample}")
        if self.oversample > 1.0 and not self.dynamic_sampling:
            raise ValueError("algorithm.oversample > 1 over-samples for dynamic sampling: it needs "
                             "algorithm.dynamic_sampling=true")


@dataclass
class TrainerConfig:
    """The whole run. Recipes build one; the CLI applies ``key=value`` overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    steps: int = 100
    """RL steps (rollout, update, weight sync) in the whole run, counting those before a resume."""
    prompts_per_step: int = 32
    """Prompt groups trained on per step (dynamic sampling draws more to fill them)."""
    output_dir: str = "outputs/run"
    """metrics.jsonl, prompts.jsonl, config.json, checkpoints/, logs/ and tensorboard/ go here."""
    save_every: int = 50
    """Checkpoint interval in steps (0: only at the end)."""
    resume: bool = True
    """Continue from the newest complete checkpoint in ``output_dir/checkpoints`` when there is one
    (False: start over there; its checkpoints and metrics are replaced as the run goes)."""
    resume_force: bool = False
    """Resume even from a checkpoint written for another model path or an incompatible config
    (data, optimizer groups): the resume guard then only warns; a new data order starts over."""
    eval_every: int = 0
    """Evaluation interval in steps on ``data.eval_path`` (0: never)."""
    eval_samples: int = 4
    """k of Avg@k / Pass@k during evaluation."""
    eval_prompts: int = 64
    """How many prompts of ``data.eval_path`` (the first ones) each evaluation uses."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with a NaN/Inf loss (each is skipped)."""
    seed: int = 0
    """Seeds python/numpy/torch and the per-request sampling seeds."""
    tensorboard: bool = True
    """Also write the metrics as TensorBoard events under ``output_dir/tensorboard``."""
    wandb_project: str | None = None
    """Log the metrics to this Weights & Biases project (needs ``wandb``); None: off."""

    def __post_init__(self):
        if self.steps < 1 or self.prompts_per_step < 1:
            raise ValueError("steps and prompts_per_step must be >= 1")
        sampling = self.rollout.sampling
        if sampling.filtered:
            raise ValueError(
                f"rollout.sampling.top_p={sampling.top_p} / top_k={sampling.top_k}: the trainer's "
                "importance ratio is against the unfiltered softmax(logits / T), which is the "
                "behaviour policy only without top-p/top-k filtering, and no correction for "
                "filtering is implemented; train with top_p=1.0 and top_k=-1 (eval may filter)")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        self._check_pipeline()
        for key in ("save_every", "eval_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0: {'only at the end' if key == 'save_every' else 'never'}), "
                                 f"got {getattr(self, key)}")
        for key in ("eval_samples", "eval_prompts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    def _check_pipeline(self) -> None:
        """What ``rollout.pipeline=one_step_off`` and ``rollout.partial`` need of the other sections."""
        ro = self.rollout
        if ro.pipeline == "sync":
            return
        if self.actor.tis_cap is None:
            raise ValueError("rollout.pipeline=one_step_off trains on samples up to one weight version old: "
                             "the decoupled objective's behaviour weight needs actor.tis_cap (e.g. 2.0)")
        if self.weight_sync.mode == "colocated":
            raise ValueError("rollout.pipeline=one_step_off generates while the trainer trains: "
                             "weight_sync.mode=colocated frees the servers' GPU memory for training")
        if self.reward.num_workers < 1:
            raise ValueError("rollout.pipeline=one_step_off scores rewards on the rollout thread, where an "
                             "inline reward (reward.num_workers=0) has no time limit: set reward.num_workers >= 1")
        needs = {"continue": "retract", "abort": "abort"}.get(ro.partial)
        if needs is not None and self.weight_sync.pause_mode != needs:
            raise ValueError(f"rollout.partial={ro.partial} needs weight_sync.pause_mode={needs} "
                             f"(got {self.weight_sync.pause_mode!r}): "
                             + ("retracted requests keep their tokens and are recomputed under the new weights"
                                if needs == "retract" else "in-flight requests must end so they are sampled again"))

    @property
    def staleness_bound(self) -> int:
        """How many weight versions a trained sample may lag the trainer."""
        return 1 if self.rollout.pipeline == "one_step_off" else 0


# ----------------------------------------------------------------------------- metrics


class MetricsSink:
    """metrics.jsonl, TensorBoard and (optionally) Weights & Biases; rank 0 only."""

    def __init__(self, cfg: TrainerConfig):
        os.makedirs(cfg.output_dir, exist_ok=True)
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.tb = self.wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("wandb_project is set but wandb is not installed "
                                   "(pip install 'maspo-megatron[wandb]')") from e
            self.wandb = wandb.init(project=cfg.wandb_project, config=to_dict(cfg))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def cut(self, step: int) -> None:
        """Drops the records after ``step`` (all of them at step 0): a resumed run redoes those."""
        _cut_jsonl(self.path, step)
        if self.tb is not None:
            log_dir = self.tb.log_dir
            self.tb.close()
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir, purge_step=step + 1)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _cut_jsonl(path: str, step: int) -> None:
    """Keeps the records of ``path`` up to ``step`` (none at step 0), atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if step > 0 and json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut short by a kill: dropped
            pass
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _console(step: int, total: int, m: dict, elapsed: float, steps_here: int) -> None:
    """One line per step; ``step``/``total`` count the whole run, the ETA this process's pace."""
    eta = elapsed / max(steps_here, 1) * (total - step)
    print(
        f"step {step:>4}/{total} | reward {m.get('reward/mean', float('nan')):.3f} "
        f"acc {m.get('reward/accuracy', float('nan')):.3f} | loss {m.get('actor/loss', float('nan')):+.4f} "
        f"gnorm {m.get('actor/grad_norm', float('nan')):.3f} | gated+ {m.get('actor/maspo/gated_frac_pos', 0):.3f} "
        f"gated- {m.get('actor/maspo/gated_frac_neg', 0):.3f} | len {m.get('response/length_mean', 0):.1f} | "
        f"t {m.get('time/step_s', 0):.1f}s eta {eta / 60:.1f}min",
        flush=True,
    )


# ----------------------------------------------------------------------------- batches


def build_batch(groups: list[RolloutGroup], advantages: torch.Tensor, mask_truncated: bool,
                routes: tuple[int, int] | None = None) -> SequenceBatch:
    """Right-padded prompt+response ids with per-token response masks and advantages.

    ``routes``: ``(layers, topk)`` under routing replay: every sample must carry its routed
    experts (``[prompt + output - 1, layers, topk]``); a missing or misshapen one is an error
    naming the sample, never a silent fallback to the trainer's own routing."""
    rows = [(g.prompt_ids, out, lp, fin) for g in groups
            for out, lp, fin in zip(g.outputs, g.logprobs, g.finish)]
    length = max(len(p) + len(o) for p, o, _, _ in rows)
    n = len(rows)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.bool)
    rollout_lp = torch.zeros(n, length)
    lengths = torch.zeros(n, dtype=torch.long)
    for i, (p, o, lp, fin) in enumerate(rows):
        ids[i, : len(p)] = torch.tensor(p)
        ids[i, len(p): len(p) + len(o)] = torch.tensor(o, dtype=torch.long)
        lengths[i] = len(p) + len(o)
        if not (mask_truncated and fin == "length"):
            mask[i, len(p): len(p) + len(o)] = True
        rollout_lp[i, len(p): len(p) + len(lp)] = torch.tensor(lp, dtype=torch.float32)
    routed = None
    if routes is not None:
        routed = filler_routes((n, length), *routes)  # the last token and the padding
        i = 0
        for g in groups:
            got = g.routed_experts or [None] * len(g.outputs)
            for j, (out, r) in enumerate(zip(g.outputs, got)):
                want = (len(g.prompt_ids) + len(out) - 1, *routes)
                if r is None or tuple(r.shape) != want:
                    raise ValueError(
                        f"routing replay: sample {j} of prompt {g.prompt_index} has routed experts "
                        f"{None if r is None else tuple(r.shape)}, expected {want} (tokens - 1, layers, "
                        "topk): the rollout's routes did not reach training")
                routed[i, : want[0]] = r
                i += 1
    return SequenceBatch(
        input_ids=ids, lengths=lengths, response_mask=mask,
        advantages=advantages.reshape(-1).float(),
        rollout_logprobs=rollout_lp, routed_experts=routed,
    )


def _spans(versions: list[int]) -> list[list[int]]:
    """Run-length form of per-token versions: ``[[version, tokens], ...]``."""
    out: list[list[int]] = []
    for v in versions:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


class _Background:
    """``fn()`` on a daemon thread of rank 0 (a rollout); :meth:`Trainer._await` waits for it."""

    def __init__(self, fn, name: str, step: int | None = None):
        self.step = step
        self._box: dict = {}
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self._box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by result() in the main thread
            self._box["error"] = e

    def result(self):
        if "error" in self._box:
            raise self._box["error"]
        return self._box["out"]


# ----------------------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.is_driver = self.rank == 0
        self.engine = self.rewards = self.sink = self.publisher = self.proof = None
        self.loader = self.eval_data = self.tokenizer = None
        self.bad_steps = 0
        self.start_step = 0
        self.version = 0  # the weights version the actor holds (= steps trained)
        self.step_in_progress = 0  # the step being run (1-based), or the last one done between steps
        self.last_checkpoint: int | None = None
        self._prefetch: _Background | None = None  # rank 0: the next step's rollout, in flight
        self._prefetch_cursor: dict | None = None  # the data cursor before it drew its prompts
        self.routes: tuple[int, int] | None = None  # (layers, topk) under routing replay

    # --------------------------------------------------------------------- set-up
    def setup(self) -> None:
        from maspo_megatron.algo.objective import Objective
        from maspo_megatron.megatron.actor import Actor
        from maspo_megatron.megatron.convert import load_hf_checkpoint
        from maspo_megatron.megatron.model import build_model

        cfg = self.cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if not cfg.model.path or not cfg.data.train_path:
            raise ValueError("model.path (an HF model directory) and data.train_path (.jsonl/.parquet) "
                             "must be set, e.g. model.path=/models/DeepSeek-R1-Distill-Qwen-1.5B")
        dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
        vocab_multiple = cfg.model.make_vocab_size_divisible_by
        if self._resuming():
            # A run resumed under another TP must rebuild the vocabulary padding it saved.
            vocab_multiple = vocab_multiple_for(self._ckpt_dir(), cfg.parallel.tp)

        overrides = cfg.model.megatron_overrides()
        if cfg.rollout.routing_replay:
            self.routes = routing_replay_shape(cfg.model.path)  # refuses a dense model, naming the key
            overrides["moe_enable_routing_replay"] = True

        def hf_model():
            chunks = build_model(cfg.model.path, cfg.parallel, dtype=dtype,
                                 make_vocab_size_divisible_by=vocab_multiple,
                                 config_overrides=overrides)
            load_hf_checkpoint(chunks, cfg.model.path)
            return chunks

        # The actor minimises the RL objective it is handed (algo.objective).
        temperature = cfg.rollout.sampling.temperature
        self.actor = Actor(hf_model(), cfg.actor, objective=Objective(cfg.actor), temperature=temperature)
        # The frozen starting policy, for the KL penalty; same layout as the actor.
        self.ref = Actor(hf_model(), cfg.actor, trainable=False, temperature=temperature) \
            if cfg.actor.kl_coef > 0 else None
        self.start_step = 0
        if self.is_driver:
            self._setup_driver()
        self._maybe_resume()
        urls = [self.engine.server_urls if self.is_driver else None]
        dist.broadcast_object_list(urls, src=0)
        self.server_urls = urls[0]
        self.publisher = self._make_publisher()
        self.proof = self._make_proof()

    def _setup_driver(self) -> None:
        from maspo_megatron.data import PromptDataset, PromptLoader, load_tokenizer
        from maspo_megatron.reward import RewardPool

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.loader = PromptLoader(PromptDataset(cfg.data.train_path, cfg.data, self.tokenizer),
                                   shuffle=cfg.data.shuffle, seed=cfg.data.seed)
        if len(self.loader.dataset) < cfg.prompts_per_step:  # pre-flight counted rows, before length filtering
            raise ValueError(f"data.train_path={cfg.data.train_path!r} keeps {len(self.loader.dataset)} prompts "
                             f"(data.max_prompt_len={cfg.data.max_prompt_len}), fewer than prompts_per_step="
                             f"{cfg.prompts_per_step}: every step would train some prompts twice")
        if cfg.eval_every and cfg.data.eval_path:
            self.eval_data = PromptDataset(cfg.data.eval_path, cfg.data, self.tokenizer)
        self.rewards = RewardPool.from_config(cfg.reward)
        if cfg.rollout.dtype is None:  # the servers hold the trainer's precision
            cfg.rollout.dtype = "float32" if cfg.model.dtype == "fp32" else "bfloat16"
        self.engine = RolloutEngine(cfg.rollout, cfg.model.path, self.tokenizer, self.rewards,
                                    os.path.join(cfg.output_dir, "logs"),
                                    vocab_size=self.actor.spec.vocab_size)
        self.engine.runner = self._generate  # rollouts that re-sync restarted servers as they go
        self.sink = MetricsSink(cfg)
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)

    def _make_publisher(self) -> WeightPublisher:
        cfg = self.cfg
        if cfg.weight_sync.mode == "disk" and not cfg.weight_sync.disk_dir:
            cfg.weight_sync.disk_dir = os.path.join(cfg.output_dir, "sync")
        return WeightPublisher(self.server_urls, cfg.weight_sync, backend=cfg.rollout.engine,
                               engine_ranks_per_server=cfg.rollout.sglang_tp)

    def _make_proof(self) -> WeightProof | None:
        proof = self.cfg.weight_sync.proof
        if not proof.enabled:
            return None
        return WeightProof(proof, self.actor.spec.vocab_size, self.actor.dp_size,
                           proof.tolerance(self.cfg.model.dtype))

    # --------------------------------------------------------------------- checkpoints
    def _ckpt_dir(self) -> str:
        return os.path.join(self.cfg.output_dir, "checkpoints")

    def _resuming(self) -> bool:
        return self.cfg.resume and has_checkpoint(self._ckpt_dir())

    def _maybe_resume(self) -> None:
        if self._resuming():
            # The newest complete checkpoint: a truncated or corrupt newer one is named and skipped.
            state = load_checkpoint(self._ckpt_dir(), self.actor.model, self.actor.optimizer,
                                    self.actor.scheduler)
            self.start_step = int(state["step"])
            extra = state.get("extra_state") or {}
            if self.is_driver and "data_cursor" in extra:
                try:
                    self.loader.load_state_dict(extra["data_cursor"])
                except ValueError as e:
                    if not self.cfg.resume_force:
                        raise
                    print(f"resume_force=true: {e}; the data order starts from the beginning", flush=True)
            self.bad_steps = int(extra.get("bad_steps", 0))
            self.last_checkpoint = self.step_in_progress = self.start_step
            if self.is_driver:
                print(f"resumed from {self._ckpt_dir()} at step {self.start_step}", flush=True)
        if self.is_driver:  # the records of steps after the checkpoint are redone
            self.sink.cut(self.start_step)
            _cut_jsonl(os.path.join(self.cfg.output_dir, "prompts.jsonl"), self.start_step)

    def _data_cursor(self) -> dict:
        """Rank 0: the cursor a checkpoint saves. A prefetched rollout is not trained yet: a
        resume draws its prompts again."""
        return self._prefetch_cursor if self._prefetch is not None else self.loader.state_dict()

    def save(self, step: int) -> None:
        from maspo_megatron.preflight import run_record

        extra = {"bad_steps": self.bad_steps}
        if self.is_driver:
            extra["data_cursor"] = self._data_cursor()
            extra["run"] = run_record(self.cfg)  # what the resume guard compares a later run with
        save_checkpoint(self._ckpt_dir(), step, self.actor.model, self.actor.optimizer,
                        self.actor.scheduler, extra_state=extra)
        self.last_checkpoint = step

    # --------------------------------------------------------------------- rollouts
    def collect(self, step: int, runner=None) -> tuple[list[RolloutGroup], dict]:
        """Rollout rounds until ``prompts_per_step`` informative groups (or the round limit).
        ``runner`` runs the requests (default: the engine's, which re-syncs restarted servers).

        Appends the dataset indices of every prompt drawn for the step, of those aborted by
        over-sampling (drawn, not trained: like an uninformative group) and of those trained on,
        with the weight versions of each trained sample's tokens (``[[version, tokens], ...]``),
        to ``output_dir/prompts.jsonl`` (after a resume, a step's later record supersedes).
        """
        cfg, alg = self.cfg, self.cfg.algorithm
        t0 = time.perf_counter()
        n = cfg.rollout.n_samples
        retries0 = self.engine.client.retries  # a prefetched rollout's happen during the step before
        kept: list[RolloutGroup] = []
        seen: list[RolloutGroup] = []
        drawn: list[int] = []
        rounds = 0
        while len(kept) < cfg.prompts_per_step and rounds < alg.max_sampling_rounds:
            need = cfg.prompts_per_step - len(kept)
            prompts = self.loader.next_batch(math.ceil(need * alg.oversample))
            enough = None
            if len(prompts) > need:  # over-sampling: the rest is aborted once `need` groups are informative
                def enough(done, need=need):
                    return int(dynamic_sampling_keep(torch.tensor([g.rewards for g in done])).sum()) >= need
            groups = self.engine.sample(prompts, n, seed_base=(cfg.seed * 1_000_003 + step * 1009 + rounds) * 10_000,
                                        runner=runner, enough=enough)
            rounds += 1
            seen += groups
            drawn += [p.index for p in prompts]
            check_reward_failures(groups, cfg.reward, step + 1)  # raises over reward.max_error_rate
            if alg.dynamic_sampling:
                keep = dynamic_sampling_keep(torch.tensor([g.rewards for g in groups]))
                kept += [g for g, k in zip(groups, keep.tolist()) if k]
            else:
                kept += groups
            if not alg.dynamic_sampling:
                break
        complete = {g.prompt_index for g in seen}
        aborted = [i for i in drawn if i not in complete]
        info = {"sampling/rounds": rounds, "sampling/groups_kept": len(kept),
                "sampling/groups_seen": len(seen), "sampling/groups_aborted": len(aborted),
                "rollout/retries": self.engine.client.retries - retries0,
                # the rollout's own duration; in one_step_off it ran during the step before
                "time/collect_s": time.perf_counter() - t0}
        failures = check_reward_failures(seen, cfg.reward, step + 1)
        if failures:
            print(failures, flush=True)
        if len(kept) < cfg.prompts_per_step:
            print(f"step {step + 1}: dynamic sampling found {len(kept)}/{cfg.prompts_per_step} prompts whose "
                  f"{n} responses disagree in reward after {rounds} rounds (algorithm.max_sampling_rounds); "
                  f"training on {len(kept)} groups", flush=True)
        kept = kept[: cfg.prompts_per_step]
        with open(os.path.join(cfg.output_dir, "prompts.jsonl"), "a") as f:
            f.write(json.dumps({"step": step + 1, "drawn": drawn, "aborted": aborted,
                                "trained": [g.prompt_index for g in kept],
                                "versions": [[_spans(self._versions(g, j)) for j in range(len(g.outputs))]
                                             for g in kept]}) + "\n")
        return kept, {**info, **rollout_stats(seen)}

    # --------------------------------------------------------------------- one step
    def step(self, step: int) -> dict | None:
        cfg = self.cfg
        t0 = time.perf_counter()
        collected = self._rollout_phase(lambda: self._rollout(step), f"the rollout of step {step + 1}")
        if self.is_driver and cfg.rollout.pipeline == "one_step_off" and step + 1 < cfg.steps:
            self._start_prefetch(step + 1)  # generated while this step trains
        batch, info = None, {}
        if self.is_driver:
            groups, info = collected
            if groups:
                rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
                if cfg.algorithm.overlong_penalty:
                    lengths = torch.tensor([[len(o) for o in g.outputs] for g in groups])
                    rewards = rewards + overlong_penalty(lengths, cfg.algorithm.overlong)
                adv = group_advantages(rewards, cfg=cfg.algorithm.advantage)
                batch = build_batch(groups, adv, cfg.algorithm.mask_truncated, self.routes)
        have, deal = [batch is not None and len(batch) >= self.actor.dp_size, None], None
        if self.is_driver and have[0]:
            try:
                deal = self.actor.deal(batch.lengths)
            except ValueError as e:  # raised on every rank below, not only on the driver
                have[1] = str(e)
        dist.broadcast_object_list(have, src=0)
        if have[1] is not None:
            raise ValueError(have[1])
        t_rollout = time.perf_counter() - t0
        if not have[0]:
            if self.is_driver:
                print(f"step {step + 1}: no informative prompt groups; no update this step", flush=True)
            return info if self.is_driver else None
        # Each data-parallel rank gets only its rows, packed; the driver drops the whole batch.
        padded_bytes = sum(v.numel() * v.element_size() for f in dataclasses.fields(SequenceBatch)
                           if (v := getattr(batch, f.name)) is not None) if self.is_driver else 0
        share, recv_bytes = send_shares(batch, deal)
        del batch
        self.publisher.release_rollout_memory()
        t1 = time.perf_counter()
        part = share.batch
        part.old_logprobs, entropy = self.actor.compute_logprobs(share, entropy=True)
        if self.ref is not None:
            part.ref_logprobs, _ = self.ref.compute_logprobs(share)
        t_logprob = time.perf_counter() - t1
        train = self.actor.train_step(share)
        t2 = time.perf_counter()
        if train["skipped_steps"] > 0:
            self.bad_steps += 1
            if self.is_driver:
                print(f"step {step + 1}: non-finite loss in {train['skipped_steps']:.0f} of "
                      f"{cfg.actor.num_mini_batches} mini-batches, their optimizer steps skipped "
                      f"({self.bad_steps} consecutive bad steps; max_bad_steps={cfg.max_bad_steps})",
                      flush=True)
        else:
            self.bad_steps = 0
        share_metrics = self._share_metrics(part, entropy, recv_bytes)
        if cfg.rollout.pipeline == "one_step_off" and cfg.rollout.partial is None and step + 1 < cfg.steps:
            # No response may be in flight at the sync: the next step's rollout ends first.
            self._rollout_phase(lambda: self._await(self._prefetch), f"the rollout of step {step + 2}")
        t_drain = time.perf_counter()
        sync = self._sync(step + 1)
        t3 = time.perf_counter()
        if not self.is_driver:
            return None
        metrics = {
            **info,
            **{f"actor/{k}": v for k, v in train.items()},
            **share_metrics, "batch/padded_bytes": float(padded_bytes),
            "time/rollout_s": t_rollout, "time/logprob_s": t_logprob,
            "time/train_s": t2 - t1 - t_logprob, "time/sync_s": t3 - t_drain, "time/step_s": t3 - t0,
            # one_step_off without partial rollouts: the wait for the next rollout before the sync
            "time/drain_s": t_drain - t2,
            **sync,
        }
        return metrics

    def _share_metrics(self, part: SequenceBatch, entropy: torch.Tensor, recv_bytes: int) -> dict[str, float]:
        """Metrics of the whole batch from every DP rank's share (reduced, not gathered), and
        the most bytes any rank received for its share. Collective: every rank calls it."""
        mask = part.response_mask
        local = {"actor/entropy_old": mean_metric(entropy, mask)}
        if part.rollout_logprobs is not None:
            local["mismatch/logprob_abs_diff"] = mean_metric((part.old_logprobs - part.rollout_logprobs).abs(), mask)
        out = reduce_over_dp(local)
        most = torch.tensor([float(recv_bytes)], dtype=torch.float64, device=device())
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        out["batch/recv_bytes_max"] = float(most)
        return out

    # --------------------------------------------------------------------- collective rollouts
    def _command(self, cmd=None):
        """Rank 0's ``cmd`` on every rank."""
        box = [cmd]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _rollout_phase(self, fn, what: str):
        """Runs ``fn`` (a rollout: collect or evaluate) on rank 0 while the other ranks serve its
        commands: ``resync`` (a restarted server needs the current weights, collectively),
        ``wait`` (a heartbeat), ``done`` or ``error``. Returns ``fn()`` on rank 0, None elsewhere."""
        if not self.is_driver:
            while True:
                cmd = self._command()
                if cmd[0] == "done":
                    return None
                if cmd[0] == "error":
                    raise RuntimeError(f"rank 0 failed during {what}: {cmd[1]}")
                if cmd[0] == "resync":
                    self._resync(cmd[1])
        try:
            out = fn()
        except Exception as e:
            try:  # the other ranks stop with it instead of waiting for their collective timeout
                self._command(("error", f"{type(e).__name__}: {e}"))
            except Exception:  # noqa: BLE001 - the original error matters
                pass
            raise
        self._command(("done",))
        return out

    def _rollout(self, step: int) -> tuple[list[RolloutGroup], dict]:
        """Rank 0, in a rollout phase: the step's groups, prefetched during the previous step
        (``one_step_off``) or collected now, checked against the staleness bound."""
        pending, self._prefetch = self._prefetch, None
        if pending is None:
            groups, info = self.collect(step)
        elif pending.step != step:
            raise RuntimeError(f"the rollout prefetched for step {pending.step + 1} is not step {step + 1}'s")
        else:
            groups, info = self._await(pending)
        return groups, {**info, **self._check_versions(groups)}

    def _start_prefetch(self, step: int) -> None:
        """Rank 0: ``step``'s rollout on a thread while the current step trains. Its requests run
        on the plain client: the main thread is busy in the training collectives, so a restarted
        server is re-synced when the trainer next waits for a rollout (:meth:`_await`)."""
        self._prefetch_cursor = self.loader.state_dict()
        self._prefetch = _Background(lambda: self.collect(step, runner=self.engine.client.run),
                                     f"rollout of step {step + 1}", step)

    def _versions(self, group: RolloutGroup, j: int) -> list[int]:
        """The weight version of each response token of ``group``'s sample ``j``. Without the
        server's per-token record a response holds the version it was answered with: only
        ``rollout.partial=continue`` lets an update land during a request."""
        tokens = group.versions[j]
        if tokens is None:
            if self.cfg.rollout.partial == "continue":
                raise RuntimeError(f"prompt {group.prompt_index} sample {j}: the server sent no per-token "
                                   "weight versions (meta_info.weight_versions), which rollout.partial=continue needs")
            tokens = [group.answered[j]] * len(group.outputs[j])
        try:
            return [int(v) for v in tokens]
        except (TypeError, ValueError):
            raise RuntimeError(f"prompt {group.prompt_index} sample {j} was sampled with weight versions "
                               f"{sorted(set(map(str, tokens)))}, not the trainer's step counts") from None

    def _check_versions(self, groups: list[RolloutGroup]) -> dict[str, float]:
        """The staleness bound, before any update: every trained token was sampled with weights
        at most ``staleness_bound`` versions older than the trainer's (and none newer)."""
        bound = self.cfg.staleness_bound
        lags, mixed, samples = [], 0, 0
        for g in groups:
            for j in range(len(g.outputs)):
                versions = self._versions(g, j)
                lag = [self.version - v for v in versions]
                if not all(0 <= x <= bound for x in lag):
                    raise RuntimeError(
                        f"prompt {g.prompt_index} sample {j} was sampled with weight versions {sorted(set(versions))} "
                        f"but the trainer holds version {self.version}: rollout.pipeline={self.cfg.rollout.pipeline} "
                        f"trains samples at most {bound} version(s) old")
                lags += lag
                mixed += len(set(versions)) > 1
                samples += 1
        if not samples:
            return {}
        return {"rollout/staleness_mean": float(np.mean(lags)) if lags else 0.0,
                "rollout/staleness_max": float(max(lags, default=0)),
                "rollout/mixed_version_frac": mixed / samples}

    def _generate(self, requests, progress=None, until=None):
        """Rank 0 (``RolloutEngine.runner``): the rollout's HTTP requests on a thread, awaited."""
        return self._await(_Background(lambda: self.engine.client.run(requests, progress, until), "rollout"))

    def _await(self, work: "_Background"):
        """Rank 0, in a rollout phase: ``work``'s result; meanwhile the main thread re-syncs each
        restarted server as soon as it is healthy (collective)."""
        thread = work.thread
        last = time.monotonic()
        while thread.is_alive():
            thread.join(timeout=0.2)
            ready = self.engine.take_ready()
            if ready:
                self._command(("resync", ready))
                self._resync(ready)
                last = time.monotonic()
            elif time.monotonic() - last > _HEARTBEAT_S:
                self._command(("wait",))
                last = time.monotonic()
        return work.result()

    def _resync(self, targets) -> None:
        """Collective: restarted servers ``[(url, generation)]`` get the current weights (a
        weight-update group of their own) and pass the proof; then they serve again. One that
        died again meanwhile is left to its next restart; a live one that fails stops the run."""
        urls = [u for u, _ in targets]
        if self.is_driver:
            names = ", ".join(self.engine.describe(u) for u in urls)
            print(f"re-syncing weights v{self.version} to restarted {names} before it serves again", flush=True)
        t0 = time.perf_counter()
        try:
            self.publisher.publish_once(self.actor.model, self.version, urls)
            if self.proof is not None:
                self.proof.check(self.actor, self.engine.client if self.is_driver else None, urls, self.version)
        except (WeightSyncError, WeightProofError) as e:
            dead = self._command(self.engine.wait_dead(urls) if self.is_driver else None)
            if not dead:
                raise
            if self.is_driver:
                print(f"re-sync v{self.version}: {', '.join(self.engine.describe(u) for u in dead)} died "
                      f"again during it ({e}); it is restarted again", flush=True)
            urls = [u for u in urls if u not in dead]
            if not urls:
                return
            return self._resync([(u, g) for u, g in targets if u in urls])
        if self.is_driver:
            for url in urls:
                self.engine.back_in_service(url)
            print(f"re-synced weights v{self.version} to {', '.join(urls)} in {time.perf_counter() - t0:.1f}s; "
                  "serving again", flush=True)

    def _sync(self, version: int) -> dict[str, float]:
        """Sends the weights to the servers in service and proves they now compute the trainer's
        log-probs. A server that dies during it is dropped and the others are sent to again; it
        gets the weights when it is back (:meth:`_resync`)."""
        self.version = version
        out: dict[str, float] = {}
        client = self.engine.client if self.is_driver else None
        if client is not None and client.accepted_weight_versions is not None:
            # The servers resume generating inside the sync, before the proof and the narrowing
            # below: a response finished meanwhile may carry the new version and is no stale one.
            client.accepted_weight_versions = client.accepted_weight_versions | {str(version)}
        while True:
            targets = self._command(self.engine.sync_targets() if self.is_driver else None)
            if not targets:
                if self.is_driver:
                    print(f"weights v{version}: no rollout server in service; each restarted one gets "
                          "them before it serves", flush=True)
                break
            urls = [u for u, _ in targets]
            try:
                out["sync/gbps"] = self.publisher.publish(self.actor.model, version, targets)
                if self.proof is not None:
                    out.update(self.proof.check(self.actor, self.engine.client if self.is_driver else None,
                                                urls, version))
                break
            except (WeightSyncError, WeightProofError) as e:
                dead = self._command(self.engine.wait_dead(urls) if self.is_driver else None)
                if not dead:
                    raise
                if self.is_driver:
                    print(f"weight sync v{version}: {', '.join(self.engine.describe(u) for u in dead)} died "
                          f"during it ({e}); sending to the others again", flush=True)
        if self.is_driver:
            # A restarted server comes back with the checkpoint's weights: never use its samples.
            # A pipelined rollout in flight also gives tokens of the version before.
            oldest = max(0, version - self.cfg.staleness_bound)
            self.engine.client.accepted_weight_versions = {str(v) for v in range(oldest, version + 1)}
        return out

    def evaluate(self, step: int) -> dict:
        """Collective (the rollout may re-sync restarted servers); the result on rank 0."""
        def run():
            prompts = [self.eval_data[i] for i in range(min(self.cfg.eval_prompts, len(self.eval_data)))]
            return self.engine.evaluate(prompts, self.cfg.eval_samples, seed_base=10**9 + step * 100_000)

        return self._rollout_phase(run, f"the evaluation at step {step}")

    def interrupted_message(self, signum: int) -> str:
        ckpt = f"step {self.last_checkpoint}" if self.last_checkpoint is not None else "none"
        name = signal.Signals(signum).name
        return (f"interrupted at step {self.step_in_progress}; last checkpoint: {ckpt} ({name}; "
                f"a rerun in {self.cfg.output_dir} resumes from it)")

    # --------------------------------------------------------------------- run
    def run(self) -> None:
        cfg = self.cfg
        # Launched servers start from the HF checkpoint, attached ones from whatever they hold:
        # the first sync (and its proof) makes both the trainer's, resumed or not.
        self._sync(self.start_step)
        evaluating = cfg.eval_every and cfg.data.eval_path
        if self.start_step == 0 and evaluating:
            result = self.evaluate(0)  # the starting policy, for the learning curve
            if self.is_driver:
                self.sink.log(0, result)
        t_start = time.perf_counter()
        try:
            for step in range(self.start_step, cfg.steps):
                self.step_in_progress = step + 1
                metrics = self.step(step)
                done = step + 1
                if evaluating and done % cfg.eval_every == 0:
                    result = self.evaluate(done)
                    if self.is_driver:
                        metrics.update(result)
                if self.is_driver:
                    self.sink.log(done, metrics)
                    _console(done, cfg.steps, metrics, time.perf_counter() - t_start, done - self.start_step)
                if self.bad_steps >= cfg.max_bad_steps:
                    raise RuntimeError(f"{self.bad_steps} consecutive steps had a non-finite loss and were "
                                       f"skipped (max_bad_steps={cfg.max_bad_steps}); stopping at step {done}")
                if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                    self.save(done)
        except Interrupted:
            raise  # train() says where the run stopped, then closes without ceremony
        except BaseException:
            self.close()
            raise
        self.close()

    def close(self, interrupted: bool = False) -> None:
        """Ends the weight-update group, reward workers, servers, router and metric files; after
        an interrupt, without the group's polite goodbye (the servers are ending anyway)."""
        closed = self.__dict__.setdefault("_closed", set())
        names = ["publisher"] + (["rewards", "engine", "sink"] if self.is_driver else [])
        for name in names:
            thing = getattr(self, name)
            if thing is None or name in closed:
                continue
            closed.add(name)
            if name == "publisher" and interrupted:
                continue
            try:
                if name == "engine":
                    thing.close(grace_s=2.0 if interrupted else 5.0)
                else:
                    thing.close()
            except Exception:  # noqa: BLE001 - shutting down: close the others
                logger.exception("closing the %s failed", name)


def train(cfg: TrainerConfig) -> None:
    """Entry point on every rank (under torchrun)."""
    from maspo_megatron.runtime import destroy_parallel, initialize_parallel

    from maspo_megatron.rollout.servers import kill_all_managed

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Upstream deprecation notices and GPU-only fallbacks: runtime/noise.py (before megatron's import).
    # SIGTERM/SIGINT (from the CLI or torchrun, also when one rank fails) become Interrupted, a
    # SystemExit: the clean-up below runs (servers, router, reward workers, metric files), bounded
    # by a watchdog for a rank stuck in a collective (runtime/lifetime.py).
    trainer = None
    is_driver = os.environ.get("RANK", "0") == "0"

    def say_interrupted(signum: int) -> None:
        if is_driver:
            message = trainer.interrupted_message(signum) if trainer is not None else \
                f"interrupted during start-up ({signal.Signals(signum).name}); last checkpoint: unchanged"
            print(message, flush=True)

    guard = InterruptGuard(grace_s=10.0, on_force=say_interrupted).install()
    interrupted = False
    try:
        initialize_parallel(cfg.parallel)
        trainer = Trainer(cfg)
        trainer.setup()
        trainer.run()
    except Interrupted as e:
        interrupted = True
        say_interrupted(e.signum)
        raise
    finally:
        try:
            if trainer is not None:
                trainer.close(interrupted=interrupted)
            kill_all_managed()  # servers started before the engine existed (set-up interrupted)
            if not interrupted:
                destroy_parallel()
        finally:
            guard.close()
