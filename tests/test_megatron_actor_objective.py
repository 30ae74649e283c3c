"""The actor's objective through the real train step: metrics that do not depend on how the batch
is cut into micro-batches, and normalisers that do not count fully masked rows (DP=2)."""

from __future__ import annotations

import math

import pytest
import torch

from distributed import run_distributed

pytestmark = pytest.mark.slow

#: Keys that measure the run, not the objective.
TIMING = {"train_time_s", "tokens_per_s"}


def _actor(chunks, cfg):
    from maspo_megatron.algo.objective import Objective
    from maspo_megatron.megatron.actor import Actor

    return Actor(chunks, cfg, objective=Objective(cfg))


def _fresh_actor(model_dir, parallel, cfg):
    from maspo_megatron.megatron.convert import load_hf_checkpoint
    from maspo_megatron.megatron.model import build_model

    chunks = build_model(model_dir, parallel, dtype=torch.float32)
    load_hf_checkpoint(chunks, model_dir)
    return _actor(chunks, cfg)


def _off_policy(batch, logprobs, seed):
    """old/rollout/ref log-probs a noisy step away from the policy, so every gate and clip fires."""
    g = torch.Generator().manual_seed(seed)
    mask = batch.response_mask

    def noisy(scale):
        return torch.where(mask, logprobs + scale * torch.randn(logprobs.shape, generator=g), 0.0)

    batch.old_logprobs = noisy(0.6)
    batch.rollout_logprobs = noisy(0.6)
    batch.ref_logprobs = noisy(0.3)
    return batch


def split_metrics(rank, world_size, model_dir):
    from test_megatron_actor import make_batch

    from maspo_megatron.megatron.actor import ActorConfig, OptimizerConfig
    from maspo_megatron.runtime import ParallelConfig, destroy_parallel, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel)
    out = {}
    for loss in ("maspo", "gspo"):
        for budget in (4096, 24):
            cfg = ActorConfig(loss=loss, micro_batch_tokens=budget, kl_coef=0.1, entropy_coef=0.01,
                              tis_cap=1.5, optimizer=OptimizerConfig(lr=1e-4))
            actor = _fresh_actor(model_dir, parallel, cfg)
            batch = make_batch(n=12, seed=3)
            # A mix of signs, with zeros, so the per-sign and A != 0 metrics have their own counts.
            batch.advantages = torch.tensor([1.5, -0.7, 0.0, 2.0, -1.2, 0.4, -0.3, 0.0, 0.9, -2.0,
                                             1.1, -0.5])
            lp, _ = actor.compute_logprobs(batch)
            _off_policy(batch, lp, seed=5)
            micro = len(actor._micro_batches(batch, torch.arange(len(batch))))
            out[loss, budget] = (micro, actor.train_step(batch))
    destroy_parallel()
    return out


def test_metrics_do_not_depend_on_the_micro_batch_split(tmp_path):
    from test_megatron_actor import make_tiny_llama

    make_tiny_llama(tmp_path)
    (out,) = run_distributed(split_metrics, 1, str(tmp_path))
    for loss in ("maspo", "gspo"):
        (one, whole), (many, split) = out[loss, 4096], out[loss, 24]
        assert one == 1 and many >= 4, (one, many)
        assert whole.keys() == split.keys()
        for key in sorted(whole.keys() - TIMING):
            assert math.isclose(whole[key], split[key], rel_tol=1e-5, abs_tol=1e-6), \
                f"{loss}: {key} = {whole[key]:.6f} in one micro-batch, {split[key]:.6f} in {many}"
    maspo = out["maspo", 4096][1]
    for key in ("maspo/gated_frac_pos", "maspo/gated_frac_neg"):
        assert 0.0 < maspo[key] < 1.0, (key, maspo[key])  # the comparison is not between zeros
    assert out["gspo", 4096][1]["gspo/seq_ratio_mean"] > 0


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
