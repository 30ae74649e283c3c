"""Run a function in N gloo processes (torchrun-style environment) and collect results.

Each worker gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set exactly as torchrun
would, so code under test takes its normal initialisation path.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        payload = ("ok", result)
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        payload = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    if payload[0] == "error":
        raise SystemExit(1)


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    ``fn`` must be importable (module level). Returns the per-rank results; raises with the
    failing ranks' tracebacks.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
            join=False, start_method="spawn",
        )
        import time

        deadline = time.monotonic() + timeout
        failed = None
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test did not finish in {timeout:.0f}s")
        except mp.ProcessRaisedException as e:  # pragma: no cover - surfaced below
            failed = e
        except mp.ProcessExitedException as e:
            failed = e
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result (crashed or killed)")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                results.append(None)
            else:
                results.append(value)
        if errors or failed is not None:
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors or [str(failed)]))
        return results
