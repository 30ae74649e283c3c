"""Reducing a per-token loss [B, T] to the scalar this rank back-propagates.

Every mode divides by a *global* count the caller supplies (all-reduced over data-parallel ranks
and summed over the micro-batches of one optimizer step), never by a local one. Each rank/micro-
batch then contributes a partial sum, and the sum of the partial results (what gradient
accumulation plus a DP all-reduce-sum computes) equals the loss of one big batch. Megatron's DDP
averages gradients over DP ranks by default; the caller must account for that factor (multiply by
the DP size, or configure DDP to sum) — this module only defines the normalisation.

Masked positions never contribute: they are selected out with ``torch.where`` (not multiplied by
0), so padding with inf/nan loss values cannot leak into the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def _masked(loss: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if loss.shape != mask.shape:
        raise ValueError(f"loss {tuple(loss.shape)} and mask {tuple(mask.shape)} must match")
    if loss.dim() != 2:
        raise ValueError(f"expected [batch, tokens] loss, got shape {tuple(loss.shape)}")
    mask = mask.to(torch.bool)
    return torch.where(mask, loss, torch.zeros_like(loss)), mask


def _check_count(name: str, value) -> None:
    # Tensors (e.g. an all-reduced count on GPU) are not checked: that would force a host sync.
    if not isinstance(value, torch.Tensor) and value <= 0:
        raise ValueError(f"{name} must be > 0 (a global count over DP ranks and micro-batches), "
                         f"got {value}")


def token_mean_global(loss: torch.Tensor, mask: torch.Tensor,
                      global_num_tokens: int | float | torch.Tensor) -> torch.Tensor:
    """sum(loss over this rank's response tokens) / global_num_tokens (DAPO "token-mean")."""
    _check_count("global_num_tokens", global_num_tokens)
    loss, _ = _masked(loss, mask)
    return loss.sum() / global_num_tokens


def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor,
                        global_num_seqs: int | float | torch.Tensor) -> torch.Tensor:
    """sum_i (mean of loss over sequence i's response tokens) / global_num_seqs (GRPO paper).

    A row without response tokens contributes 0 (and should not be counted in global_num_seqs).
    """
    _check_count("global_num_seqs", global_num_seqs)
    loss, mask = _masked(loss, mask)
    per_seq = loss.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_seq.sum() / global_num_seqs


def seq_mean_token_sum_norm(loss: torch.Tensor, mask: torch.Tensor,
                            global_num_seqs: int | float | torch.Tensor,
                            normalizer: float) -> torch.Tensor:
    """sum_i sum_t loss_it / (normalizer * global_num_seqs): Dr.GRPO's constant normaliser.

    Liu et al. 2025, "Understanding R1-Zero-Like Training" (arXiv 2503.20783): divide by a
    constant (e.g. the maximum response length) instead of each response's own length, which
    removes GRPO's length bias.
    """
    _check_count("global_num_seqs", global_num_seqs)
    _check_count("normalizer", normalizer)
    loss, _ = _masked(loss, mask)
    return loss.sum() / (normalizer * global_num_seqs)


def global_counts(mask: torch.Tensor,
                  sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, int]:
    """The normalisers of one optimizer step from its ``[N, L]`` response mask.

    ``tokens``: response tokens; ``seqs``: rows with at least one response token. A fully masked
    row (e.g. a truncated response under ``algorithm.mask_truncated``) contributes nothing to the
    loss, so it is not counted either: otherwise the sequence-level modes would shrink by the
    masked fraction. Both are at least 1 (a step with no response token has loss 0).
    ``sum_over_ranks``: when each rank holds only its rows of the step, the sum of a tensor over
    those ranks (the counts are of the whole step); None when ``mask`` is the whole step's.
    """
    if mask.dim() != 2:
        raise ValueError(f"expected a [batch, tokens] mask, got shape {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    local = torch.stack([mask.sum(), mask.any(dim=1).sum()]).double()
    tokens, seqs = (sum_over_ranks(local) if sum_over_ranks is not None else local).tolist()
    return {"tokens": max(int(tokens), 1), "seqs": max(int(seqs), 1)}


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token_mean_global": token_mean_global,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


@dataclass(frozen=True)
class AggregationConfig:
    """How the per-token loss is reduced.

    mode: one of ``AGGREGATIONS``. ``token_mean_global`` (default) weights every response token
      equally across the whole step; ``seq_mean_token_mean`` weights every response equally;
      ``seq_mean_token_sum_norm`` (Dr.GRPO) weights every token equally within a batch of
      sequences, normalised by the constant ``normalizer``.
    normalizer: required by ``seq_mean_token_sum_norm`` (typically the maximum response length).
    """

    mode: str = "token_mean_global"
    normalizer: float | None = None

    def __post_init__(self):
        if self.mode not in AGGREGATIONS:
            raise ValueError(f"AggregationConfig.mode {self.mode!r} is not one of: "
                             f"{', '.join(AGGREGATIONS)}")
        if self.mode == "seq_mean_token_sum_norm" and self.normalizer is None:
            raise ValueError("AggregationConfig.normalizer is required for mode "
                             "'seq_mean_token_sum_norm' (e.g. the max response length)")


def aggregate(cfg: AggregationConfig, loss: torch.Tensor, mask: torch.Tensor, *,
              global_num_tokens: int | float | torch.Tensor | None = None,
              global_num_seqs: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce ``loss`` per ``cfg.mode``; pass the global count that mode divides by."""
    if cfg.mode == "token_mean_global":
        if global_num_tokens is None:
            raise ValueError("aggregation 'token_mean_global' needs global_num_tokens")
        return token_mean_global(loss, mask, global_num_tokens)
    if global_num_seqs is None:
        raise ValueError(f"aggregation {cfg.mode!r} needs global_num_seqs")
    if cfg.mode == "seq_mean_token_mean":
        return seq_mean_token_mean(loss, mask, global_num_seqs)
    return seq_mean_token_sum_norm(loss, mask, global_num_seqs, cfg.normalizer)
