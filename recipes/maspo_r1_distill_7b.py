"""MASPO on DeepSeek-R1-Distill-Qwen-7B (the paper's middle scale), math RL.

Hyper-parameters and their sources: ``recipes/_maspo_math.py`` ([M] MASPO paper/official code,
[D] DAPO values where MASPO's could not be found, [R] this repository's choices).

Layout [R], for 8x H100 80GB nodes:
- training: 2 nodes, TP2 x PP1 with sequence parallelism (DP=8). Qwen2-7B has 4 KV heads, so
  TP may be 1, 2 or 4; TP2 halves the per-GPU weights/activations of 22.5k-token sequences
  while keeping the TP all-reduces inside NVLink.
- rollouts: 1 node, 4 SGLang servers at TP2 (the official example's rollout TP is 2).

    python -m launch.slurm --recipe maspo_r1_distill_7b --train-nodes 2 --rollout-nodes 1 ... \
        model.path=/models/DeepSeek-R1-Distill-Qwen-7B data.train_path=/data/train.parquet
"""

from _maspo_math import maspo_math_config

from maspo_megatron.runtime import ParallelConfig
from maspo_megatron.trainer import ModelConfig, TrainerConfig

TRAIN_NODES, ROLLOUT_NODES, GPUS_PER_NODE = 2, 1, 8  # intended layout (tests check it)

# deepseek-ai/DeepSeek-R1-Distill-Qwen-7B config.json, architecture fields (a Qwen2.5-Math-7B).
# The toy-scale CI run (maspo_megatron/toy.py) builds a tiny model from it.
HF_CONFIG = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
    max_position_embeddings=131072, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
    tie_word_embeddings=False, use_sliding_window=False,
)


def build() -> TrainerConfig:
    return maspo_math_config(
        model=ModelConfig(dtype="bf16", sequence_parallel=True, recompute_granularity="full"),
        parallel=ParallelConfig(tp=2, pp=1),
        sglang_tp=2,
        output_dir="outputs/maspo_r1_distill_7b",
    )
