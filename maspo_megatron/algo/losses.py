"""Per-token policy losses: MASPO and the baselines it is compared against.

Every loss has the signature

    fn(logprobs, old_logprobs, advantages, mask, cfg) -> (loss_per_token, metrics)

- ``logprobs``      [B, T] log pi_theta(y_t) of the sampled tokens (the only differentiated input).
- ``old_logprobs``  [B, T] log pi_old(y_t) (the policy that defines the ratio); treated as data.
- ``advantages``    [B, T] per-token, or [B, 1] per-sequence (broadcast); treated as data.
- ``mask``          [B, T] response-token mask (bool or 0/1), or None for "every token counts".
                    Only metrics use it, except ``gspo``, which needs it for its sequence mean.
- ``loss_per_token`` has the broadcast shape [B, T] and is *not* masked or reduced: aggregation
  (``algo.aggregation``) owns the mask and the normaliser, so that the loss and the way it is
  averaged can be chosen independently.

Inputs in half precision are computed in float32. The ratio is r = exp(clamp(logp - logp_old,
-c, c)) with c = ``cfg.log_ratio_clamp`` (20), so a stale or garbage log-prob cannot produce inf.

Metrics are :class:`~maspo_megatron.algo.metrics.Metric` ``(total, weight)`` pairs computed
over *this call's* masked elements (per rank, per micro-batch; nothing is all-reduced here):
a mean carries the sum and the number of elements it averages over (all response tokens; the
tokens of one advantage sign for the MASPO fractions; tokens with A != 0 for the MASPO width;
sequences for GSPO's sequence ratio), a ``*_max`` key the maximum. The caller reduces them over
micro-batches and ranks as sum(total) / sum(weight) (MAX for maxima): see ``algo.metrics``,
whose ``metric_values`` turns them into numbers. Shared keys:

- ``policy/ratio_mean``, ``policy/ratio_max``: the token ratio r = pi_theta / pi_old.
- ``policy/approx_kl_k3``: Schulman's k3 estimator of KL(pi_old || pi_theta) from tokens sampled
  by pi_old: mean(r - 1 - log r) with r = pi_theta / pi_old. It is unbiased for that direction of
  the KL and never negative. (http://joschu.net/blog/kl-approx.html)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from maspo_megatron.algo.metrics import Metrics, max_metric, mean_metric

LossFn = Callable[..., tuple[torch.Tensor, Metrics]]

#: TIS cap used when rollout log-probs are given and no cap is.
DEFAULT_TIS_CAP = 2.0
#: A gate below this counts as "gated" in the MASPO fraction metrics.
GATED_THRESHOLD = 0.99


# ----------------------------------------------------------------------------------- helpers


def _prepare(logprobs, old_logprobs, advantages, mask):
    """Upcast, broadcast advantages to the token shape, detach data inputs, normalise the mask."""
    if logprobs.shape != old_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and old_logprobs {tuple(old_logprobs.shape)} "
            "must have the same shape")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    logprobs = logprobs.to(dtype)
    old_logprobs = old_logprobs.detach().to(dtype)
    try:
        advantages = torch.broadcast_to(advantages.detach().to(dtype), logprobs.shape)
    except RuntimeError as e:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must be per-token {tuple(logprobs.shape)} "
            f"or per-sequence ({logprobs.shape[0]}, 1)") from e
    if mask is None:
        mask = torch.ones_like(logprobs, dtype=torch.bool)
    elif mask.shape != logprobs.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match logprobs {tuple(logprobs.shape)}")
    else:
        mask = mask.to(torch.bool)
    return logprobs, old_logprobs, advantages, mask


def _log_ratio(logprobs, old_logprobs, clamp):
    return torch.clamp(logprobs - old_logprobs, -clamp, clamp)


def _ratio_metrics(log_ratio, ratio, mask) -> Metrics:
    return {
        "policy/ratio_mean": mean_metric(ratio, mask),
        "policy/ratio_max": max_metric(ratio, mask),
        "policy/approx_kl_k3": mean_metric(ratio - 1 - log_ratio, mask),
    }


# ----------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class PolicyLossConfig:
    """Fields shared by every loss."""

    #: |logp - logp_old| is clamped to this before exp, so the ratio stays finite.
    log_ratio_clamp: float = 20.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"{type(self).__name__}.{f.name} must be >= 0, got {v}")


@dataclass(frozen=True)
class MASPOConfig(PolicyLossConfig):
    """MASPO (arXiv 2602.17550) defaults; see ``maspo_token_loss``."""

    sigma_base: float = 1.0   # gate width for a token of old probability 1
    alpha: float = 0.3        # growth of the width as p_old shrinks: m = sigma_base / p_old**alpha
    sigma_high: float = 10.0  # upper bound of the mass-adaptive width m
    adv_low: float = 0.1      # lower clamp of the risk factor
    adv_high: float = 10.0    # upper clamp of the risk factor
    beta_pos: float = 0.03    # risk factor slope for A > 0: 1 + beta_pos * A
    beta_neg: float = 0.03    # risk factor slope for A < 0: 1 / (1 - beta_neg * A)

    def __post_init__(self):
        super().__post_init__()
        if self.sigma_high < self.sigma_base:
            raise ValueError(f"MASPOConfig.sigma_high ({self.sigma_high}) must be >= "
                             f"sigma_base ({self.sigma_base})")
        if self.adv_high < self.adv_low or self.adv_low <= 0:
            raise ValueError(f"MASPOConfig needs 0 < adv_low <= adv_high, got "
                             f"adv_low={self.adv_low}, adv_high={self.adv_high}")


@dataclass(frozen=True)
class _PPOClipConfig(PolicyLossConfig):
    #: For A < 0 the loss is capped at -c*A (dual clip; None disables). Must be > 1.
    dual_clip_c: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"{type(self).__name__}.dual_clip_c must be > 1 or None, "
                             f"got {self.dual_clip_c}")


@dataclass(frozen=True)
class GRPOConfig(_PPOClipConfig):
    """PPO clipped surrogate as used by GRPO, with dual-clip for negative advantages."""

    eps: float = 0.2                  # clip range: r in [1 - eps, 1 + eps]
    dual_clip_c: float | None = 3.0


@dataclass(frozen=True)
class ClipHigherConfig(_PPOClipConfig):
    """DAPO's decoupled clip ("clip-higher"); DAPO uses no dual clip (dual_clip_c=None)."""

    eps_low: float = 0.2
    eps_high: float = 0.28


@dataclass(frozen=True)
class SAPOConfig(PolicyLossConfig):
    """SAPO soft-gate temperatures (the paper recommends tau_neg > tau_pos)."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self):
        super().__post_init__()
        if self.tau_pos <= 0 or self.tau_neg <= 0:
            raise ValueError(f"SAPOConfig temperatures must be > 0, got tau_pos={self.tau_pos}, "
                             f"tau_neg={self.tau_neg}")


@dataclass(frozen=True)
class GSPOConfig(PolicyLossConfig):
    """GSPO clip range on the length-normalised sequence ratio."""

    eps_low: float = 3e-4
    eps_high: float = 4e-4


@dataclass(frozen=True)
class CISPOConfig(PolicyLossConfig):
    """CISPO bounds on the detached IS weight: clip(r, 1 - eps_low, 1 + eps_high)."""

    eps_high: float = 3.0             # weight capped at 4
    eps_low: float | None = None      # None: no lower bound (as in MiniMax-M1)


# ----------------------------------------------------------------------------------- MASPO


def maspo_gate(ratio: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               cfg: MASPOConfig = MASPOConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """The MASPO gate w (detached) and the width s of the token's advantage sign.

    s is s_pos where A > 0 and s_neg elsewhere (it only matters where the gate applies).
    In float32 the gate underflows to exactly 0 for ratios far outside the width (e.g. r=1e3 at
    s=1); that is the limit of the equation, and the token then simply carries no gradient.
    """
    A = advantages.detach()
    old_logprobs = old_logprobs.detach()
    m = torch.clamp(cfg.sigma_base * torch.exp(-cfg.alpha * old_logprobs), cfg.sigma_base,
                    cfg.sigma_high)
    s_pos = m * torch.clamp(1 + cfg.beta_pos * A, cfg.adv_low, cfg.adv_high)
    s_neg = m * torch.clamp(1 / (1 - cfg.beta_neg * A), cfg.adv_low, cfg.adv_high)
    s = torch.where(A > 0, s_pos, s_neg)

    r = ratio.detach()
    overshoot = ((A > 0) & (r > 1)) | ((A < 0) & (r < 1))
    w = torch.where(overshoot, torch.exp(-((r - 1) ** 2) / (2 * s**2)), torch.ones_like(r))
    return w, s


def maspo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    cfg: MASPOConfig = MASPOConfig(),
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """MASPO per-token loss (Mass-Adaptive Soft Policy Optimization, arXiv 2602.17550).

        r      = exp(clamp(logp - logp_old, -20, 20)),   p_old = exp(logp_old)
        m      = clamp(sigma_base / p_old**alpha, sigma_base, sigma_high)
        s_pos  = m * clamp(1 + beta_pos*A,       adv_low, adv_high)
        s_neg  = m * clamp(1 / (1 - beta_neg*A), adv_low, adv_high)
        w      = exp(-(sg(r) - 1)**2 / (2 s**2))  where (A>0 and r>1) with s = s_pos
                                                   or    (A<0 and r<1) with s = s_neg
                 1                                 elsewhere (including A == 0)
        loss_t = -A * w * r

    ``sigma_base / p_old**alpha`` is computed as ``sigma_base * exp(-alpha * logp_old)`` (same
    value, no underflow of p_old for rare tokens). The gate w is a stop-gradient coefficient, so
    d loss_t / d logp_t = -A * w * r. No hard clip and no dual clip.

    Extra metrics: ``maspo/gated_frac_pos`` / ``maspo/gated_frac_neg`` (fraction of A>0 / A<0
    tokens with w < 0.99, over the tokens of that sign), ``maspo/gate_mean`` (all tokens),
    ``maspo/sigma_mean`` (the width s of the token's advantage sign, over tokens with A != 0).
    """
    logprobs, old_logprobs, A, mask = _prepare(logprobs, old_logprobs, advantages, mask)
    log_ratio = _log_ratio(logprobs, old_logprobs, cfg.log_ratio_clamp)
    r = torch.exp(log_ratio)
    w, s = maspo_gate(r, old_logprobs, A, cfg)
    loss = -A * w * r

    gated = w < GATED_THRESHOLD
    pos, neg = mask & (A > 0), mask & (A < 0)
    metrics = _ratio_metrics(log_ratio, r, mask)
    metrics.update({
        "maspo/gated_frac_pos": mean_metric(gated, pos),
        "maspo/gated_frac_neg": mean_metric(gated, neg),
        "maspo/gate_mean": mean_metric(w, mask),
        "maspo/sigma_mean": mean_metric(s, pos | neg),
    })
    return loss, metrics


def _maspo(logprobs, old_logprobs, advantages, mask, cfg: MASPOConfig):
    return maspo_token_loss(logprobs, old_logprobs, advantages, cfg, mask)


# ----------------------------------------------------------------------------------- baselines


def _ppo_clip(logprobs, old_logprobs, advantages, mask, cfg, eps_low, eps_high, name):
    """PPO clipped surrogate -min(r A, clip(r, 1-eps_low, 1+eps_high) A), optional dual clip."""
    logprobs, old_logprobs, A, mask = _prepare(logprobs, old_logprobs, advantages, mask)
    log_ratio = _log_ratio(logprobs, old_logprobs, cfg.log_ratio_clamp)
    r = torch.exp(log_ratio)

    loss = torch.maximum(-A * r, -A * torch.clamp(r, 1 - eps_low, 1 + eps_high))
    # The clipped branch carries no gradient where it strictly wins.
    clipped = ((A > 0) & (r > 1 + eps_high)) | ((A < 0) & (r < 1 - eps_low))
    metrics = _ratio_metrics(log_ratio, r, mask)
    c = cfg.dual_clip_c
    if c is not None:
        # Ye et al. 2020: for A < 0 bound the loss by -c*A so a huge ratio cannot blow it up.
        dual = (A < 0) & (loss > -c * A)
        loss = torch.where(A < 0, torch.minimum(loss, -c * A), loss)
        clipped = clipped | dual
        metrics[f"{name}/dual_clip_frac"] = mean_metric(dual, mask)
    metrics[f"{name}/clip_frac"] = mean_metric(clipped, mask)
    return loss, metrics


def grpo_loss(logprobs, old_logprobs, advantages, mask, cfg: GRPOConfig):
    """GRPO / PPO clipped surrogate with dual clip.

    loss_t = -min(r A, clip(r, 1-eps, 1+eps) A); for A < 0 additionally min(loss_t, -c A).
    Defaults eps=0.2 (Schulman et al. 2017, PPO, arXiv 1707.06347; GRPO: Shao et al. 2024,
    DeepSeekMath, arXiv 2402.03300), dual clip c=3 (Ye et al. 2020, "Mastering Complex Control in
    MOBA Games with Deep RL", arXiv 1912.09729). Metrics: ``grpo/clip_frac`` (tokens whose
    gradient a clip zeroes), ``grpo/dual_clip_frac``.
    """
    return _ppo_clip(logprobs, old_logprobs, advantages, mask, cfg, cfg.eps, cfg.eps, "grpo")


def clip_higher_loss(logprobs, old_logprobs, advantages, mask, cfg: ClipHigherConfig):
    """DAPO clip-higher: PPO surrogate with decoupled range [1-eps_low, 1+eps_high].

    Defaults eps_low=0.2, eps_high=0.28 (Yu et al. 2025, DAPO, arXiv 2503.14476). No dual clip
    unless ``dual_clip_c`` is set. Metrics: ``clip_higher/clip_frac``.
    """
    return _ppo_clip(logprobs, old_logprobs, advantages, mask, cfg, cfg.eps_low, cfg.eps_high,
                     "clip_higher")


def sapo_loss(logprobs, old_logprobs, advantages, mask, cfg: SAPOConfig):
    """SAPO: soft, temperature-controlled sigmoid gate instead of a hard clip.

    loss_t = -f(r) A with f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos if A > 0 else
    tau_neg. d f / d r = 4 sigmoid (1 - sigmoid), which is 1 at r = 1 (on-policy gradient
    unchanged) and decays smoothly as r leaves 1. Defaults tau_pos=1.0, tau_neg=1.05 as
    recommended by Gao et al. 2025, "Soft Adaptive Policy Optimization" (Qwen), arXiv 2511.20347.
    Metric ``sapo/grad_weight_mean``: mean of 4 sigmoid (1 - sigmoid), the factor the gate puts on
    the vanilla per-token gradient -A r.
    """
    logprobs, old_logprobs, A, mask = _prepare(logprobs, old_logprobs, advantages, mask)
    log_ratio = _log_ratio(logprobs, old_logprobs, cfg.log_ratio_clamp)
    r = torch.exp(log_ratio)
    tau = torch.where(A > 0, torch.full_like(A, cfg.tau_pos), torch.full_like(A, cfg.tau_neg))
    sig = torch.sigmoid(tau * (r - 1))
    loss = -A * sig * 4 / tau
    metrics = _ratio_metrics(log_ratio, r, mask)
    metrics["sapo/grad_weight_mean"] = mean_metric(4 * sig * (1 - sig), mask)
    return loss, metrics


def gspo_loss(logprobs, old_logprobs, advantages, mask, cfg: GSPOConfig):
    """GSPO (token form): clipped surrogate on the length-normalised sequence ratio.

    s_i = exp(mean_{t in y_i} (logp - logp_old)) over the response mask;
    s_{i,t} = sg(s_i) * exp(logp_t - sg(logp_t))  (value s_i, d s_{i,t} / d logp_t = s_i);
    loss_t = -min(s_{i,t} A, clip(s_{i,t}, 1-eps_low, 1+eps_high) A).
    Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071 (GSPO-token, with the
    paper's clip ranges 3e-4 / 4e-4). With a per-sequence advantage and ``seq_mean_token_mean``
    aggregation this has exactly the gradient of sequence-level GSPO. Requires ``mask``.
    Metrics: ``gspo/seq_ratio_mean`` (over sequences), ``gspo/clip_frac`` (over tokens).
    """
    if mask is None:
        raise ValueError("gspo needs the response mask to compute each sequence's mean log-ratio")
    logprobs, old_logprobs, A, mask = _prepare(logprobs, old_logprobs, advantages, mask)
    if logprobs.dim() != 2:
        raise ValueError(f"gspo expects [batch, tokens] inputs, got {tuple(logprobs.shape)}")
    log_ratio = _log_ratio(logprobs, old_logprobs, cfg.log_ratio_clamp)
    zero = torch.zeros_like(log_ratio)
    n = mask.sum(dim=1, keepdim=True).clamp(min=1)
    seq_log_ratio = torch.where(mask, logprobs - old_logprobs, zero).sum(1, keepdim=True) / n
    seq_log_ratio = torch.clamp(seq_log_ratio, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    s = torch.exp(seq_log_ratio.detach() + logprobs - logprobs.detach())
    s_val = s.detach()
    loss = torch.maximum(-A * s, -A * torch.clamp(s, 1 - cfg.eps_low, 1 + cfg.eps_high))
    clipped = ((A > 0) & (s_val > 1 + cfg.eps_high)) | ((A < 0) & (s_val < 1 - cfg.eps_low))
    metrics = _ratio_metrics(log_ratio, torch.exp(log_ratio), mask)
    metrics["gspo/seq_ratio_mean"] = mean_metric(torch.exp(seq_log_ratio).squeeze(1),
                                                 mask.any(dim=1))
    metrics["gspo/clip_frac"] = mean_metric(clipped, mask)
    return loss, metrics


def cispo_loss(logprobs, old_logprobs, advantages, mask, cfg: CISPOConfig):
    """CISPO: REINFORCE with a clipped, detached importance weight.

    loss_t = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logp_t  (every token keeps a gradient).
    MiniMax et al. 2025, "MiniMax-M1", arXiv 2506.13585, Sec. 3.1: no lower bound in practice
    (``eps_low=None``), only eps_high tuned; the paper does not report its value. The default cap
    of 4 on the weight (eps_high=3) is the default of Thinking Machines' Tinker ``cispo`` loss
    (clip_high_threshold=4.0). The loss *value* is not a surrogate of the return (it is
    weight * A * logp); only its gradient -sg(w) A d logp is meaningful.
    Metric ``cispo/clip_frac``: tokens whose weight was clipped.
    """
    logprobs, old_logprobs, A, mask = _prepare(logprobs, old_logprobs, advantages, mask)
    log_ratio = _log_ratio(logprobs, old_logprobs, cfg.log_ratio_clamp)
    r = torch.exp(log_ratio).detach()
    low = None if cfg.eps_low is None else 1 - cfg.eps_low
    weight = torch.clamp(r, low, 1 + cfg.eps_high)
    loss = -weight * A * logprobs
    metrics = _ratio_metrics(log_ratio, r, mask)
    metrics["cispo/clip_frac"] = mean_metric(weight != r, mask)
    return loss, metrics


# ----------------------------------------------------------------------------------- registry

#: name -> (loss function, config class)
LOSSES: dict[str, tuple[LossFn, type[PolicyLossConfig]]] = {
    "maspo": (_maspo, MASPOConfig),
    "grpo": (grpo_loss, GRPOConfig),
    "clip_higher": (clip_higher_loss, ClipHigherConfig),
    "sapo": (sapo_loss, SAPOConfig),
    "gspo": (gspo_loss, GSPOConfig),
    "cispo": (cispo_loss, CISPOConfig),
}


def _entry(name: str):
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy loss {name!r}; valid names: {', '.join(sorted(LOSSES))}") from None


def get_loss(name: str) -> LossFn:
    """The loss function registered under ``name``."""
    return _entry(name)[0]


def loss_config_class(name: str) -> type[PolicyLossConfig]:
    """The config dataclass of the loss registered under ``name``."""
    return _entry(name)[1]


# ----------------------------------------------------------------------------------- TIS


def truncated_is_weight(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                        cap: float = DEFAULT_TIS_CAP) -> torch.Tensor:
    """Detached truncated importance weight min(exp(logp_old - logp_rollout), cap).

    Corrects for the trainer's pi_old differing from the rollout engine's sampler (train/rollout
    mismatch). Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training" (fengyao.notion.site), which uses a cap C=2.
    """
    if cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    if old_logprobs.shape != rollout_logprobs.shape:
        raise ValueError(f"rollout_logprobs {tuple(rollout_logprobs.shape)} must match "
                         f"old_logprobs {tuple(old_logprobs.shape)}")
    dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
    diff = old_logprobs.detach().to(dtype) - rollout_logprobs.detach().to(dtype)
    # exp(min(d, log cap)) == min(exp(d), cap) without overflow for large d.
    return torch.exp(torch.clamp(diff, max=math.log(cap)))


def policy_loss(
    name: str,
    cfg: PolicyLossConfig | None,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Per-token loss of the named policy loss, with optional TIS correction.

    ``cfg=None`` uses the loss's defaults. When ``rollout_logprobs`` is given the per-token loss is
    multiplied by ``truncated_is_weight(old_logprobs, rollout_logprobs, tis_cap or 2.0)``
    and the metrics gain ``tis/weight_mean`` and ``tis/capped_frac``. Returns the unreduced
    per-token loss; reduce it with ``algo.aggregation``.
    """
    fn, cfg_cls = _entry(name)
    if cfg is None:
        cfg = cfg_cls()
    elif not isinstance(cfg, cfg_cls):
        raise TypeError(f"policy loss {name!r} takes a {cfg_cls.__name__}, "
                        f"got {type(cfg).__name__}")
    loss, metrics = fn(logprobs, old_logprobs, advantages, mask, cfg)
    if rollout_logprobs is not None:
        cap = DEFAULT_TIS_CAP if tis_cap is None else tis_cap
        w = truncated_is_weight(old_logprobs, rollout_logprobs, cap).to(loss.dtype)
        loss = loss * w
        m = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        metrics["tis/weight_mean"] = mean_metric(w, m)
        metrics["tis/capped_frac"] = mean_metric(w >= cap, m)
    elif tis_cap is not None:
        raise ValueError("tis_cap was given without rollout_logprobs")
    return loss, metrics
