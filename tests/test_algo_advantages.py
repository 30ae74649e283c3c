"""Group-relative advantages against manual computations."""

import math
import statistics

import pytest
import torch

from maspo_megatron.algo.advantages import AdvantageConfig, expand_to_tokens, group_advantages

REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, -1.0, 2.0, 0.0]]


def manual(rewards, std, eps):
    """Flattened list of per-response advantages, group by group."""
    out = []
    for g in rewards:
        mu = sum(g) / len(g)
        sd = std(g) if std else None
        out += [(x - mu) / (sd + eps) if std else x - mu for x in g]
    return out


def test_grpo_matches_manual_unbiased_and_population_std():
    r = torch.tensor(REWARDS, dtype=torch.float64)
    got = group_advantages(r)
    expected = manual(REWARDS, statistics.stdev, 1e-6)
    assert got.flatten().tolist() == pytest.approx(expected, rel=1e-12)
    got = group_advantages(r, cfg=AdvantageConfig(std_unbiased=False, eps=1e-3))
    expected = manual(REWARDS, statistics.pstdev, 1e-3)
    assert got.flatten().tolist() == pytest.approx(expected, rel=1e-12)
    # An all-equal group has zero advantage, not nan.
    assert got[1].tolist() == [0.0] * 4


def test_dr_grpo_is_mean_centred_only():
    got = group_advantages(torch.tensor(REWARDS), cfg=AdvantageConfig(estimator="dr_grpo"))
    assert got.flatten().tolist() == pytest.approx(manual(REWARDS, None, 0.0))


def test_flat_input_with_group_size_keeps_flat_shape():
    flat = torch.tensor(sum(REWARDS, []))
    got = group_advantages(flat, group_size=4)
    assert got.shape == (12,)
    torch.testing.assert_close(got, group_advantages(torch.tensor(REWARDS)).flatten())
    # Integer rewards are accepted.
    assert group_advantages(torch.tensor([1, 0]), 2).tolist() == pytest.approx(
        [0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6)])


@pytest.mark.parametrize("rewards,group_size,match", [
    (torch.ones(4, 1), None, r"group size 1 .*need >= 2"),
    (torch.ones(4), 1, r"group size 1 .*need >= 2"),
    (torch.ones(5), 2, r"length 5 .*group_size=2"),
    (torch.ones(6), None, r"flat rewards of shape \(6,\) need group_size"),
    (torch.ones(2, 3, 4), None, r"\[num_groups, group_size\].*got shape \(2, 3, 4\)"),
    (torch.ones(2, 3), 4, r"shape \(2, 3\) have group size 3, but group_size=4"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), None, r"non-finite .*\(0, 1\)"),
    (torch.tensor([0.0, 1.0, float("inf"), 1.0]), 2, r"non-finite .*\(1, 0\)"),
    (torch.ones(0, 4), None, "empty"),
])
def test_bad_rewards_raise_clear_errors(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size)


def test_advantage_config_validation():
    with pytest.raises(ValueError, match="estimator 'ppo' is not one of: grpo, dr_grpo"):
        AdvantageConfig(estimator="ppo")


def test_expand_to_tokens():
    adv = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    assert expand_to_tokens(adv, mask).tolist() == [[0, 0.5, 0.5, 0], [-2, -2, -2, -2]]
    with pytest.raises(ValueError, match=r"advantages \[N\] and mask \[N, T\]"):
        expand_to_tokens(adv, mask[:1])
