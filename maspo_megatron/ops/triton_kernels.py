"""Fused Triton kernels for the two hot loops of :mod:`vocab_parallel` (CUDA; fp32 math).

``row_stats`` is the single-pass form of ``vocab_parallel.chunk_stats`` and ``logits_grad`` the
single-pass form of ``vocab_parallel.chunk_grad_z``; the PyTorch versions stay the reference and
the CPU path. Each kernel reads every logit exactly once (forward: online max / rescaled sums over
column blocks of a row; backward: one elementwise pass that also writes the padded columns' zeros)
and keeps nothing ``[tokens, V/tp]``-sized besides the gradient it returns, so forward + backward
moves the same bytes as the memory-bound floor (one read, then one read + one write).

This module imports nothing from the package on purpose: the CPU tests load a second copy of it
with ``TRITON_INTERPRET=1`` set, so that ``triton.jit`` builds interpreted kernels that run on CPU
tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

# Captured at import: a copy loaded under TRITON_INTERPRET=1 may run on CPU tensors.
INTERPRET = bool(knobs.runtime.interpret)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Widest column block per program; a 128k-column row is 16 blocks of 8192. The launch defaults
# (this, launch_config's warps, 1 pipeline stage) were set without a GPU measurement: the CUDA
# run of benchmarks/logprob.py prints a sweep of alternatives to tune them.
MAX_BLOCK_V = 8192


@triton.jit
def _row_stats_kernel(
    x_ptr, t_ptr, out_ptr,
    stride_xr, stride_xc, stride_o,
    n_valid, inv_t,
    ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, STAGES: tl.constexpr,
):
    # One program per row. m, s, w are the running max of z, sum exp(z - m) and
    # sum exp(z - m)(z - m) over the columns seen so far, moved to the new max at every block.
    row = tl.program_id(0).to(tl.int64)  # int64: rows x V/tp exceeds 2**31 at 65k x 128k
    x_row = x_ptr + row * stride_xr
    m = tl.full([], -float("inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    # STAGES > 1 prefetches the next blocks through shared memory (cp.async) while this one is
    # reduced; 1 keeps plain vectorised loads and relies on other programs to hide latency.
    for start in tl.range(0, n_valid, BLOCK_V, num_stages=STAGES):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_valid
        x = tl.load(x_row + cols * stride_xc, mask=valid, other=-float("inf"))
        z = x.to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block has a valid column
        zm = z - m_new  # -inf on the masked columns
        e = tl.exp(zm)
        alpha = tl.exp(m - m_new)  # 0 on the first block (m = -inf)
        s_old = s
        s = s * alpha + tl.sum(e, axis=0)
        if ENTROPY:
            # sum e (z - m_new) over old columns = alpha (w + (m - m_new) s_old); on the first
            # block s_old = 0 and m - m_new = -inf, hence the where (and 0 * -inf on masked ones).
            shift = tl.where(s_old > 0, m - m_new, 0.0) * s_old
            w = (w + shift) * alpha + tl.sum(e * tl.where(valid, zm, 0.0), axis=0)
        m = m_new
    tgt = tl.load(t_ptr + row)
    owned = (tgt >= 0) & (tgt < n_valid)
    zy = tl.load(x_row + tgt * stride_xc, mask=owned, other=-float("inf")).to(tl.float32) * inv_t
    tl.store(out_ptr + row, m)
    tl.store(out_ptr + stride_o + row, s)
    tl.store(out_ptr + 2 * stride_o + row, w)
    tl.store(out_ptr + 3 * stride_o + row, zy)


@triton.jit
def _logits_grad_kernel(
    x_ptr, t_ptr, m_ptr, log_s_ptr, w_over_s_ptr, g_lp_ptr, g_h_ptr, out_ptr,
    stride_xr, stride_xc, stride_or, stride_oc,
    n_cols, n_valid, inv_t,
    ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Program (row, column block): elementwise, so no loop and no ordering between programs;
    # in place (out = x) is safe because each element is read before it is written by one program.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = cols < n_valid
    x = tl.load(x_ptr + row * stride_xr + cols * stride_xc, mask=valid, other=0.0)
    zm = x.to(tl.float32) * inv_t - tl.load(m_ptr + row)  # z - m
    p = tl.exp(zm - tl.load(log_s_ptr + row))
    g_lp = tl.load(g_lp_ptr + row)
    if ENTROPY:
        # dH/dz = -p (z - E) with z - E = (z - m) - w/s
        coef = g_lp + tl.load(g_h_ptr + row) * (zm - tl.load(w_over_s_ptr + row))
    else:
        coef = g_lp
    g = -p * coef
    g = tl.where(valid & (cols == tl.load(t_ptr + row)), g + g_lp, g)
    g = tl.where(valid, g * inv_t, 0.0)  # padded vocab columns get exactly zero
    tl.store(out_ptr + row * stride_or + cols * stride_oc, g.to(out_ptr.dtype.element_ty),
             mask=cols < n_cols)


def launch_config(n_cols: int, block_v: int | None, num_warps: int | None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of ``n_cols``: the given values, else the defaults."""
    if block_v is None:
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(n_cols, 16)))
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    if num_warps is None:
        # About 16 elements per thread: vectorised 16-byte bf16 loads, modest registers.
        num_warps = max(1, min(16, block_v // 512))
    return block_v, num_warps


def _check(x: torch.Tensor, local_targets: torch.Tensor, n_valid: int) -> None:
    if not (x.is_cuda or INTERPRET):
        raise ValueError(
            f"the Triton log-prob kernels need CUDA tensors, got logits on {x.device} "
            f"(use backend='torch', or set TRITON_INTERPRET=1 before importing triton)")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the Triton log-prob kernels take {[str(d) for d in SUPPORTED_DTYPES]} logits, "
            f"got {x.dtype} (use backend='torch', e.g. for float64 gradcheck)")
    if x.dim() != 2 or local_targets.shape != x.shape[:1]:
        raise ValueError(
            f"expected logits [c, Vp] and local targets [c], got {tuple(x.shape)} and "
            f"{tuple(local_targets.shape)}")
    if not 0 <= n_valid <= x.shape[1]:
        raise ValueError(f"n_valid={n_valid} must be in [0, {x.shape[1]}]")


def row_stats(
    x: torch.Tensor,
    local_targets: torch.Tensor,
    n_valid: int,
    temperature: float,
    entropy: bool,
    out: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 1,
) -> torch.Tensor:
    """``vocab_parallel.chunk_stats`` in one pass: fp32 ``[4, c]`` (max z, sum exp(z - max),
    sum exp(z - max)(z - max) or 0, target z or -inf), written into ``out`` if given (a ``[4, c]``
    fp32 view with unit column stride, e.g. ``stats[:, a:b]``). ``block_v``, ``num_warps`` and
    ``num_stages`` (software pipelining of the column loop) tune the launch."""
    _check(x, local_targets, n_valid)
    c = x.shape[0]
    if out is None:
        out = torch.empty(4, c, dtype=torch.float32, device=x.device)
    elif out.shape != (4, c) or out.dtype != torch.float32 or (c > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be fp32 [4, {c}] with unit column stride, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    local_targets = local_targets.contiguous()
    if c == 0:
        return out
    block_v, num_warps = launch_config(n_valid, block_v, num_warps)
    _row_stats_kernel[(c,)](
        x, local_targets, out, x.stride(0), x.stride(1), out.stride(0),
        n_valid, 1.0 / temperature,
        ENTROPY=entropy, BLOCK_V=block_v, STAGES=num_stages, num_warps=num_warps)
    return out


def logits_grad(
    x: torch.Tensor,
    local_targets: torch.Tensor,
    n_valid: int,
    temperature: float,
    m: torch.Tensor,
    log_s: torch.Tensor,
    w_over_s: torch.Tensor,
    g_lp: torch.Tensor,
    g_h: torch.Tensor | None,
    out: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. the whole ``x [c, Vp]`` (``chunk_grad_z`` on the first ``n_valid`` columns,
    zeros after), in ``out``'s dtype (default: a new tensor of ``x``'s dtype). ``out`` may be ``x``
    itself. The per-token inputs ``m, log_s, w_over_s, g_lp, g_h`` are ``[c]`` (used in fp32)."""
    _check(x, local_targets, n_valid)
    c, n_cols = x.shape
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"out must be {tuple(x.shape)} in one of {SUPPORTED_DTYPES}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    per_token = {"m": m, "log_s": log_s, "w_over_s": w_over_s, "g_lp": g_lp, "g_h": g_h}
    for name, v in per_token.items():
        if v is not None and v.shape != (c,):
            raise ValueError(f"{name} must have shape [{c}], got {tuple(v.shape)}")
    # O(tokens) copies at most: incoming gradients are often expanded (stride 0).
    m, log_s, w_over_s, g_lp = (v.float().contiguous() for v in (m, log_s, w_over_s, g_lp))
    g_h = None if g_h is None else g_h.float().contiguous()
    local_targets = local_targets.contiguous()
    if c == 0 or n_cols == 0:
        return out
    block_v, num_warps = launch_config(n_cols, block_v, num_warps)
    grid = (c, triton.cdiv(n_cols, block_v))
    _logits_grad_kernel[grid](
        x, local_targets, m, log_s, w_over_s, g_lp, g_lp if g_h is None else g_h, out,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        n_cols, n_valid, 1.0 / temperature,
        ENTROPY=g_h is not None, BLOCK_V=block_v, num_warps=num_warps)
    return out
