"""Resume after a killed run: the real loop (2 torchrun processes, CPU server, router) is SIGKILLed
after a checkpoint; a second run continues from that step and data cursor, and across both runs
every prompt of the data order is trained on exactly once, none repeated, none skipped.

Each run starts its own server (not :func:`shared_server`): a run killed during a weight sync
could leave a shared server waiting in the broadcast."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from maspo_megatron.megatron.checkpoint import latest_checkpoint_step

STEPS = 8
KILL_AFTER = 4  # checkpoint step after which the first run is killed


def train_cmd(paths: dict, run_dir: str) -> list[str]:
    return [sys.executable, "-m", "maspo_megatron.cli", "train", "--recipe", "tiny_cpu",
            f"model.path={paths['model']}", f"data.train_path={paths['train']}", f"output_dir={run_dir}",
            f"steps={STEPS}", "save_every=2", "prompts_per_step=4", "rollout.n_samples=4",
            "eval_every=0", "tensorboard=false"]


@contextlib.contextmanager
def shared_server(model_dir: str, log_dir: str):
    """URLs of one rollout server of ``model_dir``, launched as tiny_cpu's runs launch theirs, for
    runs that attach to it (``rollout.server_urls``; each syncs and proves its weights at start)."""
    from maspo_megatron.cli import load_recipe
    from maspo_megatron.generation import launch_servers

    os.makedirs(log_dir, exist_ok=True)
    servers = launch_servers(dataclasses.replace(load_recipe("tiny_cpu").rollout, num_servers=1), model_dir, log_dir)
    try:
        yield list(servers.urls)
    finally:
        servers.stop()


def kill_orphans(marker: str, keep_servers: bool = False) -> None:
    """SIGKILLs the rollout server started on ``marker`` (its model path) and the router in front
    of it: they run in their own sessions, so killing the trainer's process group leaves them.
    ``keep_servers``: only the routers (the server is shared by several runs)."""
    def cmdlines():
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    yield int(pid), f.read().decode(errors="replace").split("\0")
            except OSError:
                pass

    servers = [(pid, cmd) for pid, cmd in cmdlines() if marker in cmd and "sglang.launch_server" in cmd]
    urls = [f"127.0.0.1:{cmd[cmd.index('--port') + 1]}" for _, cmd in servers]
    keep = {pid for pid, _ in servers} if keep_servers else set()
    victims = [pid for pid, _ in servers if pid not in keep]
    victims += [pid for pid, cmd in cmdlines()
                if pid not in victims and pid not in keep and any(u in a for a in cmd for u in urls)]
    for pid in victims:
        try:
            # Each server and the router lead their own session (their scheduler and
            # detokenizer processes included): end the whole group.
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def final_records(path: str) -> dict[int, dict]:
    """step -> its last record (a step the killed run started is redone after the resume)."""
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_after_sigkill_continues_step_and_data_cursor(tmp_path):
    from maspo_megatron.cli import load_recipe
    from maspo_megatron.data import PromptDataset, PromptLoader, load_tokenizer
    from maspo_megatron.demo import prepare_assets

    paths = prepare_assets(str(tmp_path))
    run_dir = str(tmp_path / "run")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(train_cmd(paths, run_dir), stdout=log1, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while (latest_checkpoint_step(ckpt_dir) or 0) < KILL_AFTER:
            assert first.poll() is None, f"first run ended early:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no step-4 checkpoint in time"
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)  # torchrun and both trainer ranks, mid-run
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        log1.close()
        kill_orphans(paths["model"])
    killed_at = latest_checkpoint_step(ckpt_dir)
    assert KILL_AFTER <= killed_at < STEPS, "the first run was not killed before it finished"
    before = final_records(os.path.join(run_dir, "prompts.jsonl"))
    assert max(before) >= killed_at

    try:
        second = subprocess.run(train_cmd(paths, run_dir), capture_output=True, text=True, timeout=400)
    finally:
        kill_orphans(paths["model"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from {ckpt_dir} at step {killed_at}" in second.stdout
    assert latest_checkpoint_step(ckpt_dir) == STEPS

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps_logged = [json.loads(line)["step"] for line in f]
    # The resumed run logs exactly the steps after the checkpoint.
    assert steps_logged[-(STEPS - killed_at):] == list(range(killed_at + 1, STEPS + 1))

    records = final_records(os.path.join(run_dir, "prompts.jsonl"))
    assert sorted(records) == list(range(1, STEPS + 1))
    # Steps up to the checkpoint are the killed run's: the resumed run did not redo them.
    for step in range(1, killed_at + 1):
        assert records[step] == before[step]
    drawn = [i for step in range(1, STEPS + 1) for i in records[step]["drawn"]]
    # The data order, independently of both runs: the recipe's loader from the start.
    cfg = load_recipe("tiny_cpu")
    dataset = PromptDataset(paths["train"], cfg.data, load_tokenizer(paths["model"]))
    expected = [p.index for p in PromptLoader(dataset, shuffle=cfg.data.shuffle, seed=cfg.data.seed).next_batch(len(drawn))]
    assert len(drawn) < len(dataset)  # within one epoch, so any repeat would be a bug
    assert drawn == expected
    assert len(set(drawn)) == len(drawn)
