"""Build this rank's megatron-core model chunk from a Hugging Face ``config.json``.

Supported: the decoder families registered in ``families/`` (Llama incl. Llama-3 RoPE scaling,
Qwen2/2.5 with QKV bias, Qwen3 with per-head q/k RMSNorm, Qwen3-MoE with expert parallelism):
RMSNorm, SwiGLU MLP or MoE layer, RoPE, grouped-query attention, tied or untied embeddings. The
family supplies the MLP's ``TransformerConfig`` fields and the layer spec.

**Why GPTModel and not HybridModel.** megatron-core 0.19 logs "GPTModel IS DEPRECATED" and points
to ``HybridModel``. We still build ``GPTModel`` deliberately, because in 0.19 HybridModel
(a) ships only Transformer-Engine stack specs (``hybrid_layer_specs.py`` notes the non-TE spec
did not work), so it cannot run on CPU, where every parity, round-trip and training test of this
project runs; (b) does not forward ``rope_scaling`` to its ``RotaryEmbedding``, so Llama-3.x
could not be expressed; and (c) splits every decoder layer into an attention layer and an MLP
layer, which doubles layer indices and changes how pipeline stages are balanced. GPTModel is
still maintained for critical fixes, is what the pipeline schedules, DDP, distributed optimizer
and dist-checkpointing are exercised with, and runs with both the local and the TE spec. The
switch is contained: HF name mapping lives in ``families/`` and conversion resolves Megatron
names from the model's own state dict.

**Vocabulary padding.** The embedding and output layer have ``padded_vocab_size`` rows: the HF
vocabulary rounded up to a multiple of ``make_vocab_size_divisible_by * tp`` (megatron's
convention, so each TP rank holds an equal, aligned slice). Padding rows are zero when loaded
from HF and stripped on export. Their logits (0 for zero rows, something else after training)
are NOT real tokens: consumers of the logits must ignore ids ``>= spec.vocab_size`` (mask them
to -inf before any softmax) to match HF / SGLang log-probs.

**Llama-3 RoPE.** megatron-core's ``rope_scaling=True`` hard-codes low/high frequency factors
1/4 and an original context of 8192. We instead apply megatron's own scaling formula with the
checkpoint's parameters to the rotary module's frequencies, so every Llama-3.x variant is exact.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch

from maspo_megatron.megatron.families import ArchConfig, Family, get_family


@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines the model this rank builds (attached to each built chunk)."""

    hf_config: Any
    """The HF ``PretrainedConfig`` the model was built from (written back by ``save_hf``)."""
    family: Family
    arch: ArchConfig
    transformer_config: Any
    """megatron-core ``TransformerConfig``."""
    use_te: bool
    vocab_size: int
    """The real (HF) vocabulary size: logits at ids >= this are padding."""
    padded_vocab_size: int
    pre_process: bool
    """This chunk holds the embedding (first pipeline stage; its first virtual stage)."""
    post_process: bool
    """This chunk holds the final norm and output layer (last pipeline stage; its last virtual
    stage)."""


def load_hf_config(hf_config_or_path: Any):
    """An HF ``PretrainedConfig`` from a config object, a checkpoint directory or a config.json."""
    if not isinstance(hf_config_or_path, (str, os.PathLike)):
        return hf_config_or_path
    from transformers import AutoConfig

    path = os.fspath(hf_config_or_path)
    if os.path.isfile(path):
        path = os.path.dirname(path) or "."
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path}")
    return AutoConfig.from_pretrained(path)


def te_available() -> bool:
    """Transformer Engine is importable and a CUDA device is present (TE is GPU-only)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int) -> int:
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def make_model_spec(
    hf_config_or_path: Any,
    parallel: Any,
    *,
    dtype: torch.dtype = torch.bfloat16,
    use_te: bool | None = None,
    make_vocab_size_divisible_by: int = 128,
    config_overrides: dict[str, Any] | None = None,
) -> ModelSpec:
    """Translates an HF config into megatron-core's config for this rank.

    ``parallel`` is a ``runtime.ParallelConfig`` (``tp``, ``pp``, ``cp``, ``vpp``) and must match
    the initialised megatron parallel state. ``config_overrides`` are extra ``TransformerConfig``
    fields (recompute, sequence_parallel, fp8 ...); they win over the translated values.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    hf_config = load_hf_config(hf_config_or_path)
    family = get_family(hf_config)
    arch = family.arch_config(hf_config)
    stray = sorted(k for k in (config_overrides or {}) if k.startswith("moe_"))
    if arch.moe is None and stray:
        raise ValueError(f"{stray} set for {family.name}, which is not a mixture-of-experts model "
                         "(model.moe_aux_loss_coeff / model.transformer_overrides)")
    vpp = getattr(parallel, "vpp", None)
    if arch.num_layers % parallel.pp:
        raise ValueError(f"num_hidden_layers={arch.num_layers} is not divisible by pp={parallel.pp}")
    if vpp and arch.num_layers % (parallel.pp * vpp):
        raise ValueError(f"num_hidden_layers={arch.num_layers} is not divisible by parallel.pp * parallel.vpp = "
                         f"{parallel.pp}*{vpp} (every virtual pipeline stage holds as many layers)")
    actual = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_virtual_pipeline_model_parallel_world_size())
    if actual != (parallel.tp, parallel.pp, vpp):
        raise ValueError(f"parallel config tp={parallel.tp}, pp={parallel.pp}, vpp={vpp} does not match the "
                         f"initialised parallel state tp={actual[0]}, pp={actual[1]}, vpp={actual[2]}")
    if arch.num_attention_heads % parallel.tp:
        raise ValueError(f"config.json num_attention_heads={arch.num_attention_heads} is not divisible "
                         f"by tp={parallel.tp}")
    if use_te is None:
        use_te = te_available()
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=getattr(parallel, "cp", 1),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # The fused kernels exist only on GPU (TE / megatron's CUDA fusions).
        bias_activation_fusion=use_te,
        bias_dropout_fusion=use_te,
        apply_rope_fusion=use_te,
        **family.transformer_fields(arch, parallel),
    )
    kwargs.update(config_overrides or {})
    tf_config = TransformerConfig(**kwargs)
    return ModelSpec(
        hf_config=hf_config,
        family=family,
        arch=arch,
        transformer_config=tf_config,
        use_te=use_te,
        vocab_size=arch.vocab_size,
        padded_vocab_size=padded_vocab_size(arch.vocab_size, parallel.tp, make_vocab_size_divisible_by),
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
    )


def _rope_kwargs(arch: ArchConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(position_embedding_type="rope", rotary_base=arch.rope.theta)
    if arch.rope.kind == "linear":
        kwargs["seq_len_interpolation_factor"] = arch.rope.params["factor"]
    return kwargs


def _apply_llama3_scaling(model, arch: ArchConfig) -> None:
    # See the module docstring: megatron's formula, with the checkpoint's parameters.
    rope = model.rotary_pos_emb
    p = arch.rope.params
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq,
        factor=p["factor"],
        low_freq_factor=p["low_freq_factor"],
        high_freq_factor=p["high_freq_factor"],
        original_max_position_embeddings=p["original_max_position_embeddings"],
    )


def build_model(
    hf_config_or_path: Any,
    parallel: Any,
    *,
    dtype: torch.dtype = torch.bfloat16,
    use_te: bool | None = None,
    make_vocab_size_divisible_by: int = 128,
    config_overrides: dict[str, Any] | None = None,
) -> list:
    """Builds this rank's model chunk(s) (randomly initialised; load weights with ``convert``).

    Needs megatron's parallel state initialised (``runtime.initialize_parallel``). Returns the
    list of ``GPTModel`` chunks megatron's pipeline schedules take: one, or ``parallel.vpp`` with
    virtual pipeline stages (interleaved 1F1B). Chunk ``v`` of pipeline rank ``r`` holds the
    ``(v * pp + r)``-th block of ``num_layers / (pp * vpp)`` layers (megatron's interleaving, its
    layer numbers carry that offset); the embedding lives on the first chunk of the first rank,
    the final norm and output layer on the last chunk of the last rank. ``dtype`` is the
    parameter dtype: bf16 in production, fp32 for exact CPU tests. Each chunk carries its
    :class:`ModelSpec` (see :func:`model_spec`; ``pre_process``/``post_process`` are the
    chunk's). The logits are vocab-parallel (``parallel_output=True``): ``[batch, seq,
    padded_vocab_size / tp]`` per TP rank.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    spec = make_model_spec(hf_config_or_path, parallel, dtype=dtype, use_te=use_te,
                           make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                           config_overrides=config_overrides)
    arch = spec.arch
    vpp = getattr(parallel, "vpp", None)
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        chunk_spec = dataclasses.replace(
            spec,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        )
        model = GPTModel(
            config=spec.transformer_config,
            transformer_layer_spec=spec.family.layer_spec(arch, spec.use_te),
            vocab_size=spec.padded_vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=chunk_spec.pre_process,
            post_process=chunk_spec.post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            vp_stage=vp_stage,
            **_rope_kwargs(arch),
        )
        if arch.rope.kind == "llama3":
            _apply_llama3_scaling(model, arch)
        # The local spec's torch norms ignore params_dtype; keep the whole chunk in one dtype.
        model.to(dtype=dtype)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        model.maspo_spec = chunk_spec
        chunks.append(model)
    return chunks


def unwrap_model(model):
    """The ``GPTModel`` inside DDP / Float16Module wrappers (they expose it as ``.module``)."""
    while not hasattr(model, "maspo_spec"):
        if not hasattr(model, "module"):
            raise TypeError(f"{type(model).__name__} is not a model built by maspo_megatron.build_model")
        model = model.module
    return model


def model_spec(model) -> ModelSpec:
    """The :class:`ModelSpec` a chunk was built from (wrappers are looked through)."""
    return unwrap_model(model).maspo_spec


def global_layer_indices(model) -> list[int]:
    """0-based global layer index of each local ``decoder.layers.<i>`` of this chunk."""
    # TransformerLayer.layer_number is 1-based and already includes the pipeline offset.
    return [layer.layer_number - 1 for layer in unwrap_model(model).decoder.layers]


__all__ = [
    "ModelSpec",
    "build_model",
    "global_layer_indices",
    "load_hf_config",
    "make_model_spec",
    "model_spec",
    "padded_vocab_size",
    "te_available",
    "unwrap_model",
]
