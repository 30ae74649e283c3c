"""The architecture-family registry: what a family declares, and how a checkpoint finds one.

A family is one small module (``llama.py``, ``qwen2.py`` ...) that calls :func:`register` with a
:class:`Family`: the HF ``architectures`` it accepts, a function translating the HF config into
an :class:`ArchConfig` (rejecting config features we do not implement, by key), the
``TransformerConfig`` fields of its MLP (dense or MoE), its megatron layer spec, and the
:class:`ParamRule` s that map each Megatron parameter to its HF tensor(s). Model building
(``model.py``) and conversion (``convert.py``) only ever talk to these objects, so a new family
is a module here (plus shared pieces in ``dense.py`` / ``moe.py``) and no branch elsewhere.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture (or one of its config features) has no implementation."""


class ShardKind(enum.Enum):
    """How a Megatron parameter is laid out over the tensor-parallel group and vs. HF."""

    REPLICATED = "replicated"
    """Same full tensor on every TP rank (norm weights)."""
    COLUMN = "column"
    """Split along dim 0 (output features) into contiguous TP chunks."""
    ROW = "row"
    """Split along dim 1 (input features) into contiguous TP chunks."""
    QKV = "qkv"
    """HF q, k, v fused into Megatron's per-query-group interleaving, then split along dim 0."""
    GATE_UP = "gate_up"
    """HF gate and up fused per TP rank as ``[gate_shard; up_shard]`` along dim 0."""
    VOCAB = "vocab"
    """Vocabulary rows, padded to the Megatron vocabulary size, split along dim 0."""


@dataclass(frozen=True)
class ParamRule:
    """Maps one Megatron parameter to the HF tensor(s) it is made of.

    ``megatron`` names are those of megatron-core's local layer spec; ``aliases`` are the same
    parameter under other specs (Transformer Engine fuses the pre-attention / pre-MLP norms
    into ``linear_qkv`` / ``linear_fc1``). Per-layer rules use names relative to
    ``decoder.layers.<i>.`` and HF names containing ``{layer}`` (the global layer index).
    Expert rules (``expert=True``) stand for one parameter per expert: the Megatron name holds
    ``{expert}`` (the local expert index on this expert-parallel rank), the HF names ``{expert}``
    (the global index); they are split over the expert-tensor-parallel group.
    """

    megatron: str
    hf: tuple[str, ...]
    kind: ShardKind
    hf_shapes: tuple[tuple[int, ...], ...]
    """Expected shape of each ``hf`` tensor (checked against the checkpoint before loading)."""
    aliases: tuple[str, ...] = ()
    export: bool = True
    """False for a duplicate (the last stage's copy of tied embeddings): loaded, never exported."""
    expert: bool = False


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings taken from HF ``rope_parameters`` (``rope_scaling``)."""

    theta: float
    kind: str = "default"
    """``default``, ``linear`` (position interpolation) or ``llama3``."""
    params: dict[str, float] = field(default_factory=dict)
    """The scaling parameters of ``kind`` (``factor``, ``low_freq_factor`` ...)."""


@dataclass(frozen=True)
class MoeArch:
    """The mixture-of-experts part of an architecture (every decoder layer is an MoE layer)."""

    num_experts: int
    ffn_hidden_size: int
    """Hidden size of one expert's MLP."""
    topk: int
    norm_topk_prob: bool
    """Renormalise the top-k routing probabilities to sum to one."""
    aux_loss_coeff: float
    """The checkpoint's load-balancing loss coefficient (the default of ours)."""


@dataclass(frozen=True)
class ArchConfig:
    """The architecture, in the terms model building needs (one instance per checkpoint)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_layernorm: bool = False
    moe: MoeArch | None = None


@dataclass(frozen=True)
class Family:
    """One architecture family: HF architectures, config translation and parameter names."""

    name: str
    architectures: tuple[str, ...]
    arch_config: Callable[[Any], ArchConfig]
    """HF ``PretrainedConfig`` -> :class:`ArchConfig`; raises UnsupportedArchitectureError."""
    param_rules: Callable[[ArchConfig], tuple[tuple[ParamRule, ...], tuple[ParamRule, ...]]]
    """:class:`ArchConfig` -> (model-level rules, per-layer rules)."""
    transformer_fields: Callable[[ArchConfig, Any], dict[str, Any]]
    """(:class:`ArchConfig`, ``ParallelConfig``) -> the ``TransformerConfig`` fields of the MLP
    (dense or MoE); raises ValueError naming the config key a layout cannot split."""
    layer_spec: Callable[[ArchConfig, bool], Any]
    """(:class:`ArchConfig`, use_te) -> megatron's ``ModuleSpec`` of one decoder layer."""


_REGISTRY: dict[str, Family] = {}
_NOT_IMPLEMENTED: dict[str, str] = {}


def register(family: Family) -> Family:
    """Adds a family; its architectures must not be claimed by another family."""
    for arch in family.architectures:
        if arch in _REGISTRY or arch in _NOT_IMPLEMENTED:
            raise ValueError(f"architecture {arch} is registered twice")
        _REGISTRY[arch] = family
    return family


def register_not_implemented(architecture: str, reason: str) -> None:
    """Records an architecture we know about but do not implement, with the reason to show."""
    if architecture in _REGISTRY or architecture in _NOT_IMPLEMENTED:
        raise ValueError(f"architecture {architecture} is registered twice")
    _NOT_IMPLEMENTED[architecture] = reason


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_family(hf_config: Any) -> Family:
    """The family of an HF config, from its ``architectures`` field."""
    archs = getattr(hf_config, "architectures", None) or []
    if len(archs) != 1:
        raise UnsupportedArchitectureError(
            f"config.json field 'architectures' must name exactly one architecture, got {archs!r}; "
            f"supported: {', '.join(supported_architectures())}"
        )
    arch = archs[0]
    if arch in _NOT_IMPLEMENTED:
        raise NotImplementedError(f"architecture {arch} is not implemented: {_NOT_IMPLEMENTED[arch]}")
    if arch not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {arch!r}; supported: {', '.join(supported_architectures())}"
        )
    return _REGISTRY[arch]


def require(hf_config: Any, key: str, ok: Callable[[Any], bool], expected: str) -> None:
    """Rejects a config value we do not implement, naming the key, its value and what works."""
    value = getattr(hf_config, key, None)
    if not ok(value):
        arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
        raise UnsupportedArchitectureError(
            f"{arch}: config.json {key}={value!r} is not supported (expected {expected})"
        )
