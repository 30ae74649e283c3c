"""Qwen3 (dense): per-head RMSNorm on queries and keys before RoPE, no QKV bias."""

from maspo_megatron.megatron.families.base import register, require
from maspo_megatron.megatron.families.dense import dense_arch_config, dense_family


def _arch_config(hf_config):
    require(hf_config, "attention_bias", lambda v: not v, "false or absent")
    return dense_arch_config(hf_config, qkv_bias=False, qk_layernorm=True)


QWEN3 = register(dense_family("qwen3", ("Qwen3ForCausalLM",), _arch_config))
