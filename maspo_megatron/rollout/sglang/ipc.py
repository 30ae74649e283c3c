"""CUDA-IPC weight payloads for SGLang's ``/update_weights_from_tensor`` (colocated sync), sender side."""

from __future__ import annotations

import base64
import contextlib
import io
import sys
import threading
import types
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from maspo_megatron.rollout.backend import BucketMeta

# ``/update_weights_from_tensor`` (SGLang srt/entrypoints/http_server.py) takes
# ``serialized_named_tensors``: one string per TP rank of the server, each the base64 of a
# ``ForkingPickler`` pickle (srt/utils ``MultiprocessingSerializer.serialize(output_str=True)``).
# With ``load_format="flattened_bucket"`` the pickle holds
# ``{"flattened_tensor": <uint8 CUDA tensor>, "metadata": [FlattenedTensorMetadata, ...]}``
# (srt/weight_sync/tensor_bucket.py: byte offsets ``start_idx``/``end_idx``, ``numel`` in bytes);
# with ``load_format=None`` a list of ``(name, tensor)``. A CUDA tensor pickles as torch's
# ``rebuild_cuda_tensor`` plus an IPC handle; SGLang's ``monkey_patch_torch_reductions`` replaces
# the device index (argument 6) by the GPU's UUID, because processes with different
# ``CUDA_VISIBLE_DEVICES`` number the same GPU differently. SGLang unpickles with an allowlist
# (``SafeUnpickler``: torch.*, builtins, sglang.srt.weight_sync.tensor_bucket.*, ...), so the
# metadata must be pickled under SGLang's class name, not ours.
SGLANG_BUCKET_MODULE = "sglang.srt.weight_sync.tensor_bucket"
# srt/constants.py GPU_MEMORY_ALL_TYPES: what /release_memory_occupation releases without tags.
GPU_MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
_DEVICE_ARG = 6  # position of the device in torch's rebuild_cuda_tensor arguments


@dataclass
class FlattenedTensorMetadata:
    """Wire form of one tensor of a flattened bucket; pickled as SGLang's class of this name."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


FlattenedTensorMetadata.__module__ = SGLANG_BUCKET_MODULE

_lend_lock = threading.Lock()


@contextlib.contextmanager
def _sglang_module_lent():
    """Makes SGLang's bucket module name resolve to ours while a payload is pickled.

    pickle stores a class by module + name and checks that importing them gives the class
    back; without SGLang installed (the usual trainer image) the module name is lent for the
    duration of the dump only. With SGLang imported, its own class is used (see
    :func:`bucket_payload`).
    """
    with _lend_lock:
        if SGLANG_BUCKET_MODULE in sys.modules:
            yield
            return
        # pickle imports the name without a fromlist, so the parent packages must resolve too.
        parts = SGLANG_BUCKET_MODULE.split(".")
        lent = {}
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                lent[name] = sys.modules[name] = types.ModuleType(name)
                lent[name].__path__ = []
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[name])
        sys.modules[SGLANG_BUCKET_MODULE].FlattenedTensorMetadata = FlattenedTensorMetadata
        try:
            yield
        finally:
            for name, module in lent.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _reduce_cuda_tensor_by_uuid(tensor: torch.Tensor):
    """torch's CUDA-IPC reduction with the device index replaced by the GPU's UUID (as SGLang's
    patched ``reduce_tensor``), without patching torch for the rest of the process."""
    from torch.multiprocessing import reductions

    rebuild, args = reductions.reduce_tensor(tensor)
    if isinstance(args[_DEVICE_ARG], int):
        args = (*args[:_DEVICE_ARG], _device_uuid(args[_DEVICE_ARG]), *args[_DEVICE_ARG + 1:])
    return rebuild, args


def dumps_ipc_payload(obj: Any) -> str:
    """``MultiprocessingSerializer.serialize(obj, output_str=True)`` as SGLang's patched torch
    would write it: CUDA tensors become IPC handles tagged with their GPU's UUID."""
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    pickler.dispatch_table[torch.Tensor] = _reduce_cuda_tensor_by_uuid
    with _sglang_module_lent():
        pickler.dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bucket_payload(flat: torch.Tensor, metas: Sequence[BucketMeta]) -> dict[str, Any]:
    """The object SGLang's ``_update_weights_from_flattened_bucket`` expects for a bucket."""
    real = sys.modules.get(SGLANG_BUCKET_MODULE)
    cls = real.FlattenedTensorMetadata if real is not None else FlattenedTensorMetadata
    return {"flattened_tensor": flat,
            "metadata": [cls(name=m.name, shape=torch.Size(m.shape), dtype=m.dtype,
                             start_idx=m.start, end_idx=m.end, numel=m.end - m.start)
                         for m in metas]}


def serialize_ipc_bucket(flat: torch.Tensor, metas: Sequence[BucketMeta]) -> str:
    """One ``serialized_named_tensors`` entry for ``load_format="flattened_bucket"``.

    ``flat`` (from :func:`flatten_bucket`) must be a CUDA tensor and must stay alive, unchanged,
    until the server has answered: the server maps its memory, it gets no copy.
    """
    if not flat.is_cuda:
        raise ValueError(f"a CUDA-IPC bucket must live on a CUDA device, got {flat.device}")
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError("a flattened bucket is a 1-D uint8 tensor (see flatten_bucket)")
    return dumps_ipc_payload(bucket_payload(flat, metas))
