"""Dispatch to the fused Triton kernels, the interpreter run on CPU, and the compiled kernels on GPU.

The kernel-level and op-level checks against the PyTorch path live in test_ops_triton_interp.py
and need a process started with ``TRITON_INTERPRET=1``; ``test_kernels_under_triton_interpreter``
runs that file in one. The ``gpu`` tests run the whole ops on CUDA (auto backend = compiled
kernels) against a float64 reference; they are skipped without a GPU.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from maspo_megatron.ops import fused_linear_vocab_parallel_logprobs, vocab_parallel_logprobs
from maspo_megatron.ops import vocab_parallel as vp
from test_ops_fused_linear import ref_fused
from test_ops_triton_interp import ONE_ROUNDING, assert_all_close, logits, value_and_grads
from test_ops_vocab_parallel import ref_logprobs

INTERP_TESTS = os.path.join(os.path.dirname(__file__), "test_ops_triton_interp.py")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="already interpreted: test_ops_triton_interp.py runs directly")
def test_kernels_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(vp.BACKEND_ENV, None)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", INTERP_TESTS, "-q", "-p", "no:cacheprovider",
         "-m", "not gpu"],
        env=env, cwd=os.path.dirname(os.path.dirname(INTERP_TESTS)), capture_output=True,
        text=True, timeout=500)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    # Every test ran: none skipped (e.g. for want of the interpreter), none failed.
    assert re.fullmatch(r"=* ?\d+ passed in .*", summary), summary


def test_backend_selection(monkeypatch):
    x = torch.zeros(2, 4)
    monkeypatch.delenv(vp.BACKEND_ENV, raising=False)
    assert not vp.use_triton(x, None)  # auto: CPU tensors take the PyTorch path
    assert not vp.use_triton(x, "torch") and vp.use_triton(x, "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        vp.use_triton(x, "cuda")
    monkeypatch.setenv(vp.BACKEND_ENV, "torch")
    assert not vp.use_triton(x, None) and vp.use_triton(x, "triton")  # the keyword wins
    monkeypatch.setenv(vp.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=r"\$MASPO_LOGPROB_BACKEND must be one of"):
        vp.use_triton(x, None)


class _Exploding:
    def __getattr__(self, name):
        raise RuntimeError(f"kernel {name} failed")


def test_auto_on_cpu_never_touches_triton_and_triton_errors_propagate(monkeypatch):
    monkeypatch.setattr(vp, "_KERNELS", _Exploding())
    x = logits(3, 8, torch.float32)
    t = torch.tensor([0, 1, 2])
    lp, _ = vocab_parallel_logprobs(x, t)  # auto on CPU: the PyTorch path
    torch.testing.assert_close(lp.double(), ref_logprobs(x, t)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="kernel row_stats failed"):  # no silent fallback
        vocab_parallel_logprobs(x, t, backend="triton")

def test_compiled_kernels_refuse_cpu_tensors():
    from maspo_megatron.ops import triton_kernels

    if triton_kernels.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the kernels run on CPU tensors here")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        triton_kernels.row_stats(torch.zeros(2, 8), torch.tensor([0, 1]), 8, 1.0, True)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        vocab_parallel_logprobs(torch.zeros(2, 8), torch.tensor([0, 1]), backend="triton")


# ---------------------------------------------------------------- GPU (compiled kernels) ------


def _count_kernel_calls(monkeypatch):
    """Wraps the compiled kernels' entry points; returns the per-name call counter."""
    from maspo_megatron.ops import triton_kernels as compiled

    calls = {"row_stats": 0, "logits_grad": 0}
    for name in calls:
        fn = getattr(compiled, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(compiled, name, wrapped)
    monkeypatch.setattr(vp, "_KERNELS", compiled)
    monkeypatch.delenv(vp.BACKEND_ENV, raising=False)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_vocab_parallel_matches_float64(monkeypatch, dtype):
    """Auto backend on CUDA = compiled kernels; rows of 20000 columns span 3 blocks of 8192."""
    calls = _count_kernel_calls(monkeypatch)
    n, v, vocab = 300, 20000, 19990
    x = logits(n, v, dtype, device="cuda")
    t = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).cuda()
    t[:4] = torch.tensor([0, vocab - 1, 8191, 8192])  # block edges
    want = value_and_grads(lambda z: ref_logprobs(z, t, 0.8, vocab), [x.double()])
    for chunk in [None, 128]:
        got = value_and_grads(lambda z: vocab_parallel_logprobs(
            z, t, temperature=0.8, chunk_tokens=chunk, vocab_size=vocab), [x])
        assert got[2].dtype == dtype and (got[2][:, vocab:] == 0).all()
        assert_all_close(got[:2], want[:2], atol=1e-4, rtol=1e-5)
        # fp32: fp32 math over 20000 terms; bf16: one rounding of the gradient.
        tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-6, rtol=8e-3)
        torch.testing.assert_close(got[2].double(), want[2], **tol)
    assert calls == {"row_stats": 2, "logits_grad": 2}


@pytest.mark.gpu
def test_gpu_fused_linear_matches_float64(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(257, 64, generator=gen, dtype=torch.float64).cuda()
    weight = (torch.randn(12000, 64, generator=gen, dtype=torch.float64) * 0.3).cuda()
    t = torch.randint(0, 11990, (257,), generator=gen).cuda()
    want = value_and_grads(lambda h, w: ref_fused(h, w, t, 0.9, 11990), [hidden, weight])
    got = value_and_grads(lambda h, w: fused_linear_vocab_parallel_logprobs(
        h, w, t, temperature=0.9, chunk_tokens=100, vocab_size=11990),
        [hidden.float(), weight.float()])
    # TF32 matmuls may be enabled by the caller's process: tolerances allow for them.
    assert_all_close(got, want, atol=2e-3, rtol=2e-3)
    assert calls == {"row_stats": 3, "logits_grad": 3}


@pytest.mark.gpu
def test_gpu_rows_beyond_int32_offsets():
    """16400 x 131072 bf16 logits (> 2**31 elements): the last rows must match the torch path."""
    from maspo_megatron.ops import triton_kernels as compiled

    n, v = 16400, 131072
    x = torch.empty(n, v, dtype=torch.bfloat16, device="cuda").normal_(0, 3)
    t = torch.randint(0, v, (n,), device="cuda")
    stats = compiled.row_stats(x, t, v - 7, 0.7, True)
    tail = slice(n - 3, n)
    torch.testing.assert_close(stats[:, tail], vp.chunk_stats(x[tail], t[tail], v - 7, 0.7, True),
                               atol=1e-4, rtol=1e-5)
    m, log_s, w_over_s, _ = vp.combine_stats(stats, None, True)
    g_lp, g_h = torch.ones(n, device="cuda"), torch.full((n,), 0.1, device="cuda")
    grad = compiled.logits_grad(x, t, v - 7, 0.7, m, log_s, w_over_s, g_lp, g_h)
    want = vp.chunk_grad_z(x[tail], t[tail], v - 7, 0.7, m[tail], log_s[tail], w_over_s[tail],
                           g_lp[tail], g_h[tail])
    torch.testing.assert_close(grad[tail, : v - 7], want.bfloat16(), atol=1e-6,
                               rtol=ONE_ROUNDING[torch.bfloat16])
    assert (grad[tail, v - 7:] == 0).all()
