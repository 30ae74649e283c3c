"""SGLang 0.5.23's HTTP wire format, trainer side: request bodies, response parsing, error bodies.

Behaviour as run against the real server (python/sglang/srt), not only as read:

- ``/generate`` with ``input_ids`` and ``return_logprob`` answers ``meta_info.output_token_logprobs``
  as ``[logprob, token_id, text]`` triples (text ``None`` with ``--skip-tokenizer-init``), each
  ``log_softmax(logits / temperature)`` before top-p/top-k filtering. ``logprob_start_len=0`` adds
  ``input_token_logprobs`` for the prompt (first entry ``None``), untempered. The default
  ``input_token_logprobs`` is ``[]``.
- finish reasons: ``{"type": "stop", "matched": id}`` is checked before ``{"type": "length"}``;
  a request aborted by ``/pause_generation`` (mode abort) ends 200 with type ``abort``.
  ``ignore_eos=True`` disables ``stop_token_ids`` as well as EOS.
- errors: an unknown sampling key gives 400 ``{"error": "unknown field ..."}``; most others
  ``{"object": "error", "message": ...}``; weight endpoints ``{"success": false, "message": ...}``
  with 400. ``/release_memory_occupation`` answers 200 with body ``null``.
- the weight version is ``/model_info``'s ``weight_version`` (there is no ``/get_weight_version``);
  a response's ``meta_info.weight_version`` is the server's when it answered, and
  ``meta_info.weight_versions`` the spans ``[{version, start, end}]`` of its output tokens (split
  where ``/update_weight_version`` landed while the request was in flight, e.g. paused by retract).
- routed experts (routing replay; server flag ``--enable-return-routed-experts``, request fields
  ``return_routed_experts`` and ``routed_experts_start_len``): ``meta_info.routed_experts`` is
  base64 of a row-major int32 array ``[seqlen - 1 - start_len, num_hidden_layers, topk]`` with
  ``seqlen = prompt + output`` tokens (``BatchResultProcessor._maybe_collect_routed_experts``,
  ``BaseTopkCapturer.get_topk``): every forwarded token from ``start_len`` on, the last output
  token never being forwarded. Every HF layer has a row; a dense layer's stays 0.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Sequence

import numpy as np
import torch

from maspo_megatron.rollout.backend import GenerateOutput, ProtocolError, SamplingParams


def sampling_json(p: SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature,
                           "top_p": p.top_p, "top_k": p.top_k, "ignore_eos": p.ignore_eos, "n": p.n}
    if p.stop_token_ids:
        out["stop_token_ids"] = list(p.stop_token_ids)
    if p.sampling_seed is not None:
        out["sampling_seed"] = p.sampling_seed
    return out


def decode_routed_experts(meta: dict, where: str, tokens: int, layers: int, topk: int) -> torch.Tensor:
    """``meta_info.routed_experts`` -> int32 ``[tokens - 1, layers, topk]``, checking its size."""
    raw = meta.get("routed_experts")
    if not isinstance(raw, str):
        raise ProtocolError(f"{where}: routed experts were requested but meta_info.routed_experts is "
                            f"{clip(raw)} (server started without --enable-return-routed-experts?)")
    try:
        flat = np.frombuffer(base64.b64decode(raw, validate=True), dtype=np.int32)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"{where}: meta_info.routed_experts is not base64 of int32: {e}") from e
    want = (tokens - 1) * layers * topk
    if flat.size != want:
        raise ProtocolError(f"{where}: meta_info.routed_experts holds {flat.size} ids, expected "
                            f"{want} = ({tokens} tokens - 1) x {layers} layers x top-{topk}")
    return torch.from_numpy(flat.copy()).reshape(tokens - 1, layers, topk)


def clip(obj: Any, limit: int = 300) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def _field(obj: dict, key: str, where: str):
    if key not in obj:
        raise ProtocolError(f"{where}: missing field {key!r} in {clip(obj)}")
    return obj[key]


def parse_logprob_triples(items: Any, where: str, token_ids: Sequence[int] | None = None):
    """``[[logprob, token_id, text], ...]`` -> list of logprobs (None kept), checking token ids."""
    if not isinstance(items, list):
        raise ProtocolError(f"{where}: expected a list of [logprob, token_id, text], got {clip(items)}")
    values = []
    for j, item in enumerate(items):
        if not isinstance(item, (list, tuple)) or len(item) < 2:
            raise ProtocolError(f"{where}[{j}]: expected [logprob, token_id, text], got {clip(item)}")
        if token_ids is not None and j >= len(token_ids):
            raise ProtocolError(f"{where}: {len(items)} entries for {len(token_ids)} tokens: {clip(items)}")
        if token_ids is not None and item[1] != token_ids[j]:
            raise ProtocolError(f"{where}[{j}]: token id {item[1]} does not match the token at that "
                                f"position ({token_ids[j]})")
        values.append(None if item[0] is None else float(item[0]))
    return values


def parse_generate_response(body: Any, expected: int, want_logprobs: bool,
                            routes: tuple[int, int] | None = None) -> list[GenerateOutput]:
    """Parses a /generate JSON body (one object, or a list for batch / n>1 requests).

    ``routes``: ``(layers, topk)`` when routed experts were requested: each output must carry
    them for its ``meta_info.prompt_tokens`` + output tokens."""
    items = body if isinstance(body, list) else [body]
    if len(items) != expected:
        raise ProtocolError(f"/generate returned {len(items)} outputs, expected {expected}: {clip(body)}")
    outs = []
    for i, item in enumerate(items):
        where = f"/generate output {i}"
        if not isinstance(item, dict):
            raise ProtocolError(f"{where}: expected an object, got {clip(item)}")
        output_ids = _field(item, "output_ids", where)
        meta = _field(item, "meta_info", where)
        if not isinstance(output_ids, list) or not isinstance(meta, dict):
            raise ProtocolError(f"{where}: output_ids must be a list and meta_info an object: {clip(item)}")
        finish = _field(meta, "finish_reason", where + ".meta_info")
        if not isinstance(finish, dict) or "type" not in finish:
            raise ProtocolError(f"{where}.meta_info.finish_reason: expected {{'type': ...}}, got {clip(finish)}")
        logprobs = None
        if want_logprobs and finish["type"] != "abort":
            triples = _field(meta, "output_token_logprobs", where + ".meta_info")
            logprobs = parse_logprob_triples(triples, where + ".meta_info.output_token_logprobs", output_ids)
            if len(logprobs) != len(output_ids):
                raise ProtocolError(f"{where}: {len(logprobs)} output_token_logprobs for "
                                    f"{len(output_ids)} output_ids")
        input_lp = None
        if meta.get("input_token_logprobs"):
            input_lp = parse_logprob_triples(meta["input_token_logprobs"], where + ".meta_info.input_token_logprobs")
        routed = None
        if routes is not None and finish["type"] != "abort":
            prompt = int(_field(meta, "prompt_tokens", where))
            routed = decode_routed_experts(meta, where, prompt + len(output_ids), *routes)
        outs.append(GenerateOutput(
            routed_experts=routed,
            output_ids=[int(t) for t in output_ids],
            token_versions=_token_versions(meta, len(output_ids), where + ".meta_info"),
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


def _token_versions(meta: dict, n: int, where: str) -> list[str] | None:
    """Per output token, the weight version it was sampled under, from ``weight_versions``: the
    spans ``[{version, start, end}]`` SGLang records when ``/update_weight_version`` lands while
    a request is in flight (absent: the server sent none, e.g. for an aborted request)."""
    spans = meta.get("weight_versions")
    if spans is None:
        return None
    out: list[str] = []
    for span in spans if isinstance(spans, list) else [spans]:
        if not isinstance(span, dict) or not {"version", "start", "end"} <= span.keys() \
                or span["start"] != len(out) or span["end"] < span["start"]:
            raise ProtocolError(f"{where}.weight_versions: expected contiguous spans "
                                f"[{{version, start, end}}] from token 0, got {clip(spans)}")
        out += [str(span["version"])] * (span["end"] - span["start"])
    if len(out) != n:
        raise ProtocolError(f"{where}.weight_versions cover {len(out)} tokens, the output has {n}: {clip(spans)}")
    return out


def error_message(status: int, text: str) -> str:
    """The server's own message from an error body (SGLang's several shapes), else the raw text."""
    try:
        body = json.loads(text)
    except (ValueError, TypeError):
        return clip(text.strip() or f"HTTP {status} with an empty body", 1000)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if key in body and body[key]:
                return str(body[key])
    return clip(body, 1000)
