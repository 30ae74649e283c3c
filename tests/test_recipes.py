"""The production recipes: each builds, fits its intended GPUs and its model, and keeps MASPO's
settings. (Each also runs 2 steps at toy scale: tests/test_recipes_toy.py.)"""

import dataclasses

import pytest

from maspo_megatron.cli import RECIPES_DIR, list_recipes, load_recipe, recipe_module
from maspo_megatron.config import revalidate
from maspo_megatron.trainer import TrainerConfig

DENSE = ["maspo_r1_distill_1_5b", "maspo_r1_distill_7b", "maspo_r1_distill_14b", "maspo_llama3_70b_fp8"]
MOE = ["maspo_qwen3_30b_a3b", "maspo_qwen3_235b_a22b"]
MASPO_MATH = DENSE + MOE


def test_every_recipe_is_covered():
    # A new recipe file must be added to these tests, not slip past them.
    assert set(list_recipes()) == {"tiny_cpu", "small_cpu", *MOE, *DENSE}


def test_small_cpu_is_the_math_recipe_at_cpu_sizes():
    # The README's recipe for one's own data (tests/test_readme_own_data.py runs its command).
    small, math, demo = load_recipe("small_cpu"), load_recipe("maspo_r1_distill_1_5b"), load_recipe("tiny_cpu")
    text = (RECIPES_DIR / "small_cpu.py").read_text()
    assert "from _maspo_math import" in text and "runpy" not in text
    # The method's settings are the math recipes'; the machine's, rollout engine included, the demo's.
    assert (small.actor.loss, small.actor.losses, small.actor.optimizer.lr) == (
        math.actor.loss, math.actor.losses, math.actor.optimizer.lr)
    assert small.reward.fn == "math" and small.data.prompt_template == math.data.prompt_template
    assert (small.rollout.engine, small.rollout.device, small.parallel, small.model) == (
        demo.rollout.engine, demo.rollout.device, demo.parallel, demo.model)
    # Sizes that fit word problems, unlike the demo's.
    sampling = small.rollout.sampling
    assert sampling == dataclasses.replace(math.rollout.sampling, max_new_tokens=sampling.max_new_tokens)
    assert small.data.max_prompt_len >= 512 > demo.data.max_prompt_len
    assert sampling.max_new_tokens >= 512 > demo.rollout.sampling.max_new_tokens
    assert small.actor.micro_batch_tokens >= small.data.max_prompt_len + sampling.max_new_tokens
    assert small.algorithm.overlong.max_response_length == sampling.max_new_tokens
    assert small.prompts_per_step % small.actor.num_mini_batches == 0
    assert small.actor.optimizer.warmup_steps == 10 * small.actor.num_mini_batches
    assert small.model.path == "" and small.data.train_path == ""


@pytest.mark.parametrize("name", MASPO_MATH)
def test_recipe_builds_and_fits_its_gpus(name):
    cfg = load_recipe(name)
    assert isinstance(cfg, TrainerConfig)
    revalidate(cfg)
    module = recipe_module(name)
    dp = cfg.parallel.validate(module.TRAIN_NODES * module.GPUS_PER_NODE)
    assert dp >= 1
    assert module.GPUS_PER_NODE % cfg.rollout.sglang_tp == 0
    # The trainer refuses to start when these differ (its log-probs describe the sampler).
    # Paths come from the user; the launchers refuse empty ones.
    assert cfg.model.path == "" and cfg.data.train_path == ""
    # One prompt+response always fits a micro-batch, and the overlong penalty ends where
    # generation stops.
    assert cfg.actor.micro_batch_tokens >= cfg.data.max_prompt_len + cfg.rollout.sampling.max_new_tokens
    assert cfg.algorithm.overlong.max_response_length == cfg.rollout.sampling.max_new_tokens
    assert cfg.prompts_per_step % cfg.actor.num_mini_batches == 0
    if cfg.model.sequence_parallel:
        assert cfg.parallel.tp > 1


@pytest.mark.parametrize("name", MASPO_MATH)
def test_recipe_layout_fits_its_model(name):
    cfg, hf = load_recipe(name), recipe_module(name).HF_CONFIG
    p = cfg.parallel
    # megatron splits query heads and KV groups over TP and layers evenly over PP.
    assert hf["num_attention_heads"] % p.tp == 0 and hf["num_key_value_heads"] % p.tp == 0
    assert hf["num_hidden_layers"] % p.pp == 0
    assert hf["num_attention_heads"] % cfg.rollout.sglang_tp == 0
    # The converter knows the architecture (a missing family fails here, not on the cluster).
    from types import SimpleNamespace

    from maspo_megatron.megatron.families import get_family

    get_family(SimpleNamespace(architectures=hf["architectures"]))


@pytest.mark.parametrize("name", MOE)
def test_moe_recipe_layout_fits_its_experts(name):
    cfg, module = load_recipe(name), recipe_module(name)
    hf, p = module.HF_CONFIG, cfg.parallel
    world = module.TRAIN_NODES * module.GPUS_PER_NODE
    etp = p.etp or p.tp
    assert p.ep > 1 and hf["num_experts"] % p.ep == 0 and hf["moe_intermediate_size"] % etp == 0
    # megatron's expert grid (pp x ep x etp) tiles the world; the weight sync needs etp == tp.
    assert world % (p.pp * p.ep * etp) == 0 and etp == p.tp
    # megatron's MoE layer refuses TP > 1 without sequence parallelism in training.
    assert p.tp == 1 or cfg.model.sequence_parallel
    # What the toy and the converter implement: every layer MoE, no dense-only layers.
    assert hf["decoder_sparse_step"] == 1 and hf["mlp_only_layers"] == []
    assert hf["num_experts_per_tok"] == 8 and hf["num_experts"] == 128 and hf["norm_topk_prob"] is True
    # Routing replay on, without the router (sglang-router drops the routes).
    assert cfg.rollout.routing_replay and not cfg.rollout.use_router
    doc = module.__doc__
    for note in ("Routing replay", "plan --recipe " + name, "_maspo_math.py"):
        assert note in doc, note


def test_recipes_import_their_shared_settings():
    # Plain modules: the shared settings are imported, never exec'd.
    for name in MASPO_MATH:
        text = (RECIPES_DIR / f"{name}.py").read_text()
        assert "from _maspo_math import maspo_math_config" in text and "runpy" not in text


def test_warmup_is_dapos_ten_training_steps():
    # verl steps its scheduler once per training step; our warm-up counts optimizer steps.
    for name in MASPO_MATH:
        cfg = load_recipe(name)
        assert cfg.actor.optimizer.warmup_steps == 10 * cfg.actor.num_mini_batches
        assert cfg.actor.optimizer.lr_schedule == "constant" and cfg.actor.optimizer.decay_steps is None


@pytest.mark.parametrize("name", MASPO_MATH)
def test_recipe_uses_the_papers_maspo_settings(name):
    cfg = load_recipe(name)
    assert cfg.actor.loss == "maspo"
    # The official code's defaults (README "Default recommendation" / actor.yaml), written out.
    assert dataclasses.asdict(cfg.actor.losses.maspo) == {
        **dataclasses.asdict(cfg.actor.losses.maspo),
        "sigma_base": 1.0, "alpha": 0.3, "sigma_high": 10.0, "adv_low": 0.1, "adv_high": 10.0,
        "beta_pos": 0.03, "beta_neg": 0.03,
    }
    assert cfg.actor.optimizer.lr == 1e-6
    assert cfg.actor.kl_coef == 0.0 and cfg.actor.entropy_coef == 0.0
    assert cfg.algorithm.advantage.estimator == "grpo"
    assert cfg.eval_samples == 32


def test_layouts_are_checked_against_the_gpu_count():
    # The check above is not vacuous: the 70B layout (TP8 x PP4) needs at least 4 nodes.
    cfg = load_recipe("maspo_llama3_70b_fp8")
    with pytest.raises(ValueError, match="not divisible"):
        cfg.parallel.validate(8)
    assert cfg.model.fp8 == "hybrid" and cfg.model.fp8_recipe == "blockwise"


def test_sources_are_documented():
    common = (RECIPES_DIR / "_maspo_math.py").read_text()
    assert "2602.17550" in common and "run_dapo_qwen2.5_32b.sh" in common and "NOT FOUND" in common
    for name in MASPO_MATH:
        assert "_maspo_math.py" in (RECIPES_DIR / f"{name}.py").read_text()
