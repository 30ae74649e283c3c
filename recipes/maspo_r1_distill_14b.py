"""MASPO on DeepSeek-R1-Distill-Qwen-14B (the paper's largest scale), math RL.

Hyper-parameters and their sources: ``recipes/_maspo_math.py`` ([M] MASPO paper/official code,
[D] DAPO values where MASPO's could not be found, [R] this repository's choices).

Layout [R], for 8x H100 80GB nodes:
- training: 4 nodes, TP4 x PP1 with sequence parallelism (DP=8). Qwen2.5-14B has 8 KV heads;
  TP4 puts ~3.7B parameters per GPU (bf16 weights + fp32 grads ~22 GB, distributed-optimizer
  state sharded over DP), leaving room for 22.5k-token activations with full recompute, and
  avoids pipeline bubbles. PP2 (``parallel.pp=2``) is the fallback for smaller GPUs.
- rollouts: 2 nodes, 8 SGLang servers at TP2 (28 GB of bf16 weights per server leaves most of
  two H100s for KV cache).

    python -m launch.slurm --recipe maspo_r1_distill_14b --train-nodes 4 --rollout-nodes 2 ... \
        model.path=/models/DeepSeek-R1-Distill-Qwen-14B data.train_path=/data/train.parquet
"""

from _maspo_math import maspo_math_config

from maspo_megatron.runtime import ParallelConfig
from maspo_megatron.trainer import ModelConfig, TrainerConfig

TRAIN_NODES, ROLLOUT_NODES, GPUS_PER_NODE = 4, 2, 8  # intended layout (tests check it)

# deepseek-ai/DeepSeek-R1-Distill-Qwen-14B config.json, architecture fields (a Qwen2.5-14B).
# The toy-scale CI run (maspo_megatron/toy.py) builds a tiny model from it.
HF_CONFIG = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=5120, intermediate_size=13824,
    num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
    max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-5, hidden_act="silu",
    tie_word_embeddings=False, use_sliding_window=False,
)


def build() -> TrainerConfig:
    return maspo_math_config(
        model=ModelConfig(dtype="bf16", sequence_parallel=True, recompute_granularity="full"),
        parallel=ParallelConfig(tp=4, pp=1),
        sglang_tp=2,
        output_dir="outputs/maspo_r1_distill_14b",
    )
