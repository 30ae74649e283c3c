"""Truncated or corrupt checkpoints are named (file and step) and skipped for the newest complete
one; a SIGKILL during a save never leaves a checkpoint that ``latest`` points at half-written.

Fast tests check ``checkpoint_problem`` and ``find_checkpoint`` on directories written by
torch.distributed.checkpoint (tests/fake_checkpoints.py). The slow ones load real megatron
checkpoints (one gloo process) damaged in several ways, and kill a saving process
(tests/checkpoint_kill_worker.py) mid-write and mid-commit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import run_distributed
from fake_checkpoints import fake_checkpoint, truncate
from maspo_megatron.megatron.checkpoint import (
    checkpoint_problem,
    find_checkpoint,
    has_checkpoint,
    iteration_dir,
    latest_checkpoint_step,
)


def test_a_complete_checkpoint_has_no_problem_and_each_damage_is_named(tmp_path):
    path = fake_checkpoint(tmp_path, 2)
    assert checkpoint_problem(path) is None
    data = path / "__0_0.distcp"
    size = data.stat().st_size

    truncate(data, 0.5)
    assert checkpoint_problem(path) == (f"{data} is truncated: {size // 2} bytes, the index .metadata needs {size}")
    data.unlink()
    assert checkpoint_problem(path) == f"{data} is missing (the index .metadata points into it)"

    path = fake_checkpoint(tmp_path, 3)
    truncate(path / ".metadata", 0.3)
    assert checkpoint_problem(path).startswith(f"{path / '.metadata'} cannot be read (")

    path = fake_checkpoint(tmp_path, 4)
    (path / ".metadata").unlink()
    assert checkpoint_problem(path) == f"{path / '.metadata'} is missing"

    path = fake_checkpoint(tmp_path, 5)
    truncate(path / "trainer_state.json", 0.5)
    assert checkpoint_problem(path).startswith(f"{path / 'trainer_state.json'} is not valid JSON")

    path = fake_checkpoint(tmp_path, 6)
    (path / "metadata.json").write_text("{")
    assert checkpoint_problem(path).startswith(f"{path / 'metadata.json'} cannot be read (JSONDecodeError")
    assert checkpoint_problem(tmp_path / "iter_0000099") == f"{tmp_path / 'iter_0000099'} does not exist"


def test_find_checkpoint_takes_the_newest_complete_one_at_or_below_latest(tmp_path):
    assert not has_checkpoint(tmp_path) and find_checkpoint(tmp_path).step is None
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("4\n")  # step 6 was renamed in, its save never committed
    assert has_checkpoint(tmp_path)
    assert find_checkpoint(tmp_path).step == 4 and find_checkpoint(tmp_path).skipped == []

    data = truncate(iteration_dir(tmp_path, 4) / "__0_0.distcp")
    choice = find_checkpoint(tmp_path)
    assert choice.step == 2
    assert choice.skipped == [f"checkpoint step 4 is incomplete or corrupt: {data} is truncated: "
                              f"{data.stat().st_size} bytes, the index .metadata needs {data.stat().st_size * 2}"]
    assert find_checkpoint(tmp_path, below=2).step is None

    (tmp_path / "latest").write_text("garbage")  # an unreadable tracker: every directory counts
    choice = find_checkpoint(tmp_path)
    assert choice.step == 6 and "should hold a step number, found 'garbage'" in choice.skipped[0]

    (tmp_path / "latest").write_text("8\n")  # points at a step whose directory is gone
    shutil.rmtree(iteration_dir(tmp_path, 6))
    truncate(iteration_dir(tmp_path, 2) / ".metadata")
    choice = find_checkpoint(tmp_path)
    assert choice.step is None and [s.split(":")[0] for s in choice.skipped] == [
        "checkpoint step 8 is incomplete or corrupt", "checkpoint step 4 is incomplete or corrupt",
        "checkpoint step 2 is incomplete or corrupt"]


# ----------------------------------------------------------------------------- real checkpoints


def _bytes_item(path: Path) -> tuple[str, int, int]:
    """(file, offset, length) of a pickled object in the checkpoint (not raw tensor bytes)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata()
    for index, info in meta.storage_data.items():
        if isinstance(meta.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            return info.relative_path, info.offset, info.length
    raise AssertionError("no pickled item in the checkpoint")


def damaged_loads(rank, world_size, root):
    import logging

    import torch
    from megatron_tiny import build_model, wrap_ddp_and_optimizer

    from maspo_megatron.megatron.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from maspo_megatron.runtime import destroy_parallel

    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("maspo_megatron.megatron.checkpoint").addHandler(Keep())
    model, config = build_model(1, 1)
    model, optimizer = wrap_ddp_and_optimizer(model, config, lr=1e-3, clip_grad=0.05)

    def fill(value):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)

    def values():
        return sorted({float(v) for p in model.parameters() for v in p.detach().flatten()})

    clean = Path(root) / "clean"
    fill(1.0)
    save_checkpoint(clean, 1, model, optimizer, extra_state={"n": 1})
    fill(2.0)
    save_checkpoint(clean, 2, model, optimizer, extra_state={"n": 2})
    out = {}

    def case(name, damage):
        ckpt = Path(root) / name
        shutil.copytree(clean, ckpt)
        damage(iteration_dir(ckpt, 2))
        fill(7.0)
        messages.clear()
        try:
            state = load_checkpoint(ckpt, model, optimizer)
            out[name] = {"step": state["step"], "extra": state["extra_state"], "skipped": state["skipped"],
                         "values": values(), "log": list(messages)}
        except CheckpointError as e:
            out[name] = {"error": str(e)}

    def pickled_garbage(path):
        name, offset, length = _bytes_item(path)
        with open(path / name, "r+b") as f:  # same size: only the load can tell
            f.seek(offset)
            f.write(b"\x00" * length)

    case("truncated_data", lambda p: truncate(p / "__0_0.distcp"))
    case("truncated_index", lambda p: truncate(p / ".metadata"))
    case("truncated_state", lambda p: truncate(p / "trainer_state.json"))
    case("pickled_garbage", pickled_garbage)
    case("both", lambda p: (truncate(p / "__0_0.distcp"), truncate(iteration_dir(p.parent, 1) / "__0_0.distcp")))
    explicit = Path(root) / "truncated_data"
    try:
        load_checkpoint(explicit, model, optimizer, step=2)
    except CheckpointError as e:
        out["explicit"] = str(e)
    destroy_parallel()
    return out


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_loads(tmp_path):
    (out,) = run_distributed(damaged_loads, 1, str(tmp_path))
    for name in ("truncated_data", "truncated_index", "truncated_state", "pickled_garbage"):
        got = out[name]
        assert got["step"] == 1 and got["extra"] == {"n": 1}, (name, got)
        assert got["values"] == [1.0], name  # step 1's weights, nothing of the failed attempt
        assert len(got["skipped"]) == 1 and got["skipped"][0].startswith("checkpoint step 2 "), got
        assert any("falling back to step 1, the newest complete checkpoint" in m for m in got["log"]), got
    data = tmp_path / "truncated_data" / "iter_0000002" / "__0_0.distcp"
    assert out["truncated_data"]["skipped"][0].startswith(
        f"checkpoint step 2 is incomplete or corrupt: {data} is truncated: ")
    assert f"{tmp_path / 'truncated_index' / 'iter_0000002' / '.metadata'} cannot be read" in \
        out["truncated_index"]["skipped"][0]
    assert "trainer_state.json is not valid JSON" in out["truncated_state"]["skipped"][0]
    # Sizes intact, a pickled object zeroed: found by the load itself, then the same fallback.
    assert out["pickled_garbage"]["skipped"][0].startswith(
        f"checkpoint step 2 ({tmp_path / 'pickled_garbage' / 'iter_0000002'}) could not be read: rank 0: ")
    assert out["both"]["error"].startswith(f"no complete checkpoint in {tmp_path / 'both'}: checkpoint step 2 ")
    assert "checkpoint step 1 is incomplete or corrupt" in out["both"]["error"]
    assert out["explicit"].startswith(f"checkpoint step 2 is incomplete or corrupt: {data} is truncated")


# ----------------------------------------------------------------------------- kill during save

WORKER = os.path.join(os.path.dirname(__file__), "checkpoint_kill_worker.py")


def _start(ckpt_dir, mode, log):
    return subprocess.Popen([sys.executable, WORKER, str(ckpt_dir), mode], stdout=subprocess.PIPE,
                            stderr=log, text=True, start_new_session=True)


def _wait_for(proc, event, step, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker ended (exit {proc.wait()}) before {event} {step}")
        if line.startswith("{"):
            message = json.loads(line)
            if message["event"] == event and message["step"] == step:
                return message
    raise AssertionError(f"no {event} {step} within {timeout} s")


def _kill(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_complete_and_current(tmp_path):
    ckpt = tmp_path / "ckpt"
    log = open(tmp_path / "worker.log", "w")
    try:
        # 1. Killed while megatron's writer is writing step 2's shard.
        proc = _start(ckpt, "slow-write", log)
        try:
            _wait_for(proc, "saved", 1)
            _wait_for(proc, "saving", 2)
            staging = ckpt / ".iter_0000002.incomplete"
            deadline = time.monotonic() + 120
            while not any(staging.glob("*.distcp")) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # the shard is part-written (each tensor write takes 50 ms here)
            assert proc.poll() is None, "the save finished before the kill"
        finally:
            _kill(proc)
        assert sorted(p.name for p in ckpt.iterdir()) == [".iter_0000002.incomplete", "iter_0000001", "latest"]
        assert latest_checkpoint_step(ckpt) == 1 and find_checkpoint(ckpt).step == 1
        assert checkpoint_problem(iteration_dir(ckpt, 1)) is None
        assert any(staging.glob("*.distcp")) and not (staging / ".metadata").exists()  # killed mid-write

        # 2. Killed after step 2 was renamed into place, before `latest` moved to it.
        proc = _start(ckpt, "slow-commit", log)
        try:
            _wait_for(proc, "committing", 2)
        finally:
            _kill(proc)
        assert (ckpt / "iter_0000002").is_dir() and not (ckpt / ".iter_0000002.incomplete").exists()
        assert latest_checkpoint_step(ckpt) == 1 and find_checkpoint(ckpt).step == 1

        # 3. A new process resumes from step 1 (what `latest` says) and saves step 2 again.
        proc = _start(ckpt, "resume", log)
        try:
            loaded = _wait_for(proc, "loaded", 1)
            saved = _wait_for(proc, "saved", 2)
        finally:
            if proc.poll() is None:
                proc.wait(timeout=60)
    finally:
        log.close()
    assert loaded["extra"] == {"n": 1} and loaded["values"] == [1.0] and loaded["skipped"] == []
    assert saved["newest"] == 2 and saved["entries"] == ["iter_0000001", "iter_0000002", "latest"]
