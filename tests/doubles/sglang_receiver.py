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
import contextlib
import io
import json
import math
import pickle
import sys
import threading
import types
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Sequence

import torch

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
@dataclass
class GenerateOutput:
    """One sample of a /generate response, parsed."""

    output_ids: list[int]
    output_logprobs: list[float] | None  # log_softmax(logits / T) of each output token
    finish_reason: str  # "stop" | "length" | "abort"
    finish_detail: dict[str, Any]  # the raw finish_reason object (matched token, message, ...)
    prompt_tokens: int
    completion_tokens: int
    weight_version: str | None
    input_logprobs: list[float | None] | None = None  # SGLang input_token_logprobs values
    meta_info: dict[str, Any] = field(default_factory=dict)


def _field(obj: dict, key: str, where: str):
    if key not in obj:
        raise ProtocolError(f"{where}: missing field {key!r} in {_clip(obj)}")
    return obj[key]


def _clip(obj: Any, limit: int = 300) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def parse_logprob_triples(items: Any, where: str, token_ids: Sequence[int] | None = None):
    """``[[logprob, token_id, text], ...]`` -> list of logprobs (None kept), checking token ids."""
    if not isinstance(items, list):
        raise ProtocolError(f"{where}: expected a list of [logprob, token_id, text], got {_clip(items)}")
    values = []
    for j, item in enumerate(items):
        if not isinstance(item, (list, tuple)) or len(item) < 2:
            raise ProtocolError(f"{where}[{j}]: expected [logprob, token_id, text], got {_clip(item)}")
        if token_ids is not None and item[1] != token_ids[j]:
            raise ProtocolError(
                f"{where}[{j}]: token id {item[1]} does not match the token at that position "
                f"({token_ids[j]})"
            )
        values.append(None if item[0] is None else float(item[0]))
    return values


def parse_generate_response(body: Any, expected: int, want_logprobs: bool) -> list[GenerateOutput]:
    """Parses a /generate JSON body (one object, or a list for batch / n>1 requests)."""
    items = body if isinstance(body, list) else [body]
    if len(items) != expected:
        raise ProtocolError(f"/generate returned {len(items)} outputs, expected {expected}: {_clip(body)}")
    outs = []
    for i, item in enumerate(items):
        where = f"/generate output {i}"
        if not isinstance(item, dict):
            raise ProtocolError(f"{where}: expected an object, got {_clip(item)}")
        output_ids = _field(item, "output_ids", where)
        meta = _field(item, "meta_info", where)
        if not isinstance(output_ids, list) or not isinstance(meta, dict):
            raise ProtocolError(f"{where}: output_ids must be a list and meta_info an object: {_clip(item)}")
        finish = _field(meta, "finish_reason", where + ".meta_info")
        if not isinstance(finish, dict) or "type" not in finish:
            raise ProtocolError(f"{where}.meta_info.finish_reason: expected {{'type': ...}}, got {_clip(finish)}")
        logprobs = None
        if want_logprobs and finish["type"] != "abort":
            triples = _field(meta, "output_token_logprobs", where + ".meta_info")
            logprobs = parse_logprob_triples(
                triples, where + ".meta_info.output_token_logprobs", output_ids
            )
            if len(logprobs) != len(output_ids):
                raise ProtocolError(
                    f"{where}: {len(logprobs)} output_token_logprobs for {len(output_ids)} output_ids"
                )
        input_lp = None
        if want_logprobs and "input_token_logprobs" in meta:
            input_lp = parse_logprob_triples(
                meta["input_token_logprobs"], where + ".meta_info.input_token_logprobs"
            )
        outs.append(GenerateOutput(
            output_ids=[int(t) for t in output_ids],
            output_logprobs=logprobs,
            finish_reason=str(finish["type"]),
            finish_detail=finish,
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            completion_tokens=int(meta.get("completion_tokens", len(output_ids))),
            weight_version=None if meta.get("weight_version") is None else str(meta["weight_version"]),
            input_logprobs=input_lp,
            meta_info=meta,
        ))
    return outs


def error_message(status: int, text: str) -> str:
    """The server's own message from an error body (SGLang's several shapes), else the raw text."""
    try:
        body = json.loads(text)
    except (ValueError, TypeError):
        return _clip(text.strip() or f"HTTP {status} with an empty body", 1000)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if key in body and body[key]:
                return str(body[key])
    return _clip(body, 1000)


# --------------------------------------------------------------------------- flattened_bucket
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


def flatten_bucket(named: Sequence[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[TensorMeta]]:
    """Concatenates tensors' bytes in the given order into one uint8 tensor (sender side)."""
    if not named:
        raise ValueError("cannot flatten an empty bucket")
    metas = bucket_layout([n for n, _ in named], [t.dtype for _, t in named],
                          [list(t.shape) for _, t in named])
    flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in named])
    return flat, metas


def unflatten_bucket(flat: torch.Tensor, metas: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Zero-copy views of each tensor in a received bucket (receiver side)."""
    return [(m.name, flat[m.start:m.end].view(m.dtype).reshape(m.shape)) for m in metas]


def order_for_alignment(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Stable sort by element size, largest first, so every byte offset in the bucket is aligned."""
    return sorted(named, key=lambda nt: -nt[1].element_size())


# --------------------------------------------------------------------------- process group
def init_weight_update_group(*, backend: str, master_address: str, master_port: int, rank: int,
                             world_size: int, group_name: str, timeout_s: float):
    """Creates the trainer<->engines weight-update group, separate from the default group.

    Mirrors SGLang's ``init_custom_process_group`` (TCP rendezvous, ``PrefixStore(group_name)``,
    ``_new_process_group_helper``) so a trainer built on this joins real SGLang servers. Rank 0
    hosts the TCP store. Works whether or not the calling process has a default group.
    """
    from torch.distributed.distributed_c10d import (
        Backend, PrefixStore, _new_process_group_helper, _world, rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(
        f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout
    ))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


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


def bucket_payload(flat: torch.Tensor, metas: Sequence[TensorMeta]) -> dict[str, Any]:
    """The object SGLang's ``_update_weights_from_flattened_bucket`` expects for a bucket."""
    real = sys.modules.get(SGLANG_BUCKET_MODULE)
    cls = real.FlattenedTensorMetadata if real is not None else FlattenedTensorMetadata
    return {"flattened_tensor": flat,
            "metadata": [cls(name=m.name, shape=torch.Size(m.shape), dtype=m.dtype,
                             start_idx=m.start, end_idx=m.end, numel=m.end - m.start)
                         for m in metas]}


def serialize_ipc_bucket(flat: torch.Tensor, metas: Sequence[TensorMeta]) -> str:
    """One ``serialized_named_tensors`` entry for ``load_format="flattened_bucket"``.

    ``flat`` (from :func:`flatten_bucket`) must be a CUDA tensor and must stay alive, unchanged,
    until the server has answered: the server maps its memory, it gets no copy.
    """
    if not flat.is_cuda:
        raise ValueError(f"a CUDA-IPC bucket must live on a CUDA device, got {flat.device}")
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError("a flattened bucket is a 1-D uint8 tensor (see flatten_bucket)")
    return dumps_ipc_payload(bucket_payload(flat, metas))


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
