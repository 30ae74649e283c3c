"""``maspo-megatron demo`` end to end: the reward rises clearly above the random policy's.

The run is seeded (model init, data order, one sampling seed per request; gloo reductions are
deterministic): on the 2-core dev machine the recipe's first 40 steps gave mean reward 0.078 over
steps 1-5 and 0.431 over steps 36-40 (the starting policy's eval Avg@4 is 0.0625; earlier seeded
runs repeated bitwise). The test asks for a gain of 0.15, less than half the one measured, so a different CPU's
floating-point rounding does not flip it while a loop that does not learn fails it.
"""

from __future__ import annotations

import json

import pytest

from maspo_megatron.cli import main

STEPS = 40
MARGIN = 0.15


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_learns_and_writes_plot_and_metrics(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), f"steps={STEPS}"]) == 0
    out = capsys.readouterr().out
    png = tmp_path / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    rewards = [m["reward/mean"] for m in metrics if "reward/mean" in m]
    assert len(rewards) == STEPS
    random_policy = next(m["eval/avg@4"] for m in metrics if m["step"] == 0)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last >= first + MARGIN, (first, last, rewards)
    assert last >= random_policy + MARGIN, (random_policy, last)
    # The trained policy also does better on the held-out prompts than the starting one.
    assert metrics[-1]["eval/avg@4"] > random_policy
    assert f"demo: reward {first:.3f} (first steps) -> {last:.3f} (last steps)" in out
