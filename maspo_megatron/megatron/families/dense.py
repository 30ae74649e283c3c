"""Shared pieces of the dense decoder families (Llama, Qwen2, Qwen3).

They share the HF module layout ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, and differ only
in QKV bias (Qwen2) and per-head q/k RMSNorm (Qwen3), which the family passes as flags.
:func:`dense_family` bundles these pieces into a :class:`Family`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F

from maspo_megatron.megatron.families.base import (
    ArchConfig,
    Family,
    ParamRule,
    RopeConfig,
    ShardKind,
    UnsupportedArchitectureError,
    require,
)

# Megatron-core 0.19 implements these rope types; others (yarn, dynamic, longrope) are rejected.
_ROPE_KINDS = ("default", "linear", "llama3")


def rope_config(hf_config: Any) -> RopeConfig:
    """RoPE settings from ``rope_parameters`` (transformers 5) or ``rope_scaling``/``rope_theta``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise UnsupportedArchitectureError("config.json has no rope_theta (rope_parameters.rope_theta)")
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind not in _ROPE_KINDS:
        raise UnsupportedArchitectureError(
            f"config.json rope type {kind!r} is not supported (supported: {', '.join(_ROPE_KINDS)})"
        )
    keep = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")}.get(kind, ())
    missing = [k for k in keep if k not in params]
    if missing:
        raise UnsupportedArchitectureError(f"config.json rope type {kind!r} lacks {missing}")
    return RopeConfig(theta=float(theta), kind=kind, params={k: float(params[k]) for k in keep})


def dense_arch_config(hf_config: Any, *, qkv_bias: bool, qk_layernorm: bool) -> ArchConfig:
    """Common translation; rejects the config features no dense family here implements."""
    require(hf_config, "hidden_act", lambda v: v == "silu", "'silu' (SwiGLU MLP)")
    require(hf_config, "mlp_bias", lambda v: not v, "false or absent")
    require(hf_config, "use_sliding_window", lambda v: not v, "false or absent")
    heads = hf_config.num_attention_heads
    return ArchConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        norm_eps=hf_config.rms_norm_eps,
        rope=rope_config(hf_config),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_layernorm=qk_layernorm,
    )


def divisible(key: str, count: int, by: int, what: str) -> None:
    """Raises ValueError naming the config key when ``count`` cannot be split ``by`` ways."""
    if count % by:
        raise ValueError(f"config.json {key}={count} is not divisible by {what}={by}")


def dense_transformer_fields(arch: ArchConfig, parallel: Any) -> dict[str, Any]:
    """The SwiGLU MLP of every layer, split over TP."""
    divisible("intermediate_size", arch.ffn_hidden_size, parallel.tp, "tp")
    return dict(ffn_hidden_size=arch.ffn_hidden_size, gated_linear_unit=True, activation_func=F.silu)


def dense_layer_spec(arch: ArchConfig, use_te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")


def dense_family(name: str, architectures: tuple[str, ...], arch_config: Callable[[Any], ArchConfig]) -> Family:
    return Family(name, architectures, arch_config, dense_param_rules, dense_transformer_fields, dense_layer_spec)


def attention_param_rules(arch: ArchConfig) -> tuple[tuple[ParamRule, ...], tuple[ParamRule, ...]]:
    """(model-level, per-layer attention and norm) rules, shared by dense and MoE decoders."""
    h, v = arch.hidden_size, arch.vocab_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.num_query_groups * arch.head_dim
    embed = "model.embed_tokens.weight"
    model_rules = [
        ParamRule("embedding.word_embeddings.weight", (embed,), ShardKind.VOCAB, ((v, h),)),
        ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",), ShardKind.REPLICATED, ((h,),)),
        # With tied embeddings the last pipeline stage still holds its own copy of the
        # embedding as output_layer.weight (only when it is not also the first stage).
        ParamRule("output_layer.weight", (embed,) if arch.tie_word_embeddings else ("lm_head.weight",),
                  ShardKind.VOCAB, ((v, h),), export=not arch.tie_word_embeddings),
    ]
    attn = "model.layers.{layer}.self_attn."
    layer_rules = [
        ParamRule("input_layernorm.weight", ("model.layers.{layer}.input_layernorm.weight",),
                  ShardKind.REPLICATED, ((h,),), aliases=("self_attention.linear_qkv.layer_norm_weight",)),
        ParamRule("self_attention.linear_qkv.weight", tuple(attn + f"{p}_proj.weight" for p in "qkv"),
                  ShardKind.QKV, ((q, h), (kv, h), (kv, h))),
        ParamRule("self_attention.linear_proj.weight", (attn + "o_proj.weight",), ShardKind.ROW, ((h, q),)),
    ]
    if arch.qkv_bias:
        layer_rules.append(ParamRule("self_attention.linear_qkv.bias", tuple(attn + f"{p}_proj.bias" for p in "qkv"),
                                     ShardKind.QKV, ((q,), (kv,), (kv,))))
    if arch.qk_layernorm:
        d = (arch.head_dim,)
        layer_rules += [
            ParamRule("self_attention.q_layernorm.weight", (attn + "q_norm.weight",), ShardKind.REPLICATED, (d,)),
            ParamRule("self_attention.k_layernorm.weight", (attn + "k_norm.weight",), ShardKind.REPLICATED, (d,)),
        ]
    return tuple(model_rules), tuple(layer_rules)


def dense_param_rules(arch: ArchConfig) -> tuple[tuple[ParamRule, ...], tuple[ParamRule, ...]]:
    """(model-level, per-layer) rules of a dense decoder, honouring the arch's optional parts."""
    h, f = arch.hidden_size, arch.ffn_hidden_size
    model_rules, layer_rules = attention_param_rules(arch)
    mlp = "model.layers.{layer}.mlp."
    return model_rules, layer_rules + (
        ParamRule("pre_mlp_layernorm.weight", ("model.layers.{layer}.post_attention_layernorm.weight",),
                  ShardKind.REPLICATED, ((h,),), aliases=("mlp.linear_fc1.layer_norm_weight",)),
        ParamRule("mlp.linear_fc1.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                  ShardKind.GATE_UP, ((f, h), (f, h))),
        ParamRule("mlp.linear_fc2.weight", (mlp + "down_proj.weight",), ShardKind.ROW, ((h, f),)),
    )
