"""The decoupled objective (algo/objective.py) for off-policy samples: behaviour log-probs (the
rollout engine's) vs proximal log-probs (the trainer's, before the update).

- equal behaviour and proximal log-probs give the on-policy loss and gradient exactly, for every
  policy loss;
- otherwise MASPO's loss and gradient equal a hand computation from the equations (plain Python
  floats, token by token): the gate and the mass-adaptive width use the proximal policy as
  p_old, the behaviour weight min(pi_prox / pi_behav, cap) multiplies the token's loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from maspo_megatron.algo.aggregation import AggregationConfig, global_counts
from maspo_megatron.algo.losses import LOSSES, MASPOConfig, maspo_gate
from maspo_megatron.algo.objective import Objective, ObjectiveConfig

F64 = torch.float64
CAP = 2.0


def _grad(cfg: ObjectiveConfig, lp: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    lp = lp.clone().requires_grad_(True)
    loss, _ = Objective(cfg)(lp, None, batch, global_counts(batch["response_mask"]))
    loss.backward()
    return loss.detach(), lp.grad


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    n, t = 4, 6
    prox = -torch.rand(n, t, generator=g, dtype=F64) * 3
    mask = torch.arange(t)[None] < torch.tensor([6, 4, 5, 3])[:, None]
    batch = {"response_mask": mask, "advantages": torch.tensor([1.5, -0.7, 0.4, -2.0], dtype=F64),
             "old_logprobs": prox}
    lp = prox + 0.5 * torch.randn(n, t, generator=g, dtype=F64)
    return lp, batch


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_matching_behaviour_and_proximal_is_the_on_policy_loss(loss):
    lp, batch = _batch(0)
    on_policy = _grad(ObjectiveConfig(loss=loss), lp, batch)
    decoupled = _grad(ObjectiveConfig(loss=loss, tis_cap=CAP),
                      lp, {**batch, "rollout_logprobs": batch["old_logprobs"].clone()})
    assert torch.equal(decoupled[0], on_policy[0]) and torch.equal(decoupled[1], on_policy[1])
    # A stale behaviour policy changes it (the weight is not silently ignored).
    stale = _grad(ObjectiveConfig(loss=loss, tis_cap=CAP),
                  lp, {**batch, "rollout_logprobs": batch["old_logprobs"] - 0.3})
    assert not torch.allclose(stale[1], on_policy[1])


def _maspo_by_hand(lp, prox, behav, adv, mask, cfg: MASPOConfig, p_old_from: str):
    """Per-token MASPO (arXiv 2602.17550) with the behaviour weight, token-mean over the mask:
    the loss and d loss / d logp, from the equations in plain floats."""
    n_tok = sum(bool(m) for row in mask for m in row)
    total, grad = 0.0, [[0.0] * len(row) for row in lp]
    for i, row in enumerate(lp):
        a = adv[i]
        for t, logp in enumerate(row):
            if not mask[i][t]:
                continue
            p_prox, p_behav = math.exp(prox[i][t]), math.exp(behav[i][t])
            p_old = p_prox if p_old_from == "proximal" else p_behav
            r = math.exp(logp - math.log(p_old))
            m = min(max(cfg.sigma_base / p_old ** cfg.alpha, cfg.sigma_base), cfg.sigma_high)
            if a > 0:
                s = m * min(max(1 + cfg.beta_pos * a, cfg.adv_low), cfg.adv_high)
            else:
                s = m * min(max(1 / (1 - cfg.beta_neg * a), cfg.adv_low), cfg.adv_high)
            overshoot = (a > 0 and r > 1) or (a < 0 and r < 1)
            gate = math.exp(-(r - 1) ** 2 / (2 * s ** 2)) if overshoot else 1.0
            w = min(p_prox / p_behav, CAP)
            total += -a * gate * r * w
            grad[i][t] = -a * gate * r * w / n_tok  # gate and w are stop-gradient; d r / d logp = r
    return total / n_tok, grad


def test_maspo_off_policy_matches_the_equations_with_the_proximal_policy_as_p_old():
    lp, batch = _batch(1)
    g = torch.Generator().manual_seed(2)
    # Behaviour one version off: some tokens more likely under it, some less, a few past the cap.
    behav = batch["old_logprobs"] + 0.6 * torch.randn(lp.shape, generator=g, dtype=F64)
    off = {**batch, "rollout_logprobs": behav}
    cfg = ObjectiveConfig(loss="maspo", tis_cap=CAP, aggregation=AggregationConfig(mode="token_mean_global"))
    loss, grad = _grad(cfg, lp, off)

    args = (lp.tolist(), batch["old_logprobs"].tolist(), behav.tolist(), batch["advantages"].tolist(),
            batch["response_mask"].tolist(), MASPOConfig())
    want_loss, want_grad = _maspo_by_hand(*args, p_old_from="proximal")
    assert loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-14)
    assert torch.allclose(grad, torch.tensor(want_grad, dtype=F64), rtol=1e-12, atol=1e-14)
    # The data exercises every branch: gated tokens, and weights above and below the cap.
    mask, prox = batch["response_mask"], batch["old_logprobs"]
    ratio = torch.exp(prox - behav)[mask]
    assert (ratio > CAP).any() and (ratio < 1).any()
    gate, _ = maspo_gate(torch.exp(lp - prox), prox, batch["advantages"][:, None].expand_as(lp))
    assert (gate[mask] < 0.99).any()
    # The hand computation tells the policies apart: centring the gate on the behaviour policy,
    # or dropping the weight (the on-policy loss), gives another loss.
    assert abs(_maspo_by_hand(*args, p_old_from="behaviour")[0] - want_loss) > 1e-3
    on_policy, _ = _grad(cfg, lp, {**batch, "rollout_logprobs": batch["old_logprobs"]})
    assert abs(on_policy.item() - want_loss) > 1e-3
