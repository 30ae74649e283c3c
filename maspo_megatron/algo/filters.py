"""Sampling filters and overlong-response handling (DAPO, Yu et al. 2025, arXiv 2503.14476).

- Dynamic sampling: a group whose rewards are all equal has zero group-relative
  advantage everywhere, so it contributes no gradient but still dilutes the batch; drop it (and
  sample more prompts until the batch is full — the trainer's job).
- Overlong filtering (DAPO "Overlong Reward Shaping"): exclude truncated responses (those that
  hit the length limit without finishing) from the loss: punishing them would penalise possibly
  sound reasoning for its length alone (reward noise).
- Soft overlong punishment (DAPO, same section): a length penalty that ramps linearly from 0 to -1
  inside the last ``buffer_length`` tokens before ``max_response_length``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maspo_megatron.algo.advantages import as_groups


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int | None = None,
                          atol: float = 0.0) -> torch.Tensor:
    """bool [num_groups]: True for groups whose rewards are not all equal (max - min > atol)."""
    groups = as_groups(rewards, group_size)
    return (groups.amax(dim=1) - groups.amin(dim=1)) > atol


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Response mask [N, T] with the rows of truncated responses (``truncated`` bool [N]) zeroed."""
    truncated = torch.as_tensor(truncated, dtype=torch.bool, device=mask.device)
    if mask.dim() != 2 or truncated.shape != (mask.shape[0],):
        raise ValueError(f"expected mask [N, T] and truncated [N], got {tuple(mask.shape)} and "
                         f"{tuple(truncated.shape)}")
    keep = ~truncated[:, None]
    return mask & keep if mask.dtype == torch.bool else mask * keep.to(mask.dtype)


@dataclass(frozen=True)
class OverlongConfig:
    """DAPO soft overlong punishment. Defaults are DAPO's: generation limit 20480 tokens, of which
    the last 4096 are the punishment buffer (expected length 16384), penalty scale 1.0."""

    max_response_length: int = 20480
    buffer_length: int = 4096
    penalty_factor: float = 1.0

    def __post_init__(self):
        if not 0 < self.buffer_length <= self.max_response_length:
            raise ValueError(f"OverlongConfig needs 0 < buffer_length ({self.buffer_length}) <= "
                             f"max_response_length ({self.max_response_length})")
        if self.penalty_factor < 0:
            raise ValueError(f"OverlongConfig.penalty_factor must be >= 0, "
                             f"got {self.penalty_factor}")


def overlong_penalty(response_lengths: torch.Tensor,
                     cfg: OverlongConfig = OverlongConfig()) -> torch.Tensor:
    """Penalty to add to each response's reward (<= 0), DAPO's R_length:

        0                                   if L <= L_max - L_buf
        ((L_max - L_buf) - L) / L_buf       if L_max - L_buf < L <= L_max
        -1                                  if L > L_max
    scaled by ``penalty_factor``.
    """
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)
    expected = cfg.max_response_length - cfg.buffer_length
    ramp = (expected - lengths) / cfg.buffer_length
    return cfg.penalty_factor * torch.clamp(ramp, min=-1.0, max=0.0)
