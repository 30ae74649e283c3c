"""Group-relative advantages (one scalar per response, shared by all of its tokens).

Rewards come either as [num_groups, group_size] (row g = the responses to prompt g) or flat
[num_groups * group_size] with ``group_size`` given, responses of one prompt contiguous.

- ``grpo``    A_i = (R_i - mean_g R) / (std_g R + eps)   (Shao et al. 2024, DeepSeekMath,
              arXiv 2402.03300). A group whose rewards are all equal gets A = 0.
- ``dr_grpo`` A_i =  R_i - mean_g R                       (Liu et al. 2025, Dr.GRPO,
              arXiv 2503.20783: no std division, which biases towards too easy/hard prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ESTIMATORS = ("grpo", "dr_grpo")


@dataclass(frozen=True)
class AdvantageConfig:
    """estimator: ``grpo`` or ``dr_grpo``.
    eps: added to the group std (grpo) so equal-reward groups give 0, not nan.
    std_unbiased: Bessel-corrected std (n-1), as ``torch.std`` in verl/TRL; False for the
      population std.
    """

    estimator: str = "grpo"
    eps: float = 1e-6
    std_unbiased: bool = True

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"AdvantageConfig.estimator {self.estimator!r} is not one of: "
                             f"{', '.join(ESTIMATORS)}")
        if self.eps < 0:
            raise ValueError(f"AdvantageConfig.eps must be >= 0, got {self.eps}")


def as_groups(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """View rewards as [num_groups, group_size], validating shape, group size and finiteness."""
    rewards = torch.as_tensor(rewards)
    if rewards.dim() == 2:
        if group_size is not None and rewards.shape[1] != group_size:
            raise ValueError(f"rewards of shape {tuple(rewards.shape)} have group size "
                             f"{rewards.shape[1]}, but group_size={group_size} was given")
        groups = rewards
    elif rewards.dim() == 1:
        if group_size is None:
            raise ValueError(f"flat rewards of shape {tuple(rewards.shape)} need group_size; "
                             "or pass them shaped [num_groups, group_size]")
        if group_size < 1 or rewards.numel() % group_size:
            raise ValueError(f"flat rewards of length {rewards.numel()} are not a whole number "
                             f"of groups of group_size={group_size}")
        groups = rewards.view(-1, group_size)
    else:
        raise ValueError(f"rewards must be [num_groups, group_size] or flat [num_groups * "
                         f"group_size], got shape {tuple(rewards.shape)}")
    if groups.shape[0] == 0:
        raise ValueError("rewards are empty: expected at least one group")
    if groups.shape[1] < 2:
        raise ValueError(f"group size {groups.shape[1]} (rewards shape {tuple(rewards.shape)}): "
                         "group-relative advantages need >= 2 responses per prompt "
                         "(with one, every advantage is 0)")
    if not torch.is_floating_point(groups):
        groups = groups.float()
    bad = ~torch.isfinite(groups)
    if bad.any():
        idx = [tuple(i) for i in bad.nonzero().tolist()[:5]]
        raise ValueError(f"rewards contain non-finite values at (group, index) {idx}")
    return groups


def group_advantages(rewards: torch.Tensor, group_size: int | None = None,
                     cfg: AdvantageConfig = AdvantageConfig()) -> torch.Tensor:
    """Per-response advantages, in the same shape as ``rewards`` (2-D or flat)."""
    groups = as_groups(rewards, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if cfg.estimator == "grpo":
        adv = adv / (groups.std(dim=1, keepdim=True, unbiased=cfg.std_unbiased) + cfg.eps)
    return adv.reshape(torch.as_tensor(rewards).shape)


def expand_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] per-response advantages -> [N, T] per-token, 0 outside the response ``mask``."""
    if advantages.dim() != 1 or mask.dim() != 2 or advantages.shape[0] != mask.shape[0]:
        raise ValueError(f"expected advantages [N] and mask [N, T], got "
                         f"{tuple(advantages.shape)} and {tuple(mask.shape)}")
    return torch.where(mask.to(torch.bool), advantages[:, None], 0.0).to(advantages.dtype)
