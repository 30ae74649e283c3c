"""response_logprobs_from_{logits,hidden}: shifting, masking, padded and packed layouts (TP=1)."""

import pytest
import torch

from maspo_megatron.ops import response_logprobs_from_hidden, response_logprobs_from_logits

V, H = 11, 4


def loop_reference(full_logits_rows, ids_rows, mask_rows, temperature):
    """One sequence at a time: token t scored by log_softmax(logits[t - 1] / T)."""
    lp_out, ent_out = [], []
    for logits, ids, mask in zip(full_logits_rows, ids_rows, mask_rows):
        lp = torch.zeros(len(ids), dtype=torch.float64)
        ent = torch.zeros(len(ids), dtype=torch.float64)
        for t in range(1, len(ids)):
            if mask[t]:
                ls = torch.log_softmax(logits[t - 1].double() / temperature, -1)
                lp[t] = ls[ids[t]]
                ent[t] = -(ls.exp() * ls).sum()
        lp_out.append(lp)
        ent_out.append(ent)
    return lp_out, ent_out


def make_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 6), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0],   # right padding after the response
                         [0, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    ids[0, 5] = -100  # padding ids need not be valid token ids
    hidden = torch.randn(3, 6, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    return ids, mask, hidden, weight


@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_padded_batch(source):
    ids, mask, hidden, weight = make_batch()
    logits = hidden @ weight.t()
    if source == "logits":
        lp, ent = response_logprobs_from_logits(logits, ids, mask, temperature=0.8, chunk_tokens=5)
    else:
        lp, ent = response_logprobs_from_hidden(
            hidden, weight, ids, mask, temperature=0.8, chunk_tokens=5)
    ref_lp, ref_ent = loop_reference(logits, ids, mask, 0.8)
    torch.testing.assert_close(lp, torch.stack(ref_lp))
    torch.testing.assert_close(ent, torch.stack(ref_ent))
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()


@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_packed_sequences_and_gradients(source):
    ids, mask, hidden, weight = make_batch(1)
    # Pack three sequences of lengths 4, 6, 3 (+ 2 padding tokens) into T = 15.
    lens = [4, 6, 3]
    packed_ids = torch.cat([ids[i, :n] for i, n in enumerate(lens)] + [torch.zeros(2, dtype=torch.long)])
    packed_mask = torch.cat([mask[i, :n] for i, n in enumerate(lens)] + [torch.zeros(2, dtype=torch.bool)])
    packed_mask[11] = True  # sequence 2 = tokens 10..12: respond from its 2nd token on
    packed_hidden = torch.cat([hidden[i, :n] for i, n in enumerate(lens)] + [hidden[0, :2]])
    packed_hidden.requires_grad_(True)
    cu = torch.tensor([0, 4, 10, 13])
    logits = packed_hidden @ weight.t()
    if source == "logits":
        lp, ent = response_logprobs_from_logits(
            logits.unsqueeze(0), packed_ids.unsqueeze(0), packed_mask.unsqueeze(0),
            cu_seqlens=cu, chunk_tokens=4)
        lp, ent = lp.squeeze(0), ent.squeeze(0)
    else:
        lp, ent = response_logprobs_from_hidden(
            packed_hidden, weight, packed_ids, packed_mask, cu_seqlens=cu, chunk_tokens=4)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    ref_lp, ref_ent = loop_reference([logits[a:b] for a, b in bounds],
                                     [packed_ids[a:b] for a, b in bounds],
                                     [packed_mask[a:b] for a, b in bounds], 1.0)
    torch.testing.assert_close(lp[:13], torch.cat(ref_lp))
    torch.testing.assert_close(ent[:13], torch.cat(ref_ent))
    assert (lp[13:] == 0).all()
    (g,) = torch.autograd.grad((lp * 1.5 + ent).sum(), packed_hidden, retain_graph=True)
    ref_total = sum(a * 1.5 + b for a, b in zip((x.sum() for x in ref_lp), (x.sum() for x in ref_ent)))
    (g_ref,) = torch.autograd.grad(ref_total, packed_hidden)
    torch.testing.assert_close(g, g_ref)
    # Positions whose prediction is unused (they precede a non-response token) get no gradient.
    unused = ~torch.roll(packed_mask, -1)
    assert (g[unused] == 0).all()


def test_bad_layouts():
    ids, mask, hidden, weight = make_batch()
    logits = hidden @ weight.t()
    bad = mask.clone()
    bad[1, 0] = True
    with pytest.raises(ValueError, match="first token of its sequence"):
        response_logprobs_from_logits(logits, ids, bad)
    with pytest.raises(ValueError, match="response_mask shape"):
        response_logprobs_from_logits(logits, ids, mask[:, :3])
    flat_ids, flat_mask = ids.reshape(-1), mask.reshape(-1)
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        response_logprobs_from_logits(logits.reshape(18, V), flat_ids, flat_mask,
                                      cu_seqlens=torch.tensor([0, 6, 19]))
    with pytest.raises(ValueError, match="padded input_ids must be"):
        response_logprobs_from_logits(logits.reshape(18, V), flat_ids, flat_mask)
    with pytest.raises(ValueError, match="padding tokens after cu_seqlens"):
        response_logprobs_from_logits(logits.reshape(18, V), flat_ids.clamp(min=0), flat_mask,
                                      cu_seqlens=torch.tensor([0, 6, 12]))
