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


# --------------------------------------------------------------------------- MoE

# config.json values of the real Qwen3-MoE checkpoints (architecture fields), Qwen/Qwen3-30B-A3B
# and Qwen/Qwen3-235B-A22B on the Hub.
MOE_MODELS = {
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                          rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
                          router_aux_loss_coef=0.001),
    "qwen3-235b-a22b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=4096,
                            intermediate_size=12288, moe_intermediate_size=1536, num_experts=128,
                            num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                            mlp_only_layers=[], num_hidden_layers=94, num_attention_heads=64,
                            num_key_value_heads=4, head_dim=128, vocab_size=151936,
                            max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                            hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
                            router_aux_loss_coef=0.001),
}
# 30.5B and 235B as the model cards state (30,532,122,624 and 235,093,634,560 exactly, by the
# test below from HF's own model).
MOE_PUBLISHED = {"qwen3-30b-a3b": 30_532_122_624, "qwen3-235b-a22b": 235_093_634_560}
MOE_RECIPE_MODEL = {"maspo_qwen3_30b_a3b": "qwen3-30b-a3b", "maspo_qwen3_235b_a22b": "qwen3-235b-a22b"}


def moe_arch(values: dict, **over):
    """(ArchConfig, MoE sizes) of a Qwen3-MoE config, read from its config.json fields directly
    (independent of the family module)."""
    from types import SimpleNamespace

    from maspo_megatron.megatron.families.base import ArchConfig, RopeConfig

    v = {**values, **over}
    arch = ArchConfig(num_layers=v["num_hidden_layers"], hidden_size=v["hidden_size"],
                      ffn_hidden_size=v["intermediate_size"], num_attention_heads=v["num_attention_heads"],
                      num_query_groups=v["num_key_value_heads"], head_dim=v["head_dim"],
                      vocab_size=v["vocab_size"], max_position_embeddings=v["max_position_embeddings"],
                      norm_eps=v["rms_norm_eps"], rope=RopeConfig(theta=v["rope_theta"]),
                      tie_word_embeddings=v["tie_word_embeddings"], qkv_bias=v["attention_bias"],
                      qk_layernorm=True)
    moe = SimpleNamespace(num_experts=v["num_experts"], ffn_hidden_size=v["moe_intermediate_size"],
                          topk=v["num_experts_per_tok"])
    return arch, moe


def megatron_moe_rank_params(arch, moe, *, tp, pp, ep, etp, world, rank) -> tuple[int, int]:
    """(all, expert) parameter elements of megatron-core's GPTModel with the local MoE layer spec
    built as ``rank`` of a ``world`` (fake process group, meta device)."""
    from unittest import mock

    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from maspo_megatron.megatron.model import padded_vocab_size

    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                     create_gloo_process_groups=False)
        config = TransformerConfig(
            num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
            num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
            kv_channels=arch.head_dim, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
            add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_layernorm,
            num_moe_experts=moe.num_experts, moe_ffn_hidden_size=moe.ffn_hidden_size,
            moe_router_topk=moe.topk, moe_token_dispatcher_type="alltoall", tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
            pipeline_dtype=torch.float32, perform_initialization=False, use_cpu_initialization=True,
            init_model_with_meta_device=True)
        spec = get_gpt_layer_local_spec(num_experts=moe.num_experts, moe_grouped_gemm=False,
                                        qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
        # The alltoall dispatcher creates a CUDA stream at construction; nothing runs here.
        with torch.device("meta"), mock.patch("torch.cuda.is_available", return_value=False), \
                mock.patch("torch.cuda.Stream", lambda *a, **k: None):
            model = GPTModel(config=config, transformer_layer_spec=spec, position_embedding_type="rope",
                             vocab_size=padded_vocab_size(arch.vocab_size, tp, 128),
                             max_sequence_length=arch.max_position_embeddings,
                             share_embeddings_and_output_weights=arch.tie_word_embeddings,
                             pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
        params = list(model.named_parameters())
        expert = sum(p.numel() for n, p in params if ".mlp.experts." in n)
        return sum(p.numel() for _, p in params), expert
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


# (tp, pp, ep, etp, world): expert TP following TP, expert TP 1 under TP 2, EP over all ranks,
# EP x PP, and TP x EP x ETP x PP with a second expert-DP replica.
MOE_LAYOUTS = [(1, 1, 1, None, 1), (1, 1, 2, None, 2), (2, 1, 2, None, 4), (2, 1, 2, 1, 4), (1, 1, 4, None, 4),
               (1, 2, 2, None, 4), (2, 2, 2, 1, 8), (2, 2, 2, 2, 16)]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp, pp, ep, etp, world", MOE_LAYOUTS)
def test_moe_stage_params_equal_megatrons_moe_model(tp, pp, ep, etp, world, tied):
    """The plan's MoE formula is exactly the numel of megatron-core's MoE GPTModel on each
    pipeline stage, on the first and the last rank of the stage (other TP / EP ranks)."""
    arch, moe = moe_arch(MOE_MODELS["qwen3-30b-a3b"], hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000,
                         num_experts=8, moe_intermediate_size=32, num_experts_per_tok=2, tie_word_embeddings=tied)
    stages = memory.moe_stage_params(arch, moe, tp=tp, pp=pp, ep=ep, etp=etp)
    assert len(stages) == pp
    per_stage = world // pp  # megatron's rank order puts pipeline stages outermost
    for st in stages:
        for rank in (st.stage * per_stage, (st.stage + 1) * per_stage - 1):
            assert megatron_moe_rank_params(arch, moe, tp=tp, pp=pp, ep=ep, etp=etp, world=world, rank=rank) \
                == (st.params, st.expert), (st, rank)


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_moe_formula_is_hfs_model_at_one_rank_and_reassembled(name):
    """At TP = EP = PP = 1 (less vocabulary padding) the formula is HF's own Qwen3-MoE model, the
    published count; at the recipes' layouts its shards reassemble to the same model."""
    values = MOE_MODELS[name]
    assert sum(p.numel() for p in hf_meta_model(values).parameters()) == MOE_PUBLISHED[name]
    arch, moe = moe_arch(values)
    (one,) = memory.moe_stage_params(arch, moe, tp=1, pp=1, make_vocab_size_divisible_by=1)
    assert one.params == MOE_PUBLISHED[name]
    for tp, pp, ep, etp in ((2, 1, 8, 1), (2, 2, 8, None), (4, 2, 8, None), (4, 2, 16, None)):
        stages = memory.moe_stage_params(arch, moe, tp=tp, pp=pp, ep=ep, etp=etp)
        etp_ = etp or tp
        dense = sum((s.params - s.expert - s.replicated) * tp + s.replicated for s in stages)
        padding = (stages[0].padded_vocab_size - arch.vocab_size) * arch.hidden_size * 2
        assert dense + sum(s.expert * ep * etp_ for s in stages) - padding == MOE_PUBLISHED[name]


def test_moe_formula_refuses_layouts_by_key():
    arch, moe = moe_arch(MOE_MODELS["qwen3-235b-a22b"])
    with pytest.raises(ValueError, match="num_hidden_layers=94 is not divisible by parallel.pp=4"):
        memory.moe_stage_params(arch, moe, tp=4, pp=4, ep=8)
    with pytest.raises(ValueError, match="num_experts=128 is not divisible by parallel.ep=3"):
        memory.moe_stage_params(arch, moe, tp=4, pp=2, ep=3)
    with pytest.raises(ValueError, match="num_key_value_heads=4 is not divisible by parallel.tp=8"):
        memory.moe_stage_params(arch, moe, tp=8, pp=2, ep=8)


def moe_arch_with_experts(values: dict):
    """The ArchConfig fields plus ``moe``, as the Qwen3-MoE family's ArchConfig carries them."""
    import dataclasses
    from types import SimpleNamespace

    arch, moe = moe_arch(values)
    return SimpleNamespace(**{**{f.name: getattr(arch, f.name) for f in dataclasses.fields(arch)}, "moe": moe})


@pytest.mark.parametrize("recipe", list(MOE_RECIPE_MODEL))
def test_moe_recipes_declare_the_real_config(recipe):
    declared, real = recipe_module(recipe).HF_CONFIG, MOE_MODELS[MOE_RECIPE_MODEL[recipe]]
    assert {k: declared[k] for k in real} == real


def test_sglang_moe_weights_at_tp1_are_the_hf_count():
    for name, values in MOE_MODELS.items():
        arch = moe_arch_with_experts(values)
        assert memory.sglang_weight_params(arch, 1) == MOE_PUBLISHED[name], name
        # TP8 (the 235B recipe's servers): every expert split 8 ways, router and norms whole, one
        # of the 4 KV heads per GPU.
        h, e, f, n = values["hidden_size"], 128, values["moe_intermediate_size"], values["num_experts"]
        layer = h * e * (values["num_attention_heads"] // 8 + 2) + values["num_attention_heads"] // 8 * e * h \
            + n * (3 * h * f // 8 + h) + 2 * h + 2 * e
        want = values["num_hidden_layers"] * layer + 2 * (values["vocab_size"] // 8) * h + h
        assert memory.sglang_weight_params(arch, 8) == want


def test_expert_state_is_sharded_over_expert_dp_and_the_rest_over_dp():
    """The 30B recipe at expert TP 1 (TP2 x EP8 x ETP1 on 16 GPUs: DP 8, expert DP 2): bf16
    weights, fp32 gradients, and the distributed optimizer's 12 B per parameter over DP for the
    dense part but over expert DP for the experts (megatron's expert-data-parallel group,
    world / (pp ep etp))."""
    cfg = apply_overrides(load_recipe("maspo_qwen3_30b_a3b"), ["parallel.etp=1"])
    arch = moe_arch_with_experts(MOE_MODELS["qwen3-30b-a3b"])
    (st,) = memory.moe_stage_params(arch, arch.moe, tp=2, pp=1, ep=8, etp=1)
    assert st.expert == 48 * 16 * 3 * 2048 * 768  # 16 whole experts per layer
    (rank,) = memory.train_rank_memory(cfg, arch, [st], dp=8)
    t = {term.name: term.bytes for term in rank.terms}
    dense = st.params - st.expert
    assert (t["parameters (bf16)"], t["gradients (fp32 grad buffer)"], t["optimizer state"]) == \
        (2 * dense, 4 * dense, 12 / 8 * dense)
    assert (t["expert parameters (bf16)"], t["expert gradients (fp32)"], t["expert optimizer state"]) == \
        (2 * st.expert, 4 * st.expert, 12 / 2 * st.expert)
    assert rank.ranks == 16


def test_moe_activations_count_the_routed_tokens():
    """One MoE layer keeps, per routed token copy (top-k of the rank's tokens, balanced), the
    gathered fc1 input (etp x h), fc1 output (2f), SwiGLU output (f) and the returned expert
    output (h); the router's fp32 logits per token and fp32 probabilities per copy. The attention
    part is the dense formula's."""
    from types import SimpleNamespace

    moe = SimpleNamespace(num_experts=128, topk=8, ffn_hidden_size=768)
    kw = dict(hidden=2048, ffn=6144, heads=32, kv_heads=4, head_dim=128, tp=2, sequence_parallel=True)
    T = 22528
    dense = memory.layer_activation_bytes(T, **kw)
    attention = dense - 2 * T * 3 * 6144 / 2
    for etp in (1, 2):
        t_in = T / 2
        want = attention + 2 * 8 * t_in * (etp * 2048 + 3 * 768 + 2048) + 4 * t_in * 128 + 4 * 8 * t_in
        assert memory.layer_activation_bytes(T, **kw, moe=moe, etp=etp) == pytest.approx(want)


@pytest.mark.parametrize("recipe", list(MOE_RECIPE_MODEL))
def test_moe_recipe_plans_fit_80gb(recipe):
    """Through the family (``arch.moe``) as ``maspo-megatron plan`` runs it: the recipe's layout
    fits 80 GiB on every GPU, with the expert terms the largest of the training ranks."""
    plan = plan_of(recipe)
    assert plan.fits, plan.format()
    for rank in plan.ranks:
        if rank.role.startswith("train"):
            assert rank.dominant.name == "expert optimizer state", plan.format()
    want = {"maspo_qwen3_30b_a3b": "EP8 x ETP2 x expert DP 1", "maspo_qwen3_235b_a22b": "EP8 x ETP4 x expert DP 2"}
    assert want[recipe] in plan.notes[0]


def test_moe_layouts_megatron_refuses_are_named():
    with pytest.raises(memory.MemoryPlanError, match="needs model.sequence_parallel=true"):
        plan_of("maspo_qwen3_30b_a3b", "model.sequence_parallel=false")
    with pytest.raises(memory.MemoryPlanError, match="num_experts=128 is not divisible by parallel.ep=3"):
        plan_of("maspo_qwen3_235b_a22b", "parallel.ep=3", train_gpus=192)
    # 8 nodes for the 235B: expert DP 1, the unsharded expert optimizer state leaves no headroom.
    tight = plan_of("maspo_qwen3_235b_a22b", train_gpus=64)
    assert "expert DP 1" in tight.notes[0]
