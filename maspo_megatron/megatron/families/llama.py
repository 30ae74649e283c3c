"""Llama (1/2/3.x, incl. Llama-3 RoPE scaling) and Llama-architecture distills."""

from maspo_megatron.megatron.families.base import register, require
from maspo_megatron.megatron.families.dense import dense_arch_config, dense_family


def _arch_config(hf_config):
    # Llama's attention_bias puts a bias on o_proj too, which megatron's add_qkv_bias does not.
    require(hf_config, "attention_bias", lambda v: not v, "false or absent")
    return dense_arch_config(hf_config, qkv_bias=False, qk_layernorm=False)


LLAMA = register(dense_family("llama", ("LlamaForCausalLM",), _arch_config))
