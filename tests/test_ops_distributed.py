"""Vocab-parallel ops in TP = 1, 2, 4 gloo processes against a gathered (full) log_softmax.

Every rank builds the same full logits / output weight from a seed, keeps its Megatron vocab shard,
and compares values and gradients with float64 references on the full tensors. One spawned run per
TP size covers all cases (spawning costs seconds).
"""

from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from maspo_megatron.ops import (
    fused_linear_vocab_parallel_logprobs, response_logprobs_from_hidden,
    response_logprobs_from_logits, vocab_parallel_logprobs,
)
from test_ops_fused_linear import ref_fused
from test_ops_sequence import loop_reference, make_batch
from test_ops_vocab_parallel import ref_logprobs, sample_logits, value_and_grad

N, VP, H = 7, 4, 3  # tokens, vocab entries per rank, hidden size


class _SumGradOverTP(torch.autograd.Function):
    """Identity whose backward sums the gradient over the group (Megatron's copy-to-TP-region).

    Lets gradcheck perturb a replicated full tensor: every rank perturbs the same entry, and the
    analytic gradient of the full tensor is the sum of the ranks' shard gradients.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


@contextmanager
def collective_spy():
    """Makes every gather-type collective raise and records the sizes of all_reduce calls."""
    names = ["all_gather", "all_gather_into_tensor", "all_gather_object", "gather",
             "gather_object", "_all_gather_base", "all_to_all", "all_to_all_single", "broadcast"]
    saved = {n: getattr(dist, n) for n in names + ["all_reduce"] if hasattr(dist, n)}
    calls = []

    def forbidden(name):
        def f(*a, **k):
            raise AssertionError(f"torch.distributed.{name} called: the logits must not be gathered")
        return f

    def counting_all_reduce(tensor, *a, **k):
        calls.append(tensor.numel())
        return saved["all_reduce"](tensor, *a, **k)

    for n in saved:
        setattr(dist, n, forbidden(n))
    dist.all_reduce = counting_all_reduce
    try:
        yield calls
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


def boundary_targets(tp, vocab_size):
    """Ids on every shard boundary, the last real id, and a few interior ones (length N)."""
    ids = [0, vocab_size - 1]
    ids += [i for r in range(1, tp) for i in (r * VP - 1, r * VP) if i < vocab_size]
    ids += [1, 2, 3, 5, 6]
    return torch.tensor(ids[:N]) % vocab_size


def shard(full, rank, dim=-1):
    return full.narrow(dim, rank * VP, VP)


def check_unfused(rank, tp, group):
    v_pad = VP * tp
    # A padded vocab that leaves the last rank with no real entries when tp = 4.
    for vocab_size, temperature, extreme in [(v_pad, 1.0, False), (v_pad - 5 if tp > 1 else v_pad - 2, 0.7, False),
                                             (v_pad, 0.5, True)]:
        full = sample_logits(N, v_pad, seed=3, extreme=extreme)
        t = boundary_targets(tp, vocab_size)
        ref_lp, ref_ent, ref_g = value_and_grad(
            lambda z: ref_logprobs(z, t, temperature, vocab_size), full.double(), N)
        for chunk in [None, *range(1, N + 2)]:
            lp, ent, g = value_and_grad(lambda z: vocab_parallel_logprobs(
                z, t, group, temperature=temperature, chunk_tokens=chunk, vocab_size=vocab_size),
                shard(full, rank), N)
            torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-6)
            torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g.double(), shard(ref_g, rank), atol=1e-5, rtol=1e-5)

    # bf16 input: fp32 math on the bf16 values (see test_ops_vocab_parallel.test_bf16_input).
    full = sample_logits(N, v_pad, torch.bfloat16, seed=4)
    t = boundary_targets(tp, v_pad)
    ref_lp, ref_ent, ref_g = value_and_grad(lambda z: ref_logprobs(z, t, 0.9), full.double(), N)
    lp, ent, g = value_and_grad(lambda z: vocab_parallel_logprobs(
        z, t, group, temperature=0.9, chunk_tokens=3), shard(full, rank), N)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), shard(ref_g, rank), atol=4e-3, rtol=1e-2)

    # Only per-token scalars cross the group: 2 all-reduces of <= 2 x tokens numbers, none in
    # backward, no gather of any kind.
    full = sample_logits(N, v_pad, seed=5)
    for entropy in (True, False):
        x = shard(full, rank).clone().requires_grad_(True)
        with collective_spy() as calls:
            lp, ent = vocab_parallel_logprobs(x, t, group, entropy=entropy, chunk_tokens=2)
            n_fwd = len(calls)
            (lp.sum() + (ent.sum() if entropy else 0)).backward()
        assert n_fwd == (2 if tp > 1 else 0) and len(calls) == n_fwd, calls
        assert all(c <= 2 * N for c in calls), calls

    # gradcheck in float64 through the distributed path (fast mode: a random projection of the
    # Jacobian; every rank draws the same projection from the same seed).
    full = sample_logits(5, v_pad, torch.float64, seed=6).requires_grad_(True)
    t5 = boundary_targets(tp, v_pad - 1)[:5]
    assert torch.autograd.gradcheck(
        lambda z: vocab_parallel_logprobs(
            shard(_SumGradOverTP.apply(z), rank), t5, group, temperature=0.8, chunk_tokens=2,
            vocab_size=v_pad - 1),
        (full,), fast_mode=True)


def check_fused(rank, tp, group):
    v_pad = VP * tp
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(v_pad, H, generator=gen, dtype=torch.float64)
    vocab_size = v_pad - 3
    t = boundary_targets(tp, vocab_size)
    gen_g = torch.Generator().manual_seed(8)
    g1, g2 = torch.randn(N, generator=gen_g, dtype=torch.float64), torch.randn(N, generator=gen_g, dtype=torch.float64)

    def run(fn, h, w):
        h = h.detach().clone().requires_grad_(True)
        w = w.detach().clone().requires_grad_(True)
        lp, ent = fn(h, w)
        gh, gw = torch.autograd.grad((lp.double() * g1).sum() + (ent.double() * g2).sum(), (h, w))
        return lp.detach(), ent.detach(), gh, gw

    ref = run(lambda h, w: ref_fused(h, w, t, 0.7, vocab_size), hidden, weight)
    for chunk in [None, *range(1, N + 2)]:
        with collective_spy() as calls:
            lp, ent, gh, gw = run(lambda h, w: fused_linear_vocab_parallel_logprobs(
                h, w, t, group, temperature=0.7, chunk_tokens=chunk, vocab_size=vocab_size),
                hidden.float(), shard(weight, rank, 0).float())
        # 2 per-token all-reduces forward, 1 of grad_hidden [N, H] in backward.
        assert calls == ([2 * N, 2 * N, N * H] if tp > 1 else []), calls
        torch.testing.assert_close(lp.double(), ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent.double(), ref[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh.double(), ref[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw.double(), shard(ref[3], rank, 0), atol=1e-5, rtol=1e-5)

    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_vocab_parallel_logprobs(
            h, shard(_SumGradOverTP.apply(w), rank, 0), t, group, temperature=0.7,
            chunk_tokens=3, vocab_size=vocab_size),
        (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)), fast_mode=True)


def check_sequence_helpers(rank, tp, group):
    ids, mask, hidden, _ = make_batch()
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(VP * tp, hidden.shape[-1], generator=gen, dtype=torch.float64)
    vocab_size = VP * tp - 1
    ids = torch.where(ids >= 0, ids % vocab_size, ids)  # keeps the -100 padding id
    logits = hidden @ weight.t()
    ref_lp, ref_ent = loop_reference(logits[..., :vocab_size], ids, mask, 1.1)
    for lp, ent in [
        response_logprobs_from_logits(shard(logits, rank), ids, mask, group, temperature=1.1,
                                      chunk_tokens=4, vocab_size=vocab_size),
        response_logprobs_from_hidden(hidden, shard(weight, rank, 0), ids, mask, group,
                                      temperature=1.1, chunk_tokens=4, vocab_size=vocab_size),
    ]:
        torch.testing.assert_close(lp, torch.stack(ref_lp))
        torch.testing.assert_close(ent, torch.stack(ref_ent))


def _worker(rank, world_size):
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    try:
        group = dist.new_group(list(range(world_size)))
        check_unfused(rank, world_size, group)
        check_fused(rank, world_size, group)
        check_sequence_helpers(rank, world_size, group)
    finally:
        dist.destroy_process_group()
    return True


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_ops_distributed(tp):
    assert run_distributed(_worker, tp, timeout=240) == [True] * tp
