"""Checkpoint directories in the trainer's layout without megatron, for fast tests.

The data part is a real ``torch.distributed.checkpoint`` save (``.metadata`` + ``__0_0.distcp``,
as megatron's torch_dist strategy writes them); ``metadata.json`` and ``trainer_state.json`` are
what ``save_checkpoint`` writes next to it. What ``checkpoint_problem``/``find_checkpoint`` and
the resume guard read is therefore the same as on a real checkpoint.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch


def fake_checkpoint(ckpt_dir, step: int, extra_state: dict | None = None, *, latest: bool = True) -> Path:
    import torch.distributed.checkpoint as dcp

    from maspo_megatron.megatron.checkpoint import FORMAT_VERSION, STATE_FILE, TRACKER_FILE, iteration_dir

    path = iteration_dir(ckpt_dir, step)
    path.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save({"weight": torch.arange(64.0) + step, "extra": {"step": step}}, checkpoint_id=str(path), no_dist=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    (path / STATE_FILE).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "step": step, "extra_state": extra_state or {},
        "layout": {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 1, "device": "cpu"},
        "model_chunks": 1, "has_optimizer": True, "optimizer_sharding": "fully_reshardable",
        "has_opt_param_scheduler": True,
    }))
    if latest:
        (Path(ckpt_dir) / TRACKER_FILE).write_text(f"{step}\n")
    return path


def truncate(path, keep: float = 0.5) -> Path:
    path = Path(path)
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))
    return path
