"""The actor's objective through the real train step: normalisers that do not count fully masked
rows (DP=2)."""

from __future__ import annotations

import math

import pytest
import torch

from distributed import run_distributed

pytestmark = pytest.mark.slow


def _actor(chunks, cfg):
    from maspo_megatron.megatron.actor import Actor

    return Actor(chunks, cfg)


def _fresh_actor(model_dir, parallel, cfg):
    from maspo_megatron.megatron.convert import load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model

    chunks = build_model(model_dir, parallel, dtype=torch.float32)
    load_hf_checkpoint(chunks, model_dir)
    return _actor(chunks, cfg)


def truncated_rows(rank, world_size, model_dir):
    from test_megatron_actor import make_batch

    from maspo_megatron.algo.aggregation import AggregationConfig
    from maspo_megatron.megatron.actor import ActorConfig, OptimizerConfig, SequenceBatch
    from maspo_megatron.megatron.convert import export_hf
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig()  # every process a data-parallel rank: DP = world size
    initialize_parallel(parallel)
    full = make_batch(n=8, seed=4)
    truncated = torch.tensor([1, 6])
    full.response_mask[truncated] = False  # mask_truncated: the loss on these rows is dropped
    keep = torch.tensor([i for i in range(8) if i not in truncated.tolist()])
    kept = SequenceBatch(input_ids=full.input_ids[keep], lengths=full.lengths[keep],
                         response_mask=full.response_mask[keep], advantages=full.advantages[keep])
    out = {}
    for mode, normalizer in (("seq_mean_token_mean", None), ("seq_mean_token_sum_norm", 9.0)):
        for name, batch in (("full", full), ("kept", kept)):
            cfg = ActorConfig(aggregation=AggregationConfig(mode=mode, normalizer=normalizer),
                              optimizer=OptimizerConfig(lr=1e-3))
            actor = _fresh_actor(model_dir, parallel, cfg)
            batch.old_logprobs, _ = actor.compute_logprobs(batch)
            metrics = actor.train_step(batch)
            params = {k: v.detach().clone() for k, v in export_hf(actor.model)}
            out[mode, name] = (metrics, params)
    destroy_parallel()
    return out


def test_fully_masked_rows_do_not_count_in_the_sequence_normaliser_dp2(tmp_path):
    from test_megatron_actor import make_tiny_llama

    make_tiny_llama(tmp_path)
    results = run_distributed(truncated_rows, 2, str(tmp_path))
    for mode in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        for out in results:
            (full, full_params), (kept, kept_params) = out[mode, "full"], out[mode, "kept"]
            assert abs(full["loss"]) > 1e-3
            assert math.isclose(full["loss"], kept["loss"], rel_tol=1e-5), \
                f"{mode}: loss {full['loss']:.6f} with the truncated rows, {kept['loss']:.6f} without"
            assert math.isclose(full["grad_norm"], kept["grad_norm"], rel_tol=1e-4), mode
            for name, tensor in kept_params.items():
                torch.testing.assert_close(full_params[name], tensor, atol=1e-6, rtol=0, msg=name)
