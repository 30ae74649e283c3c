"""MASPO on a Llama-3.x 70B model with FP8 training through Transformer Engine, math RL.

Beyond the paper: MASPO was evaluated at 1.5B/7B/14B only; this recipe applies the same
hyper-parameters (``recipes/_maspo_math.py``: [M] MASPO, [D] DAPO, [R] ours) at 70B. DAPO's own
values come from its 32B run, the closest published scale.

Model: a Llama-3.1/3.3 70B checkpoint (``LlamaForCausalLM``, 128k context). Llama-3.0 has an
8k context, shorter than the 2048 + 20480 tokens used here: lower ``rollout.max_new_tokens``,
``algorithm.overlong.*`` and ``actor.micro_batch_tokens`` for it.

Precision [R]: ``fp8="hybrid"`` (e4m3 forward, e5m2 gradients) with TE's ``blockwise`` scaling
(Hopper, per-block scales; no amax history to go stale between RL steps). Needs the NGC
PyTorch/NeMo container (TE); on CPU the trainer refuses ``model.fp8`` with a clear error.
Rollouts stay bf16: the weights sent to SGLang are the bf16 parameters (FP8 is only compute).

Layout [R], for 8x H100 80GB nodes:
- training: 8 nodes, TP8 x PP4 (one pipeline stage per node, DP=2), sequence parallelism and
  full recompute. 80 layers / 4 stages = 20 layers per stage; TP8 (8 KV heads) keeps the TP
  all-reduces on NVLink. 4 nodes (DP=1) also validate.
- rollouts: 2 nodes, 4 SGLang servers at TP4 (35 GB of bf16 weights per GPU).

    python -m launch.slurm --recipe maspo_llama3_70b_fp8 --train-nodes 8 --rollout-nodes 2 ... \
        model.path=/models/Llama-3.3-70B-Instruct data.train_path=/data/train.parquet
"""

from _maspo_math import maspo_math_config

from maspo_megatron.runtime import ParallelConfig
from maspo_megatron.trainer import ModelConfig, TrainerConfig

TRAIN_NODES, ROLLOUT_NODES, GPUS_PER_NODE = 8, 2, 8  # intended layout (tests check it)

# meta-llama/Llama-3.3-70B-Instruct config.json, architecture fields (Llama-3.1 70B is the same
# but for its tokenizer's chat template). The toy-scale CI run (maspo_megatron/toy.py) builds a
# tiny model from it, Llama-3 RoPE scaling included.
HF_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192, intermediate_size=28672,
    num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
)


def build() -> TrainerConfig:
    return maspo_math_config(
        model=ModelConfig(dtype="bf16", fp8="hybrid", fp8_recipe="blockwise",
                          sequence_parallel=True, recompute_granularity="full"),
        parallel=ParallelConfig(tp=8, pp=4),
        sglang_tp=4,
        output_dir="outputs/maspo_llama3_70b_fp8",
        steps=200,
    )
