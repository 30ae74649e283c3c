"""``maspo-megatron plan`` (``maspo_megatron/megatron/memory.py``): per-rank parameter counts of
the megatron model built on the meta device, checked against Hugging Face's own models built from
the real config.json values below; the optimizer-state bytes against megatron-core's published
table; the activation formula against Korthikanti et al. 2022; the 70B recipe's plan and the
refusal of a layout that cannot fit (CLI and launcher)."""

from __future__ import annotations

import math

import pytest
import torch

from maspo_megatron.cli import load_recipe, main, recipe_module
from maspo_megatron.config import apply_overrides
from maspo_megatron.megatron import memory

# config.json values of the real checkpoints (architecture fields), as published on the Hub.
MODELS = {
    # meta-llama/Llama-3.1-70B
    "llama3.1-70b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=8192,
                         intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # Qwen/Qwen2.5-72B
    "qwen2.5-72b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=8192,
                        intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072,
                        rope_theta=1000000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                        use_sliding_window=False),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "r1-distill-1.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536,
                            intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                            num_key_value_heads=2, vocab_size=151936, max_position_embeddings=131072,
                            rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
                            tie_word_embeddings=False, use_sliding_window=False),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B
    "r1-distill-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584,
                          intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
                          rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
                          tie_word_embeddings=False, use_sliding_window=False),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-14B
    "r1-distill-14b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=5120,
                           intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                           num_key_value_heads=8, vocab_size=152064, max_position_embeddings=131072,
                           rope_theta=1000000.0, rms_norm_eps=1e-5, hidden_act="silu",
                           tie_word_embeddings=False, use_sliding_window=False),
}
# The parameter counts the Hub shows for these checkpoints (safetensors totals).
PUBLISHED = {"llama3.1-70b": 70_553_706_496, "qwen2.5-72b": 72_706_203_648,
             "r1-distill-1.5b": 1_777_088_000, "r1-distill-7b": 7_615_616_512,
             "r1-distill-14b": 14_770_033_664}
# (tp, pp) layouts: the trivial one and a sharded one per model (the recipes' where they exist).
LAYOUTS = {"llama3.1-70b": [(1, 1), (8, 4)], "qwen2.5-72b": [(1, 1), (8, 4)],
           "r1-distill-1.5b": [(1, 1), (2, 2)], "r1-distill-7b": [(1, 1), (2, 1), (4, 2)],
           "r1-distill-14b": [(1, 1), (4, 1), (8, 2)]}
RECIPE_MODEL = {"maspo_llama3_70b_fp8": "llama3.1-70b", "maspo_r1_distill_1_5b": "r1-distill-1.5b",
                "maspo_r1_distill_7b": "r1-distill-7b", "maspo_r1_distill_14b": "r1-distill-14b"}


def hf_meta_model(values: dict):
    """Hugging Face's own model class for the config, on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def expected_stage_params(values: dict, tp: int, pp: int) -> list[int]:
    """Per-rank counts of each pipeline stage from the HF model's own tensors: layers split evenly
    over stages, norm weights replicated over TP, every other tensor split over TP, the embedding
    and output layer with megatron's vocabulary padding (a multiple of 128 x TP)."""
    model = hf_meta_model(values)
    layers, v, h = values["num_hidden_layers"], values["vocab_size"], values["hidden_size"]
    padded = math.ceil(v / (128 * tp)) * 128 * tp
    per_stage = layers // pp
    out = [0] * pp
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("model.layers."):
            stage = int(name.split(".")[2]) // per_stage
            out[stage] += n if "layernorm" in name else n // tp
        elif name == "model.embed_tokens.weight":
            assert n == v * h
            out[0] += padded * h // tp
        elif name == "lm_head.weight":
            out[-1] += padded * h // tp
        elif name == "model.norm.weight":
            out[-1] += n
        else:
            raise AssertionError(f"unexpected HF parameter {name}")
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_reference_is_the_published_count(name):
    assert sum(p.numel() for p in hf_meta_model(MODELS[name]).parameters()) == PUBLISHED[name]


@pytest.mark.parametrize("name, tp, pp", [(n, tp, pp) for n, layouts in LAYOUTS.items() for tp, pp in layouts])
def test_stage_params_equal_the_hf_model(name, tp, pp):
    values = MODELS[name]
    stages = memory.count_stage_params(values, tp, pp)
    assert [s.params for s in stages] == expected_stage_params(values, tp, pp)
    assert [s.layers for s in stages] == [values["num_hidden_layers"] // pp] * pp
    # Reassembled over TP ranks (replicated tensors once), minus the vocabulary padding rows: the
    # real model.
    padding = (stages[0].padded_vocab_size - values["vocab_size"]) * values["hidden_size"] * 2
    whole = sum((s.params - s.replicated) * tp + s.replicated for s in stages)
    assert whole - padding == PUBLISHED[name]


@pytest.mark.parametrize("recipe", list(RECIPE_MODEL))
def test_recipes_declare_the_real_config(recipe):
    """The recipes' HF_CONFIG (what `plan` uses without a readable model.path) is the real one."""
    declared, real = recipe_module(recipe).HF_CONFIG, MODELS[RECIPE_MODEL[recipe]]
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings", "architectures")
    assert {k: declared[k] for k in keys} == {k: real[k] for k in keys}


def test_sglang_weights_at_tp1_are_the_hf_count():
    from maspo_megatron.megatron.families import get_family

    for name, values in MODELS.items():
        hf = memory.hf_config_from(values)
        arch = get_family(hf).arch_config(hf)
        assert memory.sglang_weight_params(arch, 1) == PUBLISHED[name], name
    hf = memory.hf_config_from(MODELS["llama3.1-70b"])
    arch = get_family(hf).arch_config(hf)
    # k and v, 80 layers, 8 KV heads of 128, bf16: 320 KiB per token on one GPU, 80 KiB at TP4.
    assert memory.kv_bytes_per_token(arch, 1) == 2 * 80 * 8 * 128 * 2 == 320 * 1024
    assert memory.kv_bytes_per_token(arch, 4) == 80 * 1024
    # Fewer KV heads than TP ranks: SGLang replicates one per GPU.
    assert memory.kv_bytes_per_token(arch, 16) == 2 * 80 * 1 * 128 * 2


@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_optimizer_bytes_match_megatron_cores_table(d):
    """megatron-core developer guide, "Distributed Optimizer": bytes per parameter are 18 / 6 + 12/d
    (bf16 params, fp32 grads), 16 / 8 + 8/d (fp32, fp32), 20 / 4 + 16/d (fp16, fp16)."""
    for pbytes, gbytes, plain, sharded in ((2, 4, 18, 6 + 12 / d), (4, 4, 16, 8 + 8 / d), (2, 2, 20, 4 + 16 / d)):
        assert sum(memory.optimizer_bytes_per_param(param_bytes=pbytes, grad_bytes=gbytes, dp=d,
                                                    distributed=False).values()) == plain
        assert sum(memory.optimizer_bytes_per_param(param_bytes=pbytes, grad_bytes=gbytes, dp=d,
                                                    distributed=True).values()) == pytest.approx(sharded)


def test_activation_formula_reduces_to_korthikanti():
    """GPT-3's layer (GeLU MLP of 4h, MHA, dropout, no flash attention) gives Korthikanti et al.
    2022's per-layer activation memory: 34 sbh/t + 5 a s^2 b/t with sequence parallelism (their
    eq. for tensor + sequence parallelism), s b h (10 + 24/t) without it under selective
    recompute, and 34 sbh/t with both."""
    s, b, h, a, t = 2048, 2, 12288, 96, 8
    gpt3 = dict(hidden=h, ffn=4 * h, heads=a, kv_heads=a, head_dim=h // a, tp=t, glu=False, dropout_masks=True)
    full = memory.layer_activation_bytes(s * b, sequence_parallel=True, flash=False, seq_len=s, **gpt3)
    assert full == pytest.approx(34 * s * b * h / t + 5 * a * s * s * b / t)
    lse = 4 * s * b * a / t  # the flash path's softmax statistics, which selective recompute drops
    for sp, want in ((False, s * b * h * (10 + 24 / t)), (True, 34 * s * b * h / t)):
        got = memory.layer_activation_bytes(s * b, sequence_parallel=sp, flash=True, **gpt3) - lse
        assert got == pytest.approx(want)


def plan_of(recipe: str, *overrides: str, **kw):
    module = recipe_module(recipe)
    return memory.plan_recipe(apply_overrides(module.build(), list(overrides)), module, **kw)


def test_70b_recipe_plan_fits_80gb_and_its_terms():
    plan = plan_of("maspo_llama3_70b_fp8")
    assert plan.fits
    train = [r for r in plan.ranks if r.role.startswith("train")]
    assert [r.ranks for r in train] == [16, 16, 16, 16]  # TP8 x DP2 per stage, 4 stages
    first = {t.name: t.bytes for t in train[0].terms}
    n = 2_271_543_296  # stage 0 on one TP rank (test_stage_params_equal_the_hf_model)
    assert first["parameters (bf16)"] + first["gradients (fp32 grad buffer)"] + first["optimizer state"] \
        == pytest.approx((6 + 12 / 2) * n)
    assert "logits shard" in {t.name for t in train[-1].terms} and "logits shard" not in first
    rollout = {t.name: t.bytes for t in plan.ranks[-1].terms}
    # 4 servers x TP4; 64 requests over 4 servers, each 2048 + 20480 tokens, 80 KiB per token.
    assert rollout["SGLang KV cache"] == 16 * 22528 * 80 * 1024
    assert "does not fit" not in plan.format()


def test_70b_at_tp1_pp1_is_refused_naming_the_dominant_term(capsys):
    rc = main(["plan", "--recipe", "maspo_llama3_70b_fp8", "parallel.tp=1", "parallel.pp=1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "does not fit: train rank" in out and "dominant term: gradients (fp32 grad buffer) 262.8 GiB" in out
    # The launchers refuse it before anything is submitted.
    from launch.plan import LaunchError, make_plan

    with pytest.raises(LaunchError, match=r"dominant term: gradients \(fp32 grad buffer\)"):
        make_plan("maspo_llama3_70b_fp8", ["model.path=/nowhere/llama", "data.train_path=/d.parquet",
                                           "parallel.tp=1", "parallel.pp=1"],
                  train_nodes=8, train_gpus_per_node=8, rollout_nodes=2, rollout_gpus_per_node=8)


def test_smaller_gpu_refuses_the_rollout_side(capsys):
    assert main(["plan", "--recipe", "maspo_llama3_70b_fp8", "--gpu-gb", "40"]) == 1
    out = capsys.readouterr().out
    assert "does not fit: rollout: one GPU of an SGLang TP4 server" in out
    assert "dominant term: SGLang weights (bf16)" in out


def test_layout_checks_name_the_problem():
    with pytest.raises(memory.MemoryPlanError, match="does not fit 12 GPUs"):
        plan_of("maspo_llama3_70b_fp8", train_gpus=12)
    with pytest.raises(memory.MemoryPlanError, match="not divisible by pp=3"):
        plan_of("maspo_llama3_70b_fp8", "parallel.pp=3", train_gpus=24)
    with pytest.raises(memory.MemoryPlanError, match="sglang_tp=3"):
        plan_of("maspo_llama3_70b_fp8", "rollout.sglang_tp=3", rollout_gpus=12)
    with pytest.raises(memory.MemoryPlanError, match="no model description"):
        plan_of("tiny_cpu")
    with pytest.raises(memory.MemoryPlanError, match=r"cannot plan this recipe: parallel.vpp=2: the activations "
                                                      r"of the interleaved schedule"):
        plan_of("maspo_llama3_70b_fp8", "parallel.vpp=2")


def test_recipe_defaults_and_cli_output(capsys):
    cfg = load_recipe("maspo_r1_distill_7b")
    assert memory.recipe_gpus(cfg, recipe_module("maspo_r1_distill_7b")) == (16, 8)
    assert main(["plan", "--recipe", "maspo_r1_distill_7b", "--rollout-gpus", "0"]) == 0
    out = capsys.readouterr().out
    assert "TP2 x PP1 x DP8 = 16 GPUs" in out and "SGLang" not in out.split("\n\n", 1)[1]
