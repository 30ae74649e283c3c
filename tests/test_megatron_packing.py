"""Packed (THD) micro-batches: layout, budget, and log-probs equal to the padded path.

The TE attention that consumes THD runs only on GPUs with Transformer Engine; this checks
everything around it on CPU: the packing, the way back to [n, L], and that the vocab-parallel
log-prob helper over a packed stream gives the padded result.
"""

import torch

from maspo_megatron.megatron.actor import pack_micro_batches, pack_sequences
from maspo_megatron.ops.sequence import response_logprobs_from_logits


def _batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 3, 7])
    ids = torch.randint(1, 30, (3, 7), generator=g)
    ids[torch.arange(7)[None] >= lengths[:, None]] = 0
    mask = (torch.arange(7)[None] >= 2) & (torch.arange(7)[None] < lengths[:, None])
    return ids, lengths, mask


def test_pack_sequences_layout_and_round_trip():
    ids, lengths, mask = _batch()
    p = pack_sequences(ids, lengths, mask, pad_to_multiple=4)
    assert p.input_ids.shape == (1, 16)  # 15 tokens + a 1-token padding segment
    assert p.cu_seqlens.tolist() == [0, 5, 8, 15, 16]
    assert p.cu_seqlens.dtype == torch.int32 and p.max_seqlen == 7
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0]
    assert not p.response_mask[0, 15]
    expected = ids.clone()
    torch.testing.assert_close(p.unpack(p.input_ids, ids.shape), expected)
    torch.testing.assert_close(p.unpack(p.response_mask, mask.shape), mask)


def test_packed_logprobs_equal_padded():
    ids, lengths, mask = _batch()
    vocab = 30
    g = torch.Generator().manual_seed(1)
    padded_logits = torch.randn(3, 7, vocab, generator=g, dtype=torch.float64)
    p = pack_sequences(ids, lengths, mask, pad_to_multiple=4)
    packed_logits = torch.randn(1, 16, vocab, generator=g, dtype=torch.float64)
    packed_logits[0, : len(p.rows)] = padded_logits[p.rows, p.cols]
    ref, ref_ent = response_logprobs_from_logits(padded_logits, ids, mask)
    lp, ent = response_logprobs_from_logits(packed_logits, p.input_ids, p.response_mask,
                                            cu_seqlens=p.cu_seqlens)
    torch.testing.assert_close(p.unpack(lp, ids.shape), ref)
    torch.testing.assert_close(p.unpack(ent, ids.shape), ref_ent)


def test_micro_batch_budget_padded_vs_packed():
    lengths = torch.tensor([10, 9, 2, 2, 2, 2])
    index = torch.arange(6)
    padded = pack_micro_batches(index, lengths, token_budget=20)
    packed = pack_micro_batches(index, lengths, token_budget=20, padded=False)
    # Padded: [10, 9] costs 2x10; the short rows pack 4 x 2.
    assert [m.tolist() for m in padded] == [[0, 1], [2, 3, 4, 5]]
    # Packed: 10 + 9 = 19 tokens, then 2 x 4 = 8 tokens.
    assert [m.tolist() for m in packed] == [[0, 1], [2, 3, 4, 5]]
    tight = pack_micro_batches(index, lengths, token_budget=12, padded=False)
    assert [m.tolist() for m in tight] == [[0], [1, 2], [3, 4, 5]]  # greedy, longest first
    assert sorted(sum((m.tolist() for m in tight), [])) == list(range(6))
