"""DAPO dynamic-sampling and overlong helpers."""

import pytest
import torch

from maspo_megatron.algo.filters import (
    OverlongConfig,
    dynamic_sampling_keep,
    mask_truncated,
    overlong_penalty,
)

REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, -1.0, 2.0, 0.0]]


def test_dynamic_sampling_keeps_groups_with_reward_spread():
    assert dynamic_sampling_keep(torch.tensor(REWARDS)).tolist() == [True, False, True]
    assert dynamic_sampling_keep(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist() == [False, True]
    assert dynamic_sampling_keep(torch.tensor([[1.0, 1.05]]), atol=0.1).tolist() == [False]


def test_mask_truncated_zeroes_rows():
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    out = mask_truncated(mask, [False, True, False])
    assert out.tolist() == [[True, True], [False, False], [True, True]]
    out = mask_truncated(mask.float(), torch.tensor([True, False, False]))
    assert out.tolist() == [[0, 0], [1, 0], [1, 1]]
    with pytest.raises(ValueError, match=r"truncated \[N\]"):
        mask_truncated(mask, [True])


def test_overlong_penalty_dapo_defaults_and_ramp():
    cfg = OverlongConfig()
    assert (cfg.max_response_length, cfg.buffer_length) == (20480, 4096)
    lengths = [100, 16384, 16385, 18432, 20480, 20481]
    expected = [0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0]
    assert overlong_penalty(torch.tensor(lengths), cfg).tolist() == pytest.approx(expected)
    small = OverlongConfig(max_response_length=10, buffer_length=4, penalty_factor=0.5)
    assert overlong_penalty([6, 7, 10], small).tolist() == pytest.approx([0.0, -0.125, -0.5])
    with pytest.raises(ValueError, match="buffer_length"):
        OverlongConfig(max_response_length=10, buffer_length=20)
