"""MASPO on DeepSeek-R1-Distill-Qwen-1.5B (the paper's smallest scale), math RL.

Hyper-parameters and their sources: ``recipes/_maspo_math.py`` ([M] MASPO paper/official code,
[D] DAPO values where MASPO's could not be found, [R] this repository's choices).

Layout [R], for 8x H100 80GB nodes:
- training: 1 node, TP1 x PP1 (DP=8). The 1.5B model (28 heads, 2 KV heads) needs no model
  parallelism; full recompute keeps 22.5k-token sequences within memory.
- rollouts: 1 node, 8 SGLang servers at TP1 behind sglang-router.

    python -m launch.slurm --recipe maspo_r1_distill_1_5b --train-nodes 1 --rollout-nodes 1 ... \
        model.path=/models/DeepSeek-R1-Distill-Qwen-1.5B data.train_path=/data/train.parquet
"""

import runpy
from pathlib import Path

from maspo_megatron.runtime import ParallelConfig
from maspo_megatron.trainer import ModelConfig, TrainerConfig

TRAIN_NODES, ROLLOUT_NODES, GPUS_PER_NODE = 1, 1, 8  # intended layout (tests check it)


def build() -> TrainerConfig:
    common = runpy.run_path(str(Path(__file__).with_name("_maspo_math.py")))
    return common["maspo_math_config"](
        model=ModelConfig(dtype="bf16", recompute_granularity="full"),
        parallel=ParallelConfig(tp=1, pp=1),
        sglang_tp=1,
        output_dir="outputs/maspo_r1_distill_1_5b",
    )
