"""Qwen3-MoE: known, not implemented yet (needs expert-parallel mapping of the experts)."""

from maspo_megatron.megatron.families.base import register_not_implemented

register_not_implemented(
    "Qwen3MoeForCausalLM",
    "the MoE mapping (router weights, per-expert gate/up/down split over expert-parallel ranks, "
    "megatron's MoE layer spec) is not written; dense Llama/Qwen2/Qwen3 are supported",
)
