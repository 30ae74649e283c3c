"""Checkpoints through megatron-core dist-checkpointing on CPU (gloo).

One TP=2 run trains K steps and saves (module fixture). Against it:
- resume: fresh TP=2 processes load and run step K+1; loss and parameters are bitwise equal to
  an uninterrupted K+1-step run. Each step's batch is drawn from torch's, numpy's and python's
  global RNGs and the LR follows a warm-up/cosine schedule, so the RNG states and the scheduler
  must be restored for equality, not just weights and Adam moments.
- TP=2 -> TP=1: same log-probs of a fixed batch (within 1e-6), and the resharded optimizer makes
  the same update as the TP=2 run (within 1e-5, the TP summation-order bound of
  test_runtime_megatron_cpu.py).
- errors: nothing saved, wrong model (names the tensor), dp_reshardable optimizer at another TP,
  and a crash mid-save that must leave ``latest`` and the previous checkpoint usable.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from distributed import run_distributed
from megatron_tiny import (
    MBS, NUM_MB, SEQ, VOCAB, assemble, build_model, gather_params, train_step, wrap_ddp_and_optimizer,
)

K = 2  # steps before the save
EXTRA = {"cursor": {"epoch": 0, "index": 2 * K}, "rollout_step": K, "note": "ok"}


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_batch():
    """A step's batch drawn from all three global RNGs (same on every rank: same seeds)."""
    tokens = torch.randint(0, VOCAB, (NUM_MB, MBS, SEQ + 1))
    tokens = tokens + torch.from_numpy(np.random.randint(0, VOCAB, size=tuple(tokens.shape)))
    tokens = (tokens + random.randrange(VOCAB)) % VOCAB
    return [_as_batch(t) for t in tokens]


def _as_batch(t):
    return {"tokens": t[:, :-1], "labels": t[:, 1:], "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}


def _fixed_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [_as_batch(t) for t in torch.randint(0, VOCAB, (NUM_MB, MBS, SEQ + 1), generator=g)]


def _setup(tp: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model, config = build_model(tp, 1)
    model, optimizer = wrap_ddp_and_optimizer(model, config, lr=1e-3, clip_grad=0.05, min_lr=1e-4)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=10, wd_incr_style="constant",
    )
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler, data):
    loss, _ = train_step(model, optimizer, data)
    scheduler.step(increment=1)
    return loss


def _logprobs(model, data) -> torch.Tensor:
    """log p(label) from the full (TP-gathered) logits of a plain forward."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    module = model.module
    module.eval()
    out = []
    with torch.no_grad():
        for b in data:
            local_logits = module(b["tokens"], b["position_ids"], None)
            logits = gather_from_tensor_model_parallel_region(local_logits)
            logp = torch.log_softmax(logits.double(), dim=-1)
            out.append(logp.gather(-1, b["labels"].unsqueeze(-1)).squeeze(-1))
    module.train()
    return torch.stack(out)


def _rng_snapshot():
    from megatron.core import tensor_parallel

    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
        "torch": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in states.items()},
    }


def _adam_state(optimizer) -> list[torch.Tensor]:
    inner = optimizer.chained_optimizers[0].optimizer
    return [
        (k, t.clone()) for group in inner.param_groups for p in group["params"]
        for k, t in sorted(inner.state[p].items())
    ] + [
        # megatron adds the step to loaded groups; torch Adam keeps it per parameter (above).
        {k: v for k, v in g.items() if k not in ("params", "step")} for g in inner.param_groups
    ]


def run_uninterrupted(rank, world_size, steps):
    from maspo_megatron.runtime import destroy_parallel

    model, optimizer, scheduler = _setup(2)
    _seed_globals(0)
    losses = [_step(model, optimizer, scheduler, _rng_batch()) for _ in range(steps)]
    params = gather_params(model.module)
    destroy_parallel()
    return {"losses": losses, "params": params}


def run_and_save(rank, world_size, full_dir, dp_dir):
    from maspo_megatron.megatron.checkpoint import save_checkpoint
    from maspo_megatron.runtime import destroy_parallel

    model, optimizer, scheduler = _setup(2)
    _seed_globals(0)
    for _ in range(K):
        _step(model, optimizer, scheduler, _rng_batch())
    committed = save_checkpoint(full_dir, K, model, optimizer, scheduler, EXTRA)
    rng = _rng_snapshot()
    adam = _adam_state(optimizer)
    lr = [g["lr"] for g in optimizer.param_groups]
    save_checkpoint(dp_dir, K, [model], optimizer, scheduler, EXTRA, optimizer_sharding="dp_reshardable")
    logprobs = _logprobs(model, _fixed_batch(1))
    # The update every layout must reproduce from this state (cross-layout optimizer check).
    _step(model, optimizer, scheduler, _fixed_batch(2))
    params = gather_params(model.module)
    destroy_parallel()
    return {"dir": str(committed), "rng": rng, "adam": adam, "lr": lr, "logprobs": logprobs,
            "params_after_fixed_step": params}


def resume(rank, world_size, full_dir, dp_dir):
    from maspo_megatron.megatron.checkpoint import load_checkpoint
    from maspo_megatron.runtime import destroy_parallel

    model, optimizer, scheduler = _setup(2)
    _seed_globals(1234)  # a resumed run must not depend on how the fresh process was seeded
    load_checkpoint(dp_dir, [model], optimizer, scheduler)
    dp_state = _adam_state(optimizer)
    info = load_checkpoint(full_dir, model, optimizer, scheduler)
    full_state = _adam_state(optimizer)
    rng = _rng_snapshot()
    lr = [g["lr"] for g in optimizer.param_groups]
    loss = _step(model, optimizer, scheduler, _rng_batch())
    params = gather_params(model.module)
    destroy_parallel()
    return {"info": info, "rng": rng, "loss": loss, "params": params,
            "dp_state": dp_state, "full_state": full_state, "lr": lr}


def load_at_tp1(rank, world_size, full_dir):
    from maspo_megatron.megatron.checkpoint import load_checkpoint
    from maspo_megatron.runtime import destroy_parallel

    model, optimizer, scheduler = _setup(1)
    info = load_checkpoint(full_dir, model, optimizer, scheduler)
    logprobs = _logprobs(model, _fixed_batch(1))
    _step(model, optimizer, scheduler, _fixed_batch(2))
    params = gather_params(model.module)
    destroy_parallel()
    return {"info": info, "logprobs": logprobs, "params_after_fixed_step": params}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    full_dir, dp_dir = root / "full", root / "dp"
    results = run_distributed(run_and_save, 2, str(full_dir), str(dp_dir))
    return {"full": full_dir, "dp": dp_dir, "ranks": results}


@pytest.mark.slow
def test_layout_on_disk(saved):
    full = saved["full"]
    assert (full / "latest").read_text() == f"{K}\n"
    assert sorted(p.name for p in full.iterdir()) == ["iter_0000002", "latest"]
    state = json.loads((full / "iter_0000002" / "trainer_state.json").read_text())
    assert state["step"] == K and state["extra_state"] == EXTRA
    assert state["layout"] == {
        "tensor_parallel": 2, "pipeline_parallel": 1, "data_parallel": 1, "expert_parallel": 1, "device": "cpu"
    }


@pytest.mark.slow
def test_resume_is_bitwise_equal_to_uninterrupted_run(saved):
    ref = run_distributed(run_uninterrupted, 2, K + 1)
    resumed = run_distributed(resume, 2, str(saved["full"]), str(saved["dp"]))
    for rank in range(2):
        r, s, u = resumed[rank], saved["ranks"][rank], ref[rank]
        assert r["info"]["step"] == K and r["info"]["extra_state"] == EXTRA and r["info"]["rng_restored"]
        # RNG states right after load equal those right after save, on every rank.
        assert r["rng"]["python"] == s["rng"]["python"]
        assert np.array_equal(r["rng"]["numpy"], s["rng"]["numpy"])
        assert torch.equal(r["rng"]["torch"], s["rng"]["torch"])
        assert r["rng"]["tracker"].keys() == s["rng"]["tracker"].keys() and r["rng"]["tracker"]
        for name, state in r["rng"]["tracker"].items():
            assert torch.equal(state, s["rng"]["tracker"][name]), name
        # Both optimizer formats restore the saved Adam moments; the scheduler restores the LR.
        assert len(r["dp_state"]) == len(r["full_state"]) == len(s["adam"]) > 0
        for name in ("dp_state", "full_state"):
            for a, b in zip(r[name], s["adam"]):
                if isinstance(a, dict):
                    assert a == b, (name, a, b)
                else:
                    assert a[0] == b[0] and torch.equal(a[1], b[1]), (name, a, b)
        assert r["lr"] == s["lr"]

        assert r["loss"] is not None and r["loss"] == u["losses"][K]
        assert r["params"].keys() == u["params"].keys()
        for key, (_, _, shard) in r["params"].items():
            assert torch.equal(shard, u["params"][key][2]), key


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1(saved):
    (tp1,) = run_distributed(load_at_tp1, 1, str(saved["full"]))
    assert tp1["info"]["step"] == K and tp1["info"]["extra_state"] == EXTRA
    assert tp1["info"]["rng_restored"] is False  # another layout: no matching RNG state
    for tp2 in saved["ranks"]:
        torch.testing.assert_close(tp1["logprobs"], tp2["logprobs"], atol=1e-6, rtol=0)
    # Optimizer resharded TP=2 -> TP=1: the next update matches the TP=2 run's.
    full = assemble([tp1["params_after_fixed_step"]])
    checked = 0
    for tp2 in saved["ranks"]:
        for (key, _), (_, view, shard) in tp2["params_after_fixed_step"].items():
            torch.testing.assert_close(shard, full[key][view].reshape(shard.shape), atol=1e-5, rtol=0)
            checked += 1
    assert checked == 2 * len(tp1["params_after_fixed_step"])


def _error_text(fn, *args, **kwargs) -> str:
    from maspo_megatron.megatron.checkpoint import CheckpointError

    try:
        fn(*args, **kwargs)
    except (CheckpointError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"{fn.__name__} did not raise")


def _listing(ckpt_dir):
    from maspo_megatron.megatron.checkpoint import latest_checkpoint_step

    return {"latest": latest_checkpoint_step(ckpt_dir), "entries": sorted(p.name for p in ckpt_dir.iterdir())}


def errors_and_crash(rank, world_size, full_dir, dp_dir, scratch):
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from maspo_megatron.megatron.checkpoint import load_checkpoint, save_checkpoint
    from maspo_megatron.runtime import destroy_parallel

    model, optimizer, scheduler = _setup(1)
    out = {"dp_optimizer": _error_text(load_checkpoint, dp_dir, model, optimizer)}
    out["dp_model_only_step"] = load_checkpoint(dp_dir, model)["step"]  # the model still reshards
    wide, _ = build_model(1, 1, hidden=48, initialize=False)
    out["shape"] = _error_text(load_checkpoint, full_dir, wide)
    qk, _ = build_model(1, 1, qk_layernorm=True, initialize=False)
    out["missing"] = _error_text(load_checkpoint, full_dir, qk)
    save_checkpoint(Path(scratch) / "qk", 1, qk, None)
    out["unexpected"] = _error_text(load_checkpoint, Path(scratch) / "qk", model)
    out["no_optimizer"] = _error_text(load_checkpoint, Path(scratch) / "qk", qk, optimizer)

    # A crash in the middle of a save leaves the previous checkpoint and `latest` usable.
    crash = Path(scratch) / "crash"
    save_checkpoint(crash, 1, model, optimizer, scheduler, {"n": 1})
    real_save = dist_checkpointing.save

    def failing_save(state, directory, *args, **kwargs):
        (Path(directory) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full (injected)")

    dist_checkpointing.save = failing_save
    try:
        save_checkpoint(crash, 2, model, optimizer, scheduler, {"n": 2})
        out["crash_raised"] = False
    except OSError:
        out["crash_raised"] = True
    finally:
        dist_checkpointing.save = real_save
    out["after_crash"] = _listing(crash)
    out["after_crash_load"] = load_checkpoint(crash, model, optimizer, scheduler)["extra_state"]
    save_checkpoint(crash, 1, model, optimizer, scheduler, {"n": "replaced"})
    save_checkpoint(crash, 2, model, optimizer, scheduler, {"n": 2})
    out["final"] = _listing(crash)
    out["step1"] = load_checkpoint(crash, model, step=1)["extra_state"]
    out["missing_step"] = _error_text(load_checkpoint, crash, model, step=5)
    destroy_parallel()
    return out


@pytest.mark.slow
def test_errors_name_the_problem_and_a_crashed_save_leaves_latest_intact(saved, tmp_path):
    (out,) = run_distributed(errors_and_crash, 1, str(saved["full"]), str(saved["dp"]), str(tmp_path))
    assert "dp_reshardable" in out["dp_optimizer"] and "tensor_parallel=2" in out["dp_optimizer"]
    assert out["dp_model_only_step"] == K
    assert "CheckpointError" in out["shape"]
    assert "'embedding.word_embeddings.weight'" in out["shape"]
    assert "(64, 32) in the checkpoint but (64, 48) in the model" in out["shape"]
    assert "'decoder.layers.self_attention.q_layernorm.weight'" in out["missing"]
    assert "is not in the checkpoint" in out["missing"]
    assert "'decoder.layers.self_attention.q_layernorm.weight' has no counterpart" in out["unexpected"]
    assert "no optimizer state" in out["no_optimizer"]

    assert out["crash_raised"]
    assert out["after_crash"] == {
        "latest": 1, "entries": [".iter_0000002.incomplete", "iter_0000001", "latest"]
    }
    assert out["after_crash_load"] == {"n": 1}
    assert out["final"] == {"latest": 2, "entries": ["iter_0000001", "iter_0000002", "latest"]}
    assert out["step1"] == {"n": "replaced"}
    assert "FileNotFoundError" in out["missing_step"] and "steps present: [1, 2]" in out["missing_step"]


def test_missing_or_empty_directory_is_a_clear_error(tmp_path):
    from maspo_megatron.megatron.checkpoint import latest_checkpoint_step, load_checkpoint

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", torch.nn.Linear(1, 1))
    with pytest.raises(FileNotFoundError, match="tracker file 'latest' is missing"):
        load_checkpoint(tmp_path, torch.nn.Linear(1, 1))
    (tmp_path / ".iter_0000003.incomplete").mkdir()
    with pytest.raises(FileNotFoundError, match=r"unfinished saves: \.iter_0000003\.incomplete"):
        load_checkpoint(tmp_path, torch.nn.Linear(1, 1))
    assert latest_checkpoint_step(tmp_path) is None
    assert latest_checkpoint_step(tmp_path / "nope") is None


def test_bad_tracker_and_foreign_directory(tmp_path):
    from maspo_megatron.megatron.checkpoint import CheckpointError, latest_checkpoint_step, load_checkpoint

    (tmp_path / "latest").write_text("ten\n")
    with pytest.raises(ValueError, match="should hold a step number, found 'ten'"):
        latest_checkpoint_step(tmp_path)
    (tmp_path / "latest").write_text("10\n")
    (tmp_path / "iter_0000010").mkdir()
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        load_checkpoint(tmp_path, torch.nn.Linear(1, 1))


def test_save_rejects_bad_arguments_before_any_collective(tmp_path):
    from maspo_megatron.megatron.checkpoint import save_checkpoint

    model = torch.nn.Linear(1, 1)
    with pytest.raises(TypeError, match=r"extra_state\['cursor'\]\['seen'\] \(a set\)"):
        save_checkpoint(tmp_path, 1, model, None, extra_state={"cursor": {"seen": {1, 2}}})
    with pytest.raises(TypeError, match=r"extra_state key 3"):
        save_checkpoint(tmp_path, 1, model, None, extra_state={3: "x"})
    with pytest.raises(ValueError, match="non-negative int"):
        save_checkpoint(tmp_path, -1, model, None)
    with pytest.raises(ValueError, match="optimizer_sharding"):
        save_checkpoint(tmp_path, 1, model, None, optimizer_sharding="fully_sharded_model_space")
    assert list(tmp_path.iterdir()) == []
