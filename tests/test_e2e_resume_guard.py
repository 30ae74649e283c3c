"""Through the real CLI (tiny_cpu: 2 torchrun ranks, a real SGLang CPU server, the router):

1. a run of 2 steps saves checkpoints at steps 1 and 2;
2. the same output_dir with another model.path stops before torchrun: exit 2, one line naming
   both paths (issue 11, item 3);
3. step 2's checkpoint is truncated; the resumed run (steps=3) names the file and step, falls
   back to step 1, says so, counts global steps on the console (2/3, 3/3), and leaves
   metrics.jsonl and prompts.jsonl with each step 1..3 exactly once (items 3 and 5);
4. a reward function that raises stops a fresh run at step 1 with its traceback (item 6).

The runs share one rollout server (``test_trainer_resume.shared_server``, tiny_cpu's deployment):
each attaches with ``rollout.server_urls`` behind its own router and syncs and proves its weights
at start; two server start-ups fewer. The clean-up after each run kills only routers left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from maspo_megatron.megatron.checkpoint import latest_checkpoint_step
from test_trainer_resume import kill_orphans, shared_server

pytestmark = [pytest.mark.slow, pytest.mark.sglang]


def _cmd(paths, run_dir, *extra, model=None):
    return [sys.executable, "-m", "maspo_megatron.cli", "train", "--recipe", "tiny_cpu",
            f"rollout.server_urls={json.dumps(paths['server_urls'])}",
            f"model.path={model or paths['model']}", f"data.train_path={paths['train']}", f"output_dir={run_dir}",
            "save_every=1", "prompts_per_step=4", "rollout.n_samples=4", "algorithm.max_sampling_rounds=1",
            "eval_every=0", "tensorboard=false", *extra]


def _run(cmd, marker, timeout=600, env=None):
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        kill_orphans(marker, keep_servers=True)  # the routers a failed run may leave
    return proc, time.monotonic() - start


def _console_steps(stdout):
    return [m.group(1) for m in re.finditer(r"^step +(\d+/\d+) \|", stdout, re.M)]


def _steps(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.mark.timeout(1800)
def test_resume_guard_fallback_and_reward_failure_through_the_cli(tmp_path):
    from maspo_megatron.demo import prepare_assets

    paths = prepare_assets(str(tmp_path))
    other = str(tmp_path / "other_model")
    shutil.copytree(paths["model"], other)
    served = str(tmp_path / "served_model")
    shutil.copytree(paths["model"], served)
    with shared_server(served, str(tmp_path / "server_logs")) as urls:
        _check_runs({**paths, "server_urls": urls, "served": served}, other, tmp_path)


def _check_runs(paths, other, tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"

    # 1. Two steps, checkpoints at 1 and 2.
    first, took = _run(_cmd(paths, run_dir, "steps=2"), paths["served"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    print(f"first run: {took:.0f} s")
    assert _console_steps(first.stdout) == ["1/2", "2/2"]
    assert latest_checkpoint_step(ckpt) == 2 and _steps(run_dir / "metrics.jsonl") == [1, 2]
    state = json.loads((ckpt / "iter_0000002" / "trainer_state.json").read_text())
    assert state["extra_state"]["run"]["model_path"] == os.path.realpath(paths["model"])

    # 2. Another model in the same output_dir: stopped before torchrun, naming both.
    guarded, took = _run(_cmd(paths, run_dir, "steps=3", model=other), other, timeout=120)
    print(f"guard: exit {guarded.returncode} in {took:.1f} s: {guarded.stderr.strip()}")
    assert guarded.returncode == 2, guarded.stdout + guarded.stderr
    lines = [line for line in guarded.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds a checkpoint (step 2) of another run" in lines[0]
    assert f"model.path: '{os.path.realpath(paths['model'])}' there, '{os.path.realpath(other)}' here" in lines[0]
    assert "resume_force=true" in lines[0] and "Traceback" not in guarded.stderr and guarded.stdout == ""
    assert _steps(run_dir / "metrics.jsonl") == [1, 2]  # nothing touched
    assert json.loads((run_dir / "config.json").read_text())["model"]["path"] == paths["model"]

    # 3. Step 2's checkpoint truncated: the resumed run falls back to step 1, saying so.
    shard = sorted((ckpt / "iter_0000002").glob("*.distcp"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    second, took = _run(_cmd(paths, run_dir, "steps=3"), paths["served"])
    print(f"second run: {took:.0f} s")
    out = second.stdout + second.stderr
    print("\n".join(line for line in out.splitlines() if "incomplete or corrupt" in line or "resumed from" in line))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    named = f"checkpoint step 2 is incomplete or corrupt: {shard} is truncated: "
    assert f"maspo-megatron: {named}" in second.stderr  # the pre-flight, in the parent
    assert "; the run resumes from step 1, the newest complete checkpoint" in second.stderr
    assert named in out and "falling back to step 1, the newest complete checkpoint" in out  # the load
    assert f"resumed from {ckpt} at step 1" in second.stdout
    assert _console_steps(second.stdout) == ["2/3", "3/3"]
    assert latest_checkpoint_step(ckpt) == 3
    assert _steps(run_dir / "metrics.jsonl") == [1, 2, 3]
    assert _steps(run_dir / "prompts.jsonl") == [1, 2, 3]

    # 4. A reward function that raises: a fresh run stops at step 1 with its traceback.
    (tmp_path / "e2e_broken_reward.py").write_text("def score(response, answer):\n    return 1 / 0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    broken, took = _run(_cmd(paths, tmp_path / "broken", "steps=1", "reward.fn=e2e_broken_reward:score"),
                        paths["served"], env=env)
    print(f"broken reward: exit {broken.returncode} in {took:.0f} s")
    out = broken.stdout + broken.stderr
    print(out[out.index("RewardFailure"):][:1500] if "RewardFailure" in out else out[-3000:])
    assert broken.returncode != 0, out[-3000:]
    assert "RewardFailure: step 1: reward.fn='e2e_broken_reward:score' could not score 16/16 samples" in out
    assert "over reward.max_error_rate=0.25: stopping. First error:" in out
    assert "ZeroDivisionError: division by zero" in out
    assert _console_steps(broken.stdout) == []
