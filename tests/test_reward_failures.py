"""Rewards are never silently zero: ``reward.fn=module:function``, per-step error and timeout
rates, and ``reward.max_error_rate`` stopping the run with the first traceback.

The rollout engine's real ``sample`` (tokenizer decode, the real RewardPool) feeds the trainer's
real ``collect`` in a one-process gloo group; only the HTTP client is replaced by a stand-in that
returns fixed responses, so no server starts.
"""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest
import torch.distributed as dist

from maspo_megatron.config import ConfigError, apply_overrides
from maspo_megatron.data.dataset import PromptSample
from maspo_megatron.generation import (
    RewardFailure,
    RolloutConfig,
    RolloutEngine,
    RolloutGroup,
    check_reward_failures,
    rollout_stats,
)
from maspo_megatron.reward import RewardConfig, RewardPool, get_reward
from maspo_megatron.rollout.client import Sample

REWARDS = '''
import time


def exact(response, answer):
    """1.0 when the response starts with the answer."""
    return float(response.startswith(answer))


def broken(response, answer):
    return 1 / 0


def broken_on_three(response, answer):
    if answer == "3":
        raise ValueError(f"cannot score {response!r}")
    return float(response.startswith(answer))


def hangs(response, answer):
    time.sleep(30)
    return 1.0


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "rf_test_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rf_test_rewards"
    sys.modules.pop("rf_test_rewards", None)


# ----------------------------------------------------------------------------- module:function


def test_module_function_is_imported_without_registration(reward_module, tmp_path, monkeypatch):
    fn = get_reward(f"{reward_module}:exact")
    assert fn("8<eos>", "8") == 1.0 and fn.__module__ == reward_module
    with pytest.raises(KeyError, match="cannot import module 'rf_no_such_module'"):
        get_reward("rf_no_such_module:exact")
    with pytest.raises(KeyError, match=r"has no attribute 'missing'"):
        get_reward(f"{reward_module}:missing")
    with pytest.raises(KeyError, match=r"'NOT_A_FUNCTION' is a int, not a function"):
        get_reward(f"{reward_module}:NOT_A_FUNCTION")


def test_module_function_is_found_in_the_working_directory(tmp_path, monkeypatch):
    # `maspo-megatron` (a console script) does not put the working directory on sys.path.
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "rf_cwd_rewards.py").write_text("def score(response, answer):\n    return 0.5\n")
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(workdir))])
    try:
        assert get_reward("rf_cwd_rewards:score")("x", "y") == 0.5
    finally:
        sys.modules.pop("rf_cwd_rewards", None)


def test_module_function_scores_in_worker_processes(reward_module):
    with RewardPool(f"{reward_module}:exact", num_workers=1, timeout_s=5.0) as pool:
        assert [r.reward for r in pool.score(["7<eos>", "3"], ["7", "4"])] == [1.0, 0.0]


def test_reward_config_is_validated_naming_the_key():
    from maspo_megatron.trainer import TrainerConfig

    for override, message in [("reward.max_error_rate=1.5", "reward.max_error_rate must lie in [0, 1]"),
                              ("reward.timeout_s=0", "reward.timeout_s must be > 0"),
                              ("reward.fn=:x", "expected 'module:function'"),
                              ("reward.start_method=thread", "reward.start_method must be one of")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            apply_overrides(TrainerConfig(), [override])


# ----------------------------------------------------------------------------- rates and the limit


def _group(rewards, errors=None, timeouts=None, index=0):
    n = len(rewards)
    return RolloutGroup(prompt_index=index, prompt_ids=[1], answer="a", outputs=[[4]] * n, logprobs=[[-1.0]] * n,
                        finish=["stop"] * n, rewards=rewards, correct=[r > 0 for r in rewards],
                        errors=errors or [None] * n, timeouts=timeouts or [False] * n)


def test_rates_and_max_error_rate():
    cfg = RewardConfig(fn="mine:f", timeout_s=2.0, max_error_rate=0.25)
    groups = [_group([1.0, 0.0, 0.0, 0.0], errors=[None, "Traceback ...\nValueError: x", None, None]),
              _group([0.0, 1.0, 0.0, 1.0], timeouts=[True, False, False, False], index=1)]
    stats = rollout_stats(groups)
    assert stats["reward/error_rate"] == 1 / 8 and stats["reward/timeout_rate"] == 1 / 8
    assert check_reward_failures(groups, cfg, step=3) == (
        "step 3: reward.fn='mine:f' could not score 2/8 samples (1 raised, 1 ran past reward.timeout_s=2); "
        "they count as reward 0")
    assert check_reward_failures([_group([1.0, 0.0])], cfg, step=3) is None
    assert rollout_stats([_group([1.0, 0.0])])["reward/error_rate"] == 0.0
    cfg.max_error_rate = 0.2
    with pytest.raises(RewardFailure) as failure:
        check_reward_failures(groups, cfg, step=3)
    text = str(failure.value)
    assert "over reward.max_error_rate=0.2: stopping. First error:\nTraceback ...\nValueError: x" in text
    only_timeouts = [_group([0.0, 0.0], timeouts=[True, True])]
    with pytest.raises(RewardFailure, match="no traceback: every failing sample ran past reward.timeout_s=2s"):
        check_reward_failures(only_timeouts, cfg, step=1)
    # RolloutGroups built without the new fields (older callers) count no failures.
    plain = RolloutGroup(prompt_index=0, prompt_ids=[1], answer="a", outputs=[[4]], logprobs=[[-1.0]],
                         finish=["stop"], rewards=[0.0], correct=[False])
    assert rollout_stats([plain])["reward/error_rate"] == 0.0 and check_reward_failures([plain], cfg, 1) is None


# ----------------------------------------------------------------------------- through collect


class StubClient:
    """Answers every request with the response "3" (token ids of the demo tokenizer)."""

    def __init__(self, tokenizer):
        self.ids = tokenizer.encode("3", add_special_tokens=False)
        self.accepted_weight_versions = None
        self.retries = 0

    def run(self, requests, progress=None):
        return [Sample(index=r.index, prompt_ids=list(r.input_ids), output_ids=list(self.ids),
                       logprobs=[-1.0] * len(self.ids), finish_reason="stop", weight_version="0",
                       token_versions=None, server="stub", attempts=1) for r in requests]


class Loader:
    def __init__(self, answers):
        self.answers = answers
        self.cursor = 0
        self.requests = []

    def next_batch(self, size):
        self.requests.append(size)
        out = [PromptSample(i, f"stub:{i}", (2, 5), "p", self.answers[i % len(self.answers)])
               for i in range(self.cursor, self.cursor + size)]
        self.cursor += size
        return out


@pytest.fixture
def collecting(tmp_path):
    """A Trainer whose collect() runs the real RolloutEngine.sample and RewardPool."""
    from maspo_megatron.data import make_demo_tokenizer
    from maspo_megatron.trainer import Trainer, TrainerConfig

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    tokenizer = make_demo_tokenizer(str(tmp_path / "tok"))
    made = []

    def make(fn, answers, **reward):
        cfg = TrainerConfig(output_dir=str(tmp_path / "run"), tensorboard=False, prompts_per_step=4,
                            reward=RewardConfig(fn=fn, num_workers=0, **reward),
                            rollout=RolloutConfig(n_samples=2))
        (tmp_path / "run").mkdir(exist_ok=True)
        engine = object.__new__(RolloutEngine)
        engine.cfg, engine.tokenizer, engine.client = cfg.rollout, tokenizer, StubClient(tokenizer)
        engine.runner = engine.client.run
        engine.rewards = RewardPool.from_config(cfg.reward)
        t = Trainer(cfg)
        t.engine, t.loader = engine, Loader(answers)
        made.append(engine.rewards)
        return t

    yield make
    for pool in made:
        pool.close()
    dist.destroy_process_group()


def test_a_raising_reward_stops_the_run_at_its_first_round_with_the_traceback(reward_module, collecting):
    t = collecting(f"{reward_module}:broken", ["3"])
    with pytest.raises(RewardFailure) as failure:
        t.collect(step=0)
    text = str(failure.value)
    assert text.startswith(f"step 1: reward.fn='{reward_module}:broken' could not score 8/8 samples "
                           "(8 raised, 0 ran past reward.timeout_s=10)")
    assert "reward.max_error_rate=0.25: stopping. First error:\nreward function" in text
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: division by zero" in text
    assert t.loader.requests == [4]  # no second round sampled for a reward that cannot score


def test_a_hanging_reward_stops_the_run_naming_the_timeout(reward_module, collecting, caplog):
    t = collecting(f"{reward_module}:hangs", ["3"], timeout_s=0.2)
    with caplog.at_level(logging.WARNING), pytest.raises(RewardFailure, match=r"8 ran past reward.timeout_s=0.2\)"):
        t.collect(step=4)
    assert "ran past timeout_s=0.2s and scored 0 (shown once)" in caplog.text  # inline timeouts warn too


def test_failures_under_the_limit_are_reported_and_counted(reward_module, collecting, capsys):
    # Prompts cycle through answers 3, 4, 5, 6, 7, 8, 9, 0: one prompt in eight cannot be scored.
    t = collecting(f"{reward_module}:broken_on_three", [str(d % 10) for d in range(3, 11)])
    t.cfg.algorithm.dynamic_sampling = False
    t.cfg.prompts_per_step = 8
    groups, info = t.collect(step=1)
    assert info["reward/error_rate"] == pytest.approx(2 / 16) and info["reward/timeout_rate"] == 0.0
    assert groups[0].errors[0].startswith(f"reward function '{reward_module}:broken_on_three' raised:")
    assert "ValueError: cannot score '3'" in groups[0].errors[0]
    assert groups[0].rewards == [0.0, 0.0] and groups[1].errors == [None, None]
    assert (f"step 2: reward.fn='{reward_module}:broken_on_three' could not score 2/16 samples (2 raised, "
            "0 ran past reward.timeout_s=10); they count as reward 0") in capsys.readouterr().out


def test_readme_custom_reward_example_runs_as_documented(tmp_path, monkeypatch):
    """The README's "Custom rewards" example, as written there, scores through reward.fn."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Custom rewards"):]
    ends = [i for i in (section.find("\n## ", 1), section.find("\n### ", 1)) if i > 0]
    section = section[: min(ends)] if ends else section
    module = re.search(r"```python\n# (\w+)\.py\n(.*?)```", section, re.S)
    assert module, "the README's custom-reward section has no ```python block starting '# NAME.py'"
    name, code = module.group(1), module.group(2)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = re.search(r"reward\.fn=(\w+:\w+)", section).group(1)
    assert spec.startswith(f"{name}:")
    try:
        with RewardPool(spec, num_workers=0) as pool:
            results = pool.score(["The answer is 42.", "I think 41", "no idea"], ["42", "42", "42"])
        assert [r.reward for r in results] == [1.0, 0.0, 0.0]
        assert results[2].no_answer
    finally:
        sys.modules.pop(name, None)
