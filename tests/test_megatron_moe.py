"""Qwen3-MoE with expert parallelism vs. HF transformers: log-prob parity at EP=2, TP=2 x EP=2 and
PP=2 x EP=2 (gloo), the HF -> Megatron -> HF round trip, and each rank reading only its experts.

Tiny random ``Qwen3MoeForCausalLM`` models (4 experts, top-2), with and without renormalised
top-k probabilities (``norm_topk_prob``: the two megatron router modes). One spawn of 4 gloo
processes runs every layout by re-initialising megatron's parallel state in between.
"""

from __future__ import annotations

import json

import pytest
import torch
from distributed import run_distributed
from test_megatron_model import BATCH, SEQ, VOCAB, _hf_tensors, hf_logprobs, make_checkpoint, megatron_logprobs
from transformers import Qwen3MoeConfig

from maspo_megatron.megatron.families import UnsupportedArchitectureError
from maspo_megatron.megatron.model import build_model

LAYOUTS = ((1, 1, 2), (2, 1, 2), (1, 2, 2))  # (tp, pp, ep) on 4 ranks
ROUND_TRIP_LAYOUTS = ((2, 1, 2), (1, 2, 2))
EXPERTS = 4


def tiny_moe_config(**changes) -> Qwen3MoeConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=EXPERTS, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"])
    return Qwen3MoeConfig(**{**kwargs, **changes})


def tiny_moe_configs() -> dict:
    return {"qwen3_moe_norm_topk": tiny_moe_config(),
            "qwen3_moe_softmax_topk_tied": tiny_moe_config(norm_topk_prob=False, tie_word_embeddings=True)}


def _expert_names_read(chunks, path) -> set[int]:
    """The experts whose tensors this rank's import reads (counted at the reader)."""
    import re

    from maspo_megatron.megatron import convert

    seen: set[int] = set()
    read = convert.HFCheckpoint.read

    def counting(self, name, *args, **kwargs):
        m = re.search(r"\.experts\.(\d+)\.", name)
        if m:
            seen.add(int(m.group(1)))
        return read(self, name, *args, **kwargs)

    convert.HFCheckpoint.read = counting
    try:
        convert.load_hf_checkpoint(chunks, path)
    finally:
        convert.HFCheckpoint.read = read
    return seen


def _moe_worker(rank, world_size, ckpts: dict, ids: torch.Tensor, out_root: str):
    import os

    from megatron.core import parallel_state as ps

    from maspo_megatron.megatron.convert import save_hf
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    logprobs, experts_read = {}, {}
    for tp, pp, ep in LAYOUTS:
        parallel = ParallelConfig(tp=tp, pp=pp, ep=ep)
        initialize_parallel(parallel)
        for name, path in ckpts.items():
            chunks = build_model(path, parallel, dtype=torch.float32)
            # Forward only: megatron's MoELayer refuses *training* at TP > 1 without sequence
            # parallelism, which the torch norms of the CPU (no apex/TE) do not support.
            for chunk in chunks:
                chunk.eval()
            experts_read[(tp, pp, ep, name)] = (ps.get_expert_model_parallel_rank(), _expert_names_read(chunks, path))
            with torch.no_grad():
                lp = megatron_logprobs(chunks, ids, VOCAB)
            if lp is not None:
                logprobs[(tp, pp, ep, name)] = lp
            if (tp, pp, ep) in ROUND_TRIP_LAYOUTS:
                save_hf(chunks, os.path.join(out_root, f"{name}_tp{tp}pp{pp}ep{ep}"), max_shard_bytes=200_000)
        ps.destroy_model_parallel()
    destroy_parallel()
    return logprobs, experts_read


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("megatron_moe")
    ckpts, refs = {}, {}
    torch.manual_seed(100)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    for i, (name, config) in enumerate(tiny_moe_configs().items()):
        path = tmp / name
        model = make_checkpoint(config, path, seed=10 + i, max_shard_size="200KB" if i % 2 else None)
        ckpts[name] = str(path)
        refs[name] = hf_logprobs(model, ids)
    out_root = tmp / "exported"
    results = run_distributed(_moe_worker, 4, ckpts, ids, str(out_root), timeout=600)
    return dict(ckpts=ckpts, refs=refs, out_root=out_root, results=results)


@pytest.mark.slow
def test_moe_logprob_parity_with_hf_at_ep2_tp2ep2_pp2ep2(moe_run):
    refs, checked = moe_run["refs"], set()
    for logprobs, _ in moe_run["results"]:
        for (tp, pp, ep, name), lp in logprobs.items():
            err = (lp - refs[name]).abs().max().item()
            print(f"{name} TP={tp} PP={pp} EP={ep}: max |logp - logp_hf| = {err:.2e}")
            assert err < 1e-4, f"{name} at TP={tp} PP={pp} EP={ep}: max |logp - logp_hf| = {err:.2e}"
            checked.add((tp, pp, ep, name))
    assert checked == {(*layout, n) for layout in LAYOUTS for n in refs}
    assert all(r.std() > 0.1 for r in refs.values())


@pytest.mark.slow
def test_each_expert_parallel_rank_reads_only_its_experts(moe_run):
    per_expert_rank = EXPERTS // 2
    for _, experts_read in moe_run["results"]:
        for key, (ep_rank, seen) in experts_read.items():
            assert seen == set(range(ep_rank * per_expert_rank, (ep_rank + 1) * per_expert_rank)), (key, seen)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ROUND_TRIP_LAYOUTS, ids=["tp2ep2", "pp2ep2"])
def test_moe_round_trip_is_bit_exact_and_loads_in_hf(moe_run, layout):
    from transformers import AutoModelForCausalLM

    tp, pp, ep = layout
    torch.manual_seed(100)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    for name, src in moe_run["ckpts"].items():
        out = moe_run["out_root"] / f"{name}_tp{tp}pp{pp}ep{ep}"
        original, exported = _hf_tensors(src), _hf_tensors(out)
        assert exported.keys() == original.keys(), name
        assert any(".mlp.experts.3.down_proj.weight" in k for k in exported)
        for key, tensor in original.items():
            assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), f"{name}: {key}"
        config, source = (json.loads((d / "config.json").read_text()) for d in (out, moe_run["out_root"].parent / name))
        for key in ("architectures", "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "tie_word_embeddings"):
            assert config[key] == source[key], key
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(hf_logprobs(hf, ids), moe_run["refs"][name], atol=0, rtol=0)


@pytest.mark.parametrize(("change", "key"), [
    ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_moe_config_feature_is_named(change, key):
    with pytest.raises(UnsupportedArchitectureError, match=key):
        build_model(tiny_moe_config(**change), None)


def test_aux_loss_coefficient_config():
    from transformers import LlamaConfig

    from maspo_megatron.trainer import ModelConfig

    assert ModelConfig(moe_aux_loss_coeff=0.02).megatron_overrides()["moe_aux_loss_coeff"] == 0.02
    assert "moe_aux_loss_coeff" not in ModelConfig().megatron_overrides()
    # Unset, the checkpoint's router_aux_loss_coef applies.
    from maspo_megatron.megatron.families import get_family
    from maspo_megatron.runtime import ParallelConfig

    hf = tiny_moe_config(router_aux_loss_coef=0.003)
    family = get_family(hf)
    assert family.transformer_fields(family.arch_config(hf), ParallelConfig())["moe_aux_loss_coeff"] == 0.003
    for bad in (-0.1, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="model.moe_aux_loss_coeff"):
            ModelConfig(moe_aux_loss_coeff=bad)
    dense = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="moe_aux_loss_coeff.*not a mixture-of-experts"):
        build_model(dense, None, config_overrides=ModelConfig(moe_aux_loss_coeff=0.1).megatron_overrides())


# Qwen/Qwen3-30B-A3B config.json (architecture fields): 128 experts, top-8, 30.5B parameters.
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                     intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     hidden_act="silu", tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])


def test_memory_plan_counts_one_expert_parallel_ranks_experts():
    from test_plan import hf_meta_model

    from maspo_megatron.megatron import memory
    from maspo_megatron.megatron.families import get_family

    total = sum(p.numel() for p in hf_meta_model(QWEN3_30B_A3B).parameters())
    assert 30.4e9 < total < 30.6e9  # the published 30.5B
    hf = memory.hf_config_from(QWEN3_30B_A3B)
    arch = get_family(hf).arch_config(hf)
    experts_per_layer = 128 * 3 * 2048 * 768
    stages = memory.moe_stage_params(arch, arch.moe, tp=1, pp=2, ep=8)
    assert [s.expert for s in stages] == [24 * experts_per_layer // 8] * 2
    # 151936 is a multiple of 128: no vocabulary padding at TP=1. Every EP rank holds 1/8 of the experts.
    assert sum(s.params - s.expert for s in stages) + 8 * sum(s.expert for s in stages) == total
    stages_tp2 = memory.moe_stage_params(arch, arch.moe, tp=2, pp=1, ep=4)  # expert TP follows TP
    assert stages_tp2[0].expert == 48 * experts_per_layer // 4 // 2
    assert memory.sglang_weight_params(arch, 1) == total

    # Training terms at PP2 x DP8 with EP8 (expert DP 1): dense parameters' optimizer state is
    # sharded over DP 8, the experts' over expert DP 1 (not at all).
    from maspo_megatron.cli import recipe_module
    from maspo_megatron.config import apply_overrides

    cfg = apply_overrides(recipe_module("maspo_r1_distill_7b").build(),
                          ["parallel.tp=1", "parallel.pp=2", "parallel.ep=8"])
    plan = memory.plan_memory(cfg, QWEN3_30B_A3B, train_gpus=16, rollout_gpus=0, stages=stages)
    first = {t.name: t for t in plan.ranks[0].terms}
    s0 = stages[0]
    assert first["optimizer state"].bytes == pytest.approx(12 * (s0.params - s0.expert) / 8)
    assert first["expert optimizer state"].bytes == pytest.approx(12 * s0.expert)
    assert "expert DP 1" in first["expert optimizer state"].how and "EP8" in plan.format()

def test_router_modes_differ_on_these_models(tmp_path):
    """The parity above tells the two router mappings apart: the same weights routed with and
    without renormalised top-k probabilities give clearly different log-probs."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(100)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    make_checkpoint(tiny_moe_config(), tmp_path, seed=10)
    lps = []
    for norm in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, norm_topk_prob=norm).eval()
        lps.append(hf_logprobs(model, ids))
    assert (lps[0] - lps[1]).abs().max() > 1e-2
