"""MASPO train steps on a Qwen3-MoE: expert parallelism (EP=2) equals EP=1 on the same two
data-parallel ranks (same tokens per rank, so the per-rank load-balancing loss is the same)."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed
from test_megatron_actor import make_batch

STEPS = 2
AUX_COEFF = 0.05  # large enough to move the router measurably in two steps


def make_tiny_qwen3_moe(path, seed=0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=64, tie_word_embeddings=False,
        architectures=["Qwen3MoeForCausalLM"],
    )
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # HF initialises the router to zeros-ish; make routing depend on the token
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return config


def full_length_batch():
    """Every sequence 12 tokens: micro-batches have no padding, so the routers see exactly the
    batch's tokens (what the HF reference routes)."""
    batch = make_batch()
    batch.lengths[:] = batch.input_ids.shape[1]
    batch.response_mask[:, 3:] = True
    return batch


def hf_load_imbalance(model_dir) -> list[float]:
    """max/mean tokens per expert of each layer, from HF's router logits on the whole batch."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(full_length_batch().input_ids, output_router_logits=True)
    imbalance = []
    for logits in out.router_logits:
        counts = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=4).double()
        imbalance.append(float(counts.max() / counts.mean()))
    return imbalance


def train(rank, world_size, model_dir, ep):
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor, ActorConfig, OptimizerConfig
    from maspo_megatron.megatron.convert import export_hf, load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    from maspo_megatron.trainer import ModelConfig

    parallel = ParallelConfig(ep=ep)
    initialize_parallel(parallel)
    model_cfg = ModelConfig(path=model_dir, dtype="fp32", moe_aux_loss_coeff=AUX_COEFF)
    chunks = build_model(model_dir, parallel, dtype=torch.float32, config_overrides=model_cfg.megatron_overrides())
    load_hf_checkpoint(chunks, model_dir)
    cfg = ActorConfig(loss="maspo", micro_batch_tokens=30, fused_logprobs=False,
                      optimizer=OptimizerConfig(lr=1e-3, clip_grad=1.0))
    actor = Actor(chunks, cfg, objective=Objective(cfg), temperature=0.9)
    batch = full_length_batch()
    batch.old_logprobs, _ = actor.compute_logprobs(batch)
    out = {"old_logprobs": batch.old_logprobs, "metrics": []}
    for _ in range(STEPS):
        out["metrics"].append(actor.train_step(batch))
    # Each rank's own share: dense tensors from data-parallel rank 0, experts from their owner.
    out["params"] = {k: v.detach().clone() for k, v in export_hf(actor.model, owned=True)}
    destroy_parallel()
    return out


@pytest.mark.slow
def test_maspo_steps_ep2_match_ep1(tmp_path):
    make_tiny_qwen3_moe(tmp_path)
    ref = run_distributed(train, 2, str(tmp_path), 1)
    ep2 = run_distributed(train, 2, str(tmp_path), 2)

    for mine, theirs in zip(ep2, ref):
        torch.testing.assert_close(mine["old_logprobs"], theirs["old_logprobs"], atol=1e-5, rtol=0)
        for m, t in zip(mine["metrics"], theirs["metrics"]):
            print({k: (m[k], t[k]) for k in ("loss", "grad_norm")})
            assert abs(m["loss"] - t["loss"]) < 1e-5
            assert abs(m["grad_norm"] - t["grad_norm"]) < 1e-5
    # MoE metrics: the same at EP=2 and EP=1, and the first step's expert load is HF's routing
    # of the same tokens (the step's forward still has the checkpoint's weights).
    reference = hf_load_imbalance(tmp_path)
    assert max(reference) > 1.0  # not trivially balanced
    for mine, theirs in zip(ep2, ref):
        for m, t in zip(mine["metrics"], theirs["metrics"]):
            moe = sorted(k for k in t if k.startswith("moe/"))
            assert moe == ["moe/aux_loss", "moe/load_imbalance/layer_0", "moe/load_imbalance/layer_1",
                           "moe/load_imbalance_worst"], moe
            for k in moe:
                assert abs(m[k] - t[k]) < 1e-5, (k, m[k], t[k])
            assert t["moe/aux_loss"] > 0
        first = theirs["metrics"][0]
        print("load imbalance", [first[f"moe/load_imbalance/layer_{i}"] for i in range(2)], "HF", reference,
              "aux", first["moe/aux_loss"])
        for i, want in enumerate(reference):
            assert abs(first[f"moe/load_imbalance/layer_{i}"] - want) < 1e-9, (i, first, reference)
        assert abs(first["moe/load_imbalance_worst"] - max(reference)) < 1e-9
    # EP=1: rank 0 exports everything; EP=2: rank 0 the dense tensors and experts 0-1, rank 1 experts 2-3.
    assert any(".experts.3." in k for k in ref[0]["params"]) and not ref[1]["params"]
    assert not any(".experts.2." in k or ".experts.3." in k for k in ep2[0]["params"])
    assert ep2[1]["params"] and all(".experts.2." in k or ".experts.3." in k for k in ep2[1]["params"])
    exported = {**ep2[0]["params"], **ep2[1]["params"]}
    assert exported.keys() == ref[0]["params"].keys()
    for name, tensor in ref[0]["params"].items():
        torch.testing.assert_close(exported[name], tensor, atol=1e-5, rtol=0, msg=name)
    # The steps changed the experts and the router (not two untouched copies compared).
    from safetensors.torch import load_file

    initial = load_file(str(tmp_path / "model.safetensors"))
    for key in ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.experts.3.down_proj.weight"):
        assert not torch.equal(initial[key], exported[key]), key


def save_then_load(rank, world_size, model_dir, ckpt_dir, ep, save, with_optimizer=True):
    """Saves after a step, or loads (weights and, with ``with_optimizer``, the optimizer)."""
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor, ActorConfig, OptimizerConfig
    from maspo_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint
    from maspo_megatron.megatron.convert import export_hf, load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig(ep=ep)
    initialize_parallel(parallel)
    chunks = build_model(model_dir, parallel, dtype=torch.float32)
    load_hf_checkpoint(chunks, model_dir)
    cfg = ActorConfig(loss="maspo", micro_batch_tokens=30, fused_logprobs=False,
                      optimizer=OptimizerConfig(lr=1e-3, clip_grad=1.0))
    actor = Actor(chunks, cfg, objective=Objective(cfg), temperature=0.9)
    if save:
        batch = full_length_batch()
        batch.old_logprobs, _ = actor.compute_logprobs(batch)
        actor.train_step(batch)
        save_checkpoint(ckpt_dir, 1, actor.model, actor.optimizer, actor.scheduler)
    else:
        load_checkpoint(ckpt_dir, actor.model, actor.optimizer if with_optimizer else None,
                        actor.scheduler if with_optimizer else None)
    params = {k: v.detach().clone() for k, v in export_hf(actor.model, owned=True)}
    destroy_parallel()
    return params


@pytest.mark.slow
def test_moe_checkpoint_saved_at_ep2_loads_at_ep2_and_its_weights_at_ep1(tmp_path):
    """The experts reshard from EP=2 to EP=1 (weights only: the optimizer state does not reshard
    across a change of EP, refused by name before megatron is asked)."""
    model_dir, ckpt = tmp_path / "model", tmp_path / "ckpt"
    make_tiny_qwen3_moe(model_dir)
    saved = run_distributed(save_then_load, 2, str(model_dir), str(ckpt), 2, True)
    same = run_distributed(save_then_load, 2, str(model_dir), str(ckpt), 2, False)
    resharded = run_distributed(save_then_load, 2, str(model_dir), str(ckpt), 1, False, False)
    with pytest.raises(RuntimeError, match=r"CheckpointError: .*expert_parallel=2 cannot load at parallel.ep=1"):
        run_distributed(save_then_load, 2, str(model_dir), str(ckpt), 1, False, True)
    trained = {**saved[0], **saved[1]}
    assert {**same[0], **same[1]}.keys() == trained.keys() == resharded[0].keys()
    for name, tensor in trained.items():
        assert torch.equal({**same[0], **same[1]}[name], tensor), name
        assert torch.equal(resharded[0][name], tensor), name
