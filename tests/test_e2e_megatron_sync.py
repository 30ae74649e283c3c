"""End to end: a Megatron model trains one MASPO step and syncs into two real SGLang servers.

The servers are the real SGLang 0.5.23 (its CPU engine) behind the real sglang-router. After the
step each server's log-probs for a fixed prompt + completion differ from the trainer's (stale
weights); after the sync they equal the trainer's recomputed log-probs within 1e-4, and the
per-sync proof (``WeightProof``: trainer vs server log-probs of a probe) passes. With PP=2 each
stage sends its own layers (no rank holds the whole model); with PP=2 x VPP=2 each stage sends
the layers of both its model chunks (layers 0, 2 and 1, 3). A sync that permutes one attention
layer's heads on the wire, or leaves one tensor stale, must stop with the proof's message.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from distributed import run_distributed
from maspo_megatron.rollout.servers import RouterManager
from sglang_servers import make_family_model, sglang_manager

pytestmark = pytest.mark.slow

PROMPT = [2, 7, 11, 3]
COMPLETION = [9, 14, 5, 20, 8]
PERMUTED = "model.layers.0.self_attn.q_proj.weight"
STALE = "model.layers.1.mlp.down_proj.weight"


def _server_logprobs(urls):
    from maspo_megatron.rollout.client import RolloutClient

    client = RolloutClient(urls)
    return [asyncio.run(client.score([PROMPT + COMPLETION], u))[0][len(PROMPT) - 1:] for u in urls]


def _corrupting(export, corrupt: str | None, heads: int):
    """Wraps the exporter to break the wire the way a conversion bug or a lost tensor would."""
    def wrapped(model, **kwargs):
        for name, t in export(model, **kwargs):
            if corrupt == "permute_heads" and name == PERMUTED:
                rows = t.shape[0] // heads
                t = t.reshape(heads, rows, -1).roll(1, dims=0).reshape(t.shape)
            if corrupt == "stale_tensor" and name == STALE:
                continue
            yield name, t
    return wrapped


def train_and_sync(rank, world_size, model_dir, server_urls, router_url, tp, pp,
                   mode="distributed", corrupt=None, disk_dir=None, vpp=None):
    import maspo_megatron.weight_publisher as wp
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor, ActorConfig, OptimizerConfig, SequenceBatch
    from maspo_megatron.megatron.convert import load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.rollout.backend import SamplingParams
    from maspo_megatron.rollout.client import RolloutClient, RolloutRequest
    from maspo_megatron.rollout.weight_sync import ProofConfig, WeightSyncConfig
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    initialize_parallel(parallel)
    chunks = build_model(model_dir, parallel, dtype=torch.float32, make_vocab_size_divisible_by=8)
    load_hf_checkpoint(chunks, model_dir)
    cfg = ActorConfig(optimizer=OptimizerConfig(lr=3e-2))
    actor = Actor(chunks, cfg, objective=Objective(cfg))
    ids = torch.tensor([PROMPT + COMPLETION] * 4)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, len(PROMPT):] = True
    batch = SequenceBatch(input_ids=ids, lengths=torch.full((4,), ids.shape[1]), response_mask=mask,
                          advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
    batch.old_logprobs, _ = actor.compute_logprobs(batch)
    actor.train_step(batch)
    trained, _ = actor.compute_logprobs(batch)
    trained = trained[0, len(PROMPT):]
    out = {}
    sync_cfg = WeightSyncConfig(mode=mode, bucket_bytes=16 << 10, disk_dir=disk_dir, timeout_s=120)
    if corrupt:
        wp.export_hf = _corrupting(wp.export_hf, corrupt, actor.spec.transformer_config.num_attention_heads)
    publisher = wp.WeightPublisher(server_urls, sync_cfg)
    proof = wp.WeightProof(ProofConfig(), actor.spec.vocab_size, actor.dp_size, atol=1e-4)
    client = RolloutClient(server_urls) if rank == 0 else None
    if rank == 0:
        out["before"] = _server_logprobs(server_urls)
    publisher.publish(actor.model, version=1)
    try:
        out["proof"] = proof.check(actor, client, server_urls, 1)
    except wp.WeightProofError as e:
        out["proof_error"] = str(e)
    if rank == 0:
        out["after"] = _server_logprobs(server_urls)
        # Generation through the router reports the new weight version.
        req = RolloutRequest(index=0, input_ids=tuple(PROMPT), sampling=SamplingParams(max_new_tokens=3))
        out["router_version"] = RolloutClient([router_url]).run([req])[0].weight_version
    publisher.close()
    out["trained"] = trained
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model_dir = str(root / "model")
    # Four layers: PP=2 x VPP=2 gives each virtual stage one.
    make_family_model(model_dir, "qwen2", vocab=40, layers=4)
    servers = sglang_manager(model_dir, 2, str(root))
    router = None
    try:
        servers.start()
        router = RouterManager(servers.urls, log_dir=str(root))
        router.start()
        yield {"model_dir": model_dir, "servers": servers, "router": router, "root": root}
    finally:
        if router is not None:
            router.stop()
        servers.stop()


@pytest.fixture
def fresh(cluster):
    """Servers back at the HF checkpoint (SGLang's own disk loader) before each test."""
    from maspo_megatron.rollout.sglang import BACKEND

    for url in cluster["servers"].urls:
        BACKEND.updater(url, http_timeout_s=120).update_from_disk(cluster["model_dir"], 120)
    return cluster


@pytest.mark.parametrize("tp, pp, vpp, mode", [(2, 1, None, "distributed"), (1, 2, None, "distributed"),
                                               (1, 2, 2, "distributed"), (2, 1, None, "disk")],
                         ids=["tp2", "pp2-one-sender-per-stage", "pp2-vpp2-every-chunk", "tp2-disk"])
def test_megatron_step_then_sync_to_two_real_servers_behind_router(fresh, tmp_path, tp, pp, vpp, mode):
    c = fresh
    results = run_distributed(train_and_sync, tp * pp, c["model_dir"], c["servers"].urls, c["router"].url,
                              tp, pp, mode, None, str(tmp_path / "sync"), vpp, timeout=400)
    r0 = results[0]
    trained = r0["trained"]
    torch.testing.assert_close(results[1]["trained"], trained, atol=1e-6, rtol=0)
    for before, after in zip(r0["before"], r0["after"]):
        before, after = torch.tensor(before), torch.tensor(after)
        assert (before - trained).abs().max() > 1e-2, "servers already had the trained weights?"
        torch.testing.assert_close(after, trained, atol=1e-4, rtol=0)
    assert "proof_error" not in r0, r0.get("proof_error")
    assert r0["proof"]["sync/proof_max_abs_diff"] < 1e-4
    assert str(r0["router_version"]) == "1"


@pytest.mark.parametrize("corrupt", ["permute_heads", "stale_tensor"])
def test_proof_stops_a_sync_that_is_wrong_on_the_wire(fresh, corrupt):
    c = fresh
    (r0,) = run_distributed(train_and_sync, 1, c["model_dir"], c["servers"].urls, c["router"].url,
                            1, 1, "distributed", corrupt, None, timeout=300)
    msg = r0.get("proof_error")
    assert msg is not None, f"{corrupt}: the proof passed a corrupted sync ({r0.get('proof')})"
    assert "weight sync v1" in msg and c["servers"].urls[0] in msg and "max |log-prob difference|" in msg, msg
