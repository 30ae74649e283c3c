"""The learning-rate schedule: validated in the config (naming the key), and every recipe's
optimizer settings build the real Megatron actor (megatron's scheduler asserts warmup < decay)."""

from __future__ import annotations

import math

import pytest

from distributed import run_distributed
from maspo_megatron.cli import list_recipes, load_recipe
from maspo_megatron.config import ConfigError, apply_overrides
from maspo_megatron.megatron.actor import OptimizerConfig


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr_schedule="linear"), "actor.optimizer.lr_schedule must be 'constant' or 'cosine'"),
    (dict(lr_schedule="cosine", warmup_steps=10), "actor.optimizer.decay_steps is required"),
    (dict(warmup_steps=10, decay_steps=10), "actor.optimizer.decay_steps=10 must exceed actor.optimizer.warmup_steps=10"),
    (dict(lr_schedule="cosine", warmup_steps=10, decay_steps=5), "must exceed actor.optimizer.warmup_steps"),
    (dict(warmup_steps=-1), "actor.optimizer.warmup_steps must be >= 0"),
    (dict(lr=0.0), "actor.optimizer.lr must be > 0"),
    (dict(lr=1e-6, min_lr=1e-5), "actor.optimizer.min_lr must lie in"),
    (dict(adam_beta2=1.0), "actor.optimizer.adam_beta2 must lie in [0, 1)"),
    (dict(clip_grad=-1.0), "actor.optimizer.clip_grad must be >= 0"),
])
def test_bad_schedules_fail_in_the_config_naming_the_key(kwargs, message):
    with pytest.raises(ValueError) as e:
        OptimizerConfig(**kwargs)
    assert message in str(e.value)


def test_schedule_overrides_are_checked_on_the_command_line():
    cfg = load_recipe("maspo_r1_distill_7b")
    with pytest.raises(ConfigError, match="actor.optimizer.decay_steps=5 must exceed"):
        apply_overrides(cfg, ["actor.optimizer.decay_steps=5"])


def test_constant_without_decay_gives_megatron_a_horizon_past_the_warmup():
    assert OptimizerConfig(warmup_steps=10).scheduler_decay_steps() == 11
    assert OptimizerConfig().scheduler_decay_steps() == 1  # as before: resumes keep matching
    assert OptimizerConfig(lr_schedule="cosine", warmup_steps=2, decay_steps=9).scheduler_decay_steps() == 9


def _recipe_optimizers() -> dict[str, OptimizerConfig]:
    out = {}
    for name in list_recipes():
        try:
            out[name] = load_recipe(name).actor.optimizer
        except NotImplementedError:
            pass  # the MoE recipe (tests/test_recipes.py checks why)
    return out


def build_actors(rank, world_size, model_dir, optimizers):
    import torch

    from maspo_megatron.megatron.actor import Actor, ActorConfig
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel)
    lrs = {}
    for name, opt in optimizers.items():
        actor = Actor(build_model(model_dir, parallel, dtype=torch.float32), ActorConfig(optimizer=opt))
        seen = []
        for _ in range(opt.warmup_steps + 3):
            seen.append(actor.optimizer.param_groups[0]["lr"])
            actor.scheduler.step(increment=1)
        lrs[name] = seen
    destroy_parallel()
    return lrs


@pytest.mark.slow
def test_every_recipes_optimizer_builds_the_real_actor(tmp_path):
    from test_megatron_actor import make_tiny_llama

    make_tiny_llama(tmp_path)
    optimizers = _recipe_optimizers()
    # Every cluster recipe warms up with no decay: the case megatron's scheduler rejected.
    assert any(o.warmup_steps > 0 and o.decay_steps is None for o in optimizers.values())
    optimizers["cosine"] = OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_schedule="cosine", warmup_steps=2,
                                           decay_steps=6)
    (lrs,) = run_distributed(build_actors, 1, str(tmp_path), optimizers)
    for name, opt in optimizers.items():
        w = opt.warmup_steps
        expected = [opt.lr * k / w if w and k <= w else opt.lr for k in range(w + 3)]
        if opt.lr_schedule == "cosine":
            d = opt.decay_steps
            expected = [opt.lr * k / w if k <= w else
                        opt.min_lr + 0.5 * (math.cos(math.pi * min(k - w, d - w) / (d - w)) + 1) * (opt.lr - opt.min_lr)
                        for k in range(w + 3)]
        assert lrs[name] == pytest.approx(expected, rel=1e-9, abs=1e-15), name
