"""Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen): bias on q, k and v, none on o_proj."""

from maspo_megatron.megatron.families.base import register
from maspo_megatron.megatron.families.dense import dense_arch_config, dense_family


def _arch_config(hf_config):
    return dense_arch_config(hf_config, qkv_bias=True, qk_layernorm=False)


QWEN2 = register(dense_family("qwen2", ("Qwen2ForCausalLM",), _arch_config))
