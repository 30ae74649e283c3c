"""MASPO on Qwen3-30B-A3B (MoE) — NOT AVAILABLE: building this recipe raises NotImplementedError.

The HF <-> Megatron converter knows ``Qwen3MoeForCausalLM`` but does not implement it (router
weights, per-expert gate/up/down split over expert-parallel ranks, megatron's MoE layer spec;
see ``maspo_megatron/megatron/families/qwen3_moe.py``). ``build()`` asks the converter's
registry and re-raises its NotImplementedError, so ``maspo-megatron train`` and the launchers
stop before any job is submitted.

When the converter supports it, this recipe still has to be written: an expert-parallel
layout (e.g. TP1-2 x EP8 for 128 experts, 8 active), ``parallel.etp``, and MoE-aware weight
sync; until then ``build()`` keeps raising.
"""

from types import SimpleNamespace

from maspo_megatron.megatron.families import get_family
from maspo_megatron.trainer import TrainerConfig

ARCHITECTURE = "Qwen3MoeForCausalLM"


def build() -> TrainerConfig:
    get_family(SimpleNamespace(architectures=[ARCHITECTURE]))  # raises NotImplementedError today
    raise NotImplementedError(
        f"recipe maspo_qwen3_30b_a3b_moe: the converter now accepts {ARCHITECTURE}, but this "
        "recipe's expert-parallel layout and MoE weight sync have not been written")
