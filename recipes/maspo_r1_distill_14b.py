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

import runpy
from pathlib import Path

from maspo_megatron.runtime import ParallelConfig
from maspo_megatron.trainer import ModelConfig, TrainerConfig

TRAIN_NODES, ROLLOUT_NODES, GPUS_PER_NODE = 4, 2, 8  # intended layout (tests check it)


def build() -> TrainerConfig:
    common = runpy.run_path(str(Path(__file__).with_name("_maspo_math.py")))
    return common["maspo_math_config"](
        model=ModelConfig(dtype="bf16", sequence_parallel=True, recompute_granularity="full"),
        parallel=ParallelConfig(tp=4, pp=1),
        sglang_tp=2,
        output_dir="outputs/maspo_r1_distill_14b",
    )
