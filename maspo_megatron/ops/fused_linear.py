"""Output layer fused with vocab-parallel log-probs: the ``[tokens, V/tp]`` logits never exist whole.

For each chunk of tokens the chunk's logits ``hidden_c @ weight.T`` are formed, reduced to the
per-token statistics of :mod:`vocab_parallel`, and dropped. Backward recomputes each chunk's logits
and turns them directly into the chunk's gradients for ``hidden`` and ``weight``. Memory beyond the
inputs is O(chunk_tokens x V/tp) plus a ``weight``-sized fp32 gradient accumulator.

Tensor parallelism: ``hidden`` must be the full (non sequence-parallel) hidden states, identical on
every rank of ``tp_group`` — exactly what Megatron's ColumnParallelLinear output layer sees after
``copy_to_tensor_model_parallel_region``. Each rank's vocab shard only yields a partial gradient
for ``hidden``, so backward **all-reduces grad_hidden over tp_group** (the role of Megatron's
copy-to-TP-region). With sequence parallelism the caller gathers first, with a gather whose backward
does not sum again: ``gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)``
(its backward then only splits the already summed gradient). Using the default
``tensor_parallel_output_grad=True`` there would count the gradient ``tp`` times.

On CUDA each chunk's logits go through the fused Triton kernels of :mod:`vocab_parallel` (see
:func:`vocab_parallel.use_triton`); in backward the chunk's gradient then overwrites its logits in
place, in their dtype, instead of an extra fp32 ``[chunk, V/tp]`` tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .vocab_parallel import (
    ShardInfo, check_chunk_tokens, check_targets, check_temperature, chunk_grad_z, chunk_ranges,
    chunk_stats, combine_stats, compute_dtype, kernels, use_triton,
)


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, shard, temperature, entropy, chunk_tokens, triton):
        x = hidden.reshape(-1, hidden.shape[-1])
        local_t = targets.reshape(-1) - shard.start
        n = x.shape[0]
        stats = torch.empty(4, n, dtype=compute_dtype(hidden.dtype), device=hidden.device)
        for a, b in chunk_ranges(n, chunk_tokens):
            logits = x[a:b] @ weight.t()
            if triton:
                kernels().row_stats(logits, local_t[a:b], shard.n_valid, temperature, entropy,
                                    out=stats[:, a:b])
            else:
                stats[:, a:b] = chunk_stats(
                    logits, local_t[a:b], shard.n_valid, temperature, entropy)
            del logits
        m, log_s, w_over_s, zy = combine_stats(stats, shard.group, entropy)
        ctx.save_for_backward(hidden, weight, targets, m, log_s, w_over_s)
        ctx.shard, ctx.temperature, ctx.entropy, ctx.chunk_tokens, ctx.triton = (
            shard, temperature, entropy, chunk_tokens, triton)
        logp = (zy - m - log_s).view(targets.shape)
        if entropy:
            return logp, (log_s - w_over_s).view(targets.shape)
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_h=None):
        hidden, weight, targets, m, log_s, w_over_s = ctx.saved_tensors
        shard = ctx.shard
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x = hidden.reshape(-1, hidden.shape[-1])
        local_t = targets.reshape(-1) - shard.start
        g_lp = g_lp.reshape(-1).to(m.dtype)
        g_h = g_h.reshape(-1).to(m.dtype) if ctx.entropy else None
        nv = shard.n_valid
        w_valid = weight[:nv]
        grad_x = torch.zeros_like(x) if need_h else None
        # Accumulate over chunks in fp32 so that many bf16 partial products do not lose bits.
        grad_w = torch.zeros(weight.shape, dtype=compute_dtype(weight.dtype),
                             device=weight.device) if need_w else None
        if nv:
            for a, b in chunk_ranges(x.shape[0], ctx.chunk_tokens):
                logits = x[a:b] @ w_valid.t()
                args = (logits, local_t[a:b], nv, ctx.temperature, m[a:b], log_s[a:b],
                        w_over_s[a:b], g_lp[a:b], None if g_h is None else g_h[a:b])
                if ctx.triton:
                    g = kernels().logits_grad(*args, out=logits)
                else:
                    g = chunk_grad_z(*args).to(hidden.dtype)
                del logits, args
                if need_h:
                    grad_x[a:b] = g @ w_valid
                if need_w:
                    grad_w[:nv] += (g.t() @ x[a:b]).to(grad_w.dtype)
                del g
        if need_h and shard.group is not None:
            dist.all_reduce(grad_x, op=dist.ReduceOp.SUM, group=shard.group)
        return (
            grad_x.view_as(hidden) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            None, None, None, None, None, None,
        )


def fused_linear_vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    *,
    entropy: bool = True,
    temperature: float = 1.0,
    chunk_tokens: int | None = 1024,
    vocab_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and entropy of ``softmax((hidden @ weight.T) / temperature)`` without the logits.

    Args:
        hidden: full-sequence last hidden states ``[..., h]`` (replicated over ``tp_group``; see the
            module docstring for sequence parallelism). Its gradient is all-reduced over tp_group.
        weight: this rank's output-layer shard ``[Vp, h]`` (rows = global ids ``[r*Vp, (r+1)*Vp)``).
        targets: global token ids, shape ``hidden.shape[:-1]``.
        tp_group, entropy, temperature, vocab_size, backend: as in :func:`vocab_parallel_logprobs`.
        chunk_tokens: tokens per chunk; the transient logits are ``[chunk_tokens, Vp]``.

    Returns:
        ``(logprobs, entropy or None)`` in fp32 (float64 for float64 inputs), shape ``targets.shape``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = "
            f"{tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [Vp, {hidden.shape[-1]}] (this rank's output-layer shard), "
            f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    check_temperature(temperature)
    check_chunk_tokens(chunk_tokens)
    shard = ShardInfo.make(tp_group, weight.shape[0], vocab_size)
    check_targets(targets, shard.vocab_size)
    out = _FusedLinearLogprobs.apply(
        hidden, weight, targets, shard, float(temperature), entropy, chunk_tokens,
        use_triton(hidden, backend))
    if entropy:
        return out
    return out, None
