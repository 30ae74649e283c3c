"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention (q/k RMSNorm), every layer an MoE
of SwiGLU experts with top-k routing and no shared expert."""

import dataclasses

from maspo_megatron.megatron.families.base import Family, MoeArch, register, require
from maspo_megatron.megatron.families.dense import dense_arch_config
from maspo_megatron.megatron.families.moe import moe_layer_spec, moe_param_rules, moe_transformer_fields


def _arch_config(hf_config):
    require(hf_config, "attention_bias", lambda v: not v, "false or absent")
    require(hf_config, "decoder_sparse_step", lambda v: v in (None, 1), "1 (every layer an MoE layer)")
    require(hf_config, "mlp_only_layers", lambda v: not v, "empty (no dense layers)")
    require(hf_config, "shared_expert_intermediate_size", lambda v: not v, "absent (no shared expert)")
    require(hf_config, "num_experts_per_tok", lambda v: isinstance(v, int) and v >= 1, "a positive integer")
    arch = dense_arch_config(hf_config, qkv_bias=False, qk_layernorm=True)
    moe = MoeArch(
        num_experts=hf_config.num_experts,
        ffn_hidden_size=hf_config.moe_intermediate_size,
        topk=hf_config.num_experts_per_tok,
        norm_topk_prob=bool(hf_config.norm_topk_prob),
        aux_loss_coeff=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
    )
    return dataclasses.replace(arch, moe=moe)


QWEN3_MOE = register(Family("qwen3_moe", ("Qwen3MoeForCausalLM",), _arch_config, moe_param_rules,
                            moe_transformer_fields, moe_layer_spec))
