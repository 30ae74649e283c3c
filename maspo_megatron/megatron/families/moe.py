"""Shared pieces of mixture-of-experts decoders whose every layer routes each token to its top-k
of ``num_experts`` SwiGLU experts (Qwen3-MoE), built on megatron's MoE layer.

Megatron side (megatron-core 0.19): the layer spec's ``MoELayer`` with a ``TopKRouter``
(``mlp.router.weight``, replicated) and ``SequentialMLP`` experts
(``mlp.experts.local_experts.<j>.linear_fc1/fc2``, ``j`` local: expert-parallel rank ``r`` holds
the global experts ``r * E/EP + j``), each expert's MLP split over the expert-tensor-parallel
group like a dense MLP over TP. Tokens reach their experts through the ``alltoall`` dispatcher,
dropless (no capacity factor). The grouped-GEMM experts (``TEGroupedMLP``) name their weights
differently and are not mapped: ``moe_grouped_gemm`` stays off on both specs.

Routing: HF takes softmax over all expert logits, then the top-k, renormalised when
``norm_topk_prob``; renormalising the top-k of a softmax equals a softmax over the top-k logits,
which is megatron's ``moe_router_pre_softmax=False``; without renormalisation it is megatron's
softmax-then-top-k (``moe_router_pre_softmax=True``). The router runs in fp32.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from maspo_megatron.megatron.families.base import ArchConfig, ParamRule, ShardKind
from maspo_megatron.megatron.families.dense import attention_param_rules, divisible


def expert_tp(parallel: Any) -> int:
    """The expert-tensor-parallel size (``parallel.etp``; None follows ``tp``)."""
    return parallel.etp if getattr(parallel, "etp", None) is not None else parallel.tp


def moe_transformer_fields(arch: ArchConfig, parallel: Any) -> dict[str, Any]:
    moe = arch.moe
    divisible("num_experts", moe.num_experts, parallel.ep, "parallel.ep")
    divisible("moe_intermediate_size", moe.ffn_hidden_size, expert_tp(parallel), "parallel.etp")
    return dict(
        # No dense MLP layer exists; megatron still wants a value.
        ffn_hidden_size=arch.ffn_hidden_size,
        gated_linear_unit=True,
        activation_func=F.silu,
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_router_topk=moe.topk,
        moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_token_dispatcher_type="alltoall",
        moe_expert_capacity_factor=None,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,  # a GPU (TE) kernel
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=expert_tp(parallel),
    )


def moe_layer_spec(arch: ArchConfig, use_te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    kwargs = dict(num_experts=arch.moe.num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_layernorm)
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(**kwargs)
    return get_gpt_layer_local_spec(**kwargs, normalization="RMSNorm")


def moe_param_rules(arch: ArchConfig) -> tuple[tuple[ParamRule, ...], tuple[ParamRule, ...]]:
    """(model-level, per-layer) rules; HF experts as saved on disk, one tensor per expert and
    projection (``mlp.experts.<e>.{gate,up,down}_proj.weight``), which is what
    ``from_pretrained`` and SGLang load (transformers 5 fuses them only in memory)."""
    h, e, f = arch.hidden_size, arch.moe.num_experts, arch.moe.ffn_hidden_size
    model_rules, layer_rules = attention_param_rules(arch)
    mlp, local = "model.layers.{layer}.mlp.", "mlp.experts.local_experts.{expert}."
    return model_rules, layer_rules + (
        ParamRule("pre_mlp_layernorm.weight", ("model.layers.{layer}.post_attention_layernorm.weight",),
                  ShardKind.REPLICATED, ((h,),)),
        ParamRule("mlp.router.weight", (mlp + "gate.weight",), ShardKind.REPLICATED, ((e, h),)),
        ParamRule(local + "linear_fc1.weight",
                  (mlp + "experts.{expert}.gate_proj.weight", mlp + "experts.{expert}.up_proj.weight"),
                  ShardKind.GATE_UP, ((f, h), (f, h)), expert=True),
        ParamRule(local + "linear_fc2.weight", (mlp + "experts.{expert}.down_proj.weight",),
                  ShardKind.ROW, ((h, f),), expert=True),
    )
