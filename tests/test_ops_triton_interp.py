"""The fused Triton kernels under Triton's interpreter, against the PyTorch path, on CPU.

``triton.jit`` decides when it decorates whether it builds a compiled or an interpreted kernel, and
the interpreter needs all of triton imported in that mode, so these tests only run in a process
started with ``TRITON_INTERPRET=1``: ``test_ops_triton.py::test_kernels_under_triton_interpreter``
starts one (elsewhere they are skipped). The kernels and the ops' dispatch are the package's own;
``backend="triton"`` sends CPU tensors to the interpreted kernels. Small column blocks
(``block_v=16`` / ``MAX_BLOCK_V=16``) make short rows span several blocks, with a partial last one.
"""

import os

import pytest
import torch

from maspo_megatron.ops import (
    fused_linear_vocab_parallel_logprobs, triton_kernels, vocab_parallel_logprobs,
)
from maspo_megatron.ops import vocab_parallel as vp
from test_ops_fused_linear import ref_fused
from test_ops_vocab_parallel import ref_logprobs

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs in the TRITON_INTERPRET=1 process of test_ops_triton.py")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance for "the same fp32 value, rounded once to dtype" (2 ulp: fp32 paths differ
# by a rounding or two before the cast, e.g. x * (1/T) in the kernels vs x / T in PyTorch).
ONE_ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-9}


@pytest.fixture
def tk(monkeypatch):
    """The kernel module (interpreted here), with 16-column blocks by default."""
    monkeypatch.setattr(triton_kernels, "MAX_BLOCK_V", 16)
    return triton_kernels


def logits(n, v, dtype, seed=0, extreme=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    if extreme:  # rows 0 and 1 get +-1e4 entries (fits fp16) in different column blocks
        x[0, 1], x[0, v - 2] = 1e4, -1e4
        x[1, v // 2], x[1, 0] = 1e4, -1e4
    return x.to(dtype).to(device)


def targets_for(n, v, n_valid):
    # Owned, last valid, padded (not owned), and ids of other shards (negative / >= v).
    pool = [0, max(n_valid - 1, 0), n_valid, -3, v + 5, 1, v // 2, 2]
    return torch.tensor([pool[i % len(pool)] for i in range(n)])


N, V = 6, 50  # 50 columns = 3 full 16-column blocks + a partial one


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_valid", [V, 37, 0])
@pytest.mark.parametrize("temperature,entropy", [(1.0, True), (0.7, True), (0.7, False)])
def test_row_stats_matches_chunk_stats(tk, dtype, n_valid, temperature, entropy):
    x = logits(N, V, dtype)
    t = targets_for(N, V, n_valid)
    want = vp.chunk_stats(x, t, n_valid, temperature, entropy)
    got = tk.row_stats(x, t, n_valid, temperature, entropy, block_v=16)
    assert got.dtype == torch.float32 and got.shape == (4, N)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # The same into a strided view of a bigger buffer (how the chunked fused path writes).
    buf = torch.full((4, N + 3), 7.0)
    tk.row_stats(x, t, n_valid, temperature, entropy, out=buf[:, 2:2 + N], block_v=16)
    torch.testing.assert_close(buf[:, 2:2 + N], want, atol=1e-5, rtol=1e-5)
    assert (buf[:, :2] == 7).all() and (buf[:, 2 + N:] == 7).all()


def expected_grad(x, t, n_valid, temperature, entropy, seed=1):
    """(per-token inputs, fp32 reference gradient of the whole row) from the PyTorch path."""
    stats = vp.chunk_stats(x, t, n_valid, temperature, entropy)
    m, log_s, w_over_s, _ = vp.combine_stats(stats, None, entropy)
    gen = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(x.shape[0], generator=gen)
    g_h = torch.randn(x.shape[0], generator=gen) if entropy else None
    inputs = (m, log_s, w_over_s, g_lp, g_h)
    want = torch.zeros(x.shape, dtype=torch.float32)
    if n_valid:
        want[:, :n_valid] = vp.chunk_grad_z(x, t, n_valid, temperature, *inputs)
    return inputs, want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_valid", [V, 37, 0])
@pytest.mark.parametrize("temperature,entropy", [(1.0, True), (0.7, True), (0.7, False)])
def test_logits_grad_matches_chunk_grad_z(tk, dtype, n_valid, temperature, entropy):
    x = logits(N, V, dtype)
    t = targets_for(N, V, n_valid)
    inputs, want = expected_grad(x, t, n_valid, temperature, entropy)
    got = tk.logits_grad(x, t, n_valid, temperature, *inputs, block_v=16)
    assert got.dtype == dtype and got.shape == x.shape  # the logits' dtype, like autograd's
    assert (got[:, n_valid:] == 0).all()  # padded vocab columns: exactly zero
    # A low-precision output is the fp32 gradient rounded once.
    torch.testing.assert_close(got, want.to(dtype), atol=1e-6, rtol=ONE_ROUNDING[dtype])
    # With an fp32 output the math is fp32 whatever the input dtype.
    got32 = tk.logits_grad(x, t, n_valid, temperature, *inputs,
                           out=torch.empty(x.shape, dtype=torch.float32), block_v=16)
    torch.testing.assert_close(got32, want, atol=1e-6, rtol=1e-5)


def test_logits_grad_in_place_and_expanded_inputs(tk):
    """out=x (the fused path's chunk logits) and stride-0 per-token gradients (from .sum())."""
    x = logits(N, V, torch.bfloat16)
    t = targets_for(N, V, 40)
    (m, log_s, w_over_s, _, g_h), want = expected_grad(x, t, 40, 0.9, True)
    g_lp = torch.ones(1).expand(N)
    want[:, :40] = vp.chunk_grad_z(x, t, 40, 0.9, m, log_s, w_over_s, g_lp.clone(), g_h)
    got = tk.logits_grad(x, t, 40, 0.9, m, log_s, w_over_s, g_lp, g_h, out=x, block_v=16)
    assert got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(got, want.bfloat16(), atol=1e-6, rtol=ONE_ROUNDING[torch.bfloat16])


def value_and_grads(fn, inputs, seed=0):
    """(lp, ent, grads of sum(g1 lp + g2 ent) w.r.t. inputs) for fixed random g1, g2."""
    inputs = [i.detach().clone().requires_grad_(True) for i in inputs]
    lp, ent = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    g1 = torch.randn(lp.shape, generator=gen, dtype=torch.float64).to(lp.device)
    g2 = torch.randn(lp.shape, generator=gen, dtype=torch.float64).to(lp.device)
    loss = (lp.double() * g1).sum() + (ent.double() * g2).sum()
    return (lp.detach(), ent.detach(), *torch.autograd.grad(loss, inputs))


def assert_all_close(got, want, **tol):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), **tol)


@pytest.mark.parametrize("temperature,vocab_size", [(1.0, V), (0.7, 41)])
def test_vocab_parallel_triton_matches_float64(tk, temperature, vocab_size):
    x = logits(N, V, torch.float32)
    t = torch.tensor([0, vocab_size - 1, 16, 17, 33, 40])
    want = value_and_grads(lambda z: ref_logprobs(z, t, temperature, vocab_size), [x.double()])
    for chunk in [None, 4]:  # chunk_tokens is accepted and irrelevant on this path
        got = value_and_grads(lambda z: vocab_parallel_logprobs(
            z, t, temperature=temperature, chunk_tokens=chunk, vocab_size=vocab_size,
            backend="triton"), [x])
        assert_all_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got[2][:, vocab_size:] == 0).all()


def test_vocab_parallel_triton_bf16_equals_torch_path(tk):
    x = logits(N, V, torch.bfloat16).view(2, 3, V)
    t = torch.tensor([[0, 44, 16], [17, 33, 3]])

    def run(backend):
        return value_and_grads(lambda z: vocab_parallel_logprobs(
            z, t, temperature=0.8, vocab_size=45, backend=backend), [x])

    got, want = run("triton"), run("torch")
    assert got[2].dtype == torch.bfloat16  # same gradient dtype as the PyTorch path
    torch.testing.assert_close(got[:2], want[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=ONE_ROUNDING[torch.bfloat16])


def test_vocab_parallel_triton_no_entropy(tk):
    x = logits(N, V, torch.float32).requires_grad_(True)
    t = targets_for(N, V, V).clamp(0, V - 1)
    lp, ent = vocab_parallel_logprobs(x, t, entropy=False, backend="triton")
    assert ent is None
    (g,) = torch.autograd.grad(lp.sum(), x)
    xr = x.detach().double().requires_grad_(True)
    ref_lp, _ = ref_logprobs(xr, t)
    (ref_g,) = torch.autograd.grad(ref_lp.sum(), xr)
    torch.testing.assert_close(lp.double(), ref_lp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), ref_g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_triton(tk, dtype):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 5, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(V, 5, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.tensor([0, 40, 16, 17, 33, 2, 39])

    def run(backend, chunk):
        return value_and_grads(lambda h, w: fused_linear_vocab_parallel_logprobs(
            h, w, t, temperature=1.3, chunk_tokens=chunk, vocab_size=41, backend=backend),
            [hidden, weight])

    for chunk in [None, 3]:
        got = run("triton", chunk)
        assert (got[3][41:] == 0).all()
        if dtype == torch.float32:
            want = value_and_grads(lambda h, w: ref_fused(h, w, t, 1.3, 41),
                                   [hidden.double(), weight.double()])
            assert_all_close(got, want, atol=1e-5, rtol=1e-5)
        else:  # same math; the bf16 chunk gradient is rounded once, then two bf16 matmuls
            want = run("torch", chunk)
            torch.testing.assert_close(got[:2], want[:2], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[2:], want[2:], atol=1e-2, rtol=1e-2)


def test_kernel_input_errors(tk):
    t = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="float64 gradcheck"):
        tk.row_stats(torch.zeros(2, 8, dtype=torch.float64), t, 8, 1.0, True)
    with pytest.raises(ValueError, match="n_valid=9"):
        tk.row_stats(torch.zeros(2, 8), t, 9, 1.0, True)
    with pytest.raises(ValueError, match="power of two"):
        tk.row_stats(torch.zeros(2, 8), t, 8, 1.0, True, block_v=24)
    with pytest.raises(ValueError, match="out must be fp32"):
        tk.row_stats(torch.zeros(2, 8), t, 8, 1.0, True, out=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="g_lp must have shape"):
        z = torch.zeros(2)
        tk.logits_grad(torch.zeros(2, 8), t, 8, 1.0, z, z, z, torch.zeros(3), None)
