"""Routing replay (R3) acceptance: trainer-vs-rollout log-prob gap on a MoE batch, with replay
and without, against the dense level.

Rollouts come from the real SGLang 0.5.23 CPU server (routed experts returned); the trainer is
the Megatron actor loaded from the same HF checkpoint, its batch built by the trainer's own
``build_batch`` (so the routes travel exactly as in a run). Gap = |trainer log-prob - rollout
log-prob| over every response token.

Why bf16 on both sides: in fp32 the two engines agree to ~1e-6, and a top-k flip needs two
router logits closer than that, which almost never happens (the relative noise does not shrink
with the router's scale, so a small-scale init does not make ties either). bf16 is also what a
real run uses; its rounding differs between SGLang and Megatron by ~1e-2, enough that some
tokens' 2nd and 3rd experts swap between the engines. Those tokens are what replay fixes. The
dense level is a dense Qwen3 of the same shape (hidden, layers, heads), served and trained the
same way.
"""

from __future__ import annotations

import sys

import pytest
import torch

from distributed import run_distributed
from test_sglang_routed_experts import LAYERS, TOPK, build_tiny_qwen3_moe, cpu_server

DTYPE = "bfloat16"
PROMPTS, SAMPLES, NEW_TOKENS = 48, 2, 32


def build_tiny_qwen3_dense(path: str, seed: int = 0, scale: float = 0.3):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, dtype="float32")
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, scale)
    model.save_pretrained(path)


def sample_groups(url: str, routes):
    from maspo_megatron.generation import RolloutGroup
    from maspo_megatron.rollout.backend import SamplingParams
    from maspo_megatron.rollout.client import RolloutClient, RolloutRequest

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 64, (int(torch.randint(4, 13, (1,), generator=g)),), generator=g).tolist()
               for _ in range(PROMPTS)]
    client = RolloutClient([url], vocab_size=64, routes=routes)
    requests = [RolloutRequest(i * SAMPLES + j, tuple(p),
                               SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, ignore_eos=True,
                                              sampling_seed=i * SAMPLES + j))
                for i, p in enumerate(prompts) for j in range(SAMPLES)]
    samples = client.run(requests)
    groups = []
    for i, p in enumerate(prompts):
        chunk = samples[i * SAMPLES:(i + 1) * SAMPLES]
        groups.append(RolloutGroup(
            prompt_index=i, prompt_ids=p, answer="", outputs=[s.output_ids for s in chunk],
            logprobs=[s.logprobs for s in chunk], finish=[s.finish_reason for s in chunk],
            rewards=[0.0] * SAMPLES, correct=[False] * SAMPLES,
            routed_experts=[s.routed_experts for s in chunk] if routes else []))
    return groups


def trainer_gaps(rank, world_size, model_dir, groups, routes):
    from maspo_megatron.megatron.actor import Actor, ActorConfig
    from maspo_megatron.megatron.convert import load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, initialize_parallel
    from maspo_megatron.trainer import build_batch

    parallel = ParallelConfig()
    initialize_parallel(parallel)
    chunks = build_model(model_dir, parallel, dtype=torch.bfloat16,
                         config_overrides={"moe_enable_routing_replay": True} if routes else None)
    load_hf_checkpoint(chunks, model_dir)
    actor = Actor(chunks, ActorConfig(micro_batch_tokens=512), trainable=False, temperature=1.0)
    batch = build_batch(groups, torch.zeros(len(groups) * SAMPLES), False, routes)
    mask = batch.response_mask
    out = {}
    for replay in ((True, False) if routes else (False,)):
        lp, _ = actor.compute_logprobs(batch, replay=replay)
        gap = (lp - batch.rollout_logprobs)[mask].abs()
        out["replay" if replay else "no_replay"] = dict(
            mean=float(gap.mean()), max=float(gap.max()), p99=float(gap.quantile(0.99)),
            over_0_1=int((gap > 0.1).sum()), tokens=int(mask.sum()))
    return out


def measure(tmp_path, kind: str):
    model_dir = str(tmp_path / kind)
    (build_tiny_qwen3_moe if kind == "moe" else build_tiny_qwen3_dense)(model_dir)
    routes = (LAYERS, TOPK) if kind == "moe" else None
    with cpu_server(model_dir, str(tmp_path), dtype=DTYPE, routes=routes is not None) as (url, _):
        groups = sample_groups(url, routes)
    return run_distributed(trainer_gaps, 1, model_dir, groups, routes, timeout=900)[0]


@pytest.mark.sglang
def test_replay_brings_the_moe_gap_to_the_dense_level(tmp_path):
    dense = measure(tmp_path, "dense")["no_replay"]
    moe = measure(tmp_path, "moe")
    for name, m in (("dense", dense), ("moe, replay", moe["replay"]), ("moe, no replay", moe["no_replay"])):
        print(f"{DTYPE} {name}: mean |gap| {m['mean']:.5f}, p99 {m['p99']:.4f}, max {m['max']:.4f}, "
              f"{m['over_0_1']}/{m['tokens']} tokens over 0.1", file=sys.stderr)
    # With replay the MoE batch is at the dense level (bf16 rounding everywhere); without, the
    # few tokens whose experts differ between the engines stand out: a far larger tail (the mean
    # moves less: most tokens route alike). Sampling is not reproducible run to run (SGLang's
    # seed needs --enable-deterministic-inference), so the bounds leave room. Measured with
    # 3,072 tokens: dense mean 0.0146, max 0.11, 3 over 0.1; replay 0.0162, 0.14, 3; no replay
    # 0.0248, 3.5, 62 (and at 1,536 tokens, twice: replay 0.0153-0.0165, 2-3 over 0.1; no
    # replay 0.024-0.028, 21-37 over 0.1). A CI run (3,072 tokens): dense 0.0151, 0.13, 1;
    # replay 0.0166, 0.20, 10; no replay 0.0240, 1.74, 59 -- hence the tail bounds below.
    dense_m, rep, raw = dense, moe["replay"], moe["no_replay"]
    assert rep["mean"] <= 1.25 * dense_m["mean"]
    assert rep["p99"] <= 1.5 * dense_m["p99"]
    assert raw["mean"] >= 1.2 * rep["mean"]
    assert raw["over_0_1"] >= 3 * max(1, rep["over_0_1"])
    assert raw["max"] >= 4 * rep["max"]
