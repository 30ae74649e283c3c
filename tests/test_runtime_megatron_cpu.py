"""megatron-core's real training path on CPU: TP=2 x PP=2 equals TP=1 x PP=1.

A tiny GPTModel (local spec) runs forward, backward and one optimizer step with gradient clipping
through megatron-core's pipeline schedule, Megatron DDP and the distributed optimizer. Both
layouts start from the same weights (generated per *global* tensor name from megatron's own
sharded state dict, then sliced to each rank's shard), so loss and updated parameters must agree.
"""

from __future__ import annotations

import hashlib
from functools import partial

import pytest
import torch

from distributed import run_distributed

VOCAB, SEQ, MBS, NUM_MB, LAYERS, HIDDEN, HEADS = 64, 8, 2, 2, 4, 32, 4


def _full_tensor(key: str, shape) -> torch.Tensor:
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 0.2


def _local_view(sharded) -> tuple[slice, ...]:
    """Index of this rank's shard inside the global tensor (prepended layer axes included)."""
    local_shape = (1,) * sharded.prepend_axis_num + tuple(sharded.local_shape)
    return tuple(slice(o, o + n) for o, n in zip(sharded.global_offset, local_shape))


def _sharded_tensors(model):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for key, sh in model.sharded_state_dict().items():
        if isinstance(sh, ShardedTensor) and not key.endswith("_extra_state"):
            yield sh


def _build(tp: int, pp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from maspo_megatron.runtime import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(tp=tp, pp=pp))
    from megatron.core import parallel_state as ps

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=4 * HIDDEN,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, use_cpu_initialization=True, bias_activation_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
        max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )
    with torch.no_grad():
        for sh in _sharded_tensors(model):
            full = _full_tensor(sh.key, sh.global_shape)
            sh.data.copy_(full[_local_view(sh)].reshape(sh.data.shape))
    return model, config


def _batches():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (NUM_MB, MBS, SEQ + 1), generator=g)
    return [
        {"tokens": t[:, :-1], "labels": t[:, 1:], "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}
        for t in tokens
    ]


def _loss_func(num_tokens_total, output):
    loss = output.float().sum() / num_tokens_total
    return loss, {"loss": loss.detach()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, NUM_MB * MBS * SEQ)


def train_one_step(rank, world_size, tp, pp):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from maspo_megatron.runtime import destroy_parallel

    model, config = _build(tp, pp)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(
        # Adam divides by sqrt(v): a gradient element near zero turns fp32 summation-order noise
        # (TP splits the reductions) into an O(lr) difference, so lr bounds the comparison.
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.05, use_distributed_optimizer=True,
                        bf16=False, params_dtype=torch.float32),
        [model],
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(_batches()), model=[model],
        num_microbatches=NUM_MB, seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    assert ok
    params = {}
    for sh in _sharded_tensors(model.module):
        params[(sh.key, tuple(sh.global_offset))] = (
            tuple(sh.global_shape), _local_view(sh), sh.data.detach().clone()
        )
    loss = sum(float(x["loss"]) for x in losses) if losses else None
    destroy_parallel()
    return {"loss": loss, "grad_norm": float(grad_norm), "params": params}


@pytest.mark.slow
def test_tp2_pp2_step_matches_single_rank():
    (ref,) = run_distributed(train_one_step, 1, 1, 1)
    results = run_distributed(train_one_step, 4, 2, 2)

    # Clipping must actually bind for the test to cover it.
    assert ref["grad_norm"] > 0.05
    last_stage_losses = [r["loss"] for r in results if r["loss"] is not None]
    assert len(last_stage_losses) == 2  # the two TP ranks of the last stage
    for loss in last_stage_losses:
        assert abs(loss - ref["loss"]) < 1e-5
    for r in results:
        assert abs(r["grad_norm"] - ref["grad_norm"]) < 1e-5

    full = {}
    for (key, _), (shape, view, shard) in ref["params"].items():
        target = full.setdefault(key, torch.full(shape, float("nan")))
        target[view] = shard.reshape(target[view].shape)
    assert not any(t.isnan().any() for t in full.values())
    checked = 0
    for r in results:
        for (key, _), (_, view, shard) in r["params"].items():
            expected = full[key][view].reshape(shard.shape)
            torch.testing.assert_close(shard, expected, atol=1e-5, rtol=0)
            checked += 1
    assert checked >= len(ref["params"])
