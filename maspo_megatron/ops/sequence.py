"""Per-response-token log-probs and entropy from a causal LM's logits or last hidden states.

Model-agnostic: the caller supplies the vocab-parallel logits shard (or hidden states plus the
output-layer weight shard) laid out like ``input_ids``:

- padded batch: ``input_ids [B, S]``, logits ``[B, S, Vp]`` / hidden ``[B, S, h]``;
- packed (THD): ``input_ids [T]`` (or ``[1, T]``), logits ``[T, Vp]`` (or ``[1, T, Vp]``) and
  ``cu_seqlens [n + 1]`` with sequence i at ``[cu_seqlens[i], cu_seqlens[i+1])``; tokens after
  ``cu_seqlens[-1]`` are padding.

Outputs are aligned with ``input_ids``: ``out[t] = log p(input_ids[t] | input_ids[<t])`` (from the
logits at position t - 1 of the same sequence) where ``response_mask[t]`` is set, and 0 elsewhere.
The first token of a sequence has no prediction, so ``response_mask`` there is an error.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .fused_linear import fused_linear_vocab_parallel_logprobs
from .vocab_parallel import vocab_parallel_logprobs


def _layout(input_ids: torch.Tensor, response_mask: torch.Tensor, cu_seqlens):
    """Flat ids, flat bool mask, and a flat bool 'has a predecessor in its sequence'."""
    if response_mask.shape != input_ids.shape:
        raise ValueError(
            f"response_mask shape {tuple(response_mask.shape)} must equal input_ids shape "
            f"{tuple(input_ids.shape)}")
    ids = input_ids.reshape(-1)
    mask = response_mask.reshape(-1).bool()
    n = ids.numel()
    has_prev = torch.ones(n, dtype=torch.bool, device=ids.device)
    if cu_seqlens is None:
        if input_ids.dim() != 2:
            raise ValueError(
                f"padded input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}; "
                "pass cu_seqlens for packed sequences")
        has_prev.view(input_ids.shape)[:, 0] = False
    else:
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(
                f"packed input_ids must be [T] or [1, T], got shape {tuple(input_ids.shape)}")
        cu = cu_seqlens.to(device=ids.device, dtype=torch.long)
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) \
                or int(cu[-1]) > n:
            raise ValueError(
                f"cu_seqlens must be a non-decreasing 1-D tensor starting at 0 and ending at "
                f"<= {n} tokens, got {cu.tolist()}")
        has_prev[cu[:-1][cu[:-1] < n]] = False
        has_prev[int(cu[-1]):] = False  # trailing padding belongs to no sequence
        if bool(mask[int(cu[-1]):].any()):
            raise ValueError("response_mask is set on padding tokens after cu_seqlens[-1]")
    if bool((mask & ~has_prev).any()):
        first = int(torch.nonzero(mask & ~has_prev)[0])
        raise ValueError(
            f"response_mask is set on flat token {first}, the first token of its sequence, "
            "which has no preceding logits to predict it (every response needs a prompt)")
    return ids, mask


def _scatter_to_tokens(values, ids_shape, pred_pos):
    """Places the prediction made at flat position p onto token p + 1."""
    out = values.new_zeros(ids_shape.numel())
    return out.index_put((pred_pos + 1,), values).view(ids_shape)


def response_logprobs_from_logits(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    entropy: bool = True,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs/entropy of ``input_ids`` under ``logits``, zero outside ``response_mask``.

    ``logits`` is the vocab-parallel shard ``[*input_ids.shape, Vp]``. Every position is scored
    (a shifted view would force a copy of the logits); the prediction for token t is taken from
    position t - 1 and non-response tokens get 0 and no gradient. The entropy at token t is that
    of the distribution that predicted it.
    """
    if logits.shape[:-1] != input_ids.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} must be input_ids shape "
            f"{tuple(input_ids.shape)} + [vocab shard]")
    ids, mask = _layout(input_ids, response_mask, cu_seqlens)
    # Target of position p is token p + 1; positions whose prediction is not used get a dummy
    # target 0 so that padding ids (e.g. -100) need not be valid token ids.
    targets = torch.where(torch.roll(mask, -1), torch.roll(ids, -1), 0)
    lp, ent = vocab_parallel_logprobs(
        logits.reshape(-1, logits.shape[-1]), targets, tp_group, entropy=entropy,
        temperature=temperature, chunk_tokens=chunk_tokens, vocab_size=vocab_size)
    pred_pos = torch.nonzero(mask).squeeze(1) - 1
    lp_out = _scatter_to_tokens(lp[pred_pos], input_ids.shape, pred_pos)
    ent_out = _scatter_to_tokens(ent[pred_pos], input_ids.shape, pred_pos) if entropy else None
    return lp_out, ent_out


def response_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    entropy: bool = True,
    temperature: float = 1.0,
    chunk_tokens: int | None = 1024,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like :func:`response_logprobs_from_logits` from last hidden states ``[*input_ids.shape, h]``.

    Only the positions that predict a response token are pushed through the output layer (the
    hidden-state gather is cheap; prompt tokens cost no vocab work). ``hidden`` follows the
    tensor-parallel contract of :func:`fused_linear_vocab_parallel_logprobs` (full sequence,
    replicated over ``tp_group``; its gradient is all-reduced over ``tp_group``).
    """
    if hidden.shape[:-1] != input_ids.shape:
        raise ValueError(
            f"hidden shape {tuple(hidden.shape)} must be input_ids shape "
            f"{tuple(input_ids.shape)} + [hidden size]")
    ids, mask = _layout(input_ids, response_mask, cu_seqlens)
    pred_pos = torch.nonzero(mask).squeeze(1) - 1
    h = hidden.reshape(-1, hidden.shape[-1])[pred_pos]
    lp, ent = fused_linear_vocab_parallel_logprobs(
        h, weight, ids[pred_pos + 1], tp_group, entropy=entropy, temperature=temperature,
        chunk_tokens=chunk_tokens, vocab_size=vocab_size)
    lp_out = _scatter_to_tokens(lp, input_ids.shape, pred_pos)
    ent_out = _scatter_to_tokens(ent, input_ids.shape, pred_pos) if entropy else None
    return lp_out, ent_out
