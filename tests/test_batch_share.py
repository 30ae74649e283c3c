"""Each data-parallel rank receives only its share of the batch, packed, and trains as one rank
on the whole batch does.

At DP=2 (2 gloo ranks, a tiny Llama in fp32) rank 0 sends the shares (``send_shares``); the
bytes each rank received are checked against the packed size of its rows computed here from
the batch, and the log-probs, losses, grad norms, reduced metrics and updated weights against a
DP=1 run on the whole batch (the reference: no share, no dealing across ranks).
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from test_megatron_actor import make_batch, make_tiny_llama

STEPS = 2


def rl_batch():
    batch = make_batch(n=8, max_len=12)
    g = torch.Generator().manual_seed(1)
    batch.rollout_logprobs = torch.where(batch.response_mask, -torch.rand(batch.input_ids.shape, generator=g), 0.0)
    return batch


def test_packed_rows_carry_only_real_tokens_in_int32_and_unpack_to_those_rows():
    import dataclasses

    from maspo_megatron.megatron.actor import SequenceBatch
    from maspo_megatron.megatron.batch_share import pack_rows, unpack_rows

    batch = rl_batch()
    rows, mini_batch = torch.tensor([5, 0, 3]), torch.tensor([0, 0, 1])
    packed = pack_rows(batch, rows, mini_batch)
    tokens = int(batch.lengths[rows].sum())
    assert packed["input_ids"].dtype == torch.int32 and packed["input_ids"].shape == (tokens,)
    assert torch.equal(packed["input_ids"][: batch.lengths[5]], batch.input_ids[5, : batch.lengths[5]].int())
    assert packed["rollout_logprobs"].shape == packed["response_mask"].shape == (tokens,)
    assert packed["advantages"].shape == packed["lengths"].shape == (3,)
    per_token = ["input_ids", "response_mask", "rollout_logprobs"]
    dtypes = {f.name: getattr(batch, f.name).dtype for f in dataclasses.fields(SequenceBatch)
              if getattr(batch, f.name) is not None} | {"mini_batch": torch.long}
    share = unpack_rows(packed, per_token, dtypes)
    width = int(batch.lengths[rows].max())
    expected = batch.select(rows, width)
    assert torch.equal(share.mini_batch, mini_batch)
    assert torch.equal(share.batch.lengths, batch.lengths[rows])
    for name in ("response_mask", "advantages", "rollout_logprobs"):
        assert torch.equal(getattr(share.batch, name), expected[name]), name
    valid = torch.arange(width)[None] < batch.lengths[rows][:, None]
    assert torch.equal(share.batch.input_ids[valid], expected["input_ids"][valid])
    assert (share.batch.input_ids[~valid] == 0).all()  # padding of the share's own, not the batch's


def run(rank, world_size, model_dir):
    from maspo_megatron.algo.metrics import mean_metric, metric_values
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor, ActorConfig, OptimizerConfig
    from maspo_megatron.megatron.batch_share import reduce_over_dp, send_shares
    from maspo_megatron.megatron.convert import export_hf, load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel)
    chunks = build_model(model_dir, parallel, dtype=torch.float32)
    load_hf_checkpoint(chunks, model_dir)
    cfg = ActorConfig(loss="maspo", num_mini_batches=2, micro_batch_tokens=30, tis_cap=2.0,
                      optimizer=OptimizerConfig(lr=1e-4))
    actor = Actor(chunks, cfg, objective=Objective(cfg), temperature=0.9)
    out = {"metrics": []}
    if world_size == 1:  # the reference: the whole batch on one rank
        batch = rl_batch()
        batch.old_logprobs, entropy = actor.compute_logprobs(batch, entropy=True)
        out["old_logprobs"] = batch.old_logprobs
        out["reduced"] = metric_values({"entropy": mean_metric(entropy, batch.response_mask),
                                        "gap": mean_metric((batch.old_logprobs - batch.rollout_logprobs).abs(),
                                                           batch.response_mask)})
        train_on = batch
    else:
        batch = rl_batch() if rank == 0 else None
        deal = actor.deal(batch.lengths) if rank == 0 else None
        share, out["recv_bytes"] = send_shares(batch, deal)
        part = share.batch
        out["rows"] = actor.deal(rl_batch().lengths)[actor.dp_rank][0]  # only to check the share
        out["share"] = part
        part.old_logprobs, entropy = actor.compute_logprobs(share, entropy=True)
        out["old_logprobs"] = part.old_logprobs
        out["reduced"] = reduce_over_dp({"entropy": mean_metric(entropy, part.response_mask),
                                         "gap": mean_metric((part.old_logprobs - part.rollout_logprobs).abs(),
                                                            part.response_mask)})
        train_on = share
    for _ in range(STEPS):
        out["metrics"].append(actor.train_step(train_on))
    out["params"] = {k: v.detach().clone() for k, v in export_hf(actor.model)}
    destroy_parallel()
    return out


def test_dp2_ranks_receive_only_their_packed_share_and_train_as_one_rank(tmp_path):
    make_tiny_llama(tmp_path)
    (ref,) = run_distributed(run, 1, str(tmp_path))
    results = run_distributed(run, 2, str(tmp_path))
    batch = rl_batch()
    padded = sum(t.numel() * t.element_size() for t in (
        batch.input_ids, batch.lengths, batch.response_mask, batch.advantages, batch.rollout_logprobs))

    rows = [r["rows"] for r in results]
    assert sorted(torch.cat(rows).tolist()) == list(range(len(batch)))  # every row on exactly one rank
    for rank, (r, mine) in enumerate(zip(results, rows)):
        share = r["share"]
        tokens = int(batch.lengths[mine].sum())
        # The share is exactly its rows: ids, masks, advantages, rollout log-probs.
        width = share.input_ids.shape[1]
        assert width == int(batch.lengths[mine].max())
        assert torch.equal(share.lengths, batch.lengths[mine])
        assert share.input_ids.dtype == torch.long
        valid = torch.arange(width)[None] < share.lengths[:, None]
        assert torch.equal(share.input_ids[valid], batch.input_ids[mine, :width][valid])
        assert torch.equal(share.response_mask, batch.response_mask[mine, :width])
        assert torch.equal(share.advantages, batch.advantages[mine])
        assert torch.equal(share.rollout_logprobs, batch.rollout_logprobs[mine, :width])
        # Bytes on the wire: int32 ids + bool mask + f32 rollout log-probs per real token;
        # int32 length + f32 advantage + int32 mini-batch per row. Rank 0 keeps its own share.
        packed = tokens * (4 + 1 + 4) + len(mine) * (4 + 4 + 4)
        assert r["recv_bytes"] == (0 if rank == 0 else packed), (rank, r["recv_bytes"], packed)
        assert packed < padded / 2, (packed, padded)
        torch.testing.assert_close(r["old_logprobs"], ref["old_logprobs"][mine, :width], atol=1e-6, rtol=0)
        for key, value in ref["reduced"].items():
            assert abs(r["reduced"][key] - value) < 1e-6, (key, r["reduced"][key], value)
        for mine_m, theirs in zip(r["metrics"], ref["metrics"]):
            for key in ("loss", "grad_norm", "response_tokens"):
                assert abs(mine_m[key] - theirs[key]) < 1e-6, (key, mine_m[key], theirs[key])
        for name, tensor in ref["params"].items():
            torch.testing.assert_close(r["params"][name], tensor, atol=1e-6, rtol=0, msg=name)
    # The steps changed the weights (not a comparison of two untouched copies).
    from safetensors.torch import load_file

    initial = load_file(str(tmp_path / "model.safetensors"))
    assert any((initial[k] - v).abs().max() > 1e-5 for k, v in ref["params"].items())


def shares_dp2_tp2(rank, world_size):
    from megatron.core import parallel_state as ps

    from maspo_megatron.megatron.actor import deal_batch
    from maspo_megatron.megatron.batch_share import send_shares
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig(tp=2))
    batch = rl_batch() if rank == 0 else None
    share, received = send_shares(batch, deal_batch(batch.lengths, 2, 2) if rank == 0 else None)
    out = {"dp_rank": ps.get_data_parallel_rank(), "share": share, "received": received}
    destroy_parallel()
    return out


def test_model_parallel_ranks_of_a_dp_index_get_the_same_share_dp2_tp2():
    """4 ranks, TP=2 x DP=2: rank 0 sends DP index 1's rows to that group's first rank, which
    broadcasts them to its TP peer; rank 0's TP peer gets DP index 0's rows by broadcast."""
    from maspo_megatron.megatron.actor import deal_batch

    results = run_distributed(shares_dp2_tp2, 4)
    batch = rl_batch()
    dealt = deal_batch(batch.lengths, 2, 2)
    for rank, r in enumerate(results):
        rows, mini_batch = dealt[r["dp_rank"]]
        share = r["share"]
        assert torch.equal(share.batch.lengths, batch.lengths[rows]) and torch.equal(share.mini_batch, mini_batch)
        width = share.batch.input_ids.shape[1]
        assert torch.equal(share.batch.rollout_logprobs, batch.rollout_logprobs[rows, :width])
        packed = int(batch.lengths[rows].sum()) * (4 + 1 + 4) + len(rows) * (4 + 4 + 4)
        assert r["received"] == (0 if rank == 0 else packed), (rank, r["received"], packed)
    assert [r["dp_rank"] for r in results] == [0, 0, 1, 1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_dp2_training_run_reports_each_rank_receiving_only_its_share(tmp_path):
    """The real loop at DP=2 (2 torchrun ranks, tiny_cpu at TP=1, a real CPU SGLang server)."""
    import json
    import subprocess
    import sys

    from maspo_megatron.demo import prepare_assets
    from test_trainer_resume import kill_orphans

    paths = prepare_assets(str(tmp_path))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "maspo_megatron.cli", "train", "--recipe", "tiny_cpu", "--nproc-per-node", "2",
           f"model.path={paths['model']}", f"data.train_path={paths['train']}", f"output_dir={run_dir}",
           "parallel.tp=1", "steps=2", "prompts_per_step=4", "rollout.n_samples=4", "eval_every=0",
           "tensorboard=false", "algorithm.dynamic_sampling=false"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    finally:
        kill_orphans(paths["model"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        # Rank 1 received its half of the rows, packed: under half of what the old broadcast
        # sent every rank (the whole padded batch, int64 ids), and not nothing.
        assert 0 < m["batch/recv_bytes_max"] < m["batch/padded_bytes"] / 2, m
        assert "mismatch/logprob_abs_diff" in m and "actor/entropy_old" in m and "actor/loss" in m
