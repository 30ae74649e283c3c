"""Architecture families. Importing this package registers every family module below."""

from maspo_megatron.megatron.families import llama, qwen2, qwen3, qwen3_moe  # noqa: F401  (registration)
from maspo_megatron.megatron.families.base import (
    ArchConfig,
    Family,
    MoeArch,
    ParamRule,
    RopeConfig,
    ShardKind,
    UnsupportedArchitectureError,
    get_family,
    register,
    supported_architectures,
)

__all__ = [
    "ArchConfig",
    "Family",
    "MoeArch",
    "ParamRule",
    "RopeConfig",
    "ShardKind",
    "UnsupportedArchitectureError",
    "get_family",
    "register",
    "supported_architectures",
]
