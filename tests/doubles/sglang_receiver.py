"""The receiving half of SGLang's wire format, for the test double ``sglang_emulator.py`` only
(the trainer's sending half is ``maspo_megatron/rollout/sglang``). Behaviour follows SGLang
0.5.23 (python/sglang/srt):

- ``flattened_bucket`` (weight_sync/tensor_bucket.py, ``supports_multi_dtypes``): every tensor is
  flattened, viewed as ``uint8`` and concatenated *in the order of* ``names``; tensor i occupies
  bytes ``[start_i, end_i)`` and is rebuilt with ``buf[start:end].view(dtype).reshape(shape)``.
  No padding is inserted, and ``Tensor.view(dtype)`` needs a byte offset divisible by the element
  size, so a sender must order a mixed-dtype bucket so that every offset stays aligned (we sort
  by element size, largest first: every prefix then has a length divisible by the next size).
- dtypes travel as strings that ``getattr(torch, s)`` resolves (``"bfloat16"``, not ``"torch.bfloat16"``).
- the weight-update group is a *non-default* process group with its own TCP rendezvous and a
  ``PrefixStore(group_name, ...)`` (srt/utils ``init_custom_process_group``); rank 0 is the trainer
  and owns the TCP store, engines join at ``rank_offset + tp_rank``.
- errors: 400 with ``{"error": {"message": ...}}`` for bad /generate input; weight endpoints answer
  ``{"success": bool, "message": str}`` with 200 or 400.
- ``/update_weights_from_tensor`` payloads: base64 ``ForkingPickler`` pickles of CUDA-IPC
  handles (device as GPU UUID), bucket metadata pickled as SGLang's ``FlattenedTensorMetadata``
  (see "CUDA-IPC payloads" below).
"""

from __future__ import annotations

import base64
import io
import math
import pickle
from dataclasses import dataclass
from typing import Any, Sequence

import torch

# The sending half lives in the package; the double reuses its wire types.
from maspo_megatron.rollout.sglang.ipc import FlattenedTensorMetadata
from maspo_megatron.rollout.weight_sync import init_weight_update_group  # noqa: F401 (re-export)

# Greedy below this temperature, as SGLang's sampling_params._SAMPLING_EPS.
SAMPLING_EPS = 1e-6


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol; the message names the field."""


# --------------------------------------------------------------------------- sampling params
@dataclass
class SamplingParams:
    """The subset of SGLang ``sampling_params`` the trainer uses (same names and defaults)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 disables top-k, as in SGLang
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    sampling_seed: int | None = None  # per-request seed; makes sampling reproducible

    def validate(self) -> None:
        """Raises ProtocolError with SGLang's wording for out-of-range values."""
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ProtocolError(f"temperature must be non-negative, got {self.temperature}.")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ProtocolError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise ProtocolError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ProtocolError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if not isinstance(self.n, int) or self.n < 1:
            raise ProtocolError(f"n must be at least 1, got {self.n}.")
        if self.stop_token_ids is not None and not all(
            isinstance(t, int) for t in self.stop_token_ids
        ):
            raise ProtocolError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}.")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "ignore_eos": self.ignore_eos,
            "n": self.n,
        }
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.sampling_seed is not None:
            out["sampling_seed"] = self.sampling_seed
        return out

    @classmethod
    def from_json(cls, obj: Any) -> "SamplingParams":
        if obj is None:
            obj = {}
        if not isinstance(obj, dict):
            raise ProtocolError(f"sampling_params must be an object, got {type(obj).__name__}.")
        known = set(cls.__dataclass_fields__)
        # SGLang accepts many more keys; ignore the ones we do not implement only if they are
        # at their neutral value, so a request relying on them fails loudly instead of silently.
        neutral = {"min_new_tokens": 0, "repetition_penalty": 1.0, "frequency_penalty": 0.0,
                   "presence_penalty": 0.0, "min_p": 0.0, "skip_special_tokens": None,
                   "spaces_between_special_tokens": None, "no_stop_trim": None, "stop": None}
        for key, value in obj.items():
            if key in known:
                continue
            if key in neutral and (neutral[key] is None or value == neutral[key] or value in ([], "")):
                continue
            raise ProtocolError(f"sampling_params.{key}={value!r} is not supported by this server.")
        params = cls(**{k: v for k, v in obj.items() if k in known})
        params.validate()
        return params


# --------------------------------------------------------------------------- /generate results
def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def str_to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ProtocolError(f"unknown dtype {name!r}; expected a torch dtype name such as 'bfloat16'")
    return dtype


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a flattened bucket (byte offsets, as SGLang's FlattenedTensorMetadata)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int


def bucket_layout(names: Sequence[str], dtypes: Sequence[str | torch.dtype],
                  shapes: Sequence[Sequence[int]]) -> list[TensorMeta]:
    """Byte layout of a flattened bucket given the request's ``names/dtypes/shapes`` lists."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ProtocolError(
            f"names, dtypes and shapes must have the same length, got {len(names)}, "
            f"{len(dtypes)}, {len(shapes)}"
        )
    metas, offset = [], 0
    for name, dt, shape in zip(names, dtypes, shapes):
        dtype = dt if isinstance(dt, torch.dtype) else str_to_dtype(dt)
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ProtocolError(f"shape of {name!r} must be a list of non-negative ints, got {shape!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offset % itemsize:
            raise ProtocolError(
                f"flattened_bucket: {name!r} ({dtype_to_str(dtype)}) starts at byte {offset}, not a "
                f"multiple of its element size {itemsize}; order tensors by element size, largest first"
            )
        nbytes = math.prod(shape) * itemsize
        metas.append(TensorMeta(name, tuple(shape), dtype, offset, offset + nbytes))
        offset += nbytes
    return metas


def unflatten_bucket(flat: torch.Tensor, metas: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Zero-copy views of each tensor in a received bucket (receiver side)."""
    return [(m.name, flat[m.start:m.end].view(m.dtype).reshape(m.shape)) for m in metas]


# --------------------------------------------------------------------------- process group
def destroy_weight_update_group(group) -> None:
    torch.distributed.destroy_process_group(group)


# --------------------------------------------------------------------------- CUDA-IPC payloads
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
# srt/constants.py GPU_MEMORY_ALL_TYPES: what /release_memory_occupation releases without tags.
GPU_MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
_DEVICE_ARG = 6  # position of the device in torch's rebuild_cuda_tensor arguments


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _rebuild_cuda_tensor_by_uuid(*args):
    """Receiver side of :func:`_reduce_cuda_tensor_by_uuid`: accepts a UUID or an index."""
    from torch.multiprocessing import reductions

    device = args[_DEVICE_ARG]
    if isinstance(device, str):
        matches = [i for i in range(torch.cuda.device_count()) if _device_uuid(i) == device]
        if not matches:
            raise ProtocolError(f"the payload's tensor lives on GPU {device}, which this process "
                                f"cannot see (CUDA_VISIBLE_DEVICES?); CUDA-IPC needs the same node")
        args = (*args[:_DEVICE_ARG], matches[0], *args[_DEVICE_ARG + 1:])
    return reductions.rebuild_cuda_tensor(*args)


@dataclass
class LocalSerializedTensor:
    """SGLang's per-TP-rank wrapper in ``load_format=None`` payloads: ``values[tp_rank]`` is the
    serialized tensor for that rank (model_runner.py)."""

    values: list


_PAYLOAD_DENY = {("builtins", "eval"), ("builtins", "exec"), ("builtins", "compile"),
                 ("builtins", "__import__"), ("builtins", "getattr"), ("builtins", "open")}


class _PayloadUnpickler(pickle.Unpickler):
    """Loads only what a weight payload contains (the spirit of SGLang's SafeUnpickler), and
    maps SGLang's class and rebuild-function names onto ours."""

    def find_class(self, module: str, name: str):
        if module.startswith("sglang.") and name == "FlattenedTensorMetadata":
            return FlattenedTensorMetadata
        if module.startswith("sglang.") and name == "LocalSerializedTensor":
            return LocalSerializedTensor
        if name in ("rebuild_cuda_tensor", "_rebuild_cuda_tensor_modified") and (
                module == "torch.multiprocessing.reductions" or module.startswith("sglang.")):
            return _rebuild_cuda_tensor_by_uuid
        allowed = module == "torch" or module.startswith("torch.") or module in ("builtins", "copyreg")
        if allowed and (module, name) not in _PAYLOAD_DENY:
            return super().find_class(module, name)
        raise ProtocolError(f"serialized_named_tensors refers to {module}.{name}, which a weight "
                            "payload may not contain")


def loads_ipc_payload(data: str | bytes) -> Any:
    """Inverse of :func:`dumps_ipc_payload` (``MultiprocessingSerializer.deserialize``)."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError as e:
            raise ProtocolError(f"serialized_named_tensors entry is not base64: {e}") from e
    try:
        return _PayloadUnpickler(io.BytesIO(data)).load()
    except ProtocolError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ProtocolError(f"serialized_named_tensors entry is not a valid payload: {e}") from e


def bucket_from_payload(obj: Any) -> tuple[torch.Tensor, list[TensorMeta]]:
    """Checks a deserialized ``flattened_bucket`` payload; returns the buffer and its layout."""
    if not isinstance(obj, dict) or not {"flattened_tensor", "metadata"} <= set(obj):
        raise ProtocolError("a flattened_bucket payload is a dict with 'flattened_tensor' and "
                            f"'metadata', got {type(obj).__name__}"
                            + (f" with keys {sorted(obj)}" if isinstance(obj, dict) else ""))
    flat, wire = obj["flattened_tensor"], obj["metadata"]
    if not isinstance(flat, torch.Tensor) or flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ProtocolError("flattened_tensor must be a 1-D uint8 tensor, got "
                            + (f"{flat.dtype} of shape {list(flat.shape)}"
                               if isinstance(flat, torch.Tensor) else type(flat).__name__))
    metas = []
    for i, m in enumerate(wire):
        where = f"metadata[{i}]"
        try:
            name, shape, dtype = m.name, tuple(int(s) for s in m.shape), m.dtype
            start, end, numel = int(m.start_idx), int(m.end_idx), int(m.numel)
        except (AttributeError, TypeError, ValueError) as e:
            raise ProtocolError(f"{where} is not a FlattenedTensorMetadata: {e}") from e
        if not isinstance(dtype, torch.dtype):
            raise ProtocolError(f"{where} ({name!r}): dtype must be a torch.dtype, got {dtype!r}")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - start != nbytes or numel != nbytes or not 0 <= start <= end <= flat.numel():
            raise ProtocolError(
                f"{where} ({name!r}): bytes [{start}, {end}) with numel {numel} do not fit "
                f"shape {list(shape)} of {dtype_to_str(dtype)} ({nbytes} bytes) inside a "
                f"{flat.numel()}-byte bucket")
        if start % torch.empty((), dtype=dtype).element_size():
            raise ProtocolError(f"{where} ({name!r}) starts at byte {start}, not aligned for "
                                f"{dtype_to_str(dtype)}")
        metas.append(TensorMeta(name, shape, dtype, start, end))
    return flat, metas


def named_tensors_from_payload(obj: Any, tp_rank: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Checks a deserialized ``load_format=None`` payload: ``(name, tensor)`` pairs, where a
    tensor may be a :class:`LocalSerializedTensor` holding one serialized tensor per TP rank."""
    if not isinstance(obj, (list, tuple)):
        raise ProtocolError(f"a load_format=None payload is a list of (name, tensor), got "
                            f"{type(obj).__name__}")
    out = []
    for i, item in enumerate(obj):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise ProtocolError(f"payload[{i}] must be a (name, tensor) pair")
        name, t = item
        if isinstance(t, LocalSerializedTensor):
            t = loads_ipc_payload(t.values[tp_rank])
        if not isinstance(t, torch.Tensor):
            raise ProtocolError(f"payload[{i}] ({name!r}) is {type(t).__name__}, not a tensor")
        out.append((name, t))
    return out
