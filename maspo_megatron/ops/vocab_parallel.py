"""Vocab-parallel per-token log-probs and entropy without gathering the logits.

Each tensor-parallel rank holds a contiguous shard of the vocabulary (Megatron's split: rank r of
``tp`` owns global ids ``[r * Vp, (r + 1) * Vp)`` with ``Vp = V_padded / tp``). With
``z = logits / temperature`` over the true vocabulary (ids ``>= vocab_size`` are padding and are
ignored) we compute, per token,

    logp = z_y - logZ,    logZ = m + log s,   s = sum_j exp(z_j - m),   m = max_j z_j
    H    = logZ - sum_j p_j z_j = log s - w / s,   w = sum_j exp(z_j - m) (z_j - m)

Only per-token scalars cross the TP group, in exactly two all-reduces per call: MAX over the
stacked ``[local max, local target logit]`` (a rank that does not own the target contributes
``-inf``), then SUM over ``[s, w]`` after rescaling each rank's partial sums from its own max to the
global one. The forward therefore reads each chunk of logits once (max and exp-sum of the chunk
use the same local max) and the number of collectives does not grow with the number of chunks.

Backward recomputes the softmax from the saved input shard (kept in its own dtype; no fp32 copy)
and the per-token statistics ``(m, log s, w / s)``:

    dlogp/dz_j = [j == y] - p_j,      dH/dz_j = -p_j (z_j - E),   E = sum_k p_k z_k = m + w / s
    dL/dlogits = (g_lp [j == y] - p_j (g_lp + g_H (z_j - E))) / temperature

Everything is computed in fp32 whatever the input dtype (float64 inputs stay float64, for
gradcheck); outputs are in that compute dtype. With ``chunk_tokens``
forward and backward process that many tokens at a time, so the transient memory is
O(chunk_tokens x Vp) fp32 instead of O(tokens x Vp).

On CUDA the two per-chunk loops run as fused Triton kernels (:mod:`triton_kernels`: one read of
the logits in forward, one read + one write of the gradient in backward, no fp32 temporaries, so
``chunk_tokens`` has nothing left to bound and is ignored there). The PyTorch functions below are
the reference and the CPU path; ``backend=`` or ``$MASPO_LOGPROB_BACKEND`` picks one explicitly.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class ShardInfo:
    """Where this rank's vocab shard sits in the global vocabulary."""

    group: dist.ProcessGroup | None  # None when there is nothing to communicate
    start: int  # global id of local column 0
    n_valid: int  # leading local columns that are real tokens (the rest is vocab padding)
    vocab_size: int  # true global vocab size

    @staticmethod
    def make(tp_group, shard_size: int, vocab_size: int | None) -> "ShardInfo":
        tp_size, tp_rank = 1, 0
        if tp_group is not None and dist.is_available() and dist.is_initialized():
            tp_size = dist.get_world_size(tp_group)
            tp_rank = dist.get_rank(tp_group)
        elif tp_group is not None:
            raise ValueError("tp_group was given but torch.distributed is not initialized")
        padded = shard_size * tp_size
        if vocab_size is None:
            vocab_size = padded
        if not 0 < vocab_size <= padded:
            raise ValueError(
                f"vocab_size={vocab_size} must be in (0, {padded}] (= shard size {shard_size} x "
                f"TP size {tp_size})"
            )
        start = tp_rank * shard_size
        n_valid = max(0, min(shard_size, vocab_size - start))
        return ShardInfo(tp_group if tp_size > 1 else None, start, n_valid, vocab_size)


BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "MASPO_LOGPROB_BACKEND"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
_KERNELS = None  # the triton_kernels module, imported on first use


def kernels():
    """The Triton kernel module (imported lazily: CPU-only runs never import triton)."""
    global _KERNELS
    if _KERNELS is None:
        from . import triton_kernels

        _KERNELS = triton_kernels
    return _KERNELS


def use_triton(x: torch.Tensor, backend: str | None) -> bool:
    """Whether the fused Triton kernels handle logits like ``x``.

    ``backend`` None means ``$MASPO_LOGPROB_BACKEND`` or ``"auto"``: Triton for fp32/bf16/fp16
    CUDA tensors when triton is installed, else PyTorch. ``"triton"`` forces the kernels (they raise
    on what they cannot run, e.g. float64); ``"torch"`` forces the reference path. Errors inside
    a selected Triton path propagate: there is no silent fallback.
    """
    source = "backend"
    if backend is None:
        backend, source = os.environ.get(BACKEND_ENV, "auto"), f"${BACKEND_ENV}"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return (HAVE_TRITON and x.is_cuda
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16))
    return backend == "triton"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower inputs; float64 inputs (gradcheck) keep float64."""
    return torch.promote_types(dtype, torch.float32)


def check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64/int32 token ids, got {targets.dtype}")
    if targets.numel() and bool(((targets < 0) | (targets >= vocab_size)).any()):
        bad = targets[(targets < 0) | (targets >= vocab_size)]
        raise ValueError(
            f"targets must be token ids in [0, {vocab_size}); got {bad.numel()} out of range "
            f"(e.g. {bad[:5].tolist()})"
        )


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def chunk_stats(
    x: torch.Tensor, local_targets: torch.Tensor, n_valid: int, temperature: float, entropy: bool
) -> torch.Tensor:
    """Per-token local statistics of one chunk ``x [c, Vp]`` (any float dtype).

    Returns fp32 ``[4, c]``: local max of z, sum exp(z - max), sum exp(z - max)(z - max) (zeros
    unless ``entropy``), and the target's z (``-inf`` where this rank does not own the target).
    """
    c = x.shape[0]
    acc = compute_dtype(x.dtype)
    out = torch.empty(4, c, dtype=acc, device=x.device)
    owned = (local_targets >= 0) & (local_targets < n_valid)
    picked = x.gather(1, local_targets.clamp(0, max(n_valid - 1, 0)).unsqueeze(1)).squeeze(1)
    out[3] = torch.where(owned, picked.to(acc) / temperature, float("-inf"))
    if n_valid == 0:  # this rank's shard is all vocab padding
        out[0] = float("-inf")
        out[1:3] = 0.0
        return out
    z = x[:, :n_valid].to(acc, copy=True)
    z.div_(temperature)
    m = z.amax(dim=1)
    out[0] = m
    z.sub_(m.unsqueeze(1))
    e = torch.exp(z)
    out[1] = e.sum(dim=1)
    if entropy:
        out[2] = e.mul_(z).sum(dim=1)
    else:
        out[2] = 0.0
    return out


def combine_stats(stats: torch.Tensor, group, entropy: bool) -> tuple[torch.Tensor, ...]:
    """Turns per-rank ``[4, N]`` stats into global ``(m, log s, w/s, target z)`` (2 all-reduces)."""
    m_loc, s_loc, w_loc = stats[0], stats[1], stats[2]
    if group is not None:
        mz = torch.stack([m_loc, stats[3]])
        dist.all_reduce(mz, op=dist.ReduceOp.MAX, group=group)
        m, zy = mz[0], mz[1]
        scale = torch.exp(m_loc - m)
        # Move this rank's sums from its own max to the global max; a rank with no valid
        # columns (s_loc == 0, m_loc == -inf) contributes exactly zero.
        has = s_loc > 0
        s_resc = torch.where(has, s_loc * scale, 0.0)
        sums = [s_resc]
        if entropy:
            sums.append(torch.where(has, scale * (w_loc + (m_loc - m) * s_loc), 0.0))
        sums = torch.stack(sums)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        s = sums[0]
        w = sums[1] if entropy else None
    else:
        m, zy, s, w = m_loc, stats[3], s_loc, (w_loc if entropy else None)
    log_s = torch.log(s)
    w_over_s = w / s if entropy else torch.zeros_like(s)
    return m, log_s, w_over_s, zy


def chunk_grad_z(
    x: torch.Tensor,
    local_targets: torch.Tensor,
    n_valid: int,
    temperature: float,
    m: torch.Tensor,
    log_s: torch.Tensor,
    w_over_s: torch.Tensor,
    g_lp: torch.Tensor,
    g_h: torch.Tensor | None,
) -> torch.Tensor:
    """fp32 gradient w.r.t. ``x[:, :n_valid]`` (the logits, not z) for one chunk."""
    zc = x[:, :n_valid].to(compute_dtype(x.dtype), copy=True)
    zc.div_(temperature)
    zc.sub_(m.unsqueeze(1))  # z - m
    p = torch.sub(zc, log_s.unsqueeze(1)).exp_()
    if g_h is not None:
        # coef = g_lp + g_h (z - E),  z - E = (z - m) - w/s
        coef = zc.sub_(w_over_s.unsqueeze(1)).mul_(g_h.unsqueeze(1)).add_(g_lp.unsqueeze(1))
    else:
        coef = g_lp.unsqueeze(1)
    grad = p.mul_(coef).neg_()
    owned = (local_targets >= 0) & (local_targets < n_valid)
    rows = torch.nonzero(owned).squeeze(1)
    grad.index_put_((rows, local_targets[rows]), g_lp[rows], accumulate=True)
    return grad.div_(temperature)


def check_chunk_tokens(chunk_tokens: int | None) -> None:
    if chunk_tokens is not None and chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens}")


def chunk_ranges(n: int, chunk_tokens: int | None):
    check_chunk_tokens(chunk_tokens)
    if chunk_tokens is None:
        return [(0, n)] if n else []
    return [(i, min(i + chunk_tokens, n)) for i in range(0, n, chunk_tokens)]


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, shard, temperature, entropy, chunk_tokens, triton):
        vp = logits.shape[-1]
        x = logits.reshape(-1, vp)
        local_t = targets.reshape(-1) - shard.start
        n = x.shape[0]
        if triton:
            stats = kernels().row_stats(x, local_t, shard.n_valid, temperature, entropy)
        else:
            stats = torch.empty(4, n, dtype=compute_dtype(logits.dtype), device=logits.device)
            for a, b in chunk_ranges(n, chunk_tokens):
                stats[:, a:b] = chunk_stats(
                    x[a:b], local_t[a:b], shard.n_valid, temperature, entropy)
        m, log_s, w_over_s, zy = combine_stats(stats, shard.group, entropy)
        logp = zy - m - log_s
        ent = log_s - w_over_s if entropy else None
        ctx.save_for_backward(logits, targets, m, log_s, w_over_s)
        ctx.shard, ctx.temperature, ctx.entropy, ctx.chunk_tokens, ctx.triton = (
            shard, temperature, entropy, chunk_tokens, triton)
        shape = targets.shape
        if ent is None:
            return logp.view(shape)
        return logp.view(shape), ent.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_h=None):
        logits, targets, m, log_s, w_over_s = ctx.saved_tensors
        shard = ctx.shard
        vp = logits.shape[-1]
        x = logits.reshape(-1, vp)
        local_t = targets.reshape(-1) - shard.start
        g_lp = g_lp.reshape(-1).to(m.dtype)
        g_h = g_h.reshape(-1).to(m.dtype) if ctx.entropy else None
        if ctx.triton:
            grad = kernels().logits_grad(
                x, local_t, shard.n_valid, ctx.temperature, m, log_s, w_over_s, g_lp, g_h)
            return grad.view_as(logits), None, None, None, None, None, None
        grad = torch.zeros_like(x)
        if shard.n_valid:
            for a, b in chunk_ranges(x.shape[0], ctx.chunk_tokens):
                grad[a:b, : shard.n_valid] = chunk_grad_z(
                    x[a:b], local_t[a:b], shard.n_valid, ctx.temperature, m[a:b], log_s[a:b],
                    w_over_s[a:b], g_lp[a:b], None if g_h is None else g_h[a:b])
        return grad.view_as(logits), None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    *,
    entropy: bool = True,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    vocab_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``log softmax(logits / temperature)[target]`` and entropy over a vocab-parallel shard.

    Args:
        logits: this rank's vocab shard ``[..., Vp]`` (any float dtype; bf16 stays bf16 in memory).
        targets: global token ids, shape ``logits.shape[:-1]``, each in ``[0, vocab_size)``.
        tp_group: the tensor-parallel group the vocab is split over (None or size 1: no comms).
        entropy: also return the entropy of ``softmax(logits / temperature)`` (differentiable).
        temperature: the rollout sampling temperature (SGLang returns log_softmax(logits / T)).
        chunk_tokens: process this many tokens at a time (forward and backward) to bound the
            fp32 working memory to O(chunk_tokens x Vp); None processes all tokens at once.
        vocab_size: the true vocabulary size; global ids ``>= vocab_size`` (Megatron's vocab
            padding) are excluded from the softmax. Defaults to ``Vp x tp`` (no padding).
        backend: ``"auto"`` (default, or ``$MASPO_LOGPROB_BACKEND``), ``"triton"`` or ``"torch"``;
            see :func:`use_triton`. The Triton path ignores ``chunk_tokens`` (it has no
            O(tokens x Vp) temporaries to bound) and returns the gradient in the logits' dtype.

    Returns:
        ``(logprobs, entropy or None)``, fp32 (float64 for float64 logits), shape ``targets.shape``, identical on all TP ranks.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits.shape[:-1] = "
            f"{tuple(logits.shape[:-1])}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    check_temperature(temperature)
    check_chunk_tokens(chunk_tokens)  # also on the Triton path, which does not chunk
    shard = ShardInfo.make(tp_group, logits.shape[-1], vocab_size)
    check_targets(targets, shard.vocab_size)
    out = _VocabParallelLogprobs.apply(
        logits, targets, shard, float(temperature), entropy, chunk_tokens,
        use_triton(logits, backend))
    if entropy:
        return out
    return out, None
