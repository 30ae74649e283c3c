"""The resume guard (preflight.check_resume), and what a resumed run does to its records.

A checkpoint in ``output_dir`` written for another model (path or architecture) or an
incompatible config stops ``maspo-megatron train`` before anything starts, naming both values;
``resume_force=true`` overrides. After a resume, ``metrics.jsonl`` and ``prompts.jsonl`` keep
only the steps up to the checkpoint, and the console counts global steps. The checkpoints here
are written with torch.distributed.checkpoint directly (tests/fake_checkpoints.py); the real
CLI with a real run is tests/test_e2e_resume_guard.py.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from fake_checkpoints import fake_checkpoint, truncate
from maspo_megatron.cli import main
from maspo_megatron.config import ConfigError, apply_overrides
from maspo_megatron.preflight import check_resume, run_record


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from maspo_megatron.demo import prepare_assets

    root = tmp_path_factory.mktemp("guard")
    paths = prepare_assets(str(root))
    other = root / "other_model"
    shutil.copytree(paths["model"], other)
    paths["other"] = str(other)
    return paths


def _cfg(assets, out, *overrides, model=None):
    from maspo_megatron.cli import load_recipe

    return apply_overrides(load_recipe("tiny_cpu"), [f"model.path={model or assets['model']}",
                                                     f"data.train_path={assets['train']}", f"output_dir={out}",
                                                     *overrides])


def _saved_run(assets, out, step=4, *overrides, model=None):
    """A checkpoint of a run of ``_cfg(...)`` at ``step`` in ``out/checkpoints``."""
    cfg = _cfg(assets, out, *overrides, model=model)
    return fake_checkpoint(os.path.join(out, "checkpoints"), step, {"run": run_record(cfg)})


def test_the_same_run_resumes_silently(assets, tmp_path):
    _saved_run(assets, tmp_path)
    assert check_resume(_cfg(assets, tmp_path)) == []
    # Settings outside the guarded keys may change on a resume (steps, TP, the loss, ...).
    assert check_resume(_cfg(assets, tmp_path, "steps=500", "parallel.tp=1", "actor.loss=grpo")) == []


def test_another_model_path_stops_naming_both(assets, tmp_path):
    _saved_run(assets, tmp_path)
    with pytest.raises(ConfigError) as e:
        check_resume(_cfg(assets, tmp_path, model=assets["other"]))
    text = str(e.value)
    assert text.startswith(f"output_dir='{tmp_path}' holds a checkpoint (step 4) of another run: ")
    assert f"model.path: '{os.path.realpath(assets['model'])}' there, '{os.path.realpath(assets['other'])}' here" in text
    assert "resume_force=true to resume from it anyway" in text and "resume=false to start over" in text
    assert "\n" not in text
    # The override: the guard then only says what it let through.
    (note,) = check_resume(_cfg(assets, tmp_path, "resume_force=true", model=assets["other"]))
    assert note.startswith("resume_force=true: resuming from step 4 of ") and "model.path: " in note
    # Not resuming at all: nothing to guard.
    assert check_resume(_cfg(assets, tmp_path, "resume=false", model=assets["other"])) == []


def test_another_architecture_at_the_same_path_stops(assets, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    _saved_run(assets, tmp_path / "run", model=model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4, "hidden_size": 128}))
    with pytest.raises(ConfigError, match=r"the model's num_hidden_layers: 2 there, 4 here; "
                                          r"the model's hidden_size: 64 there, 128 here"):
        check_resume(_cfg(assets, tmp_path / "run", model=model))


def test_incompatible_data_or_optimizer_settings_stop(assets, tmp_path):
    _saved_run(assets, tmp_path)
    other_data = tmp_path / "other.jsonl"
    shutil.copy(assets["train"], other_data)
    cases = [
        (["actor.optimizer.lr=0.002"], "actor.optimizer.lr: 0.001 there, 0.002 here"),
        (["actor.optimizer.weight_decay=0.1"], "actor.optimizer.weight_decay: 0.0 there, 0.1 here"),
        (["data.seed=3"], "data.seed: 0 there, 3 here"),
        (["data.shuffle=false"], "data.shuffle: True there, False here"),
        (["data.max_prompt_len=12"], "data.max_prompt_len: 16 there, 12 here"),
        ([f"data.train_path={other_data}"], f"data.train_path: '{assets['train']}' there, '{other_data}' here"),
    ]
    for overrides, expected in cases:
        with pytest.raises(ConfigError) as e:
            check_resume(_cfg(assets, tmp_path, *overrides))
        assert expected in str(e.value), overrides


def test_checkpoints_without_a_run_record_use_the_runs_config_json(assets, tmp_path):
    fake_checkpoint(tmp_path / "checkpoints", 2, {})  # saved before checkpoints recorded their run
    assert check_resume(_cfg(assets, tmp_path, model=assets["other"])) == []  # nothing to compare
    from maspo_megatron.config import to_dict

    (tmp_path / "config.json").write_text(json.dumps(to_dict(_cfg(assets, tmp_path))))
    with pytest.raises(ConfigError, match="model.path: "):
        check_resume(_cfg(assets, tmp_path, model=assets["other"]))


def test_the_guard_reads_the_checkpoint_the_run_would_resume_from(assets, tmp_path):
    _saved_run(assets, tmp_path, 2)
    newer = _saved_run(assets, tmp_path, 4, model=assets["other"])  # another run's, then damaged
    data = truncate(newer / "__0_0.distcp")
    (note,) = check_resume(_cfg(assets, tmp_path))
    assert note.startswith(f"checkpoint step 4 is incomplete or corrupt: {data} is truncated: ")
    assert note.endswith("; the run resumes from step 2, the newest complete checkpoint")
    truncate(tmp_path / "checkpoints" / "iter_0000002" / ".metadata")
    with pytest.raises(ConfigError, match=rf"output_dir='{tmp_path}' holds checkpoints, but none is complete "
                                          r"\(checkpoint step 4 is incomplete .*step 2 is incomplete"):
        check_resume(_cfg(assets, tmp_path))


def test_the_cli_stops_before_torchrun_in_one_line(assets, tmp_path, capsys, monkeypatch):
    import maspo_megatron.cli as cli

    launched = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("MASPO_MEGATRON_PREFLIGHT_DONE", raising=False)
    monkeypatch.setattr(cli, "_relaunch_with_torchrun", lambda *a, **k: launched.append(a) or 0)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _saved_run(assets, tmp_path)
    args = ["train", "--recipe", "tiny_cpu", f"model.path={assets['other']}", f"data.train_path={assets['train']}",
            f"output_dir={tmp_path}"]
    assert main(args) == 2 and launched == []
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a checkpoint (step 4) of another run: model.path: " in err
    assert main([*args, "resume_force=true"]) == 0 and len(launched) == 1
    assert "maspo-megatron: resume_force=true: resuming from step 4" in capsys.readouterr().err


# ----------------------------------------------------------------------------- records after a resume


def test_records_are_cut_back_to_the_resumed_step(tmp_path):
    from maspo_megatron.trainer import _cut_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in [0, 1, 2, 3, 4]) + '{"step": 5, "x')
    _cut_jsonl(str(path), 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    _cut_jsonl(str(path), 0)  # a fresh start keeps nothing of an earlier run
    assert path.read_text() == ""
    _cut_jsonl(str(tmp_path / "absent.jsonl"), 3)


def test_console_counts_global_steps(capsys):
    from maspo_megatron.trainer import _console

    _console(7, 10, {"reward/mean": 0.5}, elapsed=4.0, steps_here=2)  # resumed at step 5
    line = capsys.readouterr().out
    assert line.startswith("step    7/10 | reward 0.500") and "eta 0.1min" in line  # 2 s a step, 3 to go
