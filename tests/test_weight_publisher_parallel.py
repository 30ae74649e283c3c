"""Parallel weight sync at PP=2 into one real SGLang 0.5.23 server (its CPU engine).

Both pipeline stages export at once and their buckets reach the server interleaved (the server
receives one update call at a time, see ``rollout/weight_sync.py``): proven by the per-bucket
timelines the senders record, with the log-prob proof (trainer vs server) showing the weights
arrived whole. A sync in which one stage fails fails on every rank with that stage's error, and
the next sync into the same server is whole again.
"""

from __future__ import annotations

import pytest

from distributed import run_distributed
from sglang_servers import make_family_model, sglang_manager, step_sync_and_prove

pytestmark = pytest.mark.slow

BUCKET = 8 << 10  # ~5 buckets per stage of the tiny model


def _synced(rank, world_size, model_dir, url):
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel

    out = step_sync_and_prove(model_dir, url, ParallelConfig(pp=2), version=1, bucket_bytes=BUCKET)
    destroy_parallel()
    return {"proof": out["proof"], "timeline": out["sync_stats"].timeline}


def _failing_then_synced(rank, world_size, model_dir, url):
    import faulthandler

    import torch

    import maspo_megatron.weight_publisher as wp
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor, ActorConfig
    from maspo_megatron.megatron.convert import load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.rollout.backend import WeightSyncError
    from maspo_megatron.rollout.client import RolloutClient
    from maspo_megatron.rollout.weight_sync import ProofConfig, WeightSyncConfig
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    faulthandler.dump_traceback_later(300, exit=True)  # a hang shows its stacks
    parallel = ParallelConfig(pp=2)
    initialize_parallel(parallel)
    chunks = build_model(model_dir, parallel, dtype=torch.float32, make_vocab_size_divisible_by=8)
    load_hf_checkpoint(chunks, model_dir)
    cfg = ActorConfig()
    actor = Actor(chunks, cfg, objective=Objective(cfg))
    export = wp.export_hf

    def broken(model, **kw):
        # Wrong weights go out (so a sync that reported success would fail the proof), and
        # stage 1's export dies after some of its buckets went out.
        for i, (name, t) in enumerate(export(model, **kw)):
            if rank == 1 and i == 12:
                raise RuntimeError("stage 1 export broke on purpose")
            yield name, t * 1.5

    wp.export_hf = broken
    publisher = wp.WeightPublisher([url], WeightSyncConfig(bucket_bytes=BUCKET, timeout_s=120))
    try:
        publisher.publish(actor.model, version=7)
        error = None
    except WeightSyncError as e:
        error = str(e)
    finally:
        wp.export_hf = export
    # The server is left paused with partly wrong weights; the next sync must land whole.
    publisher.publish(actor.model, version=8)
    proof = wp.WeightProof(ProofConfig(), actor.spec.vocab_size, actor.dp_size, atol=1e-4)
    result = proof.check(actor, RolloutClient([url]), [url], 8)
    publisher.close()
    destroy_parallel()
    faulthandler.cancel_dump_traceback_later()
    return {"error": error, "proof": result}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("psync")
    model_dir = str(root / "model")
    make_family_model(model_dir, "qwen2", layers=4)
    servers = sglang_manager(model_dir, 1, str(root))
    try:
        servers.start()
        yield model_dir, servers.urls[0]
    finally:
        servers.stop()


def test_pp2_stages_export_at_once_and_interleave_their_buckets(server):
    model_dir, url = server
    results = run_distributed(_synced, 2, model_dir, url, timeout=400)
    assert results[0]["proof"]["sync/proof_max_abs_diff"] < 1e-4
    sends = {r: [e for e in results[r]["timeline"] if e[0] == "send"] for r in (0, 1)}
    prepares = {r: [e for e in results[r]["timeline"] if e[0] == "prepare"] for r in (0, 1)}
    assert all(len(sends[r]) >= 3 for r in (0, 1)), sends
    # One server receives one bucket at a time: the senders' sends never overlap...
    merged = sorted(sends[0] + sends[1], key=lambda e: e[2])
    for a, b in zip(merged, merged[1:]):
        assert a[3] <= b[2], f"two sends at once: {a} {b}"
    # ...but they alternate: stage 1 starts long before stage 0 has sent everything.
    assert sends[1][0][2] < sends[0][1][2], (sends[0][:2], sends[1][0])
    owners = [0 if e in sends[0] else 1 for e in merged]
    assert owners[:4] == [0, 1, 0, 1], owners
    for r in (0, 1):
        # Stage 1 prepared its first bucket while stage 0 was sending (not after it).
        assert prepares[r][0][3] <= sends[0][0][3], (r, prepares[r][0], sends[0][0])
        # Double buffering: bucket i+1 is being prepared before bucket i's send has ended.
        for (_, i, _, send_end), (_, _, prep_start, _) in zip(sends[r], prepares[r][1:]):
            assert prep_start < send_end, (r, i, prep_start, send_end)


def test_a_stage_that_fails_fails_every_rank_with_its_cause_and_the_next_sync_lands(server):
    model_dir, url = server
    results = run_distributed(_failing_then_synced, 2, model_dir, url, timeout=400)
    for r in (0, 1):
        assert results[r]["error"] is not None, f"rank {r} did not see the failed sync"
        assert "stage 1 export broke on purpose" in results[r]["error"], results[r]["error"]
    assert results[0]["proof"]["sync/proof_max_abs_diff"] < 1e-4
