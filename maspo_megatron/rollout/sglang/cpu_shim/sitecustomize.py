"""CPU SGLang server only: host buffers as plain CPU tensors (``--enable-return-routed-experts``).

Why: SGLang 0.5.23's routed-experts capturer (routing replay, R3) keeps its per-token routes in a
host buffer allocated by ``ALLOC_MEMORY_FUNCS[device]``
(``sglang/srt/state_capturer/base.py`` ``BaseHostCache``). That table
(``sglang/srt/mem_cache/pool_host/common.py``) has entries for npu/musa/xpu and defaults to
``alloc_with_host_register``, which pins the buffer with ``torch.cuda.cudart().cudaHostRegister``:
on a machine without CUDA the server dies at start-up. Pinning only speeds up device copies; with
the CPU engine the "device" buffer is on the CPU too, so a plain tensor is the exact equivalent.

What: Python imports ``sitecustomize`` at start-up from the first ``sys.path`` entry that has
one; this directory is first on the *CPU server's* ``PYTHONPATH`` only (``cpu_engine_env``), so
every server process (launcher, scheduler, detokenizer) runs this file. It installs an import
hook that, right after SGLang's ``pool_host.common`` module executes, sets
``ALLOC_MEMORY_FUNCS["cpu"]`` to :func:`alloc_unpinned`. Other devices keep SGLang's own
allocators. With a CUDA device visible the hook raises instead (use the SGLang image there), as
the ``sgl_kernel`` stand-in does. The patch is recorded in ``MASPO_SGL_KERNEL_SHIM_LOG``
(``{"event": "patch", ...}``) so a test can check that it ran.

When to drop it: when SGLang gives the "cpu" device an allocator of its own.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys

TARGET = "sglang.srt.mem_cache.pool_host.common"
LOG_ENV = "MASPO_SGL_KERNEL_SHIM_LOG"


def alloc_unpinned(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes=None):
    """``alloc_with_host_register``'s signature, without the CUDA host registration."""
    import torch

    if allocator is not None:
        return allocator.allocate(dims, dtype=dtype, device=device)
    return torch.empty(dims, dtype=dtype, device=device)


def _record(event: str, op: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps({"event": event, "op": op, "pid": os.getpid()}) + "\n").encode())
    finally:
        os.close(fd)


def patch(module) -> None:
    """Gives device "cpu" the unpinned allocator in SGLang's ``ALLOC_MEMORY_FUNCS``."""
    import torch

    if torch.cuda.is_available():
        raise RuntimeError(
            "maspo_megatron's CPU sitecustomize (unpinned SGLang host buffers) was loaded with a "
            "CUDA device visible; it is for SGLang's CPU engine only: do not put "
            "maspo_megatron/rollout/sglang/cpu_shim on PYTHONPATH on a GPU machine.")
    module.ALLOC_MEMORY_FUNCS["cpu"] = alloc_unpinned
    _record("patch", "ALLOC_MEMORY_FUNCS[cpu]")


class _PatchAfterLoad(importlib.abc.MetaPathFinder):
    """Finds :data:`TARGET` through the normal finders, then patches it once it has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # one module, once; also keeps the lookup below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _PatchAfterLoad) for f in sys.meta_path):
    sys.meta_path.insert(0, _PatchAfterLoad())
