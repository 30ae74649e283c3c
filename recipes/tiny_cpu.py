"""The embedded CPU demo: a 2-layer Llama learns the synthetic "a+b=" task with MASPO.

Same code path as a cluster run: Megatron actor at TP=2 on gloo, a real SGLang server (its CPU
engine) behind the real sglang-router, weight sync over a torch.distributed group every step,
proven by comparing log-probs after each sync. ``maspo-megatron demo`` creates the model, tokenizer and data and fills in the paths.
"""

from maspo_megatron.algo.advantages import AdvantageConfig
from maspo_megatron.data import DataConfig
from maspo_megatron.megatron.actor import ActorConfig, OptimizerConfig
from maspo_megatron.reward import RewardConfig
from maspo_megatron.rollout.backend import SamplingConfig
from maspo_megatron.rollout.weight_sync import WeightSyncConfig
from maspo_megatron.runtime import ParallelConfig
from maspo_megatron.trainer import AlgorithmConfig, ModelConfig, RolloutConfig, TrainerConfig


def build() -> TrainerConfig:
    return TrainerConfig(
        model=ModelConfig(dtype="fp32", make_vocab_size_divisible_by=8),
        parallel=ParallelConfig(tp=2),
        actor=ActorConfig(
            loss="maspo",
            # Two optimizer steps per batch: the second is off-policy, where MASPO's gate acts.
            num_mini_batches=2,
            micro_batch_tokens=2048,
            optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.0, clip_grad=1.0),
        ),
        data=DataConfig(max_prompt_len=16),
        reward=RewardConfig(fn="synthetic", num_workers=0),
        rollout=RolloutConfig(device="cpu", num_servers=1, use_router=True, n_samples=8,
                              sampling=SamplingConfig(temperature=1.0, max_new_tokens=2),
                              startup_timeout_s=300.0),
        weight_sync=WeightSyncConfig(mode="distributed", bucket_bytes=1 << 20),
        algorithm=AlgorithmConfig(advantage=AdvantageConfig(estimator="grpo"), dynamic_sampling=True,
                                  max_sampling_rounds=3),
        steps=80,
        prompts_per_step=32,
        save_every=0,
        eval_every=20,
        eval_samples=4,
        eval_prompts=64,
        tensorboard=True,
    )
