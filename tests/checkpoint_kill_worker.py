"""A one-process megatron run that saves checkpoints, for tests/test_checkpoint_corruption.py to
SIGKILL in the middle of a save.

    python tests/checkpoint_kill_worker.py CKPT_DIR MODE

MODE:
  slow-write   save step 1, then step 2 with each tensor write slowed (megatron's writer), so a
               kill lands while the shard files are being written;
  slow-commit  save step 2 with the final tracker update slowed, so a kill lands after the
               checkpoint directory was renamed into place but before ``latest`` points at it;
  resume       load the newest complete checkpoint, then save step 2 (normal speed), and print
               what was loaded and what is on disk.

Prints one JSON line per event (``{"event": ...}``), flushed, for the parent to wait on.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def say(**event) -> None:
    print(json.dumps(event), flush=True)


def main(ckpt_dir: str, mode: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch

    from megatron_tiny import build_model, wrap_ddp_and_optimizer

    from maspo_megatron.megatron import checkpoint
    from maspo_megatron.megatron.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    model, config = build_model(1, 1)
    model, optimizer = wrap_ddp_and_optimizer(model, config, lr=1e-3, clip_grad=0.05)

    def bump(value: float) -> None:  # makes each step's weights tell apart
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)

    if mode == "slow-write":
        bump(1.0)
        save_checkpoint(ckpt_dir, 1, model, optimizer, extra_state={"n": 1})
        say(event="saved", step=1)
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        real = filesystem_async._write_item

        def slow_write_item(*args, **kwargs):
            out = real(*args, **kwargs)
            time.sleep(0.05)
            return out

        filesystem_async._write_item = slow_write_item
        bump(2.0)
        say(event="saving", step=2)
        save_checkpoint(ckpt_dir, 2, model, optimizer, extra_state={"n": 2})
        say(event="saved", step=2)  # the parent kills before this
    elif mode == "slow-commit":
        real = checkpoint._write_atomically

        def slow_tracker(path, text):
            if path.name == checkpoint.TRACKER_FILE:
                say(event="committing", step=2)
                time.sleep(120)
            return real(path, text)

        checkpoint._write_atomically = slow_tracker
        bump(2.0)
        save_checkpoint(ckpt_dir, 2, model, optimizer, extra_state={"n": 2})
        say(event="saved", step=2)  # the parent kills before this
    elif mode == "resume":
        state = load_checkpoint(ckpt_dir, model, optimizer)
        values = sorted({float(v) for p in model.parameters() for v in p.detach().flatten()[:4]})
        say(event="loaded", step=state["step"], extra=state["extra_state"], values=values,
            skipped=state["skipped"])
        bump(2.0)
        save_checkpoint(ckpt_dir, 2, model, optimizer, extra_state={"n": 2})
        say(event="saved", step=2, newest=find_checkpoint(ckpt_dir).step,
            entries=sorted(os.listdir(ckpt_dir)))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
