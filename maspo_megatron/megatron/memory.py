"""Per-GPU memory of a recipe's layout, training ranks and SGLang servers, before anything runs.

``plan_memory(cfg, hf_config, train_gpus=..., rollout_gpus=...)`` returns a :class:`MemoryPlan`:
for each distinct training rank (pipeline stages differ: the first holds the embedding, the last
the output layer; TP and DP ranks of a stage are alike) and for a rollout server's GPU, the
terms below in GiB (2**30 bytes), their total against the GPU size, and the dominant term.
``maspo-megatron plan`` prints it; the launchers refuse a layout that does not fit.

Parameters: counted, not estimated
----------------------------------
:func:`count_stage_params` builds each pipeline stage's chunk with this project's own
``build_model`` (so megatron-core's GPTModel, vocabulary padding and TP sharding are exactly the
trainer's) on the **meta device**: no weights are read or allocated. One process plays every
stage: torch's single-process ``fake`` process-group backend (``torch.testing._internal.
distributed.fake_pg``, whose collectives do nothing) gives megatron's ``initialize_model_parallel``
a world of ``tp * pp`` ranks, and the stage's chunk is built as TP rank 0 of that stage (TP ranks
hold equal shards; DP does not change the model). Initialisation is switched off
(``perform_initialization=False``) and CUDA is hidden while building, so nothing touches a device.
The local layer spec is used: the TE spec has the same parameters (it fuses the two norm weights
into ``linear_qkv``/``linear_fc1`` under other names). About 0.1 s per stage at 70B after
megatron's import. ``tests/test_plan.py`` checks the counts against Hugging Face's models built
from the real config.json values (Llama-3.1-70B, Qwen2.5-72B, R1-Distill-Qwen 1.5B/7B/14B).

MoE (``ArchConfig.moe`` set: Qwen3-MoE)
--------------------------------------
Parameters come from :func:`moe_stage_params`, a formula for megatron-core's MoE layout per rank
(checked equal to the ``numel`` of its GPTModel with the local MoE spec, built per rank at
several TP x EP x ETP x PP layouts, and to HF's Qwen3-MoE at one rank, ``tests/test_plan.py``):
attention, norms, embedding and output layer as for a dense model (over TP, layers over PP);
the router (experts x h) whole on every rank; each layer's experts split into ``ep`` groups of
whole experts, each expert's fc1/fc2 over expert TP ``etp`` (``parallel.etp``, None = TP).
Expert parameters get their own three terms: megatron reduces their gradients, and its
distributed optimizer shards their state, over the expert-data-parallel group of size
e_d = world / (pp x ep x etp) instead of DP; so the expert optimizer state is 12/e_d B per
expert parameter (bf16). Activations: the MLP part of a layer is replaced by, with T_in = T/s the
tokens a rank routes, k the top-k and f the expert width, and routing assumed balanced (each EP
rank's experts receive k x T_in token copies; dropless routing under a skewed router sends more
to some ranks, which this cannot know):

      b*k*T_in*(etp*h + 3f + h) + 4*T_in*E + 4*k*T_in    (the copies' fc1 input, gathered over
                                                          expert TP; fc1 and SwiGLU outputs; the
                                                          expert output back for the probability
                                                          weighting; fp32 router logits and
                                                          routing probabilities)

The all-to-all send/receive buffers are transient (each about one of these tensors) and not
counted. SGLang's MoE weights follow its default layout (no ``--ep-size``): every expert split
over the server's TP ranks, the router replicated.

Training terms (per rank; N = the rank's parameter count, d = data-parallel size)
---------------------------------------------------------------------------------
- parameters: N x 2 B (bf16; 4 B in fp32).
- gradients: N x 4 B: megatron's DDP grad buffer, fp32 (the actor sets ``grad_reduce_in_fp32``);
  the distributed optimizer does not shard gradients.
- optimizer: fp32 main parameters (only when the parameters are not fp32) + Adam m and v:
  N x 12 B (8 B in fp32), divided by d with ``actor.optimizer.use_distributed_optimizer``.
  These three terms are megatron-core's own table ("Distributed Optimizer" in its developer
  guide): 6 + 12/d bytes per parameter for bf16 parameters with fp32 gradients, 8 + 8/d for
  fp32 (18 and 16 without the distributed optimizer). Bucket padding (< 0.1 %) is ignored.
- FP8 weight copies (``model.fp8``, an estimate): Transformer Engine caches an FP8 copy of each
  linear weight and, on Hopper, of its transpose: 2 B per linear-layer parameter.
- reference model (``actor.kl_coef > 0``): a second, frozen copy of the parameters.
- activations, with T = tokens of the largest micro-batch (``max(actor.micro_batch_tokens,
  data.max_prompt_len + rollout.sampling.max_new_tokens)``, padded as the actor pads it), t = TP,
  s = t under sequence parallelism else 1, b = bytes of the activation dtype (2 in bf16). What one
  decoder layer keeps for backward, following Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models" (arXiv 2205.05198, section 4), for this
  architecture (RMSNorm, grouped-query attention with a q heads and g KV heads of size e,
  SwiGLU MLP of width f, no dropout, flash/fused attention as in TE's layer spec):

      b*T*(4h/s + (2q + 2g)*e/t + 3f/t) + 4*T*q/t      (norm inputs and outputs; q, k, v and
                                                         the attention output; fc1 output and
                                                         the SwiGLU output; fp32 softmax stats)

  For GPT-3's architecture (GeLU MLP with f = 4h, g = q, their two dropout masks, no flash
  attention) the same accounting gives their 34*s*b*h/t + 5*a*s^2*b/t with sequence parallelism,
  and s*b*h*(10 + 24/t) without sequence parallelism under selective recompute; the test checks
  both. 1F1B keeps ``pp - stage`` micro-batches in flight on a stage (megatron's warm-up count +
  1), at most the sequences a DP rank has per mini-batch. With ``recompute_granularity="full"``
  (megatron's uniform method, ``recompute_num_layers`` = n, 1 in the recipes) a layer group keeps
  only its input, b*T*h/s, per group of n layers and micro-batch in flight, plus the n layers'
  full activations while one group is recomputed in backward. ``selective`` recomputes the core
  attention, which under flash attention keeps no s^2 tensor: it changes only the softmax stats.
  The last stage adds the final norm's input and output, 2*b*T*h/s. Not counted: transient
  all-gathered inputs of sequence-parallel linears and the activation gradients of the layer in
  backward (each about one layer-sized tensor), TE's FP8 copies of saved inputs (which make the
  real figure smaller), pipeline send/receive buffers.
- logits shard (last stage): T x V/t x 4 B: the bf16 logits the vocab-parallel log-prob op keeps
  for backward (``ops/vocab_parallel.py``: the input shard, in its own dtype) plus their bf16
  gradient (the Triton kernels' output, the default on CUDA). With ``actor.fused_logprobs`` the
  logits exist one chunk at a time: chunk x V/t x 2 B plus the fp32 gradient accumulator of the
  output weight, V/t x h x 4 B (``ops/fused_linear.py``).
- runtime reserve: CUDA context, NCCL communicators and buffers, allocator fragmentation. A flat
  estimate (``reserve_gib``, 4 GiB), not measured here.

SGLang terms (per GPU of one server, tensor-parallel size t_r)
--------------------------------------------------------------
- weights: bf16 (``rollout.dtype`` or the model's), counted analytically from the architecture
  as SGLang shards it: attention and MLP weights and the vocabulary over t_r, norms replicated,
  KV heads replicated when there are fewer than t_r (SGLang's rule). At t_r = 1 this is the HF
  parameter count (tested).
- KV cache: 2 (k and v) x layers x KV heads per GPU x head size x 2 B per token, for
  ``ceil(rollout.client.max_concurrency / servers)`` requests of ``data.max_prompt_len +
  rollout.sampling.max_new_tokens`` tokens (the client sends one request per sample; the router
  spreads them over the servers), or ``rollout.max_total_tokens`` when it is set (SGLang then
  allocates exactly that; fewer tokens than needed queue requests rather than fail).
- non-static reserve (activations, CUDA graphs): ``(1 - rollout.mem_fraction_static) x GPU``
  when set; otherwise SGLang 0.5.23's own rule (``srt/arg_groups/memory_hook.py``,
  ``handle_gpu_memory_settings``): at least 10 GiB on GPUs over 60 GiB, else about
  0.5 GiB + 2048 prefill tokens x 1.5 MiB + t_r/8 GiB.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any
from unittest import mock

from maspo_megatron.config import ConfigError

GIB = 1024 ** 3
MIB = 1024 ** 2
RESERVE_GIB = 4.0
"""Default runtime reserve of a training rank (see the module docstring)."""
LINEAR_WEIGHTS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
"""Decoder-layer linear weights (local-spec names): what TE runs in FP8."""


class MemoryPlanError(ConfigError):
    """A layout that does not fit its GPUs (the message names the rank and the dominant term),
    or one the layout checks refuse (naming the key)."""


# ------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class StageParams:
    """Parameter counts of one pipeline stage's chunk on one TP rank (from the built model)."""

    stage: int
    layers: int
    """Decoder layers on this stage."""
    first_layer: int
    params: int
    """Elements of every parameter on the rank."""
    replicated: int
    """Of which the same on every TP rank (norm weights)."""
    linear: int
    """Of which decoder-layer linear weights (what TE runs in FP8)."""
    vocab: int
    """Of which word-embedding / output-layer rows (padded vocabulary / TP, times h)."""
    padded_vocab_size: int
    expert: int = 0
    """Of which expert weights (MoE): this EP rank's experts, split over expert TP. The
    distributed optimizer shards them over the expert-data-parallel group, not DP."""


def hf_config_from(values: Any):
    """A transformers ``PretrainedConfig`` from a config.json dict (a recipe's ``HF_CONFIG``),
    a model directory or config.json path, or a config object (returned as is)."""
    if isinstance(values, dict):
        from transformers import AutoConfig

        values = dict(values)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    from maspo_megatron.megatron.model import load_hf_config

    return load_hf_config(values)


@contextlib.contextmanager
def _quiet():
    import logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


def count_stage_params(hf_config: Any, tp: int, pp: int, *, cp: int = 1,
                       make_vocab_size_divisible_by: int = 128) -> list[StageParams]:
    """Builds each pipeline stage's model chunk on the meta device and counts its parameters.

    See the module docstring for how (a single-process ``fake`` process group, no weights).
    Needs a process where torch.distributed is not initialised (the CLI, a launcher, a test).
    """
    import torch
    import torch.distributed as dist

    from maspo_megatron.megatron.model import build_model, unwrap_model
    from maspo_megatron.runtime.parallel import ParallelConfig

    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("count_stage_params needs a process without torch.distributed initialised "
                           "(it plays every rank through a fake process group)")
    with _quiet():
        from megatron.core import parallel_state as ps
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

        if ps.model_parallel_is_initialized():
            raise RuntimeError("count_stage_params needs a process without megatron's parallel state")
        hf = hf_config_from(hf_config)
        world = tp * pp * cp
        out = []
        for stage in range(pp):
            rank = stage * tp * cp  # megatron's default order tp-cp-ep-dp-pp: pp outermost
            dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
            try:
                ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp, create_gloo_process_groups=False)
                assert (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()) == (stage, 0)
                with torch.device("meta"), mock.patch("torch.cuda.is_available", return_value=False):
                    (chunk,) = build_model(hf, ParallelConfig(tp=tp, pp=pp, cp=cp), use_te=False,
                                           make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                           config_overrides=dict(perform_initialization=False))
                model = unwrap_model(chunk)
                total = replicated = linear = vocab = 0
                for name, p in model.named_parameters():
                    n = p.numel()
                    total += n
                    if not getattr(p, "tensor_model_parallel", False):
                        replicated += n
                    if name.startswith("decoder.layers.") and name.endswith(LINEAR_WEIGHTS):
                        linear += n
                    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                        vocab += n
                layers = [layer.layer_number - 1 for layer in model.decoder.layers]
                out.append(StageParams(stage=stage, layers=len(layers), first_layer=min(layers, default=0),
                                       params=total, replicated=replicated, linear=linear, vocab=vocab,
                                       padded_vocab_size=model.maspo_spec.padded_vocab_size))
            finally:
                ps.destroy_model_parallel()
                dist.destroy_process_group()
    return out


def moe_stage_params(arch, moe, *, tp: int, pp: int, ep: int = 1, etp: int | None = None,
                     make_vocab_size_divisible_by: int = 128) -> list[StageParams]:
    """Parameters of each pipeline stage's chunk on one rank of an MoE model (module docstring,
    "MoE"): every decoder layer an MoE layer of ``moe.num_experts`` SwiGLU experts of width
    ``moe.ffn_hidden_size`` and a bias-free router, no shared experts. ``arch`` is the family's
    :class:`ArchConfig` (attention, norms, vocabulary); ``etp`` None follows ``tp``.

    A formula, not a built model, because the per-rank count is needed for layouts of hundreds
    of GPUs; ``tests/test_plan.py`` checks it equals the ``numel`` of megatron-core's GPTModel
    (local MoE spec) built per rank at several TP x EP x ETP x PP layouts.
    """
    from maspo_megatron.megatron.model import padded_vocab_size

    etp = tp if etp is None else etp
    h, e, q, g = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_query_groups
    n_exp, f = moe.num_experts, moe.ffn_hidden_size
    for key, count, size, by in (("num_attention_heads", q, tp, "parallel.tp"),
                                 ("num_key_value_heads", g, tp, "parallel.tp"),
                                 ("num_hidden_layers", arch.num_layers, pp, "parallel.pp"),
                                 ("num_experts", n_exp, ep, "parallel.ep"),
                                 ("moe_intermediate_size", f, etp, "parallel.etp (None: parallel.tp)")):
        if count % size:
            raise ValueError(f"config.json {key}={count} is not divisible by {by}={size}")
    qkv = h * (q + 2 * g) * e // tp
    proj = q * e * h // tp
    experts = n_exp // ep * 3 * h * f // etp  # fc1 (gate and up, 2f/etp x h) + fc2 (h x f/etp) each
    norms = 2 * h + (2 * e if arch.qk_layernorm else 0)  # input/pre-MLP norms (+ q/k norms)
    router = n_exp * h  # replicated over TP: every rank routes its own tokens
    bias = (q + 2 * g) * e // tp if arch.qkv_bias else 0
    padded = padded_vocab_size(arch.vocab_size, tp, make_vocab_size_divisible_by)
    vocab = padded * h // tp
    layers = arch.num_layers // pp
    out = []
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        # Tied embeddings: one matrix when one stage holds both ends, else the last stage keeps
        # its own copy as output_layer (megatron's shared embedding).
        n_vocab = vocab * (first + (last and not (arch.tie_word_embeddings and pp == 1)))
        per_layer = qkv + bias + proj + experts + norms + router
        out.append(StageParams(
            stage=stage, layers=layers, first_layer=stage * layers,
            params=layers * per_layer + n_vocab + (h if last else 0),
            replicated=layers * (norms + router) + (h if last else 0),
            linear=layers * (qkv + proj + experts), vocab=n_vocab, padded_vocab_size=padded,
            expert=layers * experts))
    return out


def optimizer_bytes_per_param(*, param_bytes: int, grad_bytes: int, dp: int, distributed: bool) -> dict[str, float]:
    """Bytes per parameter of (params, grads, optimizer state) under megatron's mixed-precision
    Adam: fp32 main params unless the params are fp32, fp32 main grads unless the grad buffer is
    fp32, Adam's m and v in fp32; the last three sharded over ``dp`` by the distributed optimizer."""
    state = (0 if param_bytes == 4 else 4) + (0 if grad_bytes == 4 else 4) + 8
    return dict(params=param_bytes, grads=grad_bytes, optimizer=state / dp if distributed else state)


# ------------------------------------------------------------------------------ activations


def layer_activation_bytes(tokens: int, *, hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int,
                           tp: int, sequence_parallel: bool, act_bytes: int = 2, glu: bool = True,
                           flash: bool = True, seq_len: int | None = None, dropout_masks: bool = False,
                           moe=None, etp: int | None = None) -> float:
    """Bytes one decoder layer keeps for backward for a micro-batch of ``tokens`` (module docstring).

    ``glu=False, flash=False, dropout_masks=True`` is GPT-3's layer as in Korthikanti et al.
    (``seq_len`` is then needed for the attention scores: ``tokens / seq_len`` sequences).
    ``moe`` (``num_experts``, ``topk``, ``ffn_hidden_size``) replaces the dense MLP by an MoE
    layer with expert TP ``etp`` (None: ``tp``), assuming balanced routing (module docstring).
    """
    s = tp if sequence_parallel else 1
    qe, ge = heads * head_dim, kv_heads * head_dim
    if moe is None:
        mlp = act_bytes * tokens * (3 * ffn if glu else 2 * ffn) / tp  # fc1 output (2f for gate+up), act output
    else:
        etp = tp if etp is None else etp
        t_in = tokens / s  # the tokens this rank routes
        routed = moe.topk * t_in  # token copies its experts receive, with balanced routing
        mlp = (act_bytes * routed * (etp * hidden + 3 * moe.ffn_hidden_size + hidden)
               + 4 * t_in * moe.num_experts + 4 * routed)
    out = act_bytes * tokens * (4 * hidden / s + (2 * qe + 2 * ge) / tp) + mlp
    if dropout_masks:
        out += 2 * tokens * hidden / s  # two hidden-dropout masks, 1 B per element
    if flash:
        out += 4 * tokens * heads / tp  # fp32 log-sum-exp per head and token
    else:
        if seq_len is None:
            raise ValueError("flash=False needs seq_len (the attention scores are seq_len^2 per sequence)")
        per_score = act_bytes + (1 + act_bytes if dropout_masks else 0)  # softmax out (+ mask + dropout out)
        out += per_score * heads / tp * seq_len * tokens
    return out


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    how: str = ""


@dataclass(frozen=True)
class RankMemory:
    """One kind of GPU: a training pipeline stage (its TP x DP ranks) or a rollout server's GPU."""

    role: str
    ranks: int
    """GPUs of this kind."""
    terms: tuple[Term, ...]

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    @property
    def dominant(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)


@dataclass(frozen=True)
class MemoryPlan:
    title: str
    gpu_gib: float
    ranks: tuple[RankMemory, ...]
    notes: tuple[str, ...] = ()

    def over(self) -> list[RankMemory]:
        return [r for r in self.ranks if r.total > self.gpu_gib * GIB]

    @property
    def fits(self) -> bool:
        return not self.over()

    def verdict(self) -> str:
        bad = self.over()
        if not bad:
            peak = max(self.ranks, key=lambda r: r.total)
            return f"fits: the fullest GPU ({peak.role}) needs {peak.total / GIB:.1f} of {self.gpu_gib:g} GiB"
        return "; ".join(
            f"does not fit: {r.role} needs {r.total / GIB:.1f} GiB > {self.gpu_gib:g} GiB; dominant term: "
            f"{r.dominant.name} {r.dominant.bytes / GIB:.1f} GiB" for r in bad)

    def check(self) -> None:
        """Raises :class:`MemoryPlanError` naming each rank that does not fit and its dominant term."""
        if not self.fits:
            raise MemoryPlanError(self.verdict())

    def format(self) -> str:
        lines = [self.title]
        lines += [f"  {n}" for n in self.notes]
        width = max(len(t.name) for r in self.ranks for t in r.terms)
        for r in self.ranks:
            lines += ["", f"{r.role}  [{r.ranks} GPU{'s' if r.ranks != 1 else ''}]"]
            for t in r.terms:
                lines.append(f"  {t.name:<{width}} {t.bytes / GIB:8.2f} GiB  {t.how}".rstrip())
            flag = "ok" if r.total <= self.gpu_gib * GIB else "OVER"
            lines.append(f"  {'total':<{width}} {r.total / GIB:8.2f} GiB  of {self.gpu_gib:g} GiB: {flag}"
                         f" (largest: {r.dominant.name})")
        lines += ["", self.verdict()]
        return "\n".join(lines)


def _sci(n: float) -> str:
    return f"{n / 1e9:.3f}e9" if n >= 1e8 else f"{n:,.0f}"


def _max_seq_tokens(cfg) -> int:
    return cfg.data.max_prompt_len + cfg.rollout.sampling.max_new_tokens


def micro_batch_tokens(cfg) -> int:
    """Tokens of the largest training micro-batch, padded as the actor pads it."""
    from maspo_megatron.megatron.actor import token_multiple

    tokens = max(cfg.actor.micro_batch_tokens, _max_seq_tokens(cfg))
    multiple = token_multiple(fp8=bool(cfg.model.fp8), sequence_parallel=cfg.model.sequence_parallel,
                              tp=cfg.parallel.tp)
    return -(-tokens // multiple) * multiple


def _recompute(cfg) -> tuple[str | None, str, int]:
    """(granularity, method, num_layers) as ``ModelConfig.megatron_overrides`` sets them."""
    over = cfg.model.transformer_overrides or {}
    gran = over.get("recompute_granularity", cfg.model.recompute_granularity)
    method = over.get("recompute_method", "uniform")
    n = int(over.get("recompute_num_layers", 1) or 1)
    return gran, method, n


def train_rank_memory(cfg, arch, stages: list[StageParams], *, dp: int, reserve_gib: float = RESERVE_GIB
                      ) -> list[RankMemory]:
    """The terms of each pipeline stage's ranks (stages with equal terms merged)."""
    p = cfg.parallel
    tp, pp, cp = p.tp, p.pp, p.cp
    fp32 = cfg.model.dtype == "fp32"
    pbytes = 4 if fp32 else 2
    per = optimizer_bytes_per_param(param_bytes=pbytes, grad_bytes=4, dp=dp,
                                    distributed=cfg.actor.optimizer.use_distributed_optimizer)
    tokens = micro_batch_tokens(cfg)
    t_rank = tokens / cp
    sp = cfg.model.sequence_parallel and tp > 1
    s = tp if sp else 1
    h = arch.hidden_size
    moe = getattr(arch, "moe", None)
    etp = p.etp or tp
    edp = dp * tp * cp // (p.ep * etp)  # megatron's expert-data-parallel size: world / (pp x ep x etp)
    layer = layer_activation_bytes(t_rank, hidden=h, ffn=arch.ffn_hidden_size, heads=arch.num_attention_heads,
                                   kv_heads=arch.num_query_groups, head_dim=arch.head_dim, tp=tp,
                                   sequence_parallel=sp, act_bytes=pbytes, moe=moe, etp=etp)
    gran, method, n_rec = _recompute(cfg)
    if gran == "selective":
        layer -= 4 * t_rank * arch.num_attention_heads / tp  # the core attention's softmax stats
    layer_input = pbytes * t_rank * h / s
    seqs_per_dp = max(1, cfg.prompts_per_step * cfg.rollout.n_samples // cfg.actor.num_mini_batches // dp)
    dtype = "fp32" if fp32 else "bf16"
    state = "Adam m, v" if fp32 else "fp32 main + Adam m, v"
    distributed = cfg.actor.optimizer.use_distributed_optimizer
    optim_how = f"{per['optimizer']:g} B x params" + (
        f" ({state} = {per['optimizer'] * dp:g} B / DP {dp})"
        if distributed else " (not sharded: distributed optimizer off)")
    per_expert = optimizer_bytes_per_param(param_bytes=pbytes, grad_bytes=4, dp=edp, distributed=distributed)
    expert_optim_how = f"{per_expert['optimizer']:g} B x expert params" + (
        f" ({state} = {per_expert['optimizer'] * edp:g} B / expert DP {edp})"
        if distributed else " (not sharded: distributed optimizer off)")
    groups: dict[tuple, tuple[list[StageParams], list[Term]]] = {}
    for st in stages:
        in_flight = min(pp - st.stage, seqs_per_dp)
        n, n_exp = st.params - st.expert, st.expert
        terms = [
            Term(f"parameters ({dtype})", per["params"] * n, f"{per['params']:g} B x {_sci(n)} params"
                 + (" (all but the experts)" if n_exp else "")),
            Term("gradients (fp32 grad buffer)", per["grads"] * n, "4 B x params (megatron DDP, not sharded)"),
            Term("optimizer state", per["optimizer"] * n, optim_how),
        ]
        if n_exp:
            terms += [
                Term(f"expert parameters ({dtype})", per_expert["params"] * n_exp,
                     f"{per_expert['params']:g} B x {_sci(n_exp)} params ({moe.num_experts // p.ep} of "
                     f"{moe.num_experts} experts x {st.layers} layers, / expert TP {etp})"),
                Term("expert gradients (fp32)", per_expert["grads"] * n_exp, "4 B x expert params (not sharded)"),
                Term("expert optimizer state", per_expert["optimizer"] * n_exp, expert_optim_how),
            ]
        if cfg.model.fp8:
            terms.append(Term("FP8 weight copies (TE)", 2 * st.linear,
                              f"estimate: (1 B + 1 B transpose) x {_sci(st.linear)} linear params"))
        if cfg.actor.kl_coef > 0:
            terms.append(Term(f"reference model ({dtype})", pbytes * st.params, "frozen copy (actor.kl_coef > 0)"))
        L = st.layers
        if gran == "full" and method == "uniform":
            groups_n = math.ceil(L / n_rec)
            act = in_flight * groups_n * layer_input + min(n_rec, L) * layer
            act_how = (f"full recompute: {in_flight} in flight x {groups_n} layer inputs x "
                       f"{layer_input / MIB:.0f} MiB + {min(n_rec, L)} layer recomputed {layer / MIB:.0f} MiB")
        elif gran == "full":  # block: the first n layers of the stage recomputed, the rest kept
            kept = max(0, L - n_rec)
            act = in_flight * (min(n_rec, L) * layer_input + kept * layer) + (layer if n_rec else 0)
            act_how = (f"block recompute of {min(n_rec, L)} layers: {in_flight} in flight x "
                       f"({min(n_rec, L)} inputs + {kept} layers x {layer / MIB:.0f} MiB)")
        else:
            act = in_flight * L * layer
            act_how = (f"{'selective recompute' if gran else 'no recompute'}: {in_flight} in flight x "
                       f"{L} layers x {layer / MIB:.0f} MiB")
        last = st.stage == pp - 1
        if last:
            act += in_flight * 2 * pbytes * t_rank * h / s  # final norm input and output
        terms.append(Term("activations", act, act_how))
        vp = st.padded_vocab_size // tp
        if last:
            if cfg.actor.fused_logprobs:
                chunk = cfg.actor.logprob_chunk_tokens or 1024
                logits = chunk * vp * pbytes + vp * h * 4
                how = f"fused: {chunk}-token chunk x {vp} x {pbytes} B + fp32 output-weight grad"
            else:
                logits = t_rank * vp * 2 * pbytes
                how = f"{int(t_rank)} tokens x V/TP {vp} x {2 * pbytes} B (logits + gradient)"
            terms.append(Term("logits shard", logits, how))
        terms.append(Term("runtime reserve", reserve_gib * GIB, "estimate: CUDA context, NCCL, fragmentation"))
        key = tuple(round(t.bytes) for t in terms) + (st.stage == 0, last)
        groups.setdefault(key, ([], terms))[0].append(st)
    out = []
    for members, terms in groups.values():
        st = members[0]
        last = st.stage == pp - 1
        parts = (["embedding"] if st.stage == 0 else []) + [f"{st.layers} layers"] + (
            ["final norm", "output layer"] if last else [])
        if pp == 1:
            role = "train rank: " + " + ".join(parts)
        elif len(members) == 1:
            role = f"train PP stage {st.stage}: " + " + ".join(parts)
        else:
            role = f"train PP stages {members[0].stage}-{members[-1].stage}: {st.layers} layers each"
        out.append(RankMemory(role, len(members) * tp * cp * dp, tuple(terms)))
    return out


def sglang_weight_params(arch, tp: int) -> int:
    """Parameters on one GPU of an SGLang server at tensor-parallel size ``tp`` (module docstring)."""
    h, f, e = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q = arch.num_attention_heads // tp
    kv = arch.num_query_groups // tp if arch.num_query_groups >= tp else 1
    moe = getattr(arch, "moe", None)
    if moe is None:
        mlp = 3 * h * f // tp
    else:  # SGLang's default MoE layout (no --ep-size): every expert split over TP, router replicated
        mlp = moe.num_experts * (3 * h * moe.ffn_hidden_size // tp + h)
    layer = h * e * (q + 2 * kv) + q * e * h + mlp + 2 * h
    if arch.qkv_bias:
        layer += e * (q + 2 * kv)
    if arch.qk_layernorm:
        layer += 2 * e
    vocab = -(-arch.vocab_size // tp) * h
    return arch.num_layers * layer + vocab * (1 if arch.tie_word_embeddings else 2) + h


def kv_bytes_per_token(arch, tp: int, kv_bytes: int = 2) -> int:
    kv = arch.num_query_groups // tp if arch.num_query_groups >= tp else 1
    return 2 * arch.num_layers * kv * arch.head_dim * kv_bytes


def sglang_reserve_bytes(gpu_gib: float, tp: int, mem_fraction_static: float | None) -> float:
    if mem_fraction_static is not None:
        return (1 - mem_fraction_static) * gpu_gib * GIB
    reserved_mib = 512 + 2048 * 1.5 + tp / 8 * 1024
    if gpu_gib > 60:
        reserved_mib = max(reserved_mib, 10 * 1024)
    return reserved_mib * MIB


def rollout_rank_memory(cfg, arch, *, num_servers: int, gpu_gib: float) -> RankMemory:
    r = cfg.rollout
    tp = r.sglang_tp
    wbytes = 4 if (r.dtype or "").lower() in ("float32", "fp32") else 2
    weights = sglang_weight_params(arch, tp)
    per_server = math.ceil(r.client.max_concurrency / num_servers)
    seq = _max_seq_tokens(cfg)
    per_token = kv_bytes_per_token(arch, tp, wbytes)
    if r.max_total_tokens:
        kv_tokens, kv_how = r.max_total_tokens, f"rollout.max_total_tokens {r.max_total_tokens}"
        if kv_tokens < per_server * seq:
            kv_how += f" (< {per_server} x {seq} needed: requests queue)"
    else:
        kv_tokens = per_server * seq
        kv_how = f"{per_server} requests x {seq} tokens"
    kv_how += f" x {per_token / 1024:.0f} KiB/token"
    terms = (
        Term(f"SGLang weights ({'fp32' if wbytes == 4 else 'bf16'})", weights * wbytes,
             f"{_sci(weights)} params per GPU at TP {tp}"),
        Term("SGLang KV cache", kv_tokens * per_token, kv_how),
        Term("SGLang non-static reserve", sglang_reserve_bytes(gpu_gib, tp, r.mem_fraction_static),
             f"1 - mem_fraction_static={r.mem_fraction_static}" if r.mem_fraction_static is not None
             else "SGLang 0.5.23 default (activations, CUDA graphs)"),
    )
    return RankMemory(f"rollout: one GPU of an SGLang TP{tp} server", num_servers * tp, terms)


def plan_memory(cfg, hf_config: Any, *, train_gpus: int, rollout_gpus: int | None = None, gpu_gib: float = 80.0,
                reserve_gib: float = RESERVE_GIB, stages: list[StageParams] | None = None,
                title: str = "") -> MemoryPlan:
    """The per-GPU memory of ``cfg``'s training ranks on ``train_gpus`` GPUs and, with
    ``rollout_gpus``, of its SGLang servers (``rollout_gpus // rollout.sglang_tp`` of them).

    ``hf_config``: the model's config.json (dict, path or config object). ``stages``: counts
    from :func:`count_stage_params` when already computed (they depend only on the model, TP,
    PP, CP and the vocabulary multiple).
    """
    from maspo_megatron.megatron.families import get_family

    if cfg.parallel.vpp:
        # Interleaving keeps (pp - stage - 1) * 2 + (vpp - 1) * group micro-batches in flight.
        raise NotImplementedError(f"parallel.vpp={cfg.parallel.vpp}: the activations of the interleaved "
                                  "schedule (virtual pipeline stages) are not modelled by the memory plan")

    p = cfg.parallel
    dp = p.validate(train_gpus)
    hf = hf_config_from(hf_config)
    arch = get_family(hf).arch_config(hf)
    moe = getattr(arch, "moe", None)
    if moe is not None:
        _check_moe_layout(cfg, train_gpus)
    if stages is None and moe is not None:
        try:
            stages = moe_stage_params(arch, moe, tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp,
                                      make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by)
        except ValueError as e:
            raise MemoryPlanError(f"the model does not fit the layout: {e}") from None
    elif stages is None:
        stages = count_stage_params(hf, p.tp, p.pp, cp=p.cp,
                                    make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by)
    ranks = train_rank_memory(cfg, arch, stages, dp=dp, reserve_gib=reserve_gib)
    gran, method, n_rec = _recompute(cfg)
    layout = (f"TP{p.tp} x PP{p.pp}" + (f" x CP{p.cp}" if p.cp > 1 else "") + f" x DP{dp} = {train_gpus} GPUs"
              + (f" (experts: EP{p.ep} x ETP{p.etp or p.tp} x expert DP "
                 f"{train_gpus // (p.pp * p.ep * (p.etp or p.tp))})" if moe is not None else ""))
    notes = [f"training {layout}; micro-batch {micro_batch_tokens(cfg)} tokens; recompute "
             f"{gran or 'none'}{f' ({method}, {n_rec} layer)' if gran == 'full' else ''}; sequence parallel "
             f"{'on' if cfg.model.sequence_parallel and p.tp > 1 else 'off'}; {cfg.model.dtype}"
             f"{f', FP8 {cfg.model.fp8}' if cfg.model.fp8 else ''}"]
    if rollout_gpus and cfg.rollout.device == "cuda":
        servers = rollout_gpus // cfg.rollout.sglang_tp
        if servers < 1:
            raise MemoryPlanError(f"rollout.sglang_tp={cfg.rollout.sglang_tp} is more than the {rollout_gpus} "
                                  "rollout GPUs")
        ranks.append(rollout_rank_memory(cfg, arch, num_servers=servers, gpu_gib=gpu_gib))
        notes.append(f"rollouts: {servers} SGLang server(s) x TP{cfg.rollout.sglang_tp} = {rollout_gpus} GPUs; "
                     f"{cfg.rollout.client.max_concurrency} requests in flight in all")
    total = sum(s.params for s in stages)
    if moe is not None:
        notes.append(f"MoE: {moe.num_experts} experts, top-{moe.topk}, expert width {moe.ffn_hidden_size}; "
                     "activations assume balanced routing")
        notes.append(f"GiB = 2^30 B; parameters from megatron's MoE layout per rank ({_sci(total)} on "
                     "TP and EP rank 0 of all stages)")
    else:
        notes.append(f"GiB = 2^30 B; parameters counted from the megatron model built per stage "
                     f"({_sci(total)} on TP rank 0 of all stages)")
    return MemoryPlan(title=title or "memory plan", gpu_gib=gpu_gib, ranks=tuple(ranks), notes=tuple(notes))


def _check_moe_layout(cfg, world: int) -> None:
    """What megatron-core refuses for an MoE layout, named by config key."""
    p = cfg.parallel
    etp = p.etp or p.tp
    if world % (p.pp * p.ep * etp):
        raise MemoryPlanError(f"parallel.pp x parallel.ep x parallel.etp = {p.pp} x {p.ep} x {etp} does not "
                              f"divide the {world} training GPUs (megatron's expert-parallel grid)")
    if p.tp > 1 and not cfg.model.sequence_parallel:
        # megatron-core's MoELayer raises in training with TP > 1 and sequence parallelism off.
        raise MemoryPlanError(f"parallel.tp={p.tp} with an MoE model needs model.sequence_parallel=true "
                              "(megatron's MoE layer refuses tensor parallelism without it in training)")


# ------------------------------------------------------------------------------ recipes


def recipe_model_config(cfg, module=None):
    """The model's config.json: ``model.path``'s when this machine can read it, else the
    recipe module's ``HF_CONFIG`` (the real checkpoint's values, declared by the recipe)."""
    import os

    path = cfg.model.path
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return path
    hf = getattr(module, "HF_CONFIG", None)
    if hf is None:
        raise MemoryPlanError(f"no model description to plan with: model.path={path!r} has no readable "
                              "config.json and the recipe declares no HF_CONFIG")
    return hf


def recipe_gpus(cfg, module=None) -> tuple[int, int]:
    """(training GPUs, rollout GPUs) a recipe is laid out for: its ``TRAIN_NODES``,
    ``ROLLOUT_NODES`` x ``GPUS_PER_NODE`` when it declares them, else the smallest world of its
    layout (DP = 1) and ``rollout.num_servers`` (or its ``server_urls``) x ``rollout.sglang_tp``."""
    p, r = cfg.parallel, cfg.rollout
    gpn = getattr(module, "GPUS_PER_NODE", None)
    train = getattr(module, "TRAIN_NODES", None)
    rollout = getattr(module, "ROLLOUT_NODES", None)
    train_gpus = train * gpn if train and gpn else p.tp * p.pp * p.cp
    rollout_gpus = rollout * gpn if rollout and gpn else (len(r.server_urls) or r.num_servers) * r.sglang_tp
    return train_gpus, rollout_gpus


def plan_recipe(cfg, module=None, *, train_gpus: int | None = None, rollout_gpus: int | None = None,
                gpu_gib: float = 80.0, reserve_gib: float = RESERVE_GIB, title: str = "") -> MemoryPlan:
    """The layout checks (parallel sizes vs the GPUs and the model, SGLang's TP vs the model's
    heads) and the memory plan of a loaded recipe; ``module`` is the recipe module (for its
    ``HF_CONFIG`` and node counts). Raises :class:`MemoryPlanError` for a layout the checks
    refuse; a plan that does not fit is returned (``plan.fits``, ``plan.check()``)."""
    import json
    import os

    default_train, default_rollout = recipe_gpus(cfg, module)
    train_gpus = train_gpus or default_train
    rollout_gpus = default_rollout if rollout_gpus is None else rollout_gpus
    try:
        cfg.parallel.validate(train_gpus)
    except ValueError as e:
        raise MemoryPlanError(f"the training layout does not fit {train_gpus} GPUs: {e}") from None
    source = recipe_model_config(cfg, module)
    if isinstance(source, dict):
        values = source
    else:
        with open(os.path.join(source, "config.json")) as f:
            values = json.load(f)
    r = cfg.rollout
    if rollout_gpus:
        if rollout_gpus % r.sglang_tp:
            raise MemoryPlanError(f"rollout.sglang_tp={r.sglang_tp} does not divide the {rollout_gpus} rollout GPUs")
        from maspo_megatron.rollout.backend import get_backend

        try:
            get_backend(r.engine).check_model(r.server_spec(cfg.model.path or "model"), values)
        except ValueError as e:
            raise MemoryPlanError(str(e)) from None
    try:
        return plan_memory(cfg, values, train_gpus=train_gpus, rollout_gpus=rollout_gpus, gpu_gib=gpu_gib,
                           reserve_gib=reserve_gib, title=title)
    except MemoryPlanError:
        raise
    except NotImplementedError as e:
        raise MemoryPlanError(f"cannot plan this recipe: {e}") from None
    except ValueError as e:  # make_model_spec's checks (heads vs TP, layers vs PP), the family's
        raise MemoryPlanError(f"the model does not fit the layout: {e}") from None


__all__ = [
    "GIB",
    "MemoryPlan",
    "MemoryPlanError",
    "RankMemory",
    "StageParams",
    "Term",
    "count_stage_params",
    "hf_config_from",
    "kv_bytes_per_token",
    "layer_activation_bytes",
    "moe_stage_params",
    "optimizer_bytes_per_param",
    "plan_memory",
    "plan_recipe",
    "recipe_gpus",
    "recipe_model_config",
    "sglang_weight_params",
]
