"""Shared settings of the MASPO math-reasoning recipes (not a recipe: the leading underscore
keeps it out of ``maspo-megatron train --recipe``). Recipes import it like any module
(``from _maspo_math import maspo_math_config``: the recipe loader puts ``recipes/`` on sys.path).

Where each value comes from
---------------------------
[M] MASPO paper (arXiv 2602.17550) and its official code, github.com/VenomRose-Juri/MASPO-RL
    (a verl fork): README.md and verl/trainer/config/actor/actor.yaml.
    - loss: MASPO with sigma_base=1, alpha=0.3, sigma_high=10, adv_low=0.1, adv_high=10,
      beta_pos=beta_neg=0.03 (README "Default recommendation"; actor.yaml). The README also
      suggests alpha=0.5 for 1.5B models as an option ("Can use"), not as the default.
    - no KL loss, no KL in reward, entropy coefficient 0 (examples/maspo_trainer script).
    - GRPO group-relative advantages (``algorithm.adv_estimator=grpo``).
    - token-mean loss aggregation (actor.yaml ``loss_agg_mode: token-mean``); we normalise by
      the global token count (DESIGN.md), the per-step equivalent.
    - learning rate 1e-6, weight decay 0.01 (actor.yaml ``optim``; the repo's GSM8K example
      script uses 4.63e-7 with 1024-token responses).
    - gradient checkpointing on (example script) -> ``recompute_granularity="full"``.
    - evaluation as Avg@32 / Pass@32 (README tables).
[D] NOT FOUND for MASPO: the paper's training data, prompts per step, samples per prompt,
    mini-batches, maximum response length and sampling temperature could not be retrieved
    (the paper's experimental-setup section was not reachable through our search tools; the
    only script in the official repo is a GSM8K example with n=5 and 1024-token responses,
    inherited from verl's quick-start). These use the DAPO recipe's values instead, labelled
    [D]: verl ``recipe/dapo/run_dapo_qwen2.5_32b.sh`` (github.com/volcengine/verl):
    512 prompts x 16 responses per step, 32-prompt mini-batches (16 optimizer steps per
    batch), prompts up to 2048 tokens, responses up to 20480 tokens with a 4096-token soft
    overlong buffer (penalty 1.0), temperature 1.0, top_p 1.0, top_k off, dynamic sampling of
    groups (up to 10 generation rounds), 10 warm-up training steps (verl steps its LR scheduler
    once per training step; ours counts optimizer steps, 16 per training step here), gradient
    clip 1.0, and
    ``ppo_max_token_len = 2048 + 20480`` tokens per micro-batch.
[R] This repository's choices (not hyper-parameters of the method): parallel layouts, SGLang TP,
    checkpoint/eval intervals.
"""

from __future__ import annotations

from maspo_megatron.algo.advantages import AdvantageConfig
from maspo_megatron.algo.aggregation import AggregationConfig
from maspo_megatron.algo.filters import OverlongConfig
from maspo_megatron.algo.losses import MASPOConfig
from maspo_megatron.algo.objective import LossConfigs
from maspo_megatron.data import DataConfig
from maspo_megatron.megatron.actor import ActorConfig, OptimizerConfig
from maspo_megatron.reward import RewardConfig
from maspo_megatron.rollout.backend import SamplingConfig
from maspo_megatron.rollout.weight_sync import WeightSyncConfig
from maspo_megatron.runtime import ParallelConfig
from maspo_megatron.trainer import AlgorithmConfig, ModelConfig, RolloutConfig, TrainerConfig

MAX_PROMPT_LEN = 2048        # [D]
MAX_RESPONSE_LEN = 20480     # [D]
OVERLONG_BUFFER = 4096       # [D]
PROMPTS_PER_STEP = 512       # [D]
SAMPLES_PER_PROMPT = 16      # [D]
MINI_BATCH_PROMPTS = 32      # [D]
TEMPERATURE = 1.0            # [D]
WARMUP_TRAIN_STEPS = 10      # [D]
NUM_MINI_BATCHES = PROMPTS_PER_STEP // MINI_BATCH_PROMPTS  # [D] 16 optimizer steps per training step


def maspo_math_config(*, model: ModelConfig, parallel: ParallelConfig, sglang_tp: int,
                      output_dir: str, steps: int = 500, routing_replay: bool = False) -> TrainerConfig:
    """The MASPO math-RL run around a model and a layout (see the module docstring for sources).

    ``routing_replay`` (MoE only) replays SGLang's expert routes in training; the client then
    spreads requests over the servers itself, because sglang-router drops the routes.

    ``model.path`` and ``data.train_path`` stay empty: the user gives them on the command line
    (``model.path=/hf/dir data.train_path=/data/train.parquet``); the launchers refuse to
    submit without them.
    """
    return TrainerConfig(
        model=model,
        parallel=parallel,
        actor=ActorConfig(
            loss="maspo",
            losses=LossConfigs(maspo=MASPOConfig()),  # [M] defaults, identical to the README's
            aggregation=AggregationConfig(mode="token_mean_global"),  # [M] token-mean
            num_mini_batches=NUM_MINI_BATCHES,  # [D] 16
            micro_batch_tokens=MAX_PROMPT_LEN + MAX_RESPONSE_LEN,  # [D] ppo_max_token_len
            entropy_coef=0.0,  # [M]
            kl_coef=0.0,  # [M]
            # Constant LR after a linear warm-up of 10 training steps (no decay: decay_steps=None).
            optimizer=OptimizerConfig(lr=1e-6, weight_decay=0.01,  # [M]
                                      warmup_steps=WARMUP_TRAIN_STEPS * NUM_MINI_BATCHES,  # [D]
                                      clip_grad=1.0),  # [D]
        ),
        data=DataConfig(
            # DeepSeek-R1 model card's recommended math instruction; math-verify reads \boxed{}.
            prompt_template="{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.",
            max_prompt_len=MAX_PROMPT_LEN,  # [D]
        ),
        reward=RewardConfig(fn="math", num_workers=16),
        rollout=RolloutConfig(
            engine="sglang", sglang_tp=sglang_tp, use_router=not routing_replay,  # [R]
            routing_replay=routing_replay,  # [R]
            n_samples=SAMPLES_PER_PROMPT,  # [D]
            sampling=SamplingConfig(temperature=TEMPERATURE, top_p=1.0, top_k=-1,  # [D]
                                    max_new_tokens=MAX_RESPONSE_LEN),  # [D]
            startup_timeout_s=1800.0,  # [R] large checkpoints load slowly from shared filesystems
        ),
        weight_sync=WeightSyncConfig(mode="distributed"),  # [R] NCCL broadcast every step
        algorithm=AlgorithmConfig(
            advantage=AdvantageConfig(estimator="grpo"),  # [M]
            dynamic_sampling=True, max_sampling_rounds=10,  # [D] filter_groups, max_num_gen_batches
            overlong_penalty=True,  # [D]
            overlong=OverlongConfig(max_response_length=MAX_RESPONSE_LEN,
                                    buffer_length=OVERLONG_BUFFER, penalty_factor=1.0),  # [D]
        ),
        steps=steps,  # [R]
        prompts_per_step=PROMPTS_PER_STEP,  # [D]
        output_dir=output_dir,
        save_every=20,  # [R]
        eval_every=20,  # [R]
        eval_samples=32,  # [M] Avg@32 / Pass@32
        eval_prompts=512,  # [R]
    )
