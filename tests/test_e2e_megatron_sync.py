"""End to end: a Megatron model (TP=2, or PP=2) trains one MASPO step and syncs to two CPU servers.

The servers (CPU implementation of SGLang's protocol) sit behind the real sglang-router. After
the step, each server's log-probs for a fixed prompt + completion differ from the trainer's
(stale weights); after the sync they equal the trainer's recomputed log-probs within 1e-4. With
PP=2 each stage sends its own layers (no rank holds the whole model).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from distributed import run_distributed
from maspo_megatron.rollout.servers import RouterManager, ServerManager, cpu_server_command

pytestmark = pytest.mark.slow

PROMPT = [2, 7, 11, 3]
COMPLETION = [9, 14, 5, 20, 8]


def _make_model(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(path)


def _server_logprobs(urls):
    from maspo_megatron.rollout.client import RolloutClient

    client = RolloutClient(urls)
    return [asyncio.run(client.score(PROMPT, COMPLETION, url=u)) for u in urls]


def train_and_sync(rank, world_size, model_dir, server_urls, router_url, tp, pp, mode="distributed"):
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor, ActorConfig, OptimizerConfig, SequenceBatch
    from maspo_megatron.megatron.convert import load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.rollout.client import RolloutClient, RolloutRequest
    from maspo_megatron.rollout.protocol import SamplingParams
    from maspo_megatron.rollout.weight_sync import WeightSyncConfig
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel
    from maspo_megatron.weight_publisher import WeightPublisher

    parallel = ParallelConfig(tp=tp, pp=pp)
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
    publisher = WeightPublisher(server_urls, WeightSyncConfig(mode=mode, bucket_bytes=16 << 10))
    if rank == 0:
        out["before"] = _server_logprobs(server_urls)
    publisher.release_rollout_memory()
    publisher.publish(actor.model, version=1)
    if rank == 0:
        out["after"] = _server_logprobs(server_urls)
        # Generation through the router reports the new weight version.
        req = RolloutRequest(index=0, input_ids=tuple(PROMPT),
                             sampling=SamplingParams(max_new_tokens=3, sampling_seed=1))
        out["router_version"] = RolloutClient([router_url]).run([req])[0].weight_version
    publisher.close()
    out["trained"] = trained
    destroy_parallel()
    return out


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2-one-sender-per-stage"])
def test_megatron_step_then_sync_to_two_servers_behind_router(tmp_path, tp, pp):
    model_dir = str(tmp_path / "model")
    _make_model(model_dir)
    servers = ServerManager(lambda port: cpu_server_command(model_dir, port), 2, startup_timeout_s=120,
                            log_dir=str(tmp_path))
    router = None
    try:
        servers.start()
        router = RouterManager(servers.urls, log_dir=str(tmp_path))
        router.start()
        results = run_distributed(train_and_sync, tp * pp, model_dir, servers.urls, router.url, tp, pp,
                                  timeout=300)
    finally:
        if router is not None:
            router.stop()
        servers.stop()
    r0 = results[0]
    trained = r0["trained"]
    torch.testing.assert_close(results[1]["trained"], trained, atol=1e-6, rtol=0)
    for before, after in zip(r0["before"], r0["after"]):
        before, after = torch.tensor(before), torch.tensor(after)
        assert (before - trained).abs().max() > 1e-2, "servers already had the trained weights?"
        torch.testing.assert_close(after, trained, atol=1e-4, rtol=0)
    assert str(r0["router_version"]) == "1"


@pytest.mark.gpu
def test_megatron_on_gpu_colocated_cuda_ipc_sync(tmp_path):
    """Megatron on cuda:0 hands its weights to a server on the same GPU through CUDA-IPC,
    releasing and resuming the server's memory around the step (colocated mode)."""
    model_dir = str(tmp_path / "model")
    _make_model(model_dir)
    servers = ServerManager(lambda port: cpu_server_command(model_dir, port, extra_args=["--device", "cuda"]),
                            1, startup_timeout_s=120, log_dir=str(tmp_path))
    try:
        servers.start()
        # Generation straight to the server: the router is not part of the GPU image.
        (r0,) = run_distributed(train_and_sync, 1, model_dir, servers.urls, servers.urls[0], 1, 1,
                                "colocated", timeout=300)
    finally:
        servers.stop()
    trained = r0["trained"]
    (before,), (after,) = r0["before"], r0["after"]
    assert (torch.tensor(before) - trained).abs().max() > 1e-2
    # The trainer computes in fp32 here; the server's HF model too, on the same GPU.
    torch.testing.assert_close(torch.tensor(after), trained, atol=1e-4, rtol=0)
    assert str(r0["router_version"]) == "1"
