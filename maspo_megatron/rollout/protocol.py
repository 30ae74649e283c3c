"""What both ends of the SGLang wire agree on: sampling parameters, /generate results, the
``flattened_bucket`` layout, error bodies and the weight-update process group.

Shared by the trainer side (client.py, weight_sync.py) and the CPU server (cpu_server.py) so the
two cannot drift apart. Behaviour follows SGLang 0.5.x (python/sglang/srt):

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
"""

from __future__ import annotations

import json
import math
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
