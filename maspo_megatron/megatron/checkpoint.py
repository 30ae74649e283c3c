"""Training checkpoints: megatron-core dist-checkpointing plus the trainer's own state.

Layout of ``ckpt_dir``::

    latest                      the step of the newest *complete* checkpoint (text, written last)
    iter_0000010/               one checkpoint
        .metadata  __R_0.distcp  metadata.json     dist-checkpointing: model, optimizer, RNG
        trainer_state.json      step, extra_state, saving layout, what was saved (rank 0)
    .iter_0000020.incomplete/   a save in progress, or one that crashed; never read

A save writes everything into the ``.incomplete`` directory, renames it to ``iter_*`` and only
then replaces ``latest`` (write-to-temp + ``os.replace``): a crash at any point leaves the
previous checkpoint and ``latest`` intact.

Loading the newest checkpoint (``step=None``) checks it first (:func:`checkpoint_problem`: its
JSON files parse, dist-checkpointing's index ``.metadata`` reads, and every data file is as long
as the index says) and, if it is truncated or corrupt -- or its load fails on the way -- names
the file and step and falls back to the newest complete one at or below ``latest``
(:func:`find_checkpoint`), saying so. Content damage that keeps every size is found only where
the load itself fails (a pickled object); tensor bytes carry no checksum.

What is stored:

- model: ``chunk.sharded_state_dict()`` of every model chunk (``model`` or ``model0``,
  ``model1``, ... with virtual pipeline stages, as in Megatron-LM). Tensors are stored by global
  name and shape, so the model loads under any TP/PP/DP layout (dist-checkpointing reshards).
- optimizer: ``optimizer.sharded_state_dict(...)``. For the distributed optimizer the format is
  ``optimizer_sharding``:

  - ``"fully_reshardable"`` (default): states in model space (one tensor per parameter and
    state); loads under any TP/PP/DP layout. Saving all-gathers each rank's DP-sharded state
    over its data-parallel group, so it costs memory for the gathered shard.
  - ``"dp_reshardable"``: megatron's internal bucket layout, no gather; loads only with the same
    TP and PP (DP may change). For very large models.

  (megatron-core 0.19's ``"fully_sharded_model_space"`` is broken: it builds ShardedTensors
  with ``flattened_range``, which the same release rejects.)
- RNG: python ``random``, numpy, torch CPU, CUDA (when present) and megatron's model-parallel RNG
  tracker, per rank, as a ShardedObject keyed by (pp, tp, dp) rank. Under another layout, or
  on another device type, there is no matching state: the RNG is left alone, with a log line.
- step, ``extra_state`` (the data cursor, trainer counters: JSON) and the optimizer-parameter
  scheduler (rank 0; identical on every rank).

Synchronous saving on CPU: megatron's writer returns its results through a queue that it creates
with a *spawned* ``multiprocessing.Manager``. Spawning re-imports the launching script: one
without an ``if __name__ == "__main__"`` guard re-runs its distributed set-up in that helper and
the save never finishes (the hang noted in DESIGN.md); otherwise it costs seconds per process.
Our saves are synchronous -- the writer runs in the calling process -- so a thread-safe
``queue.Queue`` carries the same results (``_use_in_process_write_results``). The writer also
imports ``psutil``, which megatron-core does not declare.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZER_SHARDINGS",
    "CheckpointChoice",
    "CheckpointError",
    "checkpoint_problem",
    "find_checkpoint",
    "has_checkpoint",
    "iteration_dir",
    "latest_checkpoint_step",
    "load_checkpoint",
    "read_trainer_state",
    "save_checkpoint",
]

FORMAT_VERSION = 1
TRACKER_FILE = "latest"
STATE_FILE = "trainer_state.json"
OPTIMIZER_SHARDINGS = ("fully_reshardable", "dp_reshardable")
_RNG_KEY = "rng_state"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the given model/optimizer (names what differs)."""


def iteration_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """``ckpt_dir/iter_0000010`` for step 10."""
    return Path(ckpt_dir) / f"iter_{step:07d}"


def latest_checkpoint_step(ckpt_dir: str | os.PathLike) -> int | None:
    """The step recorded in ``ckpt_dir/latest``; None when nothing was saved there yet.

    Raises:
        ValueError: the tracker file exists but does not hold a step number.
    """
    tracker = Path(ckpt_dir) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"checkpoint tracker {tracker} should hold a step number, found {text!r}")
    return int(text)


def vocab_multiple_for(ckpt_dir: str | os.PathLike, tp: int, step: int | None = None) -> int:
    """The ``make_vocab_size_divisible_by`` that rebuilds a checkpoint's padded vocabulary at
    tensor-parallel size ``tp`` (``step``; None: the newest complete one, as ``load_checkpoint``).

    Megatron pads the vocabulary to a multiple of ``divisible_by * tp``, so the padded size
    depends on the saving layout; loading at another TP must reproduce the saved size.
    """
    from megatron.core import dist_checkpointing

    if step is None:
        step = find_checkpoint(ckpt_dir).step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
    meta = dist_checkpointing.load_tensors_metadata(str(iteration_dir(ckpt_dir, step)))
    padded = meta["embedding.word_embeddings.weight"].global_shape[0]
    if padded % tp:
        raise CheckpointError(f"the checkpoint's padded vocabulary ({padded} rows) cannot be split over tp={tp}")
    return padded // tp


def _available_steps(ckpt_dir: Path) -> list[int]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _ITER_RE.match(p.name)))


def has_checkpoint(ckpt_dir: str | os.PathLike) -> bool:
    """Something was saved in ``ckpt_dir``: a tracker file or an ``iter_*`` directory (complete
    or not; :func:`find_checkpoint` tells which one loads)."""
    return (Path(ckpt_dir) / TRACKER_FILE).is_file() or bool(_available_steps(Path(ckpt_dir)))


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint directory ``path`` cannot be loaded, naming the file; None if it looks
    complete.

    Reads only small files and sizes: ``trainer_state.json`` and megatron's ``metadata.json``
    parse, the dist-checkpointing index ``.metadata`` unpickles, and every data file it points
    into exists and is at least as long as the index says (a truncated file is shorter).
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    try:
        read_trainer_state(path)
    except CheckpointError as e:
        return str(e)
    config = path / "metadata.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as e:
        return f"{config} cannot be read ({type(e).__name__}: {e})"
    index = path / ".metadata"
    if not index.is_file():
        return f"{index} is missing"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(path)).read_metadata().storage_data
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # noqa: BLE001 - any unreadable index is a corrupt checkpoint
        return f"{index} cannot be read ({type(e).__name__}: {e})"
    for name, end in sorted(needed.items()):
        data = path / name
        if not data.is_file():
            return f"{data} is missing (the index {index.name} points into it)"
        size = data.stat().st_size
        if size < end:
            return f"{data} is truncated: {size} bytes, the index {index.name} needs {end}"
    return None


@dataclass
class CheckpointChoice:
    """What :func:`find_checkpoint` chose: the step to load (None: nothing loadable) and, for
    every newer checkpoint passed over, why (one sentence naming the step and the file)."""

    step: int | None
    skipped: list[str] = field(default_factory=list)


def find_checkpoint(ckpt_dir: str | os.PathLike, below: int | None = None) -> CheckpointChoice:
    """The newest complete checkpoint of ``ckpt_dir`` at or below ``latest`` (or below ``below``).

    ``latest`` is written last by a save, so steps above it are never taken; if the tracker
    itself is unreadable, every ``iter_*`` directory is a candidate. Touches only the files
    :func:`checkpoint_problem` reads; no collective.
    """
    ckpt_dir = Path(ckpt_dir)
    skipped: list[str] = []
    try:
        top = latest_checkpoint_step(ckpt_dir)
    except (ValueError, OSError) as e:
        top = None
        skipped.append(f"{e}; looking at every iter_* directory instead")
    steps = _available_steps(ckpt_dir)
    candidates = sorted({*[s for s in steps if top is None or s <= top], *([top] if top is not None else [])},
                        reverse=True)
    if below is not None:
        candidates = [s for s in candidates if s < below]
    for step in candidates:
        problem = checkpoint_problem(iteration_dir(ckpt_dir, step))
        if problem is None:
            return CheckpointChoice(step, skipped)
        skipped.append(f"checkpoint step {step} is incomplete or corrupt: {problem}")
    return CheckpointChoice(None, skipped)


def _non_json_path(value: Any, path: str = "extra_state") -> str | None:
    """Where in ``value`` the first non-JSON value sits (e.g. ``extra_state['cursor'][2]``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{path} key {k!r} (keys must be str)"
            found = _non_json_path(v, f"{path}[{k!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _non_json_path(v, f"{path}[{i}]")
            if found:
                return found
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return f"{path} (a {type(value).__name__})"


def _as_chunks(model_chunks) -> list[torch.nn.Module]:
    """The bare model chunks: DDP/Float16Module wrappers removed, so tensor names and state-dict
    keys are the model's own (``decoder.layers...``, not ``module.decoder.layers...``) whether
    or not the saving or loading side wraps it."""
    from megatron.core.utils import unwrap_model

    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    if not chunks:
        raise ValueError("model_chunks is empty: pass the model (or its virtual-pipeline chunks)")
    return unwrap_model(chunks)


def _model_keys(n_chunks: int) -> list[str]:
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def _layout() -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    return {
        "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel": ps.get_data_parallel_world_size(with_context_parallel=True),
        "expert_parallel": ps.get_expert_model_parallel_world_size(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def _rng_object(state: dict | None):
    """This rank's RNG state as a ShardedObject at (pp, tp, dp) of the (PP, TP, DP) grid."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        _RNG_KEY,
        state,
        global_shape=(
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size(with_context_parallel=True),
        ),
        global_offset=(
            ps.get_pipeline_model_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank(with_context_parallel=True),
        ),
        replica_id=0,
    )


def _capture_rng() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {
            name: state.clone()
            for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()
        },
    }


def _restore_rng(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _materialise_adam_state(optimizer) -> None:
    """Gives a never-stepped plain ``torch.optim.Adam(W)`` its zero state before a load.

    megatron-core 0.19's ``DistributedOptimizer.state_dict()`` reads the step from the
    per-parameter state of a plain torch Adam (the optimizer used without Apex/TE, e.g. on CPU)
    and asserts it is there, so no state dict of a never-stepped optimizer can be built (to load
    into, or to save at step 0). Zero moments at step 0 are exactly what Adam's first step would
    create (so training is unchanged); a load overwrites them.
    Other optimizers (TE/Apex FusedAdam keep the step in param groups) are left alone.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):
            continue
        for group in inner.param_groups:
            on_param_device = group.get("capturable") or group.get("fused")
            for p in group["params"]:
                state = inner.state[p]
                if state:
                    continue
                state["step"] = torch.zeros(
                    (), dtype=torch.float32, device=p.device if on_param_device else "cpu"
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


_PARAM_STATE_LOADERS = {
    "fully_reshardable": "load_parameter_state_from_fully_reshardable",
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
}


def _load_optimizer_state(optimizer, state) -> None:
    """``optimizer.load_state_dict(state)``, around two megatron-core 0.19 bugs.

    With a plain torch Adam (the optimizer without Apex/TE, e.g. on CPU), the distributed
    optimizer's parameter-state loaders copy every tensor of the per-parameter torch state,
    including the 0-dim ``step``, which the param groups already restored: the
    ``fully_reshardable`` loader has no ``step`` to copy (``KeyError: 'step'``) and the
    ``dp_reshardable`` one copies the *current* local step over it (a fresh optimizer resumes
    at step 0: wrong bias correction); and the restored step is one tensor shared by all
    parameters. For those parts: load all but the parameter state, then the parameter state
    with the step tensors set aside, then put back a copy per parameter.
    """
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is None or len(chained) == 1:
        parts = [(optimizer if chained is None else chained[0], state)]
    else:
        # ChainedOptimizer.sharded_state_dict keys its parts 0, 1, ... (MoE expert optimizers).
        parts = [(opt, state[i]) for i, opt in enumerate(chained)]
    for opt, sub in parts:
        loader = _PARAM_STATE_LOADERS.get(sub.get("param_state_sharding_type"))
        inner = getattr(opt, "optimizer", None)
        if loader is None or not isinstance(inner, torch.optim.Adam):
            opt.load_state_dict(sub)
            continue
        sub = dict(sub)
        param_state = sub.pop("param_state")
        sub.pop("param_state_sharding_type")
        opt.load_state_dict(sub)
        steps = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
        getattr(opt, loader)(param_state)
        for p, step in steps.items():
            # Own tensors: megatron gives every parameter the *same* step tensor, which torch's
            # foreach Adam then increments once per parameter.
            inner.state[p]["step"] = step.clone()
    if chained is not None and len(chained) > 1:
        optimizer._synchronize_steps()


def _sharded_state(chunks, optimizer, scheduler, sharding: str, *, is_loading: bool, rng) -> dict:
    """The state dict handed to dist-checkpointing (``rng``: the object's data, or False)."""
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(len(chunks)), chunks)}
    if optimizer is not None:
        _materialise_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": sharding, "chained_optim_avoid_prefix": True},
        )
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng is not False:
        state[_RNG_KEY] = _rng_object(rng)
    return state


def _rank0_then_all(fn) -> None:
    """Runs ``fn`` on global rank 0; every rank raises if it failed (nobody waits forever)."""
    error = [None]
    if dist.get_rank() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"checkpoint step on rank 0 failed: {error[0]}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _use_in_process_write_results() -> None:
    """Gives megatron's checkpoint writer a thread-safe queue instead of a spawned Manager's.

    See the module docstring: our saves run the writer in this process, so no helper process is
    needed. An existing queue (someone set up async saving) is left alone.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model_chunks,
    optimizer,
    opt_param_scheduler=None,
    extra_state: dict | None = None,
    *,
    optimizer_sharding: str = "fully_reshardable",
) -> Path:
    """Saves a checkpoint of step ``step`` and points ``ckpt_dir/latest`` at it. Collective.

    Args:
        ckpt_dir: checkpoint root, on a filesystem every rank sees.
        step: training step just completed (>= 0); names the directory ``iter_{step:07d}``.
        model_chunks: the model (e.g. Megatron DDP) or the list of its virtual-pipeline chunks.
        optimizer: a megatron-core optimizer, or None to save weights only.
        opt_param_scheduler: megatron's ``OptimizerParamScheduler`` (or anything with
            ``state_dict``/``load_state_dict``), or None.
        extra_state: JSON-serialisable trainer state (data cursor, counters); rank 0's is kept.
        optimizer_sharding: ``"fully_reshardable"`` or ``"dp_reshardable"`` (module docstring).

    Returns:
        The committed checkpoint directory. A checkpoint already saved at ``step`` is replaced.
    """
    import importlib.util

    from megatron.core import dist_checkpointing

    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if optimizer_sharding not in OPTIMIZER_SHARDINGS:
        raise ValueError(
            f"optimizer_sharding must be one of {OPTIMIZER_SHARDINGS}, got {optimizer_sharding!r}"
        )
    extra_state = {} if extra_state is None else extra_state
    if not isinstance(extra_state, dict) or (bad := _non_json_path(extra_state)):
        where = "extra_state (must be a dict)" if not isinstance(extra_state, dict) else bad
        raise TypeError(f"extra_state must be JSON-serialisable; not serialisable: {where}")
    if importlib.util.find_spec("psutil") is None:
        raise ImportError("megatron-core's checkpoint writer needs psutil: pip install psutil")
    chunks = _as_chunks(model_chunks)
    ckpt_dir = Path(ckpt_dir)
    final = iteration_dir(ckpt_dir, step)
    staging = ckpt_dir / f".{final.name}.incomplete"

    def prepare():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if staging.exists():  # left over from a crashed save of the same step
            shutil.rmtree(staging)
        staging.mkdir()

    _rank0_then_all(prepare)
    state = _sharded_state(
        chunks, optimizer, opt_param_scheduler, optimizer_sharding, is_loading=False, rng=_capture_rng()
    )
    _use_in_process_write_results()
    dist_checkpointing.save(state, str(staging))  # ends with a barrier: all shards are written

    trainer_state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "extra_state": extra_state,
        "layout": _layout(),
        "model_chunks": len(chunks),
        "has_optimizer": optimizer is not None,
        "optimizer_sharding": optimizer_sharding,
        "has_opt_param_scheduler": opt_param_scheduler is not None,
    }

    def commit():
        _write_atomically(staging / STATE_FILE, json.dumps(trainer_state, indent=1))
        replaced = ckpt_dir / f".{final.name}.replaced"
        if final.exists():
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(final, replaced)
        os.replace(staging, final)
        _fsync_dir(ckpt_dir)
        _write_atomically(ckpt_dir / TRACKER_FILE, f"{step}\n")
        if replaced.exists():
            shutil.rmtree(replaced)

    _rank0_then_all(commit)
    return final


def read_trainer_state(path: str | os.PathLike) -> dict:
    """``trainer_state.json`` of the checkpoint directory ``path`` (step, extra_state, layout)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(
            f"{state_file} is missing: {path} is not a checkpoint written by save_checkpoint"
        )
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_file} is not valid JSON: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file} is not a JSON object")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{state_file}: format_version {state.get('format_version')!r} is not supported "
            f"(this code reads version {FORMAT_VERSION})"
        )
    return state


def _check_tensors(path: Path, state: dict, model_keys: Sequence[str]) -> None:
    """Compares every requested tensor with the checkpoint's metadata; raises on all ranks.

    Catches, naming the tensor: a tensor the model/optimizer needs that the checkpoint lacks, a
    global shape that differs, and a model tensor in the checkpoint that no rank's model has
    (silently dropping weights would be worse than failing).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    ckpt = dist_checkpointing.load_tensors_metadata(str(path))
    requested, _, _ = load_preprocess(state)
    problems, model_tensor_keys = [], set()
    for part, sub in requested.items():
        for sh in nested_values(sub) if isinstance(sub, (dict, list)) else [sub]:
            if not isinstance(sh, ShardedTensor):
                continue
            if part in model_keys:
                model_tensor_keys.add(sh.key)
            if sh.key not in ckpt:
                problems.append(f"tensor '{sh.key}' ({part}) is not in the checkpoint")
            elif tuple(ckpt[sh.key].global_shape) != tuple(sh.global_shape):
                problems.append(
                    f"tensor '{sh.key}' ({part}) has shape {tuple(ckpt[sh.key].global_shape)} in the "
                    f"checkpoint but {tuple(sh.global_shape)} in the model"
                )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (sorted(set(problems)), sorted(model_tensor_keys)))
    all_problems = sorted({p for rank_problems, _ in gathered for p in rank_problems})
    wanted = {k for _, keys in gathered for k in keys}
    for key in sorted(ckpt):
        if not key.startswith("optimizer.") and key not in wanted:
            all_problems.append(f"checkpoint tensor '{key}' has no counterpart in the model")
    if all_problems:
        shown = "\n  ".join(all_problems[:20])
        more = f"\n  ... and {len(all_problems) - 20} more" if len(all_problems) > 20 else ""
        raise CheckpointError(f"checkpoint {path} does not match the model:\n  {shown}{more}")


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    model_chunks,
    optimizer=None,
    opt_param_scheduler=None,
    step: int | None = None,
) -> dict:
    """Loads a checkpoint saved by ``save_checkpoint`` into the given objects. Collective.

    The model loads under any TP/PP/DP layout, virtual pipeline stages included. The optimizer
    loads under any layout when saved ``"fully_reshardable"``, and with the same TP, PP and
    model chunks per rank when saved ``"dp_reshardable"``. RNG states
    are restored only under the saving layout and device type (else left alone, logged).

    Args:
        ckpt_dir: checkpoint root given to ``save_checkpoint``.
        model_chunks: the model (or its virtual-pipeline chunks), built for the current layout.
        optimizer: optimizer to restore, or None to load weights only (a megatron optimizer's
            own fp32 copies then need ``optimizer.reload_model_params()``).
        opt_param_scheduler: scheduler to restore, or None.
        step: the step to load; None loads the newest complete checkpoint: the one named by
            ``ckpt_dir/latest`` or, when that one is truncated or corrupt (or its load fails),
            the next older complete one -- each checkpoint passed over is logged (rank 0)
            naming its step and file, and listed in ``skipped``.

    Returns:
        ``{"step", "extra_state", "rng_restored", "saved_layout", "skipped"}``.

    Raises:
        FileNotFoundError: no such directory, nothing saved there (no ``latest``), no such step.
        CheckpointError: the checkpoint does not match the model/optimizer (names the tensor),
            lacks the optimizer/scheduler state asked for, or is truncated/corrupt (an explicit
            ``step``; with ``step=None``: every checkpoint is).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    args = (model_chunks, optimizer, opt_param_scheduler)
    if step is not None:
        return _load_step(ckpt_dir, step, *args, skipped=[])
    if not has_checkpoint(ckpt_dir):
        incomplete = sorted(p.name for p in ckpt_dir.glob(".iter_*.incomplete"))
        hint = f" (unfinished saves: {', '.join(incomplete)})" if incomplete else ""
        raise FileNotFoundError(
            f"no complete checkpoint in {ckpt_dir}: its tracker file '{TRACKER_FILE}' is missing{hint}"
        )
    skipped: list[str] = []  # every checkpoint passed over, for the caller
    unread: list[str] = []  # ... of them, those whose load failed (not yet reported)
    below = None
    while True:
        # Rank 0 looks (one view of a shared filesystem); every rank loads what it chose.
        choice = _from_rank0(lambda: find_checkpoint(ckpt_dir, below))
        skipped += choice.skipped
        if choice.step is None:
            raise CheckpointError(f"no complete checkpoint in {ckpt_dir}: " + "; ".join(skipped))
        if _rank() == 0:
            for reason in unread + choice.skipped:
                logger.warning("%s; falling back to step %d, the newest complete checkpoint", reason, choice.step)
        unread = []
        try:
            return _load_step(ckpt_dir, choice.step, *args, skipped=skipped)
        except _UnreadableCheckpoint as e:
            skipped.append(str(e))
            unread.append(str(e))
            below = choice.step


class _UnreadableCheckpoint(CheckpointError):
    """dist-checkpointing failed to read a checkpoint that looked complete (on some rank)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _from_rank0(fn):
    """``fn()`` on global rank 0, its result on every rank (plain call without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _load_error_text(e: BaseException) -> str:
    """One line for a failed read; torch's CheckpointException carries each rank's exception."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, pair = next(iter(sorted(failures.items())))
        exc = pair[0] if isinstance(pair, tuple) else pair
        text = f"rank {rank}: {type(exc).__name__}: {exc}"
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


def _load_step(ckpt_dir: Path, step: int, model_chunks, optimizer, opt_param_scheduler, *,
               skipped: list[str]) -> dict:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    path = iteration_dir(ckpt_dir, step)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (steps present: {_available_steps(ckpt_dir) or 'none'})"
        )
    problem = _from_rank0(lambda: checkpoint_problem(path))
    if problem is not None:
        raise CheckpointError(f"checkpoint step {step} is incomplete or corrupt: {problem}")
    saved = read_trainer_state(path)
    saved["layout"] = {"expert_parallel": 1, **saved["layout"]}  # saved before the key existed
    chunks = _as_chunks(model_chunks)
    layout = _layout()
    if optimizer is not None and saved["layout"]["expert_parallel"] != layout["expert_parallel"]:
        # megatron's distributed optimizer shards expert parameters over the expert-data-parallel
        # group, whose layout changes with EP: its state does not reshard (fails inside megatron).
        raise CheckpointError(
            f"checkpoint {path}: optimizer state saved at expert_parallel="
            f"{saved['layout']['expert_parallel']} cannot load at parallel.ep={layout['expert_parallel']}; "
            "resume at the saving parallel.ep, or load weights only (optimizer=None)")
    if optimizer is not None and not saved["has_optimizer"]:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state (saved with optimizer=None)")
    if opt_param_scheduler is not None and not saved["has_opt_param_scheduler"]:
        raise CheckpointError(f"checkpoint {path} holds no optimizer-parameter scheduler state")
    sharding = saved["optimizer_sharding"]
    if optimizer is not None and sharding == "dp_reshardable":
        # Its buckets follow each model chunk's parameters: virtual stages change them too.
        before = {**saved["layout"], "model_chunks": saved["model_chunks"]}
        now = {"tensor_parallel": layout["tensor_parallel"], "pipeline_parallel": layout["pipeline_parallel"],
               "model_chunks": len(chunks)}
        for dim, value in now.items():
            if before[dim] != value:
                raise CheckpointError(
                    f"checkpoint {path}: optimizer state saved 'dp_reshardable' at {dim}="
                    f"{before[dim]} cannot load at {dim}={value}"
                    + (" (model chunks per rank: parallel.vpp)" if dim == "model_chunks" else "")
                    + "; load with optimizer=None, or save with optimizer_sharding='fully_reshardable'"
                )
    same_rng_layout = saved["layout"] == layout
    state = _sharded_state(
        chunks, optimizer, opt_param_scheduler, sharding, is_loading=True,
        rng=None if same_rng_layout else False,
    )
    _check_tensors(path, state, _model_keys(len(chunks)))
    error = None
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        error = _load_error_text(e)
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)  # all ranks agree before anyone moves on
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise _UnreadableCheckpoint(f"checkpoint step {step} ({path}) could not be read: {first}")

    # no_grad: with fp32 params the distributed optimizer's main-param shards are views of the
    # (grad-requiring) model params, which megatron's load_state_dict copies into in place.
    with torch.no_grad():
        for key, chunk in zip(_model_keys(len(chunks)), chunks):
            chunk.load_state_dict(loaded[key], strict=True)
        if optimizer is not None:
            try:
                _load_optimizer_state(optimizer, loaded["optimizer"])
            except KeyError as e:
                # megatron's distributed optimizer keys its parameter groups by their
                # hyper-parameters (lr, min_lr, weight-decay and lr multipliers, ...).
                raise CheckpointError(
                    f"{path}: the optimizer's parameter groups do not match the checkpoint's "
                    f"(group key {e.args[0]!r} not found): resume with the optimizer settings the "
                    "run was saved with (lr, min_lr, weight_decay), or load weights only") from e
    if opt_param_scheduler is not None:
        if hasattr(opt_param_scheduler, "num_steps"):
            # megatron's scheduler *adds* the saved step count to its own: start from 0 so a
            # scheduler that already stepped (or was loaded before) ends at the saved step.
            opt_param_scheduler.num_steps = 0
        opt_param_scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_rng_layout:
        _restore_rng(loaded[_RNG_KEY])
    elif dist.get_rank() == 0:
        logger.warning(
            "checkpoint %s was saved under layout %s, now %s: RNG states not restored "
            "(model%s loaded)", path, saved["layout"], layout,
            " and optimizer" if optimizer is not None else "",
        )
    return {
        "step": saved["step"],
        "extra_state": saved["extra_state"],
        "rng_restored": same_rng_layout,
        "saved_layout": saved["layout"],
        "skipped": list(skipped),
    }
