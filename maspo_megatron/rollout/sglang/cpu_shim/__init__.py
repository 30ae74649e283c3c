"""When and how the CPU SGLang server gets the ``sgl_kernel`` stand-in (``sgl_kernel/`` here).

This directory is what goes on the *server process's* ``PYTHONPATH``; the trainer imports this
file only as ``maspo_megatron.rollout.sglang.cpu_shim`` and never sees a top-level
``sgl_kernel``. :func:`cpu_engine_env` gives the environment additions of a CPU SGLang server:

- ``SGLANG_USE_CPU_ENGINE=1`` - without it SGLang's ``is_cpu()`` is false and start-up imports
  vLLM/CUDA ops;
- :data:`SHIM_DIR` first on ``PYTHONPATH``, only when the server's interpreter cannot import a
  real ``sgl_kernel`` (an installed sgl-kernel CPU build is used as is; the CUDA wheel fails to
  import without libcuda, so it is shadowed) - and never with a CUDA device visible:
  :func:`cpu_engine_env` raises there, and so does the stand-in's own import.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

SHIM_DIR = os.path.dirname(os.path.abspath(__file__))
"""The directory to put on the CPU server's PYTHONPATH (it holds ``sgl_kernel/``)."""

LOG_ENV = "MASPO_SGL_KERNEL_SHIM_LOG"
"""Names a file where the stand-in records each import, op call and missing-op lookup."""


@functools.lru_cache(maxsize=None)
def real_sgl_kernel_importable(python: str = sys.executable) -> bool:
    """Whether ``python`` (the server's interpreter) imports a real ``sgl_kernel``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != SHIM_DIR)
    probe = ("import sgl_kernel, sys; "
             "sys.exit(3 if getattr(sgl_kernel, 'IS_MASPO_CPU_SHIM', False) else 0)")
    try:
        done = subprocess.run([python, "-c", probe], env=env, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def cpu_engine_env(python: str = sys.executable, base_pythonpath: str | None = None) -> dict[str, str]:
    """Environment additions for a CPU SGLang server started with ``python``.

    ``base_pythonpath`` defaults to this process's ``PYTHONPATH``; the stand-in's directory is
    prepended to it when needed. Raises ``RuntimeError`` when the stand-in would be needed but a
    CUDA device is visible (use the real sgl-kernel of the SGLang image there).
    """
    import torch

    env = {"SGLANG_USE_CPU_ENGINE": "1"}
    if real_sgl_kernel_importable(python):
        return env
    if torch.cuda.is_available():
        raise RuntimeError(
            "SGLang CPU engine requested on a machine with a CUDA device, and no real sgl_kernel "
            "imports: the pure-torch sgl_kernel stand-in is for CPU-only machines. Run the "
            "server with device='cuda' (the SGLang image has sgl-kernel), or hide the GPUs "
            "(CUDA_VISIBLE_DEVICES='') for a CPU run.")
    base = os.environ.get("PYTHONPATH", "") if base_pythonpath is None else base_pythonpath
    rest = [p for p in base.split(os.pathsep) if p and os.path.abspath(p) != SHIM_DIR]
    env["PYTHONPATH"] = os.pathsep.join([SHIM_DIR, *rest])
    return env
