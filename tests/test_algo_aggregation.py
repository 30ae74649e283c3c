"""Loss aggregation: DP x micro-batch partial results must add up to the one-big-batch value."""

import pytest
import torch

from maspo_megatron.algo.aggregation import (
    AGGREGATIONS,
    AggregationConfig,
    aggregate,
    global_counts,
    seq_mean_token_mean,
    seq_mean_token_sum_norm,
    token_mean_global,
)
from maspo_megatron.algo.losses import maspo_token_loss

F64 = torch.float64


def batch(n=12, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    loss = torch.randn(n, t, generator=g, dtype=F64)
    loss[~mask] = float("nan")  # padding must not leak
    return loss, mask


def manual(mode, loss, mask, normalizer=None):
    """Plain loops over the big batch."""
    rows = [[loss[i, j].item() for j in range(mask.shape[1]) if mask[i, j]]
            for i in range(mask.shape[0])]
    if mode == "token_mean_global":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) / normalizer for r in rows) / len(rows)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_dp_and_micro_batch_partials_sum_to_big_batch(mode):
    loss, mask = batch()
    cfg = AggregationConfig(mode=mode, normalizer=7.0 if mode == "seq_mean_token_sum_norm"
                            else None)
    counts = dict(global_num_tokens=int(mask.sum()), global_num_seqs=mask.shape[0])
    big = aggregate(cfg, loss, mask, **counts)
    assert big.item() == pytest.approx(manual(mode, loss, mask, 7.0), rel=1e-12)
    # 2 DP ranks x 3 micro-batches of uneven sizes, each normalised by the *global* counts.
    total = 0
    for rank_rows in (range(0, 5), range(5, 12)):
        rows = list(rank_rows)
        for mb in (rows[:1], rows[1:3], rows[3:]):
            total = total + aggregate(cfg, loss[mb], mask[mb], **counts)
    assert total.item() == pytest.approx(big.item(), rel=1e-12)


def test_gradients_of_partials_match_big_batch():
    loss_in, mask = batch(seed=3)
    lp = torch.randn(loss_in.shape, dtype=F64)
    lpo = lp + 0.3 * torch.randn(loss_in.shape, dtype=F64)
    A = torch.randn(loss_in.shape[0], 1, dtype=F64)
    n = int(mask.sum())

    def grad(splits):
        x = lp.clone().requires_grad_(True)
        total = 0
        for rows in splits:
            loss, _ = maspo_token_loss(x[rows], lpo[rows], A[rows], mask=mask[rows])
            total = total + token_mean_global(loss, mask[rows], n)
        total.backward()
        return x.grad

    split = grad([[0, 1, 2], [3], list(range(4, 12))])
    torch.testing.assert_close(grad([list(range(12))]), split)


def test_local_normalisation_would_differ():
    """Guard against a silent fallback to per-micro-batch means: they differ from the big batch."""
    loss, mask = batch()
    big = token_mean_global(loss, mask, int(mask.sum()))
    local = sum(token_mean_global(loss[r], mask[r], int(mask[r].sum()))
                for r in ([0, 1], list(range(2, 12)))) / 2
    assert abs(local.item() - big.item()) > 1e-6


def test_empty_rows_and_errors():
    loss = torch.ones(2, 3)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert seq_mean_token_mean(loss, mask, 1).item() == 1.0
    assert seq_mean_token_sum_norm(loss, mask, 1, 4.0).item() == 0.5
    with pytest.raises(ValueError, match="global_num_tokens must be > 0"):
        token_mean_global(loss, mask, 0)
    with pytest.raises(ValueError, match="needs global_num_seqs"):
        aggregate(AggregationConfig("seq_mean_token_mean"), loss, mask, global_num_tokens=2)
    with pytest.raises(ValueError, match="normalizer is required"):
        AggregationConfig("seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="mode 'mean' is not one of"):
        AggregationConfig("mean")
    with pytest.raises(ValueError, match=r"loss \(2, 3\) and mask \(3,\)"):
        token_mean_global(loss, mask[0], 2)


def test_global_counts_skip_fully_masked_rows():
    """A truncated response under mask_truncated is a fully masked row: it adds nothing to the
    loss, so it must not be counted in the sequence normaliser either."""
    mask = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert global_counts(mask) == {"tokens": 3, "seqs": 2}
    loss = torch.ones(4, 3)
    assert seq_mean_token_mean(loss, mask, global_counts(mask)["seqs"]).item() == 1.0
    # A step without a single response token divides 0 by 1 rather than by 0.
    assert global_counts(torch.zeros(2, 3, dtype=torch.bool)) == {"tokens": 1, "seqs": 1}
