"""MASPO on Qwen3-30B-A3B (MoE) — NOT AVAILABLE: building this recipe raises NotImplementedError.

The converter, model, actor and weight sync implement ``Qwen3MoeForCausalLM`` with expert
parallelism (``maspo_megatron/megatron/families/qwen3_moe.py``; tested on tiny models at EP=2,
TP=2 x EP=2, PP=2 x EP=2 and into a real SGLang server). What this recipe still lacks is its
layout and settings for the real model: an expert-parallel layout for 128 experts with 8 active
(e.g. TP1-2 x EP8, ``parallel.etp``, sequence parallelism when TP > 1, which megatron's MoE layer
requires for training), memory-planned on its target nodes (``maspo-megatron plan`` counts experts
per rank), and ``model.moe_aux_loss_coeff``; until then ``build()`` raises, so ``maspo-megatron
train`` and the launchers stop before any job is submitted.
"""

from maspo_megatron.trainer import TrainerConfig

ARCHITECTURE = "Qwen3MoeForCausalLM"


def build() -> TrainerConfig:
    raise NotImplementedError(
        f"recipe maspo_qwen3_30b_a3b_moe: the converter supports {ARCHITECTURE} with expert "
        "parallelism, but this recipe's layout for the real 128-expert model (TP x EP, expert TP, "
        "sequence parallelism, aux-loss coefficient, memory plan on its nodes) has not been written")
