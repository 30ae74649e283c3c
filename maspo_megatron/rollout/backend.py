"""The rollout backend interface: what the trainer needs from an inference engine.

A backend supplies three things, and nothing outside its folder knows the engine's wire format:

- **servers**: the command line and environment that start one server (:meth:`server_command`),
  and how many ranks of a weight-update group one server occupies (:meth:`engine_ranks`);
- **the client side** of generation: the request body for token ids + sampling settings, and the
  parsed :class:`GenerateOutput` of a response (:meth:`generate_request`, :meth:`parse_generate`),
  plus the engine's own log-probs of a fixed token sequence (:meth:`score_request`, the probe of
  every weight sync's proof);
- **the weight-update protocol**: :meth:`updater` gives a :class:`WeightUpdateAPI` per server URL
  (pause, begin/end an update session, group set-up, each transport, version, resume).

``rollout/client.py``, ``rollout/servers.py`` and ``rollout/weight_sync.py`` are written against
this interface only. SGLang (``rollout/sglang/``) is the implementation; a second engine is a
second folder plus one line in :data:`BACKENDS`.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass
class SamplingConfig:
    """How responses are sampled. One section, read by the servers' requests and by the trainer's
    log-prob pass (the trainer divides its logits by ``temperature`` the same way)."""

    temperature: float = 1.0
    """Softmax temperature of sampling; the trainer's log-probs use the same one."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off). Training needs 1.0: the trainer's ratio is against the
    unfiltered softmax, which is the behaviour policy only without filtering."""
    top_k: int = -1
    """Top-k sampling (-1: off). Training needs -1, for the same reason as ``top_p``."""
    max_new_tokens: int = 1024
    """Longest response, in tokens."""

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"rollout.sampling.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"rollout.sampling.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def filtered(self) -> bool:
        """True when top-p/top-k change the sampling distribution away from softmax(z / T)."""
        return self.top_p < 1.0 or self.top_k > 0


@dataclass
class SamplingParams:
    """The settings of one request (a :class:`SamplingConfig` plus per-request fields)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    sampling_seed: int | None = None

    @classmethod
    def from_config(cls, cfg: SamplingConfig, **kw) -> "SamplingParams":
        return cls(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_p=cfg.top_p, top_k=cfg.top_k, **kw)


@dataclass
class GenerateOutput:
    """One sample of a generate response, parsed."""

    output_ids: list[int]
    output_logprobs: list[float] | None  # log_softmax(logits / T) of each output token
    finish_reason: str  # "stop" | "length" | "abort"
    finish_detail: dict[str, Any]  # the engine's raw finish-reason object
    prompt_tokens: int
    completion_tokens: int
    weight_version: str | None  # the server's version when it answered
    token_versions: list[str] | None = None
    """Per output token, the weight version it was sampled under (the engine's record; None when
    the engine sent none)."""
    input_logprobs: list[float | None] | None = None  # prompt log-probs, when asked for
    meta_info: dict[str, Any] = field(default_factory=dict)
    routed_experts: torch.Tensor | None = None
    """Routing replay: int32 ``[prompt + output - 1, layers, topk]``, the experts the engine routed
    each token to, in forward order (the last output token is never forwarded), when asked for."""


class ProtocolError(ValueError):
    """A response that does not follow the engine's protocol; the message names the field."""


class WeightSyncError(RuntimeError):
    """A weight sync that did not complete or did not verify; names the server and the step."""


@dataclass
class ServerSpec:
    """What the trainer asks of each server it launches (engine-neutral)."""

    model_path: str
    tp_size: int = 1
    device: str = "cuda"
    """``cuda``, or ``cpu`` (the engine's CPU mode: the demo, CI and laptops)."""
    dtype: str | None = None
    """e.g. ``bfloat16`` or ``float32``; None: the checkpoint's own."""
    mem_fraction_static: float | None = None
    memory_saver: bool = False
    """Let the server release and resume its GPU memory (colocated training)."""
    max_total_tokens: int | None = None
    """KV-cache capacity in tokens (None: the engine sizes it from memory)."""
    api_key: str | None = None
    base_gpu_id: int | None = None
    """First GPU of this server on its node (several servers per node)."""
    extra_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BucketMeta:
    """One tensor of a flattened weight bucket (byte range inside the bucket)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    end: int


class WeightUpdateAPI(abc.ABC):
    """The weight-update calls of one server. Every call raises
    :class:`~maspo_megatron.rollout.weight_sync.WeightSyncError` naming the server and the call."""

    url: str

    @abc.abstractmethod
    def pause(self, mode: str) -> None: ...

    @abc.abstractmethod
    def resume(self) -> None: ...

    @abc.abstractmethod
    def begin_update(self) -> None:
        """Opens an update session (the engine may need one around every transport)."""

    @abc.abstractmethod
    def end_update(self) -> None: ...

    @abc.abstractmethod
    def init_group(self, *, master_address: str, master_port: int, rank_offset: int,
                   world_size: int, group_name: str, backend: str) -> None: ...

    @abc.abstractmethod
    def destroy_group(self, group_name: str) -> None: ...

    @abc.abstractmethod
    def update_from_distributed(self, metas: Sequence[BucketMeta], group_name: str,
                                timeout_s: float) -> None:
        """Receives one flattened bucket broadcast from rank 0 of ``group_name``."""

    @abc.abstractmethod
    def update_from_disk(self, path: str, timeout_s: float) -> None: ...

    @abc.abstractmethod
    def update_from_ipc(self, flat: torch.Tensor, metas: Sequence[BucketMeta], ranks: int,
                        timeout_s: float) -> None:
        """Hands over one CUDA bucket by IPC handle (servers on the same node)."""

    @abc.abstractmethod
    def set_version(self, version: str) -> None: ...

    @abc.abstractmethod
    def version(self) -> str | None: ...

    @abc.abstractmethod
    def flush_cache(self) -> None: ...

    @abc.abstractmethod
    def release_memory(self, tags: Sequence[str] | None) -> None: ...

    @abc.abstractmethod
    def resume_memory(self, tags: Sequence[str] | None) -> None: ...

    @abc.abstractmethod
    def read_weight_rows(self, name: str, rows: int) -> list:
        """The leading ``rows`` of a served tensor (a diagnostic; slow on big tensors)."""


class RolloutBackend(abc.ABC):
    name: str
    #: Memory tags ``release_memory`` accepts (None in a call means all of them).
    memory_tags: tuple[str, ...] = ()

    # ---------------------------------------------------------------- servers
    @abc.abstractmethod
    def server_command(self, spec: ServerSpec, port: int, host: str) -> tuple[list[str], dict[str, str]]:
        """Command line and extra environment of one server listening on ``host:port``."""

    def engine_ranks(self, spec: ServerSpec) -> int:
        """Ranks one server takes in a weight-update group."""
        return spec.tp_size

    def check_model(self, spec: ServerSpec, hf_config: dict) -> None:
        """Raises ValueError when the engine cannot serve this model with this spec."""

    def routing_replay_args(self) -> list[str]:
        """Server arguments that make it return routed experts (routing replay)."""
        raise NotImplementedError(f"rollout engine {self.name!r} cannot return routed experts")

    health_path: str = "/health"

    # ---------------------------------------------------------------- generation
    generate_path: str = "/generate"

    @abc.abstractmethod
    def generate_request(self, input_ids: Sequence[int], sampling: SamplingParams,
                         routed_experts: bool = False) -> dict:
        """``routed_experts``: also ask for every token's routed experts (routing replay)."""

    @abc.abstractmethod
    def score_request(self, sequences: Sequence[Sequence[int]]) -> dict:
        """One request for the engine's untempered log-prob of every token after the first, of
        every sequence (a single prefill batch: the probe of every weight sync's proof)."""

    @abc.abstractmethod
    def parse_generate(self, body: Any, expected: int, want_logprobs: bool,
                       routes: tuple[int, int] | None = None) -> list[GenerateOutput]:
        """``routes``: ``(layers, topk)`` when the request asked for routed experts (each output
        must then carry them, that shape per token)."""

    @abc.abstractmethod
    def parse_score(self, body: Any, lengths: Sequence[int]) -> list[list[float]]:
        """Per sequence of a :meth:`score_request`, the ``length - 1`` log-probs of tokens 1.."""

    @abc.abstractmethod
    def error_message(self, status: int, text: str) -> str:
        """The engine's own message from an error body."""

    def max_running_requests(self, url: str, api_key: str | None = None, timeout_s: float = 30.0) -> int:
        """How many requests the server at ``url`` runs at once (beyond that it queues them)."""
        raise NotImplementedError(f"the {self.name} backend cannot read a server's running-request limit; "
                                  "set rollout.client.max_running_per_server")

    # ---------------------------------------------------------------- weights
    @abc.abstractmethod
    def updater(self, url: str, api_key: str | None = None, http_timeout_s: float = 60.0) -> WeightUpdateAPI: ...


#: name -> "module:attribute" of the backend instance.
BACKENDS = {"sglang": "maspo_megatron.rollout.sglang:BACKEND"}


def get_backend(name: str) -> RolloutBackend:
    if name not in BACKENDS:
        raise ValueError(f"rollout.engine must be one of {sorted(BACKENDS)}, got {name!r}")
    module, attr = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), attr)
