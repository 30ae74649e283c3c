"""``key=value`` overrides (config.py) and the CLI's handling of bad ones (exit code 2, named key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from maspo_megatron.cli import load_recipe, main
from maspo_megatron.config import ConfigError, apply_overrides, to_dict


@dataclass
class Inner:
    mode: Literal["fast", "slow"] = "fast"
    ratio: float = 0.5


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    count: int = 1
    limit: int | None = None
    tags: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    flag: bool = False

    def __post_init__(self):
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


def error_of(cfg, *overrides) -> str:
    with pytest.raises(ConfigError) as e:
        apply_overrides(cfg, list(overrides))
    return str(e.value)


def test_nested_keys_and_types_parse_to_the_declared_type():
    cfg = apply_overrides(Outer(), [
        "inner.ratio=1e-3", "inner.mode=slow", "count=7", "limit=12", "flag=yes",
        'tags=["a","b"]', "sizes=1,2,3", 'extra={"x": 1, "y": [2]}', "maybe.ratio=2",
    ])
    assert cfg.inner == Inner(mode="slow", ratio=1e-3)
    assert (cfg.count, cfg.limit, cfg.flag) == (7, 12, True)
    assert cfg.tags == ["a", "b"] and cfg.sizes == [1, 2, 3]
    assert cfg.extra == {"x": 1, "y": [2]}
    # A None section is created from its type when one of its fields is set.
    assert cfg.maybe == Inner(ratio=2.0)
    assert apply_overrides(cfg, ["limit=none", "flag=off"]).limit is None and cfg.flag is False


@pytest.mark.parametrize("override, expected", [
    ("count=ten", "count: expected int, got 'ten'"),
    ("inner.ratio=fast", "inner.ratio: expected float, got 'fast'"),
    ("limit=1.5", "limit: expected int | None, got '1.5'"),
    ("flag=maybe", "flag: expected bool (true/false), got 'maybe'"),
    ("inner.mode=medium", "inner.mode: expected one of ['fast', 'slow'], got 'medium'"),
    ("sizes=1,x", "sizes[1]: expected int, got 'x'"),
    ("extra=[1]", "extra: expected dict (JSON or comma list), got '[1]'"),
])
def test_wrong_types_name_the_key_and_the_expected_type(override, expected):
    assert error_of(Outer(), override) == expected


def test_unknown_keys_sections_and_malformed_items():
    msg = error_of(Outer(), "inner.speed=1")
    assert "unknown config key 'inner.speed'" in msg and "inner has no field 'speed'" in msg
    assert "(valid: mode, ratio)" in msg
    assert "the config has no field 'cuont'" in error_of(Outer(), "cuont=1")
    assert error_of(Outer(), "inner=slow") == "inner is a config section; set its fields (inner.FIELD=VALUE)"
    assert error_of(Outer(), "count.x=1") == "count is not a config section (cannot set count.x)"
    assert error_of(Outer(), "count") == "override 'count' must look like key=value"


def test_validation_runs_again_after_overrides():
    assert error_of(Outer(), "count=-1") == "count must be >= 0, got -1"


def test_trainer_config_overrides_and_validation():
    cfg = apply_overrides(load_recipe("tiny_cpu"), [
        "actor.optimizer.lr=1e-6", "actor.loss=grpo", "rollout.server_urls=http://a:1,http://b:2",
        "model.fp8=none", "wandb_project=proj", 'model.transformer_overrides={"hidden_dropout": 0.0}',
    ])
    assert cfg.actor.optimizer.lr == 1e-6 and cfg.actor.loss == "grpo"
    assert cfg.rollout.server_urls == ["http://a:1", "http://b:2"]
    assert cfg.model.fp8 is None and cfg.wandb_project == "proj"
    assert to_dict(cfg)["model"]["transformer_overrides"] == {"hidden_dropout": 0.0}
    assert "rollout.n_samples must be >= 2" in error_of(load_recipe("tiny_cpu"), "rollout.n_samples=1")
    assert "algorithm.max_sampling_rounds must be >= 1" in error_of(load_recipe("tiny_cpu"),
                                                                    "algorithm.max_sampling_rounds=0")
    assert "max_bad_steps must be >= 1" in error_of(load_recipe("tiny_cpu"), "max_bad_steps=0")
    assert "unknown" in error_of(load_recipe("tiny_cpu"), "actor.loss=ppo2").lower()


@pytest.mark.parametrize("argv, expected", [
    (["train", "--recipe", "maspo_r1_distill_1_5b"], "model.path must be set"),
    (["train", "--recipe", "tiny_cpu", "model.path=/no/such/dir", "data.train_path=/x"],
     "model.path='/no/such/dir' does not exist"),
    (["train", "--recipe", "tiny_cpu", "nope=1"], "unknown config key 'nope'"),
    (["train", "--recipe", "tiny_cpu", "steps=ten"], "steps: expected int, got 'ten'"),
    (["train", "--recipe", "tiny_cpu", "actor.optimizer.lr=fast"],
     "actor.optimizer.lr: expected float, got 'fast'"),
    (["train", "--recipe", "tiny_cpu", "rollout.use_router=perhaps"],
     "rollout.use_router: expected bool (true/false), got 'perhaps'"),
    (["train", "--recipe", "tiny_cpu", "actor=maspo"], "actor is a config section"),
    (["train", "--recipe", "no_such_recipe"], "unknown recipe 'no_such_recipe'"),
    (["eval", "k=many"], "k: expected int, got 'many'"),
    (["demo", "--output-dir", "{tmp}", "rollout.n_sample=4"], "unknown config key 'rollout.n_sample'"),
])
def test_cli_rejects_bad_overrides_with_exit_code_2(argv, expected, capsys, tmp_path):
    argv = [a.format(tmp=tmp_path / "demo") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("maspo-megatron: config error: ") and expected in err, err
    # Nothing was started or written for a rejected command (the demo checks before its assets).
    assert not (tmp_path / "demo").exists()


def test_commands_relaunch_under_torchrun_with_their_own_arguments(monkeypatch, tmp_path):
    import maspo_megatron.cli as cli

    data = tmp_path / "train.jsonl"
    data.write_text("")
    paths = [f"model.path={tmp_path}", f"data.train_path={data}"]
    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(cli, "_relaunch_with_torchrun",
                        lambda nproc, argv, extra_env=None: calls.append((nproc, argv)) or 0)
    # The pre-flight checks (tests/test_preflight.py) need a real model and data: not the point here.
    monkeypatch.setattr("maspo_megatron.preflight.run_preflight", lambda cfg, **kw: [])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["pytest", "-q"])  # must not leak into the child's command line
    assert main(["train", "--recipe", "tiny_cpu", "steps=3", "actor.loss=grpo", *paths]) == 0
    assert main(["export-hf", "--checkpoint", "c", "--model", "m", "--out", "o", "--tp", "2"]) == 0
    # tiny_cpu is TP=2: two processes on a machine without GPUs.
    assert calls == [
        (2, ["train", "--recipe", "tiny_cpu", "steps=3", "actor.loss=grpo", *paths]),
        (1, ["export-hf", "--checkpoint", "c", "--model", "m", "--out", "o", "--tp", "2", "--pp", "1"]),
    ]
