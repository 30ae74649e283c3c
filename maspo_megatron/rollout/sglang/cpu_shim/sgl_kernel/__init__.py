"""A pure-torch stand-in for sgl-kernel's CPU build, so the *real* SGLang server runs on CPU.

Why it exists: with ``SGLANG_USE_CPU_ENGINE=1`` SGLang 0.5.23 imports ``*_cpu`` ops from
``sgl_kernel`` (the C++ CPU build of sgl-kernel) at module load. That build has no wheel and no
sdist on the package registry, and the CUDA wheel has none of these ops and needs libcuda. On a
machine without a GPU nothing else provides the module, so the server cannot even start.

What it is: a top-level module named ``sgl_kernel`` that lives in the ``cpu_shim`` directory of
this package. That directory is put on the **SGLang server process's** ``PYTHONPATH`` only
(``maspo_megatron.rollout.sglang.cpu_engine.cpu_engine_env``), and only when no real
``sgl_kernel`` imports and no CUDA device is visible; the trainer never imports it as
``sgl_kernel``. Importing it with a CUDA device visible raises ``RuntimeError``.

What it provides (read from SGLang 0.5.23's source, checked by running the server):

1. ``assign_req_to_token_pool_cpu`` - **implemented** in pure torch with the semantics and the
   input checks of sgl-kernel's C++ op (``csrc/cpu``): for each request ``i``,
   ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] =
   out_cache_loc[sum_{j<i}(end_j - start_j) : ...]``. Imported at module load by
   ``sglang/srt/mem_cache/allocation.py`` and called from ``assign_req_to_token_pool_func``,
   whose one caller in 0.5.23 is ``alloc_for_spec_decode`` (speculative decoding). A plain
   ``/generate`` run with our flags does not call it (the decode path writes
   ``req_to_token`` with ``ReqToTokenPool.write``); it is kept, tested against the C++
   semantics, because it is the one op of the CPU allocator path and costs nothing.
2. **Placeholders** (``_PLACEHOLDERS``): names that SGLang's CPU engine imports
   *unconditionally at module load* during a dense-model server start-up - ``from sgl_kernel
   import X`` under ``if _is_cpu:``. Without an attribute of that name the import fails and
   the server does not start, although a dense model never calls them. Each placeholder
   raises ``NotImplementedError`` naming itself **when called**, so reaching one is loud.
3. **Everything else**: the module ``__getattr__`` raises :class:`SglKernelShimMissingOp`,
   which is a ``NotImplementedError`` naming the op *and* an ``AttributeError``. The
   ``AttributeError`` part matters: SGLang probes optional kernels with
   ``try: from sgl_kernel import X except ImportError`` and ``hasattr``; Python turns an
   ``AttributeError`` raised during ``from ... import`` into ``ImportError``, so those probes
   take their fallback exactly as with no ``sgl_kernel`` at all, instead of crashing.
   Submodules (``sgl_kernel.kvcacheio``, ``sgl_kernel.mamba``, ...) do not exist, so importing
   them raises ``ModuleNotFoundError`` as without sgl-kernel.

What it deliberately does not do: register ``torch.ops.sgl_kernel`` operators. SGLang selects
its Intel-AMX CPU kernels (``torch.ops.sgl_kernel.*_cpu``: attention, RMSNorm, silu_and_mul,
fused MoE, ...) only when ``hasattr(torch.ops.sgl_kernel, "convert_weight_packed")``
(``srt/utils/common.py:_is_intel_amx_backend_available``); with no operator registered that is
false and SGLang runs its pure-torch (``forward_native`` / ``torch_native``) paths.

Recording: when ``MASPO_SGL_KERNEL_SHIM_LOG`` names a file, every import of this module, every
call of an op (implemented or placeholder) and every lookup of a missing op is appended to it
as one JSON line ``{"event": "import"|"call"|"lookup", "op": ..., "pid": ...}``, so a test can
check that a whole server run used implemented ops only. Missing ops are also reported once per
process on stderr (which lands in the server log).

When to drop it: when sgl-kernel publishes its CPU build (then install that; this module is put
on the path only when no real ``sgl_kernel`` imports), or when SGLang stops importing CPU ops at
module load. When a new SGLang version imports another name at start-up, the server fails with
``ImportError: cannot import name 'X' from 'sgl_kernel'`` naming it: add it to
``_PLACEHOLDERS`` with its import site, or implement it if a run calls it.
"""

from __future__ import annotations

import json
import os
import sys

import torch

if torch.cuda.is_available():
    raise RuntimeError(
        "maspo_megatron's CPU stand-in for sgl_kernel was imported with a CUDA device visible. "
        "It is for SGLang's CPU engine only: on a GPU use the real sgl-kernel (the SGLang image) "
        "and do not put maspo_megatron/rollout/sglang/cpu_shim on PYTHONPATH."
    )

LOG_ENV = "MASPO_SGL_KERNEL_SHIM_LOG"
IS_MASPO_CPU_SHIM = True

#: Ops implemented here (pure torch, the C++ op's semantics).
IMPLEMENTED = ("assign_req_to_token_pool_cpu",)

#: Imported at module load by SGLang 0.5.23's CPU engine in a dense-model start-up; never
#: called there. Name -> import site.
_PLACEHOLDERS = {
    "copy_all_layer_kv_cache_cpu": "sglang/kernels/ops/kvcache/cache_move.py (KV moves: spec decode)",
    "build_tree_kernel_efficient_cpu": "sglang/kernels/ops/speculative/spec_tree.py (EAGLE trees)",
    "verify_tree_greedy_cpu": "sglang/kernels/ops/speculative/spec_tree.py (EAGLE verify)",
    "assign_draft_cache_locs_contiguous_cpu": "sglang/kernels/ops/speculative/cache_locs.py",
    "assign_extend_cache_locs_cpu": "sglang/kernels/ops/speculative/cache_locs.py",
    "fill_accept_out_cache_loc_cpu": "sglang/kernels/ops/speculative/eagle.py",
    "fill_bonus_tokens_cpu": "sglang/kernels/ops/speculative/eagle.py",
}
PLACEHOLDERS = tuple(_PLACEHOLDERS)

_reported: set[str] = set()


def _record(event: str, op: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps({"event": event, "op": op, "pid": os.getpid()}) + "\n"
    # One O_APPEND write per line: lines from the server's processes do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class SglKernelShimMissingOp(NotImplementedError, AttributeError):
    """An sgl_kernel op that the CPU stand-in does not provide (see the module docstring)."""


def _missing_message(name: str) -> str:
    return (f"sgl_kernel.{name} is not implemented by maspo_megatron's CPU stand-in for "
            "sgl-kernel (maspo_megatron/rollout/sglang/cpu_shim/sgl_kernel); implemented: "
            f"{', '.join(IMPLEMENTED)}")


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Scatter newly allocated KV slots into the request-to-token map, in place.

    ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] =
    out_cache_loc[prefix_i : prefix_i + end_offset[i] - start_offset[i]]`` where ``prefix_i``
    sums the lengths of the requests before ``i``. Checks as the C++ op: ``req_to_token`` is a
    2-D int32 tensor with ``pool_len`` columns, ``out_cache_loc`` is int64, the offsets share a
    dtype.
    """
    _record("call", "assign_req_to_token_pool_cpu")
    if req_to_token.dim() != 2 or req_to_token.dtype != torch.int32:
        raise RuntimeError("assign_req_to_token_pool_cpu: req_to_token must be a 2-D int32 tensor")
    if out_cache_loc.dtype != torch.int64:
        raise RuntimeError("assign_req_to_token_pool_cpu: out_cache_loc must be int64")
    if start_offset.dtype != end_offset.dtype:
        raise RuntimeError("assign_req_to_token_pool_cpu: start_offset and end_offset dtypes differ")
    if req_to_token.size(1) != pool_len:
        raise RuntimeError(f"assign_req_to_token_pool_cpu: pool_len {pool_len} != "
                           f"req_to_token.size(1) {req_to_token.size(1)}")
    rows = req_pool_indices.tolist()
    starts, ends = start_offset.tolist(), end_offset.tolist()
    pt = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[pt:pt + n].to(torch.int32)
        pt += n


def _placeholder(name: str):
    def op(*args, **kwargs):
        _record("call", name)
        raise NotImplementedError(_missing_message(name) + f" (imported by {_PLACEHOLDERS[name]})")

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"Placeholder: raises NotImplementedError. Imported by {_PLACEHOLDERS[name]}."
    return op


for _name in _PLACEHOLDERS:
    globals()[_name] = _placeholder(_name)
del _name


def __getattr__(name: str):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(f"module 'sgl_kernel' has no attribute {name!r}")
    _record("lookup", name)
    if name not in _reported:
        _reported.add(name)
        print(f"[sgl_kernel CPU stand-in] no op {name!r}: answered as missing", file=sys.stderr)
    raise SglKernelShimMissingOp(_missing_message(name))


_record("import", "sgl_kernel")
