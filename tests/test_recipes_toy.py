"""Every recipe in recipes/ runs 2 steps at toy scale through the real trainer.

Each recipe keeps its own loss, optimizer, schedule, aggregation, algorithm and sampling settings;
only model size, layout, batch and precision shrink (``maspo_megatron/toy.py``). The run is the
user's command, ``maspo-megatron train --recipe NAME --nproc-per-node N key=value ...`` (torchrun,
the rollout servers of the tiny_cpu recipe behind sglang-router, weight sync every step, a
checkpoint at the end), and both steps must reach metrics.jsonl with a finite loss and an update.

Recipes are discovered from the directory, so a new one is covered without editing this file; a
recipe whose build() raises NotImplementedError for a reason its docstring states is an expected
failure with that reason checked. The MoE recipes (Qwen3-30B-A3B, Qwen3-235B-A22B) run as a toy
Qwen3-MoE of 4 experts, top-2, at EP 2 (TP1 x EP2 and PP2 x EP2).

The CPU recipes (tiny_cpu, small_cpu) are run by their own tests (``RUN_ELSEWHERE``), checked
to exist and to name them.

Cost: server start-ups dominate (real SGLang: 16-60 s each on an idle 2-core machine), so one
server per toy model is started for the module and every recipe with that toy model attaches to
it (``rollout.server_urls``): the three R1-Distill toys are one Qwen2 model, the Llama-3 toy
another, the two Qwen3-MoE toys (PP1 and PP2) a third, so three servers start for six runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maspo_megatron.cli import list_recipes, recipe_module
from maspo_megatron.toy import config_changes, may_shrink, shrink, toy_assets, toy_overrides

RECIPES = list_recipes()
RUN_TIMEOUT_S = 900
RUN_ELSEWHERE = {
    # CPU recipes, already at CPU scale, each run end to end by its own test: (test, what in it
    # runs the recipe).
    "tiny_cpu": ("test_demo.py", 'main(["demo"'),  # `maspo-megatron demo` trains tiny_cpu
    "small_cpu": ("test_readme_own_data.py", "README.md"),  # the README's `--recipe small_cpu` command
}
"""Recipes another CI test already runs through the trainer (this module would only repeat it,
at the cost of a server start-up and a run)."""


@pytest.fixture(scope="module")
def assets_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("toy_assets"))


@pytest.fixture(scope="module")
def shared_servers(tmp_path_factory):
    """``get(model_dir, rollout_cfg) -> urls``: a server of the toy model, launched exactly as the
    trainer launches the toy run's servers (``RolloutEngine``). One runs at a time (~2.5 GB
    each): recipes of one toy model are adjacent in name order, so each model's server starts
    once and stops when the next model's starts."""
    from maspo_megatron.generation import RolloutEngine

    current: dict[str, RolloutEngine] = {}
    log_dir = str(tmp_path_factory.mktemp("toy_servers"))
    starts = []

    def get(model_dir: str, rollout) -> list[str]:
        if model_dir not in current:
            for engine in current.values():
                engine.close()
            current.clear()
            starts.append(model_dir)
            own = dataclasses.replace(rollout, server_urls=[], router_url=None, use_router=False, num_servers=1)
            current[model_dir] = RolloutEngine(own, model_dir, None, None, os.path.join(log_dir, str(len(starts))))
        return list(current[model_dir].server_urls)

    yield get
    for engine in current.values():
        engine.close()
    print(f"toy rollout servers started: {len(starts)} ({', '.join(map(os.path.basename, starts))})")


def _build(name):
    module = recipe_module(name)
    return module, module.build()


@pytest.mark.parametrize("name", RECIPES)
def test_the_shrink_changes_only_size_layout_batch_and_precision(name, tmp_path):
    module, cfg = _build(name)
    small, procs = shrink(cfg, model_path="m", train_path="t", output_dir=str(tmp_path))
    changed = config_changes(cfg, small)
    assert not [k for k in changed if not may_shrink(k)], changed
    assert 1 <= procs <= 4 and small.parallel.tp <= 2 and small.parallel.pp <= 2
    assert small.model.fp8 is None and small.model.dtype == "fp32"
    # Kept: the method (loss, optimizer and schedule, aggregation, algorithm, sampling).
    assert small.actor.losses == cfg.actor.losses and small.actor.loss == cfg.actor.loss
    assert small.actor.optimizer == cfg.actor.optimizer and small.actor.aggregation == cfg.actor.aggregation
    assert dataclasses.replace(small.algorithm, overlong=cfg.algorithm.overlong) == cfg.algorithm
    assert small.rollout.sampling == dataclasses.replace(
        cfg.rollout.sampling, max_new_tokens=small.rollout.sampling.max_new_tokens)
    assert small.reward.fn == cfg.reward.fn and small.data.prompt_template == cfg.data.prompt_template
    # Whole groups per mini-batch, so a batch that dynamic sampling could not fill still splits.
    assert small.prompts_per_step % small.actor.num_mini_batches == 0
    assert small.rollout.n_samples % small.actor.num_mini_batches == 0


MOE_RECIPES = [n for n in RECIPES if "num_experts" in getattr(recipe_module(n), "HF_CONFIG", {})]


def test_moe_recipes_are_found():
    assert MOE_RECIPES == ["maspo_qwen3_235b_a22b", "maspo_qwen3_30b_a3b"]


@pytest.mark.parametrize("name", MOE_RECIPES)
def test_moe_toy_keeps_expert_parallelism_and_routing(name, tmp_path):
    """The toy MoE: >= 4 experts, top-2, every routing key of the recipe's config kept; EP 2 at
    TP 1 on 2-4 processes that megatron's expert grid accepts; HF builds the toy model."""
    from maspo_megatron.toy import TOY_EXPERTS, make_toy_model, toy_hf_config, toy_layout

    module, cfg = _build(name)
    hf = module.HF_CONFIG
    small, procs = shrink(cfg, model_path="m", train_path="t", output_dir=str(tmp_path))
    p = small.parallel
    assert (p.tp, p.ep) == (1, 2) and p.pp == min(cfg.parallel.pp, 2) and procs == p.pp * p.ep
    assert p.etp in (None, 1) and (p.etp is None) == (cfg.parallel.etp is None)
    assert p.validate(procs) == p.ep and procs % (p.pp * p.ep * (p.etp or p.tp)) == 0
    assert not small.model.sequence_parallel
    toy = toy_hf_config(hf)
    assert toy["num_experts"] == TOY_EXPERTS >= 4 and toy["num_experts"] % p.ep == 0
    assert toy["num_experts_per_tok"] == 2 and toy["moe_intermediate_size"] < hf["moe_intermediate_size"]
    routing = ("norm_topk_prob", "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers",
               "output_router_logits", "architectures", "model_type", "tie_word_embeddings", "attention_bias")
    assert {k: toy[k] for k in routing} == {k: hf[k] for k in routing}
    assert toy["num_hidden_layers"] % p.pp == 0
    assert toy_layout(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep) == (p.tp, p.pp, p.ep, procs)
    # Hugging Face's own Qwen3-MoE builds from it, with the experts and router the toy asks for.
    from transformers import AutoConfig, AutoModelForCausalLM

    out = make_toy_model(str(tmp_path / "model"), hf)
    config = AutoConfig.from_pretrained(out)
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (4, 2, True)
    model = AutoModelForCausalLM.from_pretrained(out)
    router = [n for n, _ in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert len(router) == toy["num_hidden_layers"]
    assert model.get_parameter(router[0]).shape == (4, toy["hidden_size"])


def test_recipes_of_one_family_share_one_toy_model():
    """What lets the toy runs share rollout servers: the toy model depends on the family, not on
    the recipe's layout or size (four models would be one per recipe group below)."""
    from maspo_megatron.toy import toy_hf_config

    def toy(name):
        return json.dumps(toy_hf_config(recipe_module(name).HF_CONFIG), sort_keys=True)

    groups = {}
    for name in RECIPES:
        if hasattr(recipe_module(name), "HF_CONFIG"):
            groups.setdefault(toy(name), []).append(name)
    assert sorted(groups.values()) == [
        ["maspo_llama3_70b_fp8"], ["maspo_qwen3_235b_a22b", "maspo_qwen3_30b_a3b"],
        ["maspo_r1_distill_14b", "maspo_r1_distill_1_5b", "maspo_r1_distill_7b"]]


def test_recipes_run_elsewhere_are_run_there():
    for name, (test, marker) in RUN_ELSEWHERE.items():
        assert name in RECIPES, f"RUN_ELSEWHERE names {name}, which is not a recipe any more"
        assert marker in Path(__file__).with_name(test).read_text(), (name, test)
    assert "--recipe small_cpu" in (Path(__file__).parent.parent / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_two_steps_at_toy_scale(name, assets_dir, shared_servers, tmp_path):
    if name in RUN_ELSEWHERE:
        pytest.skip(f"{name} runs through the trainer in tests/{RUN_ELSEWHERE[name][0]}")
    module, cfg = _build(name)
    paths = toy_assets(module, cfg, assets_dir)
    run_dir = str(tmp_path / "run")
    kwargs = dict(model_path=paths["model"], train_path=paths["train"], output_dir=run_dir)
    small, _ = shrink(cfg, **kwargs)
    urls = shared_servers(paths["model"], small.rollout)
    overrides, procs = toy_overrides(cfg, **kwargs, server_urls=urls)
    cmd = [sys.executable, "-m", "maspo_megatron.cli", "train", "--recipe", name,
           "--nproc-per-node", str(procs), *overrides]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    print(f"{name}: {time.monotonic() - start:.0f} s on {procs} processes: {' '.join(cmd[3:])}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1, 2], metrics
    for m in metrics:
        assert math.isfinite(m["actor/loss"]) and math.isfinite(m["actor/grad_norm"]), m
        assert m["actor/skipped_steps"] == 0 and m["actor/response_tokens"] > 0, m
        if name in MOE_RECIPES:  # the MoE path ran: router metrics, and the synced weights proven
            assert m["actor/moe/aux_loss"] > 0 and m["actor/moe/load_imbalance_worst"] >= 1, m
            assert "sync/proof_max_abs_diff" in m, m
    with open(os.path.join(run_dir, "config.json")) as f:
        ran = json.load(f)
    # The run used the recipe's method settings, not defaults.
    assert ran["actor"]["optimizer"]["warmup_steps"] == cfg.actor.optimizer.warmup_steps
    assert ran["actor"]["loss"] == cfg.actor.loss and ran["reward"]["fn"] == cfg.reward.fn
