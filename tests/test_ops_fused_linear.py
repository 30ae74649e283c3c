"""fused_linear_vocab_parallel_logprobs at TP=1 against log_softmax(hidden @ weight.T) in float64."""

import pytest
import torch

from maspo_megatron.ops import fused_linear_vocab_parallel_logprobs, vocab_parallel_logprobs
from test_ops_vocab_parallel import ref_logprobs, saved_bytes

N, H, V = 7, 5, 12


def sample(n=N, h=H, v=V, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * scale
    return hidden.to(dtype), weight.to(dtype)


def grads(fn, hidden, weight, seed=0):
    """(lp, ent, d/dhidden, d/dweight) of sum(g1 lp + g2 ent) for fixed random g1, g2."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    lp, ent = fn(hidden, weight)
    g1 = torch.randn(lp.shape, generator=gen, dtype=torch.float64)
    g2 = torch.randn(lp.shape, generator=gen, dtype=torch.float64)
    loss = (lp.double() * g1).sum() + (ent.double() * g2).sum()
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return lp.detach(), ent.detach(), gh, gw


def ref_fused(hidden, weight, t, temperature=1.0, vocab_size=None):
    return ref_logprobs(hidden.double() @ weight.double().t(), t, temperature, vocab_size)


@pytest.mark.parametrize("temperature,vocab_size", [(1.0, V), (0.7, 9)])
def test_matches_reference_every_chunk_size(temperature, vocab_size):
    hidden, weight = sample()
    t = torch.tensor([0, vocab_size - 1, 3, 4, 5, 1, 2])
    ref = grads(lambda h, w: ref_fused(h, w, t, temperature, vocab_size), hidden.double(),
                weight.double())
    for chunk in [None, *range(1, N + 2)]:
        out = grads(lambda h, w: fused_linear_vocab_parallel_logprobs(
            h, w, t, temperature=temperature, chunk_tokens=chunk, vocab_size=vocab_size),
            hidden, weight)
        for got, want in zip(out, ref):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        assert (out[3][vocab_size:] == 0).all()  # padded output rows get no gradient


def test_same_as_unfused_op():
    hidden, weight = sample(n=9)
    t = torch.arange(9) % V
    fused = grads(lambda h, w: fused_linear_vocab_parallel_logprobs(
        h, w, t, temperature=1.3, chunk_tokens=4), hidden, weight)
    unfused = grads(lambda h, w: vocab_parallel_logprobs(
        h @ w.t(), t, temperature=1.3, chunk_tokens=2), hidden, weight)
    for got, want in zip(fused, unfused):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_gradcheck_float64():
    hidden, weight = sample(n=5, h=3, v=6, dtype=torch.float64)
    t = torch.tensor([0, 4, 2, 3, 1])
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_vocab_parallel_logprobs(
            h, w, t, temperature=0.8, chunk_tokens=2, vocab_size=5),
        (hidden.requires_grad_(True), weight.requires_grad_(True)))


def test_bf16_and_extreme_logits():
    """bf16 hidden/weight; logits up to ~1e4 in magnitude (weight scaled by 3e3).

    Tolerances: values vs float64 on the same bf16 inputs: the bf16 matmul output is rounded to
    bf16 (relative 2^-8, i.e. up to ~40 absolute at 1e4), so values are compared against the
    reference on the bf16-rounded logits (1e-5 relative); gradients (bf16) within 2e-2 relative
    of their largest entry.
    """
    hidden, weight = sample(dtype=torch.bfloat16, scale=3e3)
    t = torch.tensor([0, 11, 3, 4, 5, 1, 2])
    out = grads(lambda h, w: fused_linear_vocab_parallel_logprobs(
        h, w, t, temperature=0.5, chunk_tokens=3), hidden, weight)
    assert all(torch.isfinite(o).all() for o in out)
    logits_bf16 = (hidden @ weight.t()).double()
    assert logits_bf16.abs().max() > 5e3
    ref_lp, ref_ent = ref_logprobs(logits_bf16, t, 0.5)
    torch.testing.assert_close(out[0].double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1].double(), ref_ent, atol=1e-5, rtol=1e-5)
    ref = grads(lambda h, w: ref_fused(h, w, t, 0.5), hidden.double(), weight.double())
    for got, want in zip(out[2:], ref[2:]):
        torch.testing.assert_close(got.double(), want, atol=2e-2 * want.abs().max(), rtol=0)


def test_saved_for_backward_has_no_logits():
    n, h, v = 64, 8, 1000
    hidden, weight = sample(n, h, v, torch.bfloat16)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(2))
    storages, _ = saved_bytes(lambda: fused_linear_vocab_parallel_logprobs(
        hidden, weight, t, chunk_tokens=16))
    inputs = {hidden.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}
    assert inputs <= set(storages)
    assert sum(b for p, b in storages.items() if p not in inputs) <= 64 * n


def test_bad_inputs():
    hidden, weight = sample()
    t = torch.zeros(N, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight must be \[Vp, 5\]"):
        fused_linear_vocab_parallel_logprobs(hidden, weight.t(), t)
    with pytest.raises(TypeError, match="dtypes differ"):
        fused_linear_vocab_parallel_logprobs(hidden, weight.double(), t)
    with pytest.raises(ValueError, match="targets shape"):
        fused_linear_vocab_parallel_logprobs(hidden, weight, t[:3])
