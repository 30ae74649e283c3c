"""``maspo-megatron eval``: Avg@k and Pass@k of a model on a dataset, through SGLang servers.

Avg@k is the accuracy averaged over k samples per prompt; Pass@k the fraction of prompts with
at least one correct sample among the k (the MASPO paper's metrics).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from maspo_megatron.config import ConfigError
from maspo_megatron.data import DataConfig, PromptDataset, load_tokenizer
from maspo_megatron.generation import RolloutConfig, RolloutEngine
from maspo_megatron.rollout.backend import SamplingConfig
from maspo_megatron.reward import RewardConfig, RewardPool


@dataclass
class EvalConfig:
    model_path: str = ""
    """HF directory of the model (its tokenizer formats the prompts; servers load it)."""
    data: DataConfig = field(default_factory=DataConfig)
    """``data.eval_path`` is the dataset evaluated."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(
        sampling=SamplingConfig(temperature=0.6, top_p=0.95)))
    """Evaluation may filter (top-p/top-k): no log-probs are trained on here."""
    k: int = 16
    max_prompts: int | None = None
    seed: int = 0
    output_dir: str = "outputs/eval"

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


def run_eval(cfg: EvalConfig) -> dict[str, float]:
    if not cfg.model_path:
        raise ConfigError("eval needs model_path=DIR (an HF model directory)")
    if not cfg.data.eval_path:
        raise ConfigError("eval needs data.eval_path=FILE (.jsonl or .parquet)")
    tokenizer = load_tokenizer(cfg.model_path)
    dataset = PromptDataset(cfg.data.eval_path, cfg.data, tokenizer)
    prompts = [dataset[i] for i in range(min(len(dataset), cfg.max_prompts or len(dataset)))]
    with RewardPool.from_config(cfg.reward) as rewards:
        engine = RolloutEngine(cfg.rollout, cfg.model_path, tokenizer, rewards,
                               os.path.join(cfg.output_dir, "logs"))
        try:
            results = engine.evaluate(prompts, cfg.k, seed_base=cfg.seed * 10**7)
        finally:
            engine.close()
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "eval.json"), "w") as f:
        json.dump({"num_prompts": len(prompts), **results}, f, indent=2)
    return results
