"""Your own small math dataset on a CPU: the MASPO math settings at sizes a laptop can run.

For a first run on real data before a cluster: word problems in JSONL (``{"prompt": ...,
"answer": ...}`` per line, README "Using it"), a small Hugging Face model, math-verify scoring the
last ``\\boxed{}`` of each response against the answer.

Nothing is copied: the method's settings (MASPO loss, optimizer, prompt template, math reward,
advantages, dynamic sampling, overlong penalty) come from ``recipes/_maspo_math.py``, the machine's
(CPU layout and dtype, the rollout engine and its servers) from ``recipes/tiny_cpu.py``. What is
this recipe's own is sizes:

- prompts up to 512 tokens: a grade-school word problem with the chat template and the
  step-by-step instruction is 100-300 tokens for Qwen/Llama tokenizers (tiny_cpu's 16 suits only
  its synthetic "a+b=" prompts and drops real ones);
- responses up to 512 new tokens, the last 128 of them DAPO's soft overlong buffer (tiny_cpu's 2
  tokens suit only its one-digit answers);
- 8 prompts x 8 samples per step in 2 mini-batches, 2 reward workers, checkpoints every 25
  steps, evaluation (with ``data.eval_path``) as Avg@4 on 64 prompts.

    maspo-megatron train --recipe small_cpu model.path=DIR data.train_path=train.jsonl
"""

import dataclasses

from _maspo_math import WARMUP_TRAIN_STEPS, maspo_math_config
from tiny_cpu import build as tiny_cpu_build

from maspo_megatron.algo.filters import OverlongConfig
from maspo_megatron.trainer import TrainerConfig

MAX_PROMPT_LEN = 512
MAX_NEW_TOKENS = 512
OVERLONG_BUFFER = 128
PROMPTS_PER_STEP = 8
NUM_MINI_BATCHES = 2


def build() -> TrainerConfig:
    machine = tiny_cpu_build()
    cfg = maspo_math_config(model=machine.model, parallel=machine.parallel, sglang_tp=1,
                            output_dir="outputs/small_cpu", steps=100)
    # The servers as the demo runs them, sampling as the math recipes do (a real model also
    # loads more slowly than the demo's).
    cfg.rollout = dataclasses.replace(
        machine.rollout, sampling=dataclasses.replace(cfg.rollout.sampling, max_new_tokens=MAX_NEW_TOKENS),
        startup_timeout_s=max(machine.rollout.startup_timeout_s, 600.0))
    cfg.data = dataclasses.replace(cfg.data, max_prompt_len=MAX_PROMPT_LEN)
    cfg.actor = dataclasses.replace(
        cfg.actor, num_mini_batches=NUM_MINI_BATCHES, micro_batch_tokens=4 * (MAX_PROMPT_LEN + MAX_NEW_TOKENS),
        # The shared warm-up of 10 training steps, counted in this recipe's optimizer steps.
        optimizer=dataclasses.replace(cfg.actor.optimizer, warmup_steps=WARMUP_TRAIN_STEPS * NUM_MINI_BATCHES))
    cfg.reward = dataclasses.replace(cfg.reward, num_workers=2)
    cfg.algorithm = dataclasses.replace(
        cfg.algorithm, max_sampling_rounds=3,
        overlong=OverlongConfig(max_response_length=MAX_NEW_TOKENS, buffer_length=OVERLONG_BUFFER))
    cfg.prompts_per_step = PROMPTS_PER_STEP
    cfg.save_every = 25
    cfg.eval_samples, cfg.eval_prompts = 4, 64
    return cfg
