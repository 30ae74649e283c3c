"""Virtual pipeline stages (interleaved 1F1B): PP=2 x VPP=2 equals PP=1.

The model is a tiny Llama loaded from an HF checkpoint, in fp32 on gloo. Two ranks with two
model chunks each (one layer per chunk, layers interleaved 0,2 | 1,3) must give the single
rank's per-token log-probs and MASPO train steps (loss, grad norm, updated weights) within
1e-5. Checkpoints save the chunks as model0/model1 and continue identically after a load,
also under PP=2 without virtual stages (fully reshardable optimizer state); the
``dp_reshardable`` optimizer state, laid out per chunk, refuses another chunk count by name.
"""

from __future__ import annotations

import os

import pytest
import torch

from distributed import run_distributed
from test_megatron_actor import STEPS, make_batch, make_tiny_llama


def test_interleave_group_size_meets_the_schedules_rule():
    from maspo_megatron.megatron.interleaved import interleave_group_size

    # megatron's rule: group in [pp, M]; M % group is 0 or >= pp.
    for pp in (2, 3, 4):
        for m in range(pp, 30):
            g = interleave_group_size(m, pp)
            assert pp <= g <= m and (m % g == 0 or m % g >= pp), (m, pp, g)
            if m % pp == 0:
                assert g == pp
    assert interleave_group_size(5, 2) == 3
    with pytest.raises(ValueError, match="cannot fill 2 pipeline stages"):
        interleave_group_size(1, 2)


def test_split_to_count_halves_the_largest_micro_batches():
    from maspo_megatron.megatron.interleaved import split_to_count

    micro = [torch.tensor([4, 1, 2]), torch.tensor([0])]
    out = split_to_count(micro, 4)
    assert len(out) == 4
    assert sorted(torch.cat(out).tolist()) == [0, 1, 2, 4]
    assert split_to_count(micro, 2) == micro
    with pytest.raises(ValueError, match=r"fewer than parallel.pp=3.*parallel.vpp"):
        split_to_count([torch.tensor([0, 1])], 3)


def _actor_cfg(**kw):
    from maspo_megatron.megatron.actor import ActorConfig, OptimizerConfig

    return ActorConfig(loss="maspo", logprob_chunk_tokens=7,
                       optimizer=OptimizerConfig(lr=1e-4, clip_grad=1.0), **kw)


def train(rank, world_size, model_dir, pp, vpp, ckpt_dir):
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor
    from maspo_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint
    from maspo_megatron.megatron.convert import export_hf, load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model, global_layer_indices, make_model_spec
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig(pp=pp, vpp=vpp)
    initialize_parallel(parallel)
    out = {}
    if vpp:
        with pytest.raises(ValueError, match=r"num_hidden_layers=4 is not divisible by parallel.pp \* "
                                             r"parallel.vpp = 2\*4"):
            make_model_spec(model_dir, ParallelConfig(pp=2, vpp=4), dtype=torch.float32)

    def fresh_actor(**kw):
        chunks = build_model(model_dir, parallel, dtype=torch.float32)
        load_hf_checkpoint(chunks, model_dir)
        cfg = _actor_cfg(**kw)
        return chunks, Actor(chunks, cfg, objective=Objective(cfg), temperature=0.9)

    chunks, actor = fresh_actor(micro_batch_tokens=30, fused_logprobs=bool(vpp))
    out["layers"] = [global_layer_indices(c) for c in chunks]
    out["pre_post"] = [(c.maspo_spec.pre_process, c.maspo_spec.post_process) for c in chunks]
    batch = make_batch()
    out["num_micro"] = len(actor._micro_batches(batch, torch.arange(len(batch))))
    batch.old_logprobs, _ = actor.compute_logprobs(batch)
    out["old_logprobs"] = batch.old_logprobs
    # One micro-batch's worth of budget: the interleaved schedule needs >= pp micro-batches.
    _, big = fresh_actor(micro_batch_tokens=4096)
    out["one_budget_micro"] = len(big._micro_batches(batch, torch.arange(len(batch))))
    out["one_budget_logprobs"], _ = big.compute_logprobs(batch)
    out["one_budget_step"] = big.train_step(batch)  # as many micro-batches as stages
    out["metrics"] = []
    for step in range(STEPS):
        out["metrics"].append(actor.train_step(batch))
        if step == 0:
            out["params"] = {k: v.detach().clone() for k, v in export_hf(actor.model)}
            if ckpt_dir:
                save_checkpoint(ckpt_dir, 1, actor.model, actor.optimizer, actor.scheduler)
                save_checkpoint(ckpt_dir + "_dp", 1, actor.model, actor.optimizer, actor.scheduler,
                                optimizer_sharding="dp_reshardable")
    if ckpt_dir:
        # A fresh actor resumed from step 1 continues exactly as the one that saved.
        _, resumed = fresh_actor(micro_batch_tokens=30, fused_logprobs=bool(vpp))
        load_checkpoint(ckpt_dir, resumed.model, resumed.optimizer, resumed.scheduler)
        out["resumed"] = [resumed.train_step(batch) for _ in range(STEPS - 1)]
        out["resumed_params"] = {k: v.detach().clone() for k, v in export_hf(resumed.model)}
        out["final_params"] = {k: v.detach().clone() for k, v in export_hf(actor.model)}
    destroy_parallel()
    return out


def resume_without_vpp(rank, world_size, model_dir, ckpt_dir, old_logprobs):
    """The vpp=2 checkpoint resumed at PP=2 without virtual stages (one chunk per rank)."""
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor
    from maspo_megatron.megatron.checkpoint import CheckpointError, load_checkpoint
    from maspo_megatron.megatron.convert import export_hf
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig(pp=2)
    initialize_parallel(parallel)
    chunks = build_model(model_dir, parallel, dtype=torch.float32)
    cfg = _actor_cfg(micro_batch_tokens=30)
    actor = Actor(chunks, cfg, objective=Objective(cfg), temperature=0.9)
    out = {}
    try:
        load_checkpoint(ckpt_dir + "_dp", actor.model, actor.optimizer, actor.scheduler)
    except CheckpointError as e:
        out["dp_error"] = str(e)
    load_checkpoint(ckpt_dir, actor.model, actor.optimizer, actor.scheduler)
    batch = make_batch()
    batch.old_logprobs = old_logprobs  # what the saving run trained on
    out["metrics"] = [actor.train_step(batch) for _ in range(STEPS - 1)]
    out["params"] = {k: v.detach().clone() for k, v in export_hf(actor.model)}
    destroy_parallel()
    return out


def _merged(results, key):
    merged = {}
    for r in results:
        merged.update(r[key])
    return merged


@pytest.mark.slow
def test_pp2_vpp2_logprobs_train_step_and_checkpoint_equal_pp1(tmp_path):
    make_tiny_llama(tmp_path / "model")
    model_dir = str(tmp_path / "model")
    (ref,) = run_distributed(train, 1, model_dir, 1, None, None)
    ckpt = str(tmp_path / "ckpt")
    results = run_distributed(train, 2, model_dir, 2, 2, ckpt, timeout=600)

    # Megatron's interleaving: chunk v of rank r holds layer v * pp + r.
    assert [r["layers"] for r in results] == [[[0], [2]], [[1], [3]]]
    assert [r["pre_post"] for r in results] == [[(True, False), (False, False)],
                                                [(False, False), (False, True)]]
    # 3 micro-batches at 30 tokens (3 % pp = 1: group size 3); 1 at 4096, split to pp = 2.
    assert results[0]["num_micro"] == ref["num_micro"] == 3
    assert results[0]["one_budget_micro"] == 2 and ref["one_budget_micro"] == 1

    losses = [m["loss"] for m in ref["metrics"]]
    assert losses[-1] < losses[0] - 1e-3, losses
    for r in results:
        torch.testing.assert_close(r["old_logprobs"], ref["old_logprobs"], atol=1e-5, rtol=0)
        torch.testing.assert_close(r["one_budget_logprobs"], ref["old_logprobs"], atol=1e-5, rtol=0)
        for key in ("loss", "grad_norm"):
            assert abs(r["one_budget_step"][key] - ref["one_budget_step"][key]) < 1e-5, key
        for mine, theirs in zip(r["metrics"], ref["metrics"]):
            assert abs(mine["loss"] - theirs["loss"]) < 1e-5, (mine["loss"], theirs["loss"])
            assert abs(mine["grad_norm"] - theirs["grad_norm"]) < 1e-5, (mine["grad_norm"], theirs["grad_norm"])
            assert mine["response_tokens"] == theirs["response_tokens"]
    exported = _merged(results, "params")
    assert exported.keys() == ref["params"].keys()
    for name, tensor in ref["params"].items():
        torch.testing.assert_close(exported[name], tensor, atol=1e-5, rtol=0, msg=name)
    from safetensors.torch import load_file

    initial = load_file(os.path.join(model_dir, "model.safetensors"))
    assert any(not torch.equal(initial[k], v) for k, v in ref["params"].items()), "the step changed nothing"

    # Checkpoint at vpp=2: one entry per chunk, and a resumed actor continues bit for bit.
    from maspo_megatron.megatron.checkpoint import iteration_dir, read_trainer_state

    assert read_trainer_state(iteration_dir(ckpt, 1))["model_chunks"] == 2
    for r in results:
        for mine, theirs in zip(r["resumed"], r["metrics"][1:]):
            assert mine["loss"] == theirs["loss"] and mine["grad_norm"] == theirs["grad_norm"]
    resumed, final = _merged(results, "resumed_params"), _merged(results, "final_params")
    assert resumed.keys() == final.keys() == ref["params"].keys()
    for name, tensor in final.items():
        assert torch.equal(resumed[name], tensor), name

    # Another layout (PP=2, no virtual stages) resumes the fully reshardable checkpoint and
    # continues as PP=1 does; the dp_reshardable one names what differs.
    other = run_distributed(resume_without_vpp, 2, model_dir, ckpt, ref["old_logprobs"], timeout=600)
    for r in other:
        assert "dp_reshardable' at model_chunks=2 cannot load at model_chunks=1" in r["dp_error"], r["dp_error"]
        for mine, theirs in zip(r["metrics"], ref["metrics"][1:]):
            assert abs(mine["loss"] - theirs["loss"]) < 1e-5 and abs(mine["grad_norm"] - theirs["grad_norm"]) < 1e-5
    params = _merged(other, "params")
    for name, tensor in final.items():
        torch.testing.assert_close(params[name], tensor, atol=1e-5, rtol=0, msg=name)

    # export-hf of the vpp=2 checkpoint (at TP=1 PP=1) gives the weights it saved, bit for bit.
    out = str(tmp_path / "exported")
    run_distributed(export_checkpoint, 1, ckpt, model_dir, out)
    written = load_file(os.path.join(out, "model.safetensors"))
    assert written.keys() == exported.keys()
    for name, tensor in exported.items():
        assert torch.equal(written[name], tensor), name


def save_hf_at_vpp(rank, world_size, model_dir, out_dir):
    from maspo_megatron.megatron.convert import load_hf_checkpoint, save_hf
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig(pp=2, vpp=2)
    initialize_parallel(parallel)
    chunks = build_model(model_dir, parallel, dtype=torch.float32)
    load_hf_checkpoint(chunks, model_dir)
    # Small shards: several files per chunk, so their order is visible in the index.
    save_hf(chunks, out_dir, tokenizer_dir=model_dir, max_shard_bytes=24 << 10)
    destroy_parallel()


def export_checkpoint(rank, world_size, ckpt_dir, model_dir, out_dir):
    from maspo_megatron.megatron.export import export_checkpoint_to_hf

    export_checkpoint_to_hf(ckpt_dir, model_dir, out_dir, tp=1, dtype=torch.float32)


def _load_dir(path):
    import json

    from safetensors.torch import load_file

    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    tensors = {}
    for name in sorted(set(weight_map.values())):
        tensors.update(load_file(os.path.join(path, name)))
    return weight_map, tensors


@pytest.mark.slow
def test_save_hf_at_pp2_vpp2_round_trips_bit_exact_in_layer_order(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir, out = str(tmp_path / "model"), str(tmp_path / "out")
    make_tiny_llama(model_dir)
    run_distributed(save_hf_at_vpp, 2, model_dir, out)
    weight_map, exported = _load_dir(out)
    original = load_file(os.path.join(model_dir, "model.safetensors"))
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    # Files follow HF's layer order although each pipeline rank holds layers {r, r + 2}.
    layer_file = {}
    for name, file in weight_map.items():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            layer_file[layer] = max(layer_file.get(layer, file), file)
    assert [layer_file[i] for i in range(4)] == sorted(layer_file[i] for i in range(4))
    assert weight_map["model.embed_tokens.weight"] <= layer_file[0] <= layer_file[3] <= weight_map["lm_head.weight"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
