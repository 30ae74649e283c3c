"""The RL objective of a train step, as one pure function of a micro-batch's tensors.

    loss_t = policy_loss_t(logp, logp_old, A) * tis_t  +  kl_coef * k3(ref || pi)_t  -  entropy_coef * H_t
    loss   = aggregate(loss_t over the response mask, global normaliser)

- ``policy_loss_t``: the configured loss (``algo.losses``: MASPO and the baselines);
- ``tis_t``: truncated importance sampling against the rollout engine's log-probs, when
  ``tis_cap`` is set (``algo.losses.truncated_is_weight``);
- ``k3``: Schulman's k3 estimate of KL(pi || ref) to a frozen reference policy (``kl_coef > 0``);
- ``H_t``: the policy's per-token entropy (bonus ``entropy_coef``);
- ``aggregate``: ``algo.aggregation``, dividing by the *global* counts of the mini-batch
  (:func:`~maspo_megatron.algo.aggregation.global_counts`), so each micro-batch's loss is its
  share of the whole step's loss.

**Off-policy samples: the decoupled objective.** With ``rollout.pipeline=one_step_off`` a token
may be sampled by weights one version older than the trainer's (and, with partial rollouts, the
tokens of one response by two versions). Three policies then meet, as in the decoupled PPO
objective of Hilton, Cobbe & Schulman, "Batch size-invariance for policy optimization" (NeurIPS
2022, arXiv 2110.00641), which AReaL (Fu et al. 2025, arXiv 2505.24298) uses for asynchronous RL:

- the behaviour policy pi_behav: the weights that sampled the token; its log-prob is the
  rollout engine's, per token (``rollout_logprobs``);
- the proximal policy pi_prox: the trainer's weights before this step's update; its log-prob is
  the trainer's own pass over the batch (``old_logprobs``);
- pi_theta: the weights being optimised.

    w_t    = min(pi_prox(y_t) / pi_behav(y_t), tis_cap)                  (data: no gradient)
    loss_t = w_t * policy_loss_t(r_t = pi_theta(y_t) / pi_prox(y_t), A_t; p_old = pi_prox(y_t))

so the trust region (the PPO clip, or MASPO's soft gate and its mass-adaptive width
m = clamp(sigma_base / p_old**alpha, ...)) is centred on the proximal policy, and w_t reweights
the tokens from the distribution that sampled them to the proximal one. When the behaviour and
proximal log-probs are equal (same weights, same numerics) w_t = 1 and the loss is the on-policy
loss exactly (``tests/test_algo_decoupled.py``). The same weight is the truncated importance
sampling correction for the train/rollout numerical mismatch (``tis``, Yao et al. 2025): with the
engine's log-probs as the behaviour policy, one weight covers staleness and mismatch alike. Where
AReaL drops a token whose weight exceeds the cap, it is truncated here (as TIS does), so every
token keeps a bounded gradient. ``rollout.pipeline=one_step_off`` therefore requires ``tis_cap``.

The actor (``megatron/actor.py``) is handed an :class:`Objective`: it computes log-probs and
entropy, calls the objective per micro-batch, back-propagates the loss and reduces the metrics
(:mod:`maspo_megatron.algo.metrics`); it knows no loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from maspo_megatron.algo.aggregation import AggregationConfig, aggregate, global_counts
from maspo_megatron.algo.losses import (
    CISPOConfig,
    ClipHigherConfig,
    GRPOConfig,
    GSPOConfig,
    MASPOConfig,
    PolicyLossConfig,
    SAPOConfig,
    get_loss,
    policy_loss,
)
from maspo_megatron.algo.metrics import Metrics, mean_metric


@dataclass
class LossConfigs:
    """One typed config per policy loss; ``ObjectiveConfig.loss`` picks the active one."""

    maspo: MASPOConfig = field(default_factory=MASPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    clip_higher: ClipHigherConfig = field(default_factory=ClipHigherConfig)
    sapo: SAPOConfig = field(default_factory=SAPOConfig)
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    cispo: CISPOConfig = field(default_factory=CISPOConfig)


@dataclass
class ObjectiveConfig:
    """What is optimised (the ``actor.`` keys of a run's config: ``ActorConfig`` extends this)."""

    loss: str = "maspo"
    """Policy loss name (``algo.losses``): maspo, grpo, clip_higher, sapo, gspo, cispo."""
    losses: LossConfigs = field(default_factory=LossConfigs)
    """Per-loss settings (paper defaults); only ``losses.<loss>`` is used."""
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    entropy_coef: float = 0.0
    """Entropy bonus (subtracted from the loss)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL estimate to a reference policy (needs ``ref_logprobs`` in the batch)."""
    tis_cap: float | None = None
    """Cap of the behaviour weight min(pi_prox / pi_behav, cap) against the rollout engine's
    log-probs: truncated importance sampling for the train/rollout mismatch, and the decoupled
    objective's weight for stale samples (2.0 is the usual choice); None disables it."""

    def __post_init__(self):
        get_loss(self.loss)  # raises with the valid names
        if not hasattr(self.losses, self.loss):
            raise ValueError(f"actor.losses has no section for loss {self.loss!r}")

    @property
    def loss_config(self) -> PolicyLossConfig:
        return getattr(self.losses, self.loss)


def k3_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: unbiased, non-negative, low variance."""
    log_ratio = (ref_logprobs - logprobs).clamp(-20, 20)
    return torch.exp(log_ratio) - log_ratio - 1


def rl_objective(cfg: ObjectiveConfig, logprobs: torch.Tensor, entropy: torch.Tensor | None,
                 batch: Mapping[str, torch.Tensor], counts: Mapping[str, int | float | torch.Tensor]
                 ) -> tuple[torch.Tensor, Metrics]:
    """This micro-batch's share of the objective, and its metrics (``algo.metrics``).

    ``logprobs`` / ``entropy``: ``[n, L]`` of the current policy (only ``logprobs`` and, with an
    entropy bonus, ``entropy`` are differentiated). ``batch``: ``response_mask`` ``[n, L]``,
    ``advantages`` ``[n]`` or ``[n, L]``, ``old_logprobs`` ``[n, L]``, and ``rollout_logprobs`` /
    ``ref_logprobs`` when TIS / the KL term are on (other keys are ignored). ``counts``: the
    mini-batch's global ``tokens`` and ``seqs`` (:func:`global_counts`).

    Metrics: the policy loss's, ``tis/*`` with TIS, ``kl_ref`` with the KL term, and ``entropy``
    (when ``entropy`` is given), each a mean over the response tokens unless the loss says
    otherwise.
    """
    mask = batch["response_mask"]
    adv = batch["advantages"]
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logprobs)
    loss_tok, metrics = policy_loss(
        cfg.loss, cfg.loss_config, logprobs, batch["old_logprobs"], adv, mask,
        rollout_logprobs=batch.get("rollout_logprobs") if cfg.tis_cap is not None else None,
        tis_cap=cfg.tis_cap,
    )
    if cfg.kl_coef > 0:
        kl = k3_kl(batch["ref_logprobs"], logprobs)
        loss_tok = loss_tok + cfg.kl_coef * kl
        metrics["kl_ref"] = mean_metric(kl, mask)
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("an entropy bonus (entropy_coef > 0) needs the policy's entropy")
        loss_tok = loss_tok - cfg.entropy_coef * entropy
    if entropy is not None:
        metrics["entropy"] = mean_metric(entropy, mask)
    loss = aggregate(cfg.aggregation, loss_tok, mask, global_num_tokens=counts["tokens"],
                     global_num_seqs=counts["seqs"])
    return loss, metrics


class Objective:
    """:func:`rl_objective` bound to its config: the callable a train step is handed."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    @property
    def required_fields(self) -> tuple[str, ...]:
        """Batch fields the objective reads, besides the response mask."""
        fields = ("advantages", "old_logprobs")
        if self.cfg.tis_cap is not None:
            fields += ("rollout_logprobs",)
        if self.cfg.kl_coef > 0:
            fields += ("ref_logprobs",)
        return fields

    @staticmethod
    def counts(response_mask: torch.Tensor) -> dict[str, int]:
        """The global normalisers of a mini-batch (its whole ``[N, L]`` response mask)."""
        return global_counts(response_mask)

    def __call__(self, logprobs: torch.Tensor, entropy: torch.Tensor | None,
                 batch: Mapping[str, torch.Tensor], counts: Mapping[str, int | float | torch.Tensor]
                 ) -> tuple[torch.Tensor, Metrics]:
        return rl_objective(self.cfg, logprobs, entropy, batch, counts)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"Objective(loss={c.loss!r}, aggregation={c.aggregation.mode!r}, "
                f"kl_coef={c.kl_coef}, entropy_coef={c.entropy_coef}, tis_cap={c.tis_cap})")
