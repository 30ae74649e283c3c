"""The RL objective (algo/objective.py): policy loss x TIS + KL - entropy, aggregated with the
mini-batch's global counts."""

from __future__ import annotations

import pytest
import torch

from maspo_megatron.algo import losses as L
from maspo_megatron.algo.aggregation import AggregationConfig, aggregate, global_counts
from maspo_megatron.algo.metrics import metric_values
from maspo_megatron.algo.objective import Objective, ObjectiveConfig, k3_kl

F64 = torch.float64


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, t = 4, 5
    old = -torch.rand(n, t, generator=g, dtype=F64) * 2
    mask = torch.arange(t)[None] < torch.tensor([5, 3, 4, 2])[:, None]
    mask[2] = False  # truncated: fully masked
    data = {"response_mask": mask, "advantages": torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=F64),
            "old_logprobs": old,
            "rollout_logprobs": old + 0.3 * torch.randn(n, t, generator=g, dtype=F64),
            "ref_logprobs": old + 0.2 * torch.randn(n, t, generator=g, dtype=F64)}
    lp = (old + 0.4 * torch.randn(n, t, generator=g, dtype=F64)).requires_grad_(True)
    ent = torch.rand(n, t, generator=g, dtype=F64).requires_grad_(True)
    return lp, ent, data


@pytest.mark.parametrize("mode", ["token_mean_global", "seq_mean_token_mean"])
def test_objective_is_policy_loss_times_tis_plus_kl_minus_entropy(mode):
    cfg = ObjectiveConfig(loss="grpo", kl_coef=0.1, entropy_coef=0.01, tis_cap=1.5,
                          aggregation=AggregationConfig(mode=mode))
    lp, ent, data = _batch()
    counts = global_counts(data["response_mask"])
    loss, metrics = Objective(cfg)(lp, ent, data, counts)

    adv = data["advantages"][:, None].expand_as(lp)
    tok, _ = L.policy_loss("grpo", None, lp, data["old_logprobs"], adv, data["response_mask"],
                           rollout_logprobs=data["rollout_logprobs"], tis_cap=1.5)
    tok = tok + 0.1 * k3_kl(data["ref_logprobs"], lp) - 0.01 * ent
    want = aggregate(cfg.aggregation, tok, data["response_mask"], global_num_tokens=counts["tokens"],
                     global_num_seqs=counts["seqs"])
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    values = metric_values(metrics)
    mask = data["response_mask"]
    assert values["entropy"] == pytest.approx(float(ent.detach()[mask].mean()))
    assert values["kl_ref"] == pytest.approx(float(k3_kl(data["ref_logprobs"], lp).detach()[mask].mean()))
    assert {"tis/weight_mean", "grpo/clip_frac", "policy/ratio_max"} <= values.keys()


def test_required_fields_follow_the_config():
    assert Objective(ObjectiveConfig()).required_fields == ("advantages", "old_logprobs")
    assert Objective(ObjectiveConfig(kl_coef=0.1, tis_cap=2.0)).required_fields == (
        "advantages", "old_logprobs", "rollout_logprobs", "ref_logprobs")
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'"):
        ObjectiveConfig(loss="ppo")
