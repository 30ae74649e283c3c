"""Pre-flight checks of ``maspo-megatron train`` (maspo_megatron/preflight.py), before torchrun.

Each bad config, data file or model file makes ``main(["train", ...])`` return 2 with one
line on stderr naming the key or the file, and nothing is launched (the relaunch is replaced by
a recorder). One test runs the real CLI in a subprocess for the exit code, the single line, the
absence of tracebacks and the time it takes. The resume guard's unit tests use checkpoints made
with torch.distributed.checkpoint directly (no megatron): what the guard reads is the same.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest

from maspo_megatron.cli import main

TRAIN = ["train", "--recipe", "tiny_cpu"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from maspo_megatron.demo import prepare_assets

    root = tmp_path_factory.mktemp("preflight")
    paths = prepare_assets(str(root))
    paths["root"] = root
    return paths


@pytest.fixture
def launched(monkeypatch):
    """Records (nproc, argv, env) of the torchrun the CLI would start instead of starting it."""
    import maspo_megatron.cli as cli

    calls = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASPO_MEGATRON_PREFLIGHT_DONE", raising=False)
    monkeypatch.setattr(cli, "_relaunch_with_torchrun",
                        lambda nproc, argv, extra_env=None: calls.append((nproc, argv, extra_env)) or 0)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    return calls


def _base(assets, tmp_path, **paths):
    model = paths.get("model", assets["model"])
    train = paths.get("train", assets["train"])
    return [f"model.path={model}", f"data.train_path={train}", f"output_dir={tmp_path / 'run'}"]


def _error(capsys, launched, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("maspo-megatron: config error: "), err
    assert launched == []  # nothing started
    return lines[0]


def _copy_model(assets, tmp_path, name="model"):
    out = tmp_path / name
    shutil.copytree(assets["model"], out)
    return out


def _write(path, text):
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, expected", [
    ("weight_sync.mode=typo", "weight_sync.mode must be one of ['distributed', 'disk', 'colocated'], got 'typo'"),
    ("actor.optimizer.lr=-1", "actor.optimizer.lr must be > 0, got -1.0"),
    ("parallel.tp=0", "parallel.tp must be a positive integer, got 0"),
    ("parallel.vpp=0", "parallel.vpp must be None or a positive integer"),
    ("reward.max_error_rate=2", "reward.max_error_rate must lie in [0, 1], got 2.0"),
    ("reward.num_workers=-1", "reward.num_workers must be >= 0"),
    ("reward.fn=a:1x", "reward.fn='a:1x': expected 'module:function'"),
    ("rollout.client.max_attempts=0", "rollout.client.max_attempts must be >= 1"),
    ("rollout.sampling.top_p=0.9", "rollout.sampling.top_p=0.9"),
    ("eval_every=-1", "eval_every must be >= 0"),
])
def test_every_config_section_is_validated_naming_the_key(assets, tmp_path, capsys, launched, override, expected):
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path), override])
    assert expected in line


# ----------------------------------------------------------------------------- layout


def test_tp_and_pp_are_checked_against_config_json(assets, tmp_path, capsys, launched):
    config = os.path.join(assets["model"], "config.json")
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path), "parallel.tp=3"])
    assert f"parallel.tp=3 does not divide num_attention_heads=4 of {config}" in line
    assert "tp values that fit: [1, 2]" in line
    # 4 query heads, 2 key/value heads: tp=4 splits the first but not the second.
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path), "parallel.tp=4"])
    assert "parallel.tp=4 does not divide num_key_value_heads=2" in line
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path), "parallel.pp=3"])
    assert f"parallel.pp=3 does not divide num_hidden_layers=2 of {config}" in line


def test_virtual_pipeline_stages_are_checked_before_anything_starts(assets, tmp_path, capsys, launched):
    config = os.path.join(assets["model"], "config.json")
    base = [*TRAIN, *_base(assets, tmp_path)]
    line = _error(capsys, launched, [*base, "parallel.vpp=2"])
    assert "parallel.vpp=2 needs parallel.pp >= 2" in line
    line = _error(capsys, launched, [*base, "parallel.pp=2", "parallel.vpp=2"])
    assert f"parallel.pp * parallel.vpp = 2*2 does not divide num_hidden_layers=2 of {config}" in line
    assert "vpp values that fit at pp=2: [1]" in line
    # The interleaved schedule needs >= pp micro-batches: one sequence per rank cannot feed 2 stages.
    line = _error(capsys, launched, [*TRAIN, "--nproc-per-node", "2", *_base(assets, tmp_path), "parallel.pp=2",
                                     "parallel.tp=1", "parallel.vpp=1", "prompts_per_step=1", "rollout.n_samples=2",
                                     "actor.num_mini_batches=2"])
    assert "parallel.vpp=1: the interleaved schedule needs at least parallel.pp=2 micro-batches, but each " \
           "data-parallel rank gets 1 sequences per mini-batch" in line


def test_process_count_and_rollout_backend_checks(assets, tmp_path, capsys, launched):
    line = _error(capsys, launched, [*TRAIN, "--nproc-per-node", "3", *_base(assets, tmp_path)])
    assert "3 processes (--nproc-per-node, or the GPUs here): world size 3 is not divisible by tp*pp*cp" in line
    # The backend's own check (SGLang replicates k/v heads only at a multiple of their number).
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path), "rollout.sglang_tp=3"])
    assert "rollout.sglang_tp=3 does not divide the model's 4 attention heads" in line
    assert os.path.join(assets["model"], "config.json") in line


# ----------------------------------------------------------------------------- model files


def test_model_files_are_checked_naming_the_file(assets, tmp_path, capsys, launched):
    truncated = _copy_model(assets, tmp_path, "truncated")
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, model=truncated)])
    assert f"{weights}: the safetensors header cannot be read" in line and "truncated" in line

    garbage = _copy_model(assets, tmp_path, "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x05\x00")
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, model=garbage)])
    assert f"{garbage / 'model.safetensors'}: the safetensors header cannot be read" in line

    no_config = _copy_model(assets, tmp_path, "no_config")
    (no_config / "config.json").unlink()
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, model=no_config)])
    assert f"model.path='{no_config}' has no config.json" in line

    bad_config = _copy_model(assets, tmp_path, "bad_config")
    _write(bad_config / "config.json", '{"architectures": ["LlamaForCausalLM"],')
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, model=bad_config)])
    assert f"{bad_config / 'config.json'} is not valid JSON" in line

    other_arch = _copy_model(assets, tmp_path, "other_arch")
    cfg = json.loads((other_arch / "config.json").read_text())
    _write(other_arch / "config.json", json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, model=other_arch)])
    assert "unsupported architecture 'GPT2LMHeadModel'" in line

    sharded = _copy_model(assets, tmp_path, "sharded")
    os.rename(sharded / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(str(sharded / "model-00001-of-00002.safetensors"), "pt") as f:
        names = list(f.keys())
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    _write(sharded / "model.safetensors.index.json", json.dumps({"weight_map": weight_map}))
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, model=sharded)])
    assert "lists model-00002-of-00002.safetensors, which does not exist" in line

    no_weights = _copy_model(assets, tmp_path, "no_weights")
    (no_weights / "model.safetensors").unlink()
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, model=no_weights)])
    assert "has neither model.safetensors nor model.safetensors.index.json" in line


# ----------------------------------------------------------------------------- data


def test_data_files_are_parsed_on_their_first_rows(assets, tmp_path, capsys, launched):
    good = '{"prompt": "1+1=", "answer": "2"}\n'
    bad_json = _write(tmp_path / "bad.jsonl", good * 40 + '{"prompt": "1+2=", "answer": 3\n')
    missing = _write(tmp_path / "missing.jsonl", good * 40 + '{"question": "1+2=", "answer": "3"}\n')
    wrong = _write(tmp_path / "wrong.jsonl", good * 40 + '{"prompt": ["1+2="], "answer": "3"}\n')
    cases = [
        (bad_json, f"data.train_path: {bad_json}: line 41: invalid JSON (Expecting ',' delimiter"),
        (missing, f"data.train_path: {missing}: line 41: field 'prompt' is missing (row has fields ['answer', 'question'])"),
        (wrong, f"data.train_path: {wrong}: line 41: field 'prompt': message 0 must be an object"),
    ]
    for path, expected in cases:
        # Only the first rows are parsed here: row 41 is the trainer's to find.
        assert main([*TRAIN, *_base(assets, tmp_path, train=path), "prompts_per_step=4"]) == 0
        launched.clear()
        # Within them, it is found before anything starts.
        head = _write(tmp_path / f"head_{path.name}", path.read_text().splitlines(keepends=True)[-1] + good * 4)
        line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, train=head), "prompts_per_step=4"])
        assert expected.replace(str(path), str(head)).replace("line 41", "line 1") in line

    txt = _write(tmp_path / "train.txt", "1+1=\n")
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, train=txt)])
    assert f"{txt}: unsupported dataset format" in line


def test_dataset_smaller_than_prompts_per_step_and_eval_data(assets, tmp_path, capsys, launched):
    small = _write(tmp_path / "small.jsonl", '{"prompt": "1+1=", "answer": "2"}\n' * 3)
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, train=small), "prompts_per_step=4"])
    assert f"data.train_path='{small}' has 3 prompts, fewer than prompts_per_step=4" in line
    bad_eval = _write(tmp_path / "eval.jsonl", '{"prompt": "1+1="}\n')
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path), f"data.eval_path={bad_eval}", "eval_every=5"])
    assert f"data.eval_path: {bad_eval}: line 1: field 'answer' is missing" in line
    # Not evaluating: the eval file is not read.
    assert main([*TRAIN, *_base(assets, tmp_path), f"data.eval_path={bad_eval}", "eval_every=0"]) == 0


def test_a_chat_template_is_required_when_applied(assets, tmp_path, capsys, launched):
    plain = _copy_model(assets, tmp_path, "no_template")
    (plain / "chat_template.jinja").unlink()
    tok = json.loads((plain / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    _write(plain / "tokenizer_config.json", json.dumps(tok))
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path, model=plain)])
    assert "data.apply_chat_template=true, but the tokenizer in model.path=" in line
    assert main([*TRAIN, *_base(assets, tmp_path, model=plain), "data.apply_chat_template=false"]) == 0


# ----------------------------------------------------------------------------- reward


def test_reward_function_must_resolve(assets, tmp_path, capsys, launched, monkeypatch):
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path), "reward.fn=no_such_module_x:f"])
    assert "reward.fn='no_such_module_x:f'" in line and "cannot import module 'no_such_module_x'" in line
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path), "reward.fn=nope"])
    assert "reward.fn='nope': unknown reward function 'nope'" in line
    (tmp_path / "pf_rewards_broken.py").write_text("raise RuntimeError('bad import')\n")
    (tmp_path / "pf_rewards_ok.py").write_text("def exact(response, answer):\n    return float(response == answer)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path), "reward.fn=pf_rewards_broken:f"])
    assert "importing it raised RuntimeError: bad import" in line
    line = _error(capsys, launched, [*TRAIN, *_base(assets, tmp_path), "reward.fn=pf_rewards_ok:missing"])
    assert "module 'pf_rewards_ok'" in line and "has no attribute 'missing'" in line
    assert main([*TRAIN, *_base(assets, tmp_path), "reward.fn=pf_rewards_ok:exact"]) == 0


def test_a_good_config_launches_torchrun_once_with_the_checks_marked_done(assets, tmp_path, launched, monkeypatch):
    assert main([*TRAIN, *_base(assets, tmp_path), "steps=3"]) == 0
    ((nproc, argv, env),) = launched
    assert nproc == 2 and argv[:3] == TRAIN and env == {"MASPO_MEGATRON_PREFLIGHT_DONE": "1"}
    # The ranks of that torchrun do not check again.
    import maspo_megatron.preflight as preflight

    monkeypatch.setenv("MASPO_MEGATRON_PREFLIGHT_DONE", "1")
    monkeypatch.setattr(preflight, "run_preflight", lambda *a, **k: pytest.fail("checked twice"))
    launched.clear()
    assert main([*TRAIN, *_base(assets, tmp_path), "steps=3"]) == 0 and len(launched) == 1


# ----------------------------------------------------------------------------- the real CLI


def test_real_cli_exits_2_in_one_line_without_traceback_quickly(assets, tmp_path):
    """The issue's scenarios through ``python -m maspo_megatron.cli``: exit 2, one line naming
    the key or file, no traceback, nothing started. The child's CPU time is asserted (< 10 s);
    its wall time is printed (this machine's 2 shared cores make it several times the CPU time)."""
    truncated = _copy_model(assets, tmp_path, "truncated")
    os.truncate(truncated / "model.safetensors", 300_000)
    bad = _write(tmp_path / "bad.jsonl", '{"prompt": "1+2=", "answer": 3\n')
    small = _write(tmp_path / "small.jsonl", '{"prompt": "1+1=", "answer": "2"}\n' * 3)
    scenarios = [
        (["weight_sync.mode=typo"], "weight_sync.mode"),
        (["parallel.tp=3"], "parallel.tp=3 does not divide num_attention_heads=4"),
        (["actor.optimizer.lr=-1"], "actor.optimizer.lr must be > 0"),
        ([f"data.train_path={bad}"], f"{bad}: line 1: invalid JSON"),
        ([f"model.path={truncated}"], f"{truncated / 'model.safetensors'}: the safetensors header cannot be read"),
        ([f"data.train_path={small}", "prompts_per_step=4"], "has 3 prompts, fewer than prompts_per_step=4"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASPO_MEGATRON_PREFLIGHT_DONE")}
    for overrides, expected in scenarios:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "maspo_megatron.cli", *TRAIN, *_base(assets, tmp_path), *overrides],
                              capture_output=True, text=True, timeout=120, env=env)
        wall = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        print(f"{' '.join(overrides)}: exit {proc.returncode} in {wall:.1f} s wall, {cpu:.1f} s CPU: {proc.stderr.strip()}")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert cpu < 10, f"{cpu:.1f} s of CPU before exiting"
        assert wall < 60
    assert not (tmp_path / "run").exists()  # nothing was written
