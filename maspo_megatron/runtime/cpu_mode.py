"""Run megatron-core's real code paths on CPU with gloo.

megatron-core 0.19 assumes CUDA in a handful of places that have nothing to do with the maths.
This module routes each of them to the CPU so that the very same pipeline schedules, DDP, the
distributed optimizer, gradient clipping and dist-checkpointing run in tests and in the laptop
demo. Every redirection below names the upstream site it exists for; when megatron-core stops
hard-coding CUDA there, the matching entry can be deleted.

The mode is process-global, idempotent, and refuses to switch on when a CUDA device is present:
on a GPU machine megatron-core runs untouched.

Redirections:

1. ``device=`` arguments of tensor factories and ``Tensor.cuda()`` / ``Tensor.to("cuda")``
   (a ``TorchFunctionMode``): ``transformer/utils.py`` builds the causal mask with
   ``device="cuda"``; ``pipeline_parallel/schedules.py`` creates token counters and
   ``p2p_communication.py`` receive buffers on ``torch.cuda.current_device()``; the optimizer,
   grad buffers and ``clip_grads.py`` create scalar tensors with ``device='cuda'``;
   ``parallel_state``'s global memory buffer allocates on the current CUDA device.
2. ``Tensor.type()`` reports CUDA type names for CPU tensors: ``clip_grads.py`` asserts
   ``param.grad.type() == 'torch.cuda.FloatTensor'`` (a dtype check in substance), so the
   assertion still rejects non-fp32 gradients.
3. ``torch.cuda`` device/stream/event API (``current_device``, ``synchronize``, ``Stream``,
   ``current_stream``, ``stream``, ``Event``): used by p2p communication, DDP and the
   distributed optimizer for overlap; on CPU every op is synchronous, so no-ops are exact.
4. CUDA RNG state (``torch.cuda.get_rng_state/set_rng_state/manual_seed`` and
   ``tensor_parallel.random._get/_set_cuda_rng_state``): the model-parallel RNG tracker's
   ``add``/``fork`` swap CUDA generator states around weight init and dropout; on CPU they swap
   the CPU generator's state, which keeps the tracker's semantics (distinct TP streams,
   ``fork`` restores the default stream afterwards).
5. Activation recompute: megatron's checkpoint functions (``tensor_parallel/random.py``
   ``CheckpointFunction``, ``CheckpointWithoutOutputFunction``) re-run a layer's forward inside
   autograd's backward. The mode of 1. dispatched ``torch.autograd.backward`` itself, and torch
   runs a mode's handler with the mode popped, so the recomputed forward would see no mode (its
   causal mask, ``transformer/utils.py`` ``device="cuda"``, failed): their ``backward`` runs under
   the mode again. The same for the MoE all-to-all (``tensor_parallel/mappings.py``
   ``_AllToAll``), whose backward allocates on ``torch.cuda.current_device()``.
6. MoE alltoall dispatcher split sizes: ``transformer/moe/token_dispatcher.py`` turns the
   per-rank token counts into host numpy arrays with ``moe_utils.maybe_move_tensor_to_cpu(...,
   as_numpy=True)``, which converts only CUDA tensors; on CPU they stayed tensors, which
   ``all_to_all_single`` rejects as split sizes. The CPU tensors become numpy arrays too.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_LOCK = threading.Lock()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal to torch's factories (torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(device):
    return torch.device("cpu") if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch function and tensor method."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=torch.device("cpu"))
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which stays CUDA's own.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_megatron_backwards() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom

    for cls in (mrandom.CheckpointFunction, mrandom.CheckpointWithoutOutputFunction, mappings._AllToAll):
        def backward(ctx, *grads, _backward=cls.backward):
            with _CudaToCpuMode():
                return _backward(ctx, *grads)

        cls.backward = staticmethod(backward)


def _patch_megatron_moe_splits() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def _quiet_cpu_warnings() -> None:
    # megatron's distributed optimizer checks ``param.grad is not None`` on its parameter shards
    # in zero_grad (optimizer.py ``_zero_grad_group_helper``); read through the mode above, on
    # fp32 CPU shards that are not leaves, torch warns on every rank and step. The read is only
    # a None check. (megatron's GPU-only fallback warnings: runtime/noise.py.)
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")


def cpu_mode_enabled() -> bool:
    return _ENABLED


def enable_cpu_mode() -> None:
    """Routes megatron-core's hard-coded CUDA uses to the CPU (see module docstring).

    Raises:
        RuntimeError: a CUDA device is visible (the mode must never shadow a real GPU).
    """
    global _ENABLED
    with _LOCK:
        if _ENABLED:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "CPU execution mode requested while a CUDA device is visible; "
                "megatron-core runs unmodified on GPUs (set CUDA_VISIBLE_DEVICES='' to force CPU)"
            )
        _patch_torch_cuda()
        _patch_megatron_rng()
        _patch_megatron_backwards()
        _patch_megatron_moe_splits()
        _quiet_cpu_warnings()
        # Entered for the life of the process; torch keeps the mode stack per thread, so
        # megatron's helper threads would need their own (none are used on CPU).
        _CudaToCpuMode().__enter__()
        _ENABLED = True
