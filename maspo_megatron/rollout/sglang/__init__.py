"""SGLang 0.5.23 as the rollout backend: server command, /generate wire format, weight updates.

Everything here speaks to the real server and was checked against it (tests/test_sglang_*.py):
weight updates through ``/update_weights_from_distributed`` and ``/update_weights_from_tensor``
must run inside ``/begin_weight_update`` … ``/end_weight_update`` (else HTTP 400);
``/update_weights_from_disk`` needs no session. Weight-update and pause endpoints answer 404
through sglang-router: they always go to each server's own URL.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Sequence

import torch

from maspo_megatron.rollout.backend import (
    BucketMeta, RolloutBackend, SamplingParams, ServerSpec, WeightSyncError, WeightUpdateAPI,
)
from maspo_megatron.rollout.sglang import wire
from maspo_megatron.rollout.sglang.server import check_model, server_command


def post_json(url: str, path: str, payload: dict | None, timeout_s: float,
              api_key: str | None = None, what: str = "") -> Any:
    """POSTs JSON; returns the parsed body; raises WeightSyncError quoting the server on failure."""
    req = urllib.request.Request(url + path, data=json.dumps(payload or {}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    label = f"{what}: " if what else ""
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        raise WeightSyncError(f"{label}{url}{path} answered HTTP {e.code}: "
                              f"{wire.error_message(e.code, text)}") from e
    except (urllib.error.URLError, OSError) as e:
        raise WeightSyncError(f"{label}{url}{path} failed: {e} (server down or not answering "
                              f"within {timeout_s:.0f}s)") from e
    try:
        body = json.loads(text) if text.strip() else {}
    except ValueError:
        return text
    if isinstance(body, dict) and body.get("success") is False:
        raise WeightSyncError(f"{label}{url}{path} reported failure: {body.get('message')}")
    return body


def get_json(url: str, path: str, timeout_s: float, api_key: str | None = None) -> Any:
    req = urllib.request.Request(url + path)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read().decode())
    except urllib.error.HTTPError as e:
        raise WeightSyncError(f"{url}{path} answered HTTP {e.code}: "
                              f"{wire.error_message(e.code, e.read().decode(errors='replace'))}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise WeightSyncError(f"{url}{path} failed: {e}") from e


class SGLangUpdater(WeightUpdateAPI):
    def __init__(self, url: str, api_key: str | None, http_timeout_s: float):
        self.url, self.api_key, self.http_timeout_s = url.rstrip("/"), api_key, http_timeout_s

    def _post(self, path: str, payload: dict | None = None, timeout_s: float | None = None,
              what: str | None = None) -> Any:
        return post_json(self.url, path, payload, timeout_s or self.http_timeout_s, self.api_key,
                         what or path.strip("/"))

    def pause(self, mode: str) -> None:
        self._post("/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self._post("/continue_generation", {})

    def begin_update(self) -> None:
        self._post("/begin_weight_update", {})

    def end_update(self) -> None:
        self._post("/end_weight_update", {})

    def init_group(self, *, master_address, master_port, rank_offset, world_size, group_name,
                   backend, timeout_s: float | None = None) -> None:
        self._post("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, "group_name": group_name,
            "backend": backend}, timeout_s)

    def destroy_group(self, group_name: str) -> None:
        self._post("/destroy_weights_update_group", {"group_name": group_name})

    def update_from_distributed(self, metas: Sequence[BucketMeta], group_name: str,
                                timeout_s: float, what: str | None = None) -> None:
        self._post("/update_weights_from_distributed", {
            "names": [m.name for m in metas], "dtypes": [str(m.dtype).removeprefix("torch.") for m in metas],
            "shapes": [list(m.shape) for m in metas], "group_name": group_name,
            "flush_cache": False, "load_format": "flattened_bucket"}, timeout_s, what)

    def update_from_disk(self, path: str, timeout_s: float) -> None:
        self._post("/update_weights_from_disk", {"model_path": path, "flush_cache": False}, timeout_s)

    def update_from_ipc(self, flat: torch.Tensor, metas: Sequence[BucketMeta], ranks: int,
                        timeout_s: float, what: str | None = None) -> None:
        from maspo_megatron.rollout.sglang.ipc import serialize_ipc_bucket

        # One entry per engine rank, each its own IPC share (as SGLang's Engine does).
        self._post("/update_weights_from_tensor", {
            "serialized_named_tensors": [serialize_ipc_bucket(flat, metas) for _ in range(ranks)],
            "load_format": "flattened_bucket", "flush_cache": False}, timeout_s, what)

    def set_version(self, version: str) -> None:
        # abort_all_requests defaults to True there; the servers are paused anyway.
        self._post("/update_weight_version", {"new_version": str(version), "abort_all_requests": False})

    def version(self) -> str | None:
        info = get_json(self.url, "/model_info", self.http_timeout_s, self.api_key)
        v = info.get("weight_version") if isinstance(info, dict) else None
        return None if v is None else str(v)

    def flush_cache(self) -> None:
        self._post("/flush_cache", {})

    def release_memory(self, tags: Sequence[str] | None) -> None:
        self._post("/release_memory_occupation", {"tags": None if tags is None else list(tags)})

    def resume_memory(self, tags: Sequence[str] | None) -> None:
        self._post("/resume_memory_occupation", {"tags": None if tags is None else list(tags)})

    def read_weight_rows(self, name: str, rows: int) -> list:
        return self._post("/get_weights_by_name", {"name": name, "truncate_size": rows})


class SGLangBackend(RolloutBackend):
    name = "sglang"
    # srt/constants.py GPU_MEMORY_ALL_TYPES
    memory_tags = ("kv_cache", "weights", "cuda_graph")

    def server_command(self, spec: ServerSpec, port: int, host: str):
        return server_command(spec, port, host)

    def check_model(self, spec: ServerSpec, hf_config: dict) -> None:
        check_model(spec, hf_config)

    def generate_request(self, input_ids: Sequence[int], sampling: SamplingParams,
                         routed_experts: bool = False) -> dict:
        body = {"input_ids": list(input_ids), "sampling_params": wire.sampling_json(sampling),
                "return_logprob": True}
        if routed_experts:  # from the first token: the trainer replays prompts too
            body.update(return_routed_experts=True, routed_experts_start_len=0)
        return body

    def score_request(self, sequences: Sequence[Sequence[int]]) -> dict:
        # A batch of prompts with no new token: one prefill, every prompt log-prob returned.
        return {"input_ids": [list(s) for s in sequences], "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True, "logprob_start_len": 0}

    def parse_generate(self, body, expected: int, want_logprobs: bool, routes=None):
        return wire.parse_generate_response(body, expected, want_logprobs, routes)

    def routing_replay_args(self) -> list[str]:
        # On CPU the capturer's host buffer needs cpu_shim/sitecustomize.py (unpinned).
        return ["--enable-return-routed-experts"]

    def parse_score(self, body, lengths: Sequence[int]) -> list[list[float]]:
        out = []
        # Output log-probs are not read: with max_new_tokens=0 SGLang may still return one (the
        # token it would have sampled next) for an empty output_ids.
        for i, (o, n) in enumerate(zip(wire.parse_generate_response(body, len(lengths), False), lengths)):
            values = o.input_logprobs or []
            if len(values) != n:
                raise wire.ProtocolError(f"sequence {i}: {len(values)} input_token_logprobs for {n} tokens")
            if values[0] is not None or any(v is None for v in values[1:]):
                raise wire.ProtocolError(f"sequence {i}: input_token_logprobs: expected None only at position 0")
            out.append([float(v) for v in values[1:]])
        return out

    def error_message(self, status: int, text: str) -> str:
        return wire.error_message(status, text)

    def updater(self, url: str, api_key: str | None = None, http_timeout_s: float = 60.0):
        return SGLangUpdater(url, api_key, http_timeout_s)

    def max_running_requests(self, url: str, api_key: str | None = None, timeout_s: float = 30.0) -> int:
        # /server_info: one internal state per DP rank, each with the limit its scheduler resolved.
        info = get_json(url.rstrip("/"), "/server_info", timeout_s, api_key)
        states = info.get("internal_states") if isinstance(info, dict) else None
        try:
            return sum(int(s["effective_max_running_requests_per_dp"]) for s in states)
        except (TypeError, KeyError, ValueError):
            raise wire.ProtocolError(f"{url}/server_info has no internal_states[*].effective_max_running_requests_per_dp: "
                                  f"{str(info)[:300]}") from None


BACKEND = SGLangBackend()
