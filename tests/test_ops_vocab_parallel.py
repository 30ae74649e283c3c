"""vocab_parallel_logprobs at TP=1 (in-process) against a plain float64 log_softmax reference.

The multi-rank (TP=2, 4) checks are in test_ops_distributed.py and reuse the references here.
"""

import pytest
import torch

from maspo_megatron.ops import vocab_parallel_logprobs


def ref_logprobs(full_logits, targets, temperature=1.0, vocab_size=None):
    """Plain float64 log_softmax over the true vocab: (logprobs, entropy)."""
    v = vocab_size or full_logits.shape[-1]
    ls = torch.log_softmax(full_logits[..., :v].double() / temperature, dim=-1)
    lp = ls.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(ls.exp() * ls).sum(-1)
    return lp, ent


def value_and_grad(fn, x, n, seed=0):
    """Runs fn(x) -> (lp, ent), returns (lp, ent, d[sum(g1 lp + g2 ent)]/dx) with fixed g1, g2."""
    x = x.detach().clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    g1 = torch.randn(n, generator=gen, dtype=torch.float64)
    g2 = torch.randn(n, generator=gen, dtype=torch.float64)
    lp, ent = fn(x)
    loss = (lp.double() * g1.view(lp.shape)).sum() + (ent.double() * g2.view(ent.shape)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return lp.detach(), ent.detach(), grad


def sample_logits(n, v, dtype=torch.float32, seed=0, extreme=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    if extreme:  # each row gets a +-1e4 entry at a row-dependent column
        x[torch.arange(n), torch.arange(n) % v] = 1e4
        x[torch.arange(n), (torch.arange(n) + 3) % v] = -1e4
    return x.to(dtype)


N, V = 7, 12


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab_size", [V, 9])
def test_matches_log_softmax_every_chunk_size(temperature, vocab_size):
    x = sample_logits(N, V)
    t = torch.tensor([0, vocab_size - 1, 3, 4, 5, 1, 2])
    ref_lp, ref_ent, ref_g = value_and_grad(
        lambda z: ref_logprobs(z, t, temperature, vocab_size), x.double(), N)
    for chunk in [None, *range(1, N + 2)]:
        lp, ent, g = value_and_grad(
            lambda z: vocab_parallel_logprobs(
                z, t, temperature=temperature, chunk_tokens=chunk, vocab_size=vocab_size), x, N)
        assert lp.dtype == torch.float32 and g.dtype == torch.float32
        torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.double(), ref_g, atol=1e-5, rtol=1e-5)
        assert (g[:, vocab_size:] == 0).all()  # padded vocab gets no gradient


@pytest.mark.parametrize("entropy", [True, False])
def test_gradcheck_float64(entropy):
    x = sample_logits(5, 8, torch.float64).requires_grad_(True)
    t = torch.tensor([0, 6, 2, 5, 1])

    def fn(z):
        lp, ent = vocab_parallel_logprobs(
            z, t, entropy=entropy, temperature=0.6, chunk_tokens=2, vocab_size=7)
        return (lp, ent) if entropy else lp

    assert torch.autograd.gradcheck(fn, (x,))


def test_bf16_input():
    """bf16 logits: exact fp32 math on the bf16 values, bf16 gradient.

    Tolerances: values 1e-5 vs a float64 reference on the same (bf16-rounded) logits; the bf16
    gradient within bf16 rounding (atol 4e-3, rtol 1e-2); vs the unrounded fp32 logits (std 3),
    values within 5e-2 (bf16 keeps 8 mantissa bits).
    """
    x32 = sample_logits(N, V)
    x = x32.to(torch.bfloat16)
    t = torch.tensor([11, 0, 5, 6, 7, 3, 2])
    ref_lp, ref_ent, ref_g = value_and_grad(lambda z: ref_logprobs(z, t, 0.9), x.double(), N)
    for chunk in [None, 3]:
        lp, ent, g = value_and_grad(
            lambda z: vocab_parallel_logprobs(z, t, temperature=0.9, chunk_tokens=chunk), x, N)
        assert lp.dtype == torch.float32 and g.dtype == torch.bfloat16
        torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g.double(), ref_g, atol=4e-3, rtol=1e-2)
    lp32, ent32 = ref_logprobs(x32.double(), t, 0.9)
    torch.testing.assert_close(lp.double(), lp32, atol=5e-2, rtol=0)
    torch.testing.assert_close(ent.double(), ent32, atol=5e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(dtype):
    x = sample_logits(N, V, dtype, extreme=True)
    # Targets at the +1e4 entry (logp ~ 0), at the -1e4 entry (logp ~ -2e4) and elsewhere.
    t = torch.tensor([0, 4, 2, 3, 8, 0, 6])
    ref_lp, ref_ent, ref_g = value_and_grad(lambda z: ref_logprobs(z, t, 0.5), x.double(), N)
    lp, ent, g = value_and_grad(
        lambda z: vocab_parallel_logprobs(z, t, temperature=0.5, chunk_tokens=4), x, N)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(g).all()
    assert lp[1] < -1.9e4
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
    tol = dict(atol=4e-3, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), ref_g, **tol)  # the gradient has the input's dtype


def test_leading_dims_and_no_entropy():
    x = sample_logits(6, V).view(2, 3, V)
    t = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(1))
    lp, ent = vocab_parallel_logprobs(x, t, entropy=False, chunk_tokens=4)
    assert ent is None and lp.shape == (2, 3)
    torch.testing.assert_close(lp.double(), ref_logprobs(x, t)[0], atol=1e-5, rtol=1e-5)


def saved_bytes(fn):
    """Bytes autograd keeps for backward while fn() runs, counted once per storage."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return storages, out


def test_saved_for_backward_is_input_plus_per_token():
    n, v = 64, 1000
    x = sample_logits(n, v, torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(2))
    for chunk in [None, 16]:
        storages, _ = saved_bytes(lambda: vocab_parallel_logprobs(x, t, chunk_tokens=chunk))
        inp = x.untyped_storage().data_ptr()
        assert inp in storages, "the input shard itself must be what is saved"
        other = sum(b for p, b in storages.items() if p != inp)
        # targets (int64) + three fp32 per-token statistics, at most 64 bytes per token.
        assert other <= 64 * n, other
        assert sum(storages.values()) <= x.numel() * x.element_size() + 64 * n


def test_bad_inputs():
    x = sample_logits(3, V)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 9\)"):
        vocab_parallel_logprobs(x, torch.tensor([0, 9, 1]), vocab_size=9)
    with pytest.raises(ValueError, match="targets shape"):
        vocab_parallel_logprobs(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_logprobs(x, torch.tensor([0, 1, 2]), temperature=0.0)
    with pytest.raises(ValueError, match="vocab_size=13 must be in"):
        vocab_parallel_logprobs(x, torch.tensor([0, 1, 2]), vocab_size=13)
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        vocab_parallel_logprobs(x, torch.tensor([0, 1, 2]), chunk_tokens=0)
    with pytest.raises(TypeError, match="targets must be int64/int32"):
        vocab_parallel_logprobs(x, torch.tensor([0.0, 1.0, 2.0]))
