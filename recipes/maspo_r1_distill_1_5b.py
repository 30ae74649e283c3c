"""MASPO on DeepSeek-R1-Distill-Qwen-1.5B (the paper's smallest scale), math RL.

Hyper-parameters and their sources: ``recipes/_maspo_math.py`` ([M] MASPO paper/official code,
[D] DAPO values where MASPO's could not be found, [R] this repository's choices).

Layout [R], for 8x H100 80GB nodes:
- training: 1 node, TP1 x PP1 (DP=8). The 1.5B model (12 heads, 2 KV heads) needs no model
  parallelism; full recompute keeps 22.5k-token sequences within memory.
- rollouts: 1 node, 8 SGLang servers at TP1 behind sglang-router.

    python -m launch.slurm --recipe maspo_r1_distill_1_5b --train-nodes 1 --rollout-nodes 1 ... \
        model.path=/models/DeepSeek-R1-Distill-Qwen-1.5B data.train_path=/data/train.parquet
"""

from _maspo_math import maspo_math_config

from maspo_megatron.runtime import ParallelConfig
from maspo_megatron.trainer import ModelConfig, TrainerConfig

TRAIN_NODES, ROLLOUT_NODES, GPUS_PER_NODE = 1, 1, 8  # intended layout (tests check it)

# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json, architecture fields (a Qwen2.5-Math-1.5B
# with untied embeddings). The toy-scale CI run (maspo_megatron/toy.py) builds a tiny model from it.
HF_CONFIG = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536, intermediate_size=8960,
    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
    max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
    tie_word_embeddings=False, use_sliding_window=False,
)


def build() -> TrainerConfig:
    return maspo_math_config(
        model=ModelConfig(dtype="bf16", recompute_granularity="full"),
        parallel=ParallelConfig(tp=1, pp=1),
        sglang_tp=1,
        output_dir="outputs/maspo_r1_distill_1_5b",
    )
