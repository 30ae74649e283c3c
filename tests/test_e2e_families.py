"""Every supported dense family, synced from Megatron into a real SGLang server and proven.

One server per family (Llama untied, Llama tied, Qwen3 with QK-norm; Qwen2 with q/k/v biases is
test_e2e_megatron_sync's model): the proof after the sync compares the trainer's log-probs with
the server's, and a plain HF forward of the exported weights must agree with both.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from sglang_servers import hf_logprobs, make_family_model, sglang_manager

pytestmark = pytest.mark.slow

IDS = [3, 17, 9, 42, 5, 11, 30, 2, 57, 8]


def step_sync_prove(rank, world_size, model_dir, url):
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor, ActorConfig, OptimizerConfig, SequenceBatch
    from maspo_megatron.megatron.convert import export_hf, load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model
    from maspo_megatron.rollout.client import RolloutClient
    from maspo_megatron.rollout.weight_sync import ProofConfig, WeightSyncConfig
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel
    from maspo_megatron.weight_publisher import WeightProof, WeightPublisher

    parallel = ParallelConfig()
    initialize_parallel(parallel)
    chunks = build_model(model_dir, parallel, dtype=torch.float32, make_vocab_size_divisible_by=8)
    load_hf_checkpoint(chunks, model_dir)
    cfg = ActorConfig(optimizer=OptimizerConfig(lr=3e-2))
    actor = Actor(chunks, cfg, objective=Objective(cfg))
    ids = torch.tensor([IDS] * 2)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 4:] = True
    batch = SequenceBatch(input_ids=ids, lengths=torch.full((2,), ids.shape[1]), response_mask=mask,
                          advantages=torch.tensor([1.0, -1.0]))
    batch.old_logprobs, _ = actor.compute_logprobs(batch)
    actor.train_step(batch)
    publisher = WeightPublisher([url], WeightSyncConfig(bucket_bytes=16 << 10))
    publisher.publish(actor.model, version=1)
    proof = WeightProof(ProofConfig(), actor.spec.vocab_size, actor.dp_size, atol=1e-4)
    result = proof.check(actor, RolloutClient([url]), [url], 1)
    publisher.close()
    every = torch.ones_like(mask)
    every[:, 0] = False  # every token but the first, which nothing predicts
    trained, _ = actor.compute_logprobs(
        SequenceBatch(input_ids=ids, lengths=batch.lengths, response_mask=every), temperature=1.0)
    exported = {k: v.clone() for k, v in export_hf(actor.model)}
    destroy_parallel()
    return {"proof": result, "trained": trained[0, 1:], "exported": exported}


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen3"])
def test_family_synced_and_proven(tmp_path, family):
    model_dir = str(tmp_path / "model")
    model = make_family_model(model_dir, family)
    servers = sglang_manager(model_dir, 1, str(tmp_path))
    try:
        servers.start()
        (r0,) = run_distributed(step_sync_prove, 1, model_dir, servers.urls[0], timeout=300)
    finally:
        servers.stop()
    assert r0["proof"]["sync/proof_max_abs_diff"] < 1e-4
    # Independent check: HF transformers with the exported weights computes the same log-probs.
    model.load_state_dict(r0["exported"], strict=family != "llama_tied")
    torch.testing.assert_close(hf_logprobs(model, IDS), r0["trained"], atol=1e-4, rtol=0)
