"""The Megatron actor: log-prob passes and the policy-loss train step over TP/PP/DP.

The actor decides which sequences each data-parallel rank trains on (:meth:`Actor.deal`); a
rank works on its :class:`BatchShare` (the trainer sends each rank only its share, see
``megatron.batch_share``), packs it into micro-batches by a token budget, and runs megatron-core's
own pipeline schedule, DDP and (distributed) optimizer. Log-probs and entropy come from the
vocab-parallel ops in ``maspo_megatron.ops``: the logits stay sharded over the TP group.

The RL objective (policy loss, IS correction, KL, entropy, aggregation) is not the actor's: it
is handed an :class:`~maspo_megatron.algo.objective.Objective` and calls it per micro-batch.

Loss normalisation: the global counts (response tokens, sequences) of a mini-batch are summed
over data-parallel ranks before the step, so each micro-batch's loss is ``sum(local tokens) / global
count`` and the accumulated gradient equals that of one big batch. megatron's schedule divides
each micro-batch loss by the number of micro-batches and DDP averages over data-parallel
ranks; the actor multiplies both back (``_MEGATRON_AVERAGING``) so neither averaging applies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from maspo_megatron.algo.metrics import is_max_metric, metric_value
from maspo_megatron.algo.objective import Objective, ObjectiveConfig
from maspo_megatron.megatron.routing_replay import RoutingReplay, fill_unrouted, filler_routes, replay_routers
from maspo_megatron.ops.sequence import response_logprobs_from_hidden, response_logprobs_from_logits
from maspo_megatron.runtime import device


@dataclass
class OptimizerConfig:
    """Adam and its learning-rate schedule (megatron-core's optimizer and scheduler).

    Steps here are **optimizer** steps: a train step makes ``actor.num_mini_batches`` of them
    (skipped updates do not count).
    """

    lr: float = 1e-6
    """Peak learning rate (the MASPO paper trains at 1e-6)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    lr_schedule: str = "constant"
    """``constant`` (after warm-up) or ``cosine`` (from ``lr`` after warm-up to ``min_lr`` at
    ``decay_steps``, then ``min_lr``)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``lr`` over this many optimizer steps."""
    decay_steps: int | None = None
    """Optimizer step at which the cosine reaches ``min_lr`` (counted from step 0, warm-up
    included; must exceed ``warmup_steps``). Required for ``cosine``; None with ``constant``
    means no decay."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron's distributed optimizer)."""

    def __post_init__(self):
        # Every check megatron's OptimizerParamScheduler would assert, here, naming the key.
        key = "actor.optimizer"
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"{key}.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"{key}.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"{key}.min_lr must lie in [0, {key}.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"{key}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_schedule == "cosine" and self.decay_steps is None:
            raise ValueError(f"{key}.decay_steps is required for {key}.lr_schedule='cosine' "
                             "(the optimizer step at which the LR reaches min_lr)")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"{key}.decay_steps={self.decay_steps} must exceed {key}.warmup_steps="
                             f"{self.warmup_steps} (the decay starts after the warm-up)")
        if self.weight_decay < 0:
            raise ValueError(f"{key}.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{key}.{name} must lie in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"{key}.adam_eps must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ValueError(f"{key}.clip_grad must be >= 0 (0 disables), got {self.clip_grad}")

    def scheduler_decay_steps(self) -> int:
        """``lr_decay_steps`` for megatron's scheduler, which needs one past the warm-up even
        when nothing decays: its constant style never reads it after the warm-up."""
        return self.decay_steps if self.decay_steps is not None else self.warmup_steps + 1


@dataclass
class ActorConfig(ObjectiveConfig):
    """What one train step does. The objective's keys (loss, losses, aggregation, entropy_coef,
    kl_coef, tis_cap) are ``ObjectiveConfig``'s (``algo.objective``): they configure the
    :class:`Objective` the actor is handed, and the actor itself never reads them."""

    num_mini_batches: int = 1
    """Optimizer steps per train step (the batch is split into this many mini-batches)."""
    micro_batch_tokens: int = 4096
    """Token budget of a micro-batch (sequences x padded length); one long sequence may exceed it."""
    fused_logprobs: bool = False
    """Compute log-probs from hidden states and the output weight, never materialising logits."""
    pack_sequences: bool | None = None
    """Pack each micro-batch's sequences without padding (THD + cu_seqlens). Needs Transformer
    Engine's attention; None packs exactly when the model uses the TE layer spec."""
    logprob_chunk_tokens: int | None = None
    """Tokens per chunk in the log-prob op (bounds its extra memory); None: one pass."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.num_mini_batches < 1 or self.micro_batch_tokens < 1:
            raise ValueError("actor.num_mini_batches and actor.micro_batch_tokens must be >= 1")


@dataclass
class SequenceBatch:
    """Right-padded prompt+response token ids with per-token training data.

    ``response_mask`` marks the response tokens (the ones the policy generated and is trained
    on). Per-token fields are ``[N, L]`` aligned with ``input_ids``; ``advantages`` may be
    ``[N]`` (one per sequence). ``routed_experts`` (routing replay of MoE models) is int
    ``[N, L, layers, topk]``: the rollout engine's experts of every token, valid everywhere
    (``routing_replay.filler_routes`` where the engine forwarded no token).
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    response_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None

    def __post_init__(self):
        n, length = self.input_ids.shape
        if self.lengths.shape != (n,):
            raise ValueError(f"lengths must have shape [{n}], got {tuple(self.lengths.shape)}")
        if int(self.lengths.max()) > length or int(self.lengths.min()) < 1:
            raise ValueError("lengths must lie in [1, input_ids.shape[1]]")
        for name in ("response_mask", "old_logprobs", "rollout_logprobs", "ref_logprobs"):
            value = getattr(self, name)
            if value is not None and value.shape != (n, length):
                raise ValueError(f"{name} must have shape [{n}, {length}], got {tuple(value.shape)}")
        if self.routed_experts is not None and (self.routed_experts.dim() != 4
                                                or self.routed_experts.shape[:2] != (n, length)):
            raise ValueError(f"routed_experts must have shape [{n}, {length}, layers, topk], "
                             f"got {tuple(self.routed_experts.shape)}")
        if self.advantages is not None and self.advantages.shape not in ((n,), (n, length)):
            raise ValueError(f"advantages must have shape [{n}] or [{n}, {length}], "
                             f"got {tuple(self.advantages.shape)}")
        self.response_mask = self.response_mask.bool()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor, max_len: int | None = None) -> dict[str, torch.Tensor]:
        """Rows ``index`` as a dict of tensors, truncated to ``max_len`` columns."""
        max_len = max_len or int(self.lengths[index].max())
        out = {}
        for name in ("input_ids", "response_mask", "advantages", "old_logprobs",
                     "rollout_logprobs", "ref_logprobs", "routed_experts"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value[index][:, :max_len] if value.dim() >= 2 else value[index]
        return out


def deal_to_dp_ranks(lengths: torch.Tensor, dp_size: int) -> list[torch.Tensor]:
    """Deals sequences to data-parallel ranks, longest first, so their token counts balance."""
    if len(lengths) < dp_size:
        raise ValueError(f"a mini-batch of {len(lengths)} sequences cannot feed {dp_size} data-parallel ranks")
    order = torch.argsort(lengths, descending=True, stable=True)
    return [order[r::dp_size] for r in range(dp_size)]


def deal_batch(lengths: torch.Tensor, dp_size: int, num_mini_batches: int
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per data-parallel rank: (rows of the whole batch, the mini-batch of each row), grouped
    by mini-batch. Mini-batches are consecutive chunks of rows; each is dealt over the ranks
    (:func:`deal_to_dp_ranks`), so every rank gets a part of every optimizer step."""
    n = len(lengths)
    if n % num_mini_batches:
        raise ValueError(f"batch of {n} sequences is not divisible by num_mini_batches={num_mini_batches}")
    parts: list[list[tuple[torch.Tensor, int]]] = [[] for _ in range(dp_size)]
    for j, index in enumerate(torch.arange(n).chunk(num_mini_batches)):
        for r, shard in enumerate(deal_to_dp_ranks(lengths[index], dp_size)):
            parts[r].append((index[shard], j))
    return [(torch.cat([rows for rows, _ in p]),
             torch.cat([torch.full((len(rows),), j, dtype=torch.long) for rows, j in p])) for p in parts]


@dataclass
class BatchShare:
    """One data-parallel rank's rows of a batch: what that rank computes and trains on."""

    batch: SequenceBatch
    """Those rows only, right-padded to their own longest row."""
    mini_batch: torch.Tensor
    """``[n]`` the mini-batch (optimizer step) of each row, ascending."""

    def __post_init__(self):
        if self.mini_batch.shape != (len(self.batch),):
            raise ValueError(f"mini_batch must have shape [{len(self.batch)}], got {tuple(self.mini_batch.shape)}")


def pack_micro_batches(index: torch.Tensor, lengths: torch.Tensor, token_budget: int,
                       padded: bool = True) -> list[torch.Tensor]:
    """Greedy packing of rows ``index`` (longest first) into micro-batches within a token budget.

    ``padded``: a micro-batch costs rows x its longest row (right padding); otherwise the sum of
    its lengths (packed THD sequences).
    """
    index = index[torch.argsort(lengths[index], descending=True, stable=True)]
    micro, current, used = [], [], 0
    for i in index.tolist():
        # Rows are sorted by length, so the first row of a micro-batch sets its padded length.
        cost = int(lengths[current[0] if current else i]) * (len(current) + 1) if padded \
            else used + int(lengths[i])
        if current and cost > token_budget:
            micro.append(torch.tensor(current))
            current, used = [], 0
        current.append(i)
        used += int(lengths[i])
    if current:
        micro.append(torch.tensor(current))
    return micro


@dataclass
class PackedLayout:
    """A micro-batch's sequences packed end to end (THD), and the way back to ``[n, L]``."""

    input_ids: torch.Tensor
    """``[1, T]`` token ids, sequences back to back (a padding segment may close the stream)."""
    position_ids: torch.Tensor
    """``[1, T]`` positions, restarting at 0 for every sequence."""
    response_mask: torch.Tensor
    """``[1, T]``."""
    cu_seqlens: torch.Tensor
    """``[segments + 1]`` int32 start offsets (megatron's PackedSeqParams)."""
    max_seqlen: int
    rows: torch.Tensor
    cols: torch.Tensor
    """Packed token k came from ``input_ids[rows[k], cols[k]]`` of the padded micro-batch."""

    def unpack(self, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``[1, T]`` per-token values -> padded ``shape`` (zeros where there is no token)."""
        out = values.new_zeros(shape)
        out[self.rows, self.cols] = values.reshape(-1)[: len(self.rows)]
        return out


def pack_sequences(input_ids: torch.Tensor, lengths: torch.Tensor, response_mask: torch.Tensor,
                   pad_to_multiple: int = 1) -> PackedLayout:
    """Packs right-padded rows into one stream; the total is padded to ``pad_to_multiple``
    (sequence parallelism splits it over TP ranks) with a segment of its own, so the padding
    attends to nothing real."""
    lengths = lengths.to(torch.long)
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(len(rows), device=lengths.device) - starts[rows]
    ids, mask = input_ids[rows, cols], response_mask[rows, cols]
    cu = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    pad = -len(rows) % pad_to_multiple
    if pad:
        ids = torch.cat([ids, ids.new_zeros(pad)])
        mask = torch.cat([mask, mask.new_zeros(pad)])
        cu = torch.cat([cu, cu[-1:] + pad])
    positions = torch.arange(len(ids), device=ids.device) - torch.repeat_interleave(cu[:-1], cu.diff())
    return PackedLayout(ids[None], positions[None], mask[None], cu.to(torch.int32),
                        int(cu.diff().max()), rows, cols)


def pack_routes(routes: torch.Tensor, packed: PackedLayout) -> torch.Tensor:
    """``[n, L, layers, topk]`` routes -> ``[1, T, layers, topk]`` in ``packed``'s token order
    (the closing padding segment gets :func:`~maspo_megatron.megatron.routing_replay.filler_routes`)."""
    tokens = routes[packed.rows, packed.cols]
    pad = packed.input_ids.shape[1] - len(tokens)
    if pad:
        tokens = torch.cat([tokens, filler_routes((pad,), *routes.shape[2:]).to(tokens)])
    return tokens[None]


FP8_TOKEN_MULTIPLE = 16
"""Transformer Engine's FP8 GEMMs need every GEMM dimension a multiple of 16
(``transformer_engine.pytorch.utils.assert_dim_for_fp8_exec``), the token dimension included
(it is the inner dimension of the weight-gradient GEMM)."""


def token_multiple(*, fp8: bool, sequence_parallel: bool, tp: int) -> int:
    """What each micro-batch's token count (per TP rank under sequence parallelism) must be a
    multiple of: 16 for FP8, times TP when sequence parallelism splits the tokens over TP."""
    return (FP8_TOKEN_MULTIPLE if fp8 else 1) * (tp if sequence_parallel else 1)


def pad_micro_batch(micro: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Right-pads the ``[n, L]`` fields of a padded micro-batch so that ``L`` (hence ``n * L``)
    is a multiple of ``multiple``: token id 0, response mask False, zeros elsewhere. The padding
    comes after every row's last token, so causal attention keeps it out of the real tokens."""
    width = micro["input_ids"].shape[1]
    pad = -width % multiple
    if not pad:
        return micro
    out = {k: torch.nn.functional.pad(v, (0, pad)) if v.dim() == 2 else v for k, v in micro.items()}
    if "routed_experts" in micro:  # padding gets valid (distinct) experts, not zeros
        routes = micro["routed_experts"]
        n, _, layers, topk = routes.shape
        fill = filler_routes((n, pad), layers, topk).to(routes)
        out["routed_experts"] = torch.cat([routes, fill], 1)
    return out


class Actor:
    """Policy (or reference) model under megatron-core with log-prob and train passes."""

    def __init__(self, model_chunks: list, cfg: ActorConfig, *, objective: Objective | None = None,
                 trainable: bool = True, temperature: float = 1.0):
        """``objective``: what ``train_step`` minimises (``algo.objective.Objective``, usually
        ``Objective(cfg)``); an actor that only computes log-probs needs none. ``temperature``:
        the rollouts' sampling temperature (``rollout.sampling.temperature``): log-probs are of
        ``softmax(logits / temperature)``, as the rollout engine reports them."""
        from megatron.core import parallel_state as ps

        from maspo_megatron.megatron.model import model_spec

        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.cfg = cfg
        self.objective = objective
        self.temperature = temperature
        self.spec = model_spec(model_chunks[0])
        if ps.get_context_parallel_world_size() > 1:
            raise NotImplementedError("context parallelism in the actor (CP-aware log-prob slicing) is not implemented")
        config = self.spec.transformer_config
        self.pack = self.spec.use_te if cfg.pack_sequences is None else cfg.pack_sequences
        if self.pack and not self.spec.use_te:
            raise ValueError("actor.pack_sequences=True needs Transformer Engine (megatron-core's local "
                             "attention has no packed THD format); leave it None or False on CPU")
        if cfg.fused_logprobs and config.sequence_parallel:
            raise NotImplementedError("fused_logprobs with sequence_parallel (needs an all-gather of hidden "
                                      "states along the sequence) is not implemented; use fused_logprobs=False")
        # Micro-batches have different shapes; pipeline stages must exchange them.
        config.variable_seq_lengths = True
        self.token_multiple = token_multiple(fp8=bool(config.fp8), sequence_parallel=config.sequence_parallel,
                                             tp=ps.get_tensor_model_parallel_world_size())
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_last_rank = ps.get_pipeline_model_parallel_last_rank()
        self.is_last_stage = ps.is_pipeline_last_stage()  # of this rank; its chunks: spec.post_process
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        # Virtual pipeline stages: megatron's interleaved 1F1B schedule, one chunk per stage.
        vpp = ps.get_virtual_pipeline_model_parallel_world_size()
        self.interleaved = vpp is not None and self.pp_size > 1
        if len(model_chunks) != (vpp if self.interleaved else 1):
            raise ValueError(f"{len(model_chunks)} model chunks on this rank, but the parallel state has "
                             f"{vpp or 1} virtual pipeline stage(s) (build them with build_model)")
        if self.interleaved:
            from maspo_megatron.megatron.interleaved import use_interleaved_p2p

            use_interleaved_p2p(config)
        if self.interleaved and replay_routers(model_chunks):
            raise NotImplementedError("routing replay with virtual pipeline stages (parallel.vpp): its "
                                      "backward hooks assume one model chunk per pipeline rank")
        self.optimizer = self.scheduler = None
        # Routing replay: on when the model was built with moe_enable_routing_replay.
        self.replay = RoutingReplay(model_chunks, num_layers=config.num_layers, topk=config.moe_router_topk,
                                    sequence_parallel=config.sequence_parallel) \
            if replay_routers(model_chunks) else None
        self.model = model_chunks
        self.steps = 0
        self.moe_metrics = None
        if trainable:
            self._setup_training(model_chunks)
            if self.spec.arch.moe is not None:
                from maspo_megatron.megatron.moe_metrics import MoeMetrics

                self.moe_metrics = MoeMetrics(self.model)
        else:
            for chunk in model_chunks:
                chunk.requires_grad_(False)

    # ------------------------------------------------------------------------------ set-up

    def _setup_training(self, model_chunks: list) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.cfg.optimizer
        config = self.spec.transformer_config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=o.use_distributed_optimizer,
        )
        self.model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk)
                      for chunk in model_chunks]
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                clip_grad=o.clip_grad, use_distributed_optimizer=o.use_distributed_optimizer,
                bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
            ),
            self.model,
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=o.scheduler_decay_steps(),
            lr_decay_style=o.lr_schedule, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=1, wd_incr_style="constant",
        )
        self._guard_non_finite_grads()
        config.no_sync_func = [m.no_sync for m in self.model]
        if len(self.model) == 1:
            config.no_sync_func = config.no_sync_func[0]
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss

    def _guard_non_finite_grads(self) -> None:
        """Skip the update when a gradient is NaN/Inf, through megatron's own skip path.

        megatron's optimizer looks for inf/NaN only under fp16 loss scaling; in bf16/fp32 it would
        apply them. Reporting them as ``found_inf`` from ``prepare_grads`` makes ``step()`` return
        ``(False, None, None)`` without touching the weights. Costs one extra grad-norm pass.
        """
        optimizer = self.optimizer
        prepare = optimizer.prepare_grads

        def prepare_and_check() -> bool:
            found_inf = prepare()
            return bool(found_inf) or not math.isfinite(float(optimizer.get_grad_norm()))

        optimizer.prepare_grads = prepare_and_check

    # ------------------------------------------------------------------------------ passes

    @staticmethod
    def _model_inputs(micro: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ids, response mask, cu_seqlens) as the model sees them: packed or padded."""
        packed = micro.get("packed")
        if packed is not None:
            return packed.input_ids, packed.response_mask, packed.cu_seqlens
        return micro["input_ids"], micro["response_mask"], None

    def _logprobs(self, output, micro: dict, entropy: bool):
        """Per-token log-probs/entropy ``[n, L]`` of a micro-batch from the last stage's output."""
        if self.cfg.fused_logprobs:
            lp, ent = output  # already computed by the output processor
        else:
            ids, mask, cu = self._model_inputs(micro)
            lp, ent = response_logprobs_from_logits(
                output, ids, mask, self.tp_group, cu_seqlens=cu, entropy=entropy,
                temperature=self.temperature, chunk_tokens=self.cfg.logprob_chunk_tokens,
                vocab_size=self.spec.vocab_size,
            )
        packed = micro.get("packed")
        if packed is not None:
            shape = micro["input_ids"].shape
            lp = packed.unpack(lp, shape)
            ent = packed.unpack(ent, shape) if ent is not None else None
        return lp, ent

    def _fused_output_processor(self, *, hidden_states, output_layer, output_weight, context, **_):
        weight = output_weight if output_weight is not None else output_layer.weight
        ids, mask, cu = self._model_inputs(context)
        return response_logprobs_from_hidden(
            hidden_states.transpose(0, 1), weight, ids, mask, self.tp_group, cu_seqlens=cu,
            entropy=context["entropy"], temperature=self.temperature,
            chunk_tokens=self.cfg.logprob_chunk_tokens or 1024, vocab_size=self.spec.vocab_size,
        )

    def _forward(self, model, micro: dict, entropy: bool):
        kwargs = {}
        if self.cfg.fused_logprobs:
            kwargs = dict(output_processor=self._fused_output_processor,
                          output_processor_context=dict(micro, entropy=entropy))
        packed = micro.get("packed")
        if packed is not None:
            from megatron.core.packed_seq_params import PackedSeqParams

            kwargs["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=packed.cu_seqlens, cu_seqlens_kv=packed.cu_seqlens,
                max_seqlen_q=packed.max_seqlen, max_seqlen_kv=packed.max_seqlen)
            return model(packed.input_ids, packed.position_ids, None, **kwargs)
        ids = micro["input_ids"]
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        # attention_mask=None: causal attention; right padding never influences real tokens.
        return model(ids, positions, None, **kwargs)

    def _run_schedule(self, micro_batches: list[dict], loss_func, forward_only: bool, entropy: bool,
                      replay: RoutingReplay | None):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            micro = next(data_iterator)
            if replay is None:
                return self._forward(model, micro, entropy), partial(loss_func, micro)
            replay.set_micro_batch(micro["routes"], model)
            output = self._forward(model, micro, entropy)
            if forward_only:
                return output, partial(loss_func, micro)
            if not self.is_last_stage:  # the stage output's backward starts this micro-batch's
                return replay.enter_backward(output, model), partial(loss_func, micro)

            def replayed_loss(m, out):  # on the last stage the loss's backward does
                loss, metrics = loss_func(m, out)
                return replay.enter_backward(loss, model), metrics

            return output, partial(replayed_loss, micro)

        data = iter(micro_batches)
        if self.interleaved:
            from maspo_megatron.megatron import interleaved

            # Each chunk walks the micro-batches in order, from its own iterator.
            data = [iter(micro_batches) for _ in self.model]
            config = self.spec.transformer_config
            config.microbatch_group_size_per_vp_stage = interleaved.interleave_group_size(
                len(micro_batches), self.pp_size)
        try:
            return get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=data, model=self.model,
                num_microbatches=len(micro_batches),
                seq_length=max(self._model_inputs(m)[0].shape[1] for m in micro_batches),
                micro_batch_size=max(self._model_inputs(m)[0].shape[0] for m in micro_batches),
                forward_only=forward_only,
            )
        finally:
            if replay is not None:
                replay.clear()

    def deal(self, lengths: torch.Tensor, train: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Which rows of a batch with these ``lengths`` each data-parallel rank computes and
        trains on (:func:`deal_batch`): the one place that decides it. A forward-only batch
        (``train=False``, e.g. the sync proof's probe) is one mini-batch: it need not divide
        into ``actor.num_mini_batches``."""
        return deal_batch(lengths, self.dp_size, self.cfg.num_mini_batches if train else 1)

    def share_of(self, batch: SequenceBatch, train: bool = True) -> tuple[BatchShare, torch.Tensor]:
        """This rank's share of a ``batch`` every rank holds, and its rows in ``batch``."""
        rows, mini_batch = self.deal(batch.lengths, train)[self.dp_rank]
        width = int(batch.lengths[rows].max())
        return BatchShare(SequenceBatch(**batch.select(rows, width), lengths=batch.lengths[rows]), mini_batch), rows

    def _micro_batches(self, batch: SequenceBatch, index: torch.Tensor, replay: bool = True) -> list[dict]:
        """Rows ``index`` of this rank's (share) ``batch`` packed into micro-batches."""
        replay = replay and self.replay is not None
        if replay:
            self.replay.check(batch.routed_experts, tuple(batch.input_ids.shape))
        dev = device()
        packed = pack_micro_batches(index, batch.lengths, self.cfg.micro_batch_tokens,
                                    padded=not self.pack)
        if self.interleaved:
            from maspo_megatron.megatron.interleaved import split_to_count

            packed = split_to_count(packed, self.pp_size)
        micro = []
        for rows in packed:
            m = {k: v.to(dev) for k, v in batch.select(rows).items()}
            if replay:
                fill_unrouted(m["routed_experts"], batch.lengths[rows].to(dev))
            if not self.pack:
                m = pad_micro_batch(m, self.token_multiple)
            m["rows"] = rows
            if self.pack:
                m["packed"] = pack_sequences(m["input_ids"], batch.lengths[rows].to(dev),
                                             m["response_mask"], self.token_multiple)
            routes = m.pop("routed_experts", None)
            if replay:  # the routes in the layout the model sees
                m["routes"] = pack_routes(routes, m["packed"]) if self.pack else routes
            micro.append(m)
        return micro

    @torch.no_grad()
    def compute_logprobs(self, batch: SequenceBatch | BatchShare, *, entropy: bool = False,
                         temperature: float | None = None, replay: bool = True):
        """Log-probs (and entropy) of every response token, zero elsewhere.

        Forward-only through the pipeline schedule. A :class:`BatchShare` gives this rank's
        rows, ``[n, L_share]``, on every stage of its pipeline. A whole ``SequenceBatch`` (held
        by every rank) gives ``[N, L]``, assembled from all data-parallel ranks.
        ``temperature`` overrides the actor's for this pass (the weight-sync proof uses 1).
        With routing replay on, the batch must carry ``routed_experts``; ``replay=False`` routes
        with the model's own router instead (the weight-sync proof's probe has no rollout).
        """
        if isinstance(batch, BatchShare):
            return self._share_logprobs(batch.batch, entropy, temperature, replay)
        share, rows = self.share_of(batch, train=False)
        lp, ent = self._share_logprobs(share.batch, entropy, temperature, replay)
        # Each row is computed on exactly one DP rank: a sum assembles the batch.
        full = torch.zeros((2 if entropy else 1, *batch.input_ids.shape), dtype=torch.float32)
        full[0, rows, : lp.shape[1]] = lp
        if entropy:
            full[1, rows, : ent.shape[1]] = ent
        full = full.to(device())
        dist.all_reduce(full, group=self.dp_group)
        full = full.cpu()
        return full[0], (full[1] if entropy else None)

    def _share_logprobs(self, batch: SequenceBatch, entropy: bool, temperature: float | None,
                        replay: bool):
        for chunk in self.model:
            chunk.eval()
        micro = self._micro_batches(batch, torch.arange(len(batch)), replay)
        out_lp = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        out_ent = torch.zeros_like(out_lp) if entropy else None

        def loss_func(m, output):
            lp, ent = self._logprobs(output, m, entropy)
            width = min(lp.shape[1], out_lp.shape[1])  # token_multiple padding may go past the batch
            out_lp[m["rows"], :width] = lp[:, :width].float().cpu()
            if entropy:
                out_ent[m["rows"], :width] = ent[:, :width].float().cpu()
            return lp.sum() * 0, {}

        default, self.temperature = self.temperature, temperature or self.temperature
        try:
            self._run_schedule(micro, loss_func, forward_only=True, entropy=entropy,
                               replay=self.replay if replay else None)
        finally:
            self.temperature = default
        results = [out_lp] + ([out_ent] if entropy else [])
        # Filled on the last pipeline stage only.
        stacked = torch.stack(results).to(device())
        dist.broadcast(stacked, src=self.pp_last_rank, group=self.pp_group)
        stacked = stacked.cpu()
        return stacked[0], (stacked[1] if entropy else None)

    def _loss(self, counts: dict, num_micro: int, m: dict, output):
        lp, ent = self._logprobs(output, m, entropy=True)
        loss, metrics = self.objective(lp, ent, m, counts)
        # Each metric as [total, weight] (algo.metrics): reduced by plain sums over
        # micro-batches and DP ranks (MAX for the totals of *_max keys).
        reported = {k: torch.stack([v.total.float(), v.weight.float()]).detach()
                    for k, v in metrics.items()}
        reported["loss"] = loss.detach().float()
        # Undo megatron's per-micro-batch and data-parallel averaging (module docstring).
        return loss * (num_micro * self.dp_size), reported

    def train_step(self, batch: SequenceBatch | BatchShare) -> dict[str, float]:
        """One train step: ``num_mini_batches`` optimizer steps over ``batch``: this rank's
        :class:`BatchShare`, or a whole ``SequenceBatch`` every rank holds.

        The loss is the objective the actor was handed; ``batch`` must carry the fields it
        reads (``objective.required_fields``: ``advantages`` and ``old_logprobs``, plus
        ``ref_logprobs`` when ``kl_coef > 0``, ``rollout_logprobs`` with TIS). Returns metrics
        averaged over mini-batches; a mini-batch whose loss is not finite, or whose gradients
        are not, is skipped (no update) and counted in ``skipped_steps``.
        """
        if self.optimizer is None:
            raise RuntimeError("this Actor was built with trainable=False")
        if self.objective is None:
            raise RuntimeError("this Actor was built without an objective: pass "
                               "Actor(..., objective=Objective(cfg)) (maspo_megatron.algo.objective)")
        share = batch if isinstance(batch, BatchShare) else self.share_of(batch)[0]
        batch = share.batch
        missing = [f for f in self.objective.required_fields if getattr(batch, f) is None]
        if missing:
            raise ValueError(f"train_step needs a batch with {' and '.join(missing)} "
                             f"(for {self.objective!r})")
        for chunk in self.model:
            chunk.train()
        start = time.perf_counter()
        history: list[dict[str, float]] = []
        for j in range(self.cfg.num_mini_batches):
            index = torch.nonzero(share.mini_batch == j).flatten()
            # This rank holds only its rows of the mini-batch: the counts are summed over DP.
            counts = self.objective.counts(batch.response_mask[index], self._sum_over_dp)
            micro = self._micro_batches(batch, index)
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            if self.moe_metrics is not None:
                self.moe_metrics.start()
            reduced = self._run_schedule(micro, partial(self._loss, counts, len(micro)),
                                         forward_only=False, entropy=True, replay=self.replay)
            metrics = self._reduce_metrics(reduced)
            if self.moe_metrics is not None:
                metrics.update(self.moe_metrics.finish(len(micro)))
            metrics["response_tokens"] = float(counts["tokens"])
            # Routing replay in effect: this rank's micro-batches whose routers took the rollout's experts.
            metrics["replayed_micro_batches"] = float(len(micro)) if self.replay is not None else 0.0
            if math.isfinite(metrics["loss"]):
                ok, grad_norm, _ = self.optimizer.step()
                if ok:  # as in Megatron-LM: a skipped update does not advance the LR schedule
                    self.scheduler.step(increment=1)
                metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                               skipped_steps=0.0 if ok else 1.0)
            else:
                metrics.update(grad_norm=float("nan"), skipped_steps=1.0)
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            history.append(metrics)
        self.steps += 1
        out = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
        out["skipped_steps"] = sum(h["skipped_steps"] for h in history)
        elapsed = time.perf_counter() - start
        out["train_time_s"] = elapsed
        out["tokens_per_s"] = float(self._sum_over_dp(batch.lengths.sum().double())) / elapsed
        return out

    def _sum_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(device())
        dist.all_reduce(value, group=self.dp_group)
        return value.cpu()

    def _reduce_metrics(self, reduced: list[dict]) -> dict[str, float]:
        """Each metric's sum(total) / sum(weight) over micro-batches and DP ranks (the maximum
        for ``*_max`` keys); ``loss`` is the sum of the micro-batch losses (each already a share
        of the global objective).

        Computed on the last pipeline stage and sent to every stage, so any rank can log them.
        """
        holder = [sorted(k for k in reduced[0] if k != "loss") if reduced else None]
        dist.broadcast_object_list(holder, src=self.pp_last_rank, group=self.pp_group)
        keys = holder[0]
        maxima = [i for i, k in enumerate(keys) if is_max_metric(k)]
        pairs = torch.zeros(len(keys), 2, dtype=torch.float64)
        top = torch.zeros(len(maxima), dtype=torch.float64)
        loss = torch.zeros(1, dtype=torch.float64)
        for r in reduced:
            if keys:
                v = torch.stack([r[k].double().cpu() for k in keys])
                pairs += v
                top = torch.maximum(top, v[maxima, 0])
            loss += r["loss"].double().cpu()
        summed = torch.cat([pairs.flatten(), loss]).to(device())
        top = top.to(device())
        for acc, op in ((summed, dist.ReduceOp.SUM), (top, dist.ReduceOp.MAX)):
            if not acc.numel():
                continue  # no *_max key (the same on every rank: keys came from one stage)
            dist.all_reduce(acc, op=op, group=self.dp_group)
            dist.broadcast(acc, src=self.pp_last_rank, group=self.pp_group)
        summed, top = summed.cpu(), top.cpu().tolist()
        pairs = summed[:-1].reshape(len(keys), 2)
        for i, t in zip(maxima, top):
            pairs[i, 0] = t
        out = {k: metric_value(k, total, weight) for k, (total, weight) in zip(keys, pairs.tolist())}
        out["loss"] = float(summed[-1])
        return out
