"""A tiny megatron-core GPTModel (local spec) for multi-process CPU tests.

Weights are a pure function of each tensor's *global* name (drawn from megatron's own sharded
state dict, then sliced to the rank's shard), so every TP/PP layout starts from the same model.
Call the builders from inside a ``run_distributed`` worker.
"""

from __future__ import annotations

import hashlib
from functools import partial

import torch

VOCAB, SEQ, MBS, NUM_MB, LAYERS, HIDDEN, HEADS = 64, 8, 2, 2, 4, 32, 4


def full_tensor(key: str, shape) -> torch.Tensor:
    """The deterministic global value of the tensor named ``key``."""
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 0.2


def local_view(sharded) -> tuple[slice, ...]:
    """Index of this rank's shard inside the global tensor (prepended layer axes included)."""
    local_shape = (1,) * sharded.prepend_axis_num + tuple(sharded.local_shape)
    return tuple(slice(o, o + n) for o, n in zip(sharded.global_offset, local_shape))


def sharded_tensors(model):
    """The model's ShardedTensors (parameters), without TE/extra-state entries."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for key, sh in model.sharded_state_dict().items():
        if isinstance(sh, ShardedTensor) and not key.endswith("_extra_state"):
            yield sh


def build_model(
    tp: int, pp: int, *, num_layers: int = LAYERS, hidden: int = HIDDEN, qk_layernorm: bool = False,
    initialize: bool = True,
):
    """Initialises the parallel state for ``tp`` x ``pp`` and builds the tiny model.

    ``initialize=False`` builds another model in an already initialised process. Returns
    ``(model, config)``; the weights come from ``full_tensor`` (layout-independent).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from maspo_megatron.runtime import ParallelConfig, initialize_parallel

    if initialize:
        initialize_parallel(ParallelConfig(tp=tp, pp=pp))
    from megatron.core import parallel_state as ps

    config = TransformerConfig(
        num_layers=num_layers, hidden_size=hidden, num_attention_heads=HEADS,
        ffn_hidden_size=4 * hidden, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, qk_layernorm=qk_layernorm,
    )
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=qk_layernorm),
        vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
    )
    with torch.no_grad():
        for sh in sharded_tensors(model):
            full = full_tensor(sh.key, sh.global_shape)
            sh.data.copy_(full[local_view(sh)].reshape(sh.data.shape))
    return model, config


def wrap_ddp_and_optimizer(model, config, *, lr: float = 1e-3, clip_grad: float = 0.05, **optimizer_config):
    """Megatron DDP + the distributed Adam optimizer, wired into ``config`` for the schedules.

    ``optimizer_config``: further ``OptimizerConfig`` fields (e.g. ``min_lr`` for a scheduler).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, clip_grad=clip_grad,
                        use_distributed_optimizer=True, bf16=False, params_dtype=torch.float32,
                        **optimizer_config),
        [model],
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer


def batches(seed: int = 0):
    """``NUM_MB`` micro-batches of random tokens with next-token labels."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (NUM_MB, MBS, SEQ + 1), generator=g)
    return [
        {"tokens": t[:, :-1], "labels": t[:, 1:], "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}
        for t in tokens
    ]


def _loss_func(num_tokens_total, output):
    loss = output.float().sum() / num_tokens_total
    return loss, {"loss": loss.detach()}


def forward_step(data_iterator, model):
    """Megatron forward-step function: mean next-token cross-entropy over the whole batch."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, NUM_MB * MBS * SEQ)


def train_step(model, optimizer, data) -> tuple[float | None, float]:
    """One optimizer step over ``data``; returns (loss on the last stage else None, grad norm)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(data), model=[model],
        num_microbatches=len(data), seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step was skipped"
    loss = sum(float(x["loss"]) for x in losses) if losses else None
    return loss, float(grad_norm)


def gather_params(model) -> dict:
    """This rank's parameter shards keyed by (global name, global offset) with their views."""
    return {
        (sh.key, tuple(sh.global_offset)): (tuple(sh.global_shape), local_view(sh), sh.data.detach().clone())
        for sh in sharded_tensors(model)
    }


def assemble(per_rank_params) -> dict[str, torch.Tensor]:
    """Full tensors from the ``gather_params`` results of every rank of one layout."""
    full = {}
    for params in per_rank_params:
        for (key, _), (shape, view, shard) in params.items():
            target = full.setdefault(key, torch.full(shape, float("nan")))
            target[view] = shard.reshape(target[view].shape)
    assert not any(t.isnan().any() for t in full.values()), "some shard was never gathered"
    return full
