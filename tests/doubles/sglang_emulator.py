"""A test double of an SGLang server, for the one place the real one cannot go: GPU tests on an
image without SGLang (the colocated CUDA-IPC sync, ``--device cuda``). Every CPU test runs the
real SGLang server instead (its CPU engine; see maspo_megatron/rollout/sglang/server.py).

Wraps an HF transformers causal LM (float32) and speaks the subset of SGLang 0.5.23's HTTP
protocol the trainer uses, as read from SGLang's source and checked against the real server;
``sglang_receiver.py`` holds the receiving half of the wire format.

Semantics copied from SGLang 0.5.x:
- ``/generate`` with ``input_ids`` (one list, or a batch of lists) behaves like
  ``--skip-tokenizer-init``: outputs carry ``output_ids`` and ``meta_info``, no text. ``n > 1`` or
  a batch returns a list ordered prompt-major (prompt 0's n samples, then prompt 1's, ...).
- ``output_token_logprobs`` = ``log_softmax(logits / temperature)`` before top-p/top-k (greedy:
  temperature 1); ``input_token_logprobs`` are untempered ``log_softmax(logits)`` (SGLang scales
  prompt log-probs only with ``temp_scaled_logprobs``), starting at ``logprob_start_len``
  (default: the last prompt token) and with ``None`` for the first listed position.
- finish reasons: ``{"type": "length", "length": n}`` is checked before stop tokens;
  ``{"type": "stop", "matched": id}``; pause with mode "abort" ends in-flight requests with
  ``{"type": "abort", "message": ...}`` and HTTP 200.
- requests arriving while paused wait for ``/continue_generation``.

- ``/update_weights_from_tensor`` (``--device cuda`` only): ``serialized_named_tensors[0]``
  (this server is TP rank 0) holds CUDA-IPC handles, ``load_format`` "flattened_bucket" or
  None; the tensors are mapped from the sender's memory and copied into the model before the
  answer, so the sender may free them afterwards. On CPU it answers 400.
- ``/release_memory_occupation`` / ``/resume_memory_occupation`` with ``tags`` (None or [] =
  all of "kv_cache", "weights", "cuda_graph"): as SGLang's memory saver, releasing "weights"
  frees their device memory and, unless the server runs with ``--weights-cpu-backup``
  (SGLang's ``--enable-weights-cpu-backup``), forgets their values: after resume they are NaN
  (SGLang's are undefined) until the trainer syncs new ones. There is no KV pool here, so
  "kv_cache" and "cuda_graph" only change state. While any tag is released, /generate and
  weight updates into released weights answer 400 instead of computing garbage.

Execution: one model thread runs generation jobs and weight updates in arrival order, so a
request never sees weights change half-way (SGLang's model_update_lock gives the same guarantee).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from aiohttp import web

from sglang_receiver import (
    GPU_MEMORY_TAGS, SAMPLING_EPS, ProtocolError, SamplingParams, bucket_from_payload,
    bucket_layout, destroy_weight_update_group, init_weight_update_group, loads_ipc_payload,
    named_tensors_from_payload, unflatten_bucket,
)


def _cache_field() -> str:
    # transformers renamed the KV-cache argument and output field from ``past_key_values`` to
    # ``cache`` during 5.x; the server runs on either side of the rename.
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


_CACHE_FIELD = _cache_field()

logger = logging.getLogger("maspo_megatron.cpu_server")

DEFAULT_GROUP = "weight_update_group"  # SGLang's default group_name


@dataclass
class _Job:
    input_ids: list[int]
    params: SamplingParams
    sample_index: int  # index among the n samples of one prompt (seed offset)
    return_logprob: bool
    logprob_start_len: int


class _Retracted(Exception):
    """A job interrupted by pause(mode="retract"); the handler re-runs it after continue."""


class _Released(Exception):
    """A job that arrived while memory was released (a 400 naming the fix)."""


class CPUEngine:
    """The model plus its weight-update groups. Every method runs on the single model thread."""

    def __init__(self, model_path: str, device: str = "cpu", weights_cpu_backup: bool = False):
        from transformers import AutoModelForCausalLM

        self.model_path = model_path
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: CUDA is not available in this process")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model = self.model.to(self.device).eval()
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        eos = getattr(self.model.generation_config, "eos_token_id", None) or cfg.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        # state_dict(keep_vars) lists tied weights under every name (lm_head.weight too).
        self.params: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        self.shapes = {name: tuple(t.shape) for name, t in self.params.items()}
        self.weights_cpu_backup = weights_cpu_backup
        self.released: set[str] = set()  # GPU_MEMORY_TAGS currently released
        self._backup: dict[int, torch.Tensor] = {}
        self.groups: dict[str, Any] = {}
        self.abort_event = threading.Event()  # set by pause(mode="abort"/"retract")
        self.retract = False

    # ------------------------------------------------------------------ generation
    def _forward(self, ids: list[int], past):
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True,
                         **{_CACHE_FIELD: past})
        # Sampling runs on the CPU with a CPU generator: same seeds, same samples on any device.
        return out.logits[0].float().cpu(), getattr(out, _CACHE_FIELD)

    @torch.no_grad()
    def run(self, job: _Job) -> dict[str, Any]:
        if self.released:
            raise _Released(f"memory is released ({sorted(self.released)}); call "
                            "/resume_memory_occupation before generating")
        p = job.params
        ids = job.input_ids
        gen = torch.Generator()
        if p.sampling_seed is not None:
            gen.manual_seed(int(p.sampling_seed) + job.sample_index)
        else:
            gen.seed()
        greedy = p.temperature < SAMPLING_EPS
        stop_ids = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            stop_ids |= self.eos_ids

        logits, past = self._forward(ids, None)
        meta: dict[str, Any] = {}
        if job.return_logprob:
            meta["input_token_logprobs"] = self._input_logprobs(ids, logits, job.logprob_start_len)
        out_ids: list[int] = []
        out_lp: list[list] = []
        finish: dict[str, Any] = {"type": "length", "length": p.max_new_tokens}
        last = logits[-1]
        while len(out_ids) < p.max_new_tokens:
            if self.abort_event.is_set():
                if self.retract:
                    raise _Retracted()
                finish = {"type": "abort", "message": "Abort in waiting queue or running batch."}
                break
            scaled = last if greedy else last / p.temperature
            logprobs = torch.log_softmax(scaled, dim=-1)
            if greedy:
                tok = int(torch.argmax(last))
            else:
                tok = int(torch.multinomial(_filtered_probs(scaled, p.top_k, p.top_p), 1, generator=gen))
            out_ids.append(tok)
            out_lp.append([float(logprobs[tok]), tok, None])
            # SGLang checks the length limit before stop tokens.
            if len(out_ids) >= p.max_new_tokens:
                break
            if tok in stop_ids:
                finish = {"type": "stop", "matched": tok}
                break
            step_logits, past = self._forward([tok], past)
            last = step_logits[-1]
        meta.update(finish_reason=finish, prompt_tokens=len(ids), completion_tokens=len(out_ids),
                    cached_tokens=0)
        if job.return_logprob:
            meta["output_token_logprobs"] = out_lp
        return {"output_ids": out_ids, "meta_info": meta}

    def _input_logprobs(self, ids: list[int], logits: torch.Tensor, start: int) -> list[list]:
        # Position q's logits score token q+1; SGLang lists tokens ids[start:] with None first.
        lp = torch.log_softmax(logits[:-1], dim=-1)
        scored = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        out: list[list] = [[None, ids[start], None]]
        out += [[scored[q - 1], ids[q], None] for q in range(start + 1, len(ids))]
        return out

    # ------------------------------------------------------------------ weights
    def _load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        if "weights" in self.released:
            raise ValueError("weights are released (release_memory_occupation); resume them "
                             "with /resume_memory_occupation tags=['weights'] before updating")
        missing = [n for n, _ in named if n not in self.params]
        if missing:
            raise ValueError(f"unknown parameter names {missing[:5]}; the model has e.g. "
                             f"{list(self.params)[:3]}")
        for name, t in named:
            if tuple(t.shape) != self.shapes[name]:
                raise ValueError(f"shape of {name!r} is {list(t.shape)}, the model's is "
                                 f"{list(self.shapes[name])}")
        with torch.no_grad():
            for name, t in named:
                self.params[name].copy_(t)

    def init_group(self, req: dict[str, Any], timeout_s: float) -> str:
        name = req.get("group_name", DEFAULT_GROUP)
        if not name:
            raise ValueError("Group name cannot be empty")
        if name in self.groups:
            raise ValueError(f"group {name!r} already exists; destroy it first")
        backend = req.get("backend", "nccl")
        if backend != "gloo":
            raise ValueError(f"backend {backend!r} is not available on the CPU server; use 'gloo'")
        self.groups[name] = init_weight_update_group(
            backend="gloo", master_address=req["master_address"], master_port=int(req["master_port"]),
            rank=int(req["rank_offset"]), world_size=int(req["world_size"]), group_name=name,
            timeout_s=timeout_s,
        )
        return "Succeeded to initialize custom process group."

    def update_from_distributed(self, req: dict[str, Any]) -> str:
        name = req.get("group_name", DEFAULT_GROUP)
        if name not in self.groups:
            raise ValueError(f"Group {name} not in {list(self.groups)}. "
                             "Please call `init_weights_update_group` first.")
        group = self.groups[name]
        metas = bucket_layout(req["names"], req["dtypes"], req["shapes"])
        if req.get("load_format") == "flattened_bucket":
            flat = torch.empty(metas[-1].end if metas else 0, dtype=torch.uint8)
            dist.broadcast(flat, src=0, group=group)
            named = unflatten_bucket(flat, metas)
        elif req.get("load_format") in (None, "auto"):
            named = []
            for m in metas:
                t = torch.empty(m.shape, dtype=m.dtype)
                dist.broadcast(t, src=0, group=group)
                named.append((m.name, t))
        else:
            raise ValueError(f"load_format {req['load_format']!r} is not supported; "
                             "use 'flattened_bucket' or omit it")
        self._load(named)
        return "Succeeded to update parameter online."

    def update_from_disk(self, req: dict[str, Any]) -> str:
        from safetensors.torch import load_file

        path = req["model_path"]
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"no *.safetensors files in {path!r}")
        for f in files:
            self._load(list(load_file(f).items()))
        return f"Succeeded to update model weights from {path}."

    def update_from_tensor(self, req: dict[str, Any]) -> str:
        if self.device.type != "cuda":
            raise ValueError(
                "update_weights_from_tensor passes CUDA-IPC handles, and this server's model is "
                f"on {self.device}: start it with --device cuda on the trainer's GPU, or use "
                "update_weights_from_distributed / update_weights_from_disk")
        entries = req["serialized_named_tensors"]
        if not isinstance(entries, list) or not entries:
            raise ProtocolError("serialized_named_tensors must be a non-empty list with one "
                                "entry per TP rank of the server")
        payload = loads_ipc_payload(entries[0])  # this server is TP rank 0 of 1
        fmt = req.get("load_format")
        if fmt == "flattened_bucket":
            named = unflatten_bucket(*bucket_from_payload(payload))
        elif fmt is None:
            named = named_tensors_from_payload(payload)
        else:
            raise ValueError(f"load_format {fmt!r} is not supported; use 'flattened_bucket' "
                             "or omit it")
        self._load(named)
        # The copies into the model are queued on this process's stream; finish them before
        # answering, since the sender frees its buffer once it has the answer.
        torch.cuda.synchronize(self.device)
        return "Success"

    def _tags(self, req: dict[str, Any]) -> list[str]:
        tags = req.get("tags") or list(GPU_MEMORY_TAGS)
        if not isinstance(tags, list) or any(t not in GPU_MEMORY_TAGS for t in tags):
            raise ProtocolError(f"tags must be a list drawn from {list(GPU_MEMORY_TAGS)}, got {tags!r}")
        return tags

    def _unique_weights(self) -> list[torch.Tensor]:
        return list({id(t): t for t in self.params.values()}.values())  # tied weights once

    def release_memory(self, req: dict[str, Any]) -> str:
        tags = self._tags(req)
        again = sorted(self.released.intersection(tags))
        if again:
            raise ValueError(f"memory {again} is already released")
        if "weights" in tags:
            for t in self._unique_weights():
                if self.weights_cpu_backup:
                    self._backup[id(t)] = t.data.to("cpu", copy=True)
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.released.update(tags)
        return f"Released memory {tags}."

    def resume_memory(self, req: dict[str, Any]) -> str:
        tags = self._tags(req)
        missing = sorted(set(tags) - self.released)
        if missing:
            raise ValueError(f"memory {missing} is not released")
        if "weights" in tags:
            shapes = {id(t): self.shapes[name] for name, t in self.params.items()}
            for t in self._unique_weights():
                backup = self._backup.pop(id(t), None)
                t.data = (backup.to(t.device) if backup is not None else
                          torch.full(shapes[id(t)], float("nan"), dtype=t.dtype, device=t.device))
        self.released.difference_update(tags)
        return f"Resumed memory {tags}."

    def memory_allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None

    def destroy_group(self, req: dict[str, Any]) -> str:
        name = req.get("group_name", DEFAULT_GROUP)
        if name not in self.groups:
            raise ValueError(f"Group {name} not in {list(self.groups)}.")
        destroy_weight_update_group(self.groups.pop(name))
        return "Succeed to destroy custom process group."

    def get_weights(self, name: str, truncate_size: int) -> list:
        if name not in self.params:
            raise KeyError(name)
        if "weights" in self.released:
            raise ValueError(f"cannot read {name!r}: weights are released")
        return self.params[name].detach().float().tolist()[:truncate_size]


def _filtered_probs(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    probs = torch.softmax(scaled, dim=-1)
    if top_k != -1 and top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
        drop = (torch.cumsum(sorted_p, 0) - sorted_p) > top_p * sorted_p.sum()
        sorted_p = torch.where(drop, torch.zeros_like(sorted_p), sorted_p)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return probs / probs.sum()


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def _result(success: bool, message: str, **extra) -> web.Response:
    return web.json_response({"success": success, "message": message, **extra},
                             status=200 if success else 400)


class CPUServer:
    engine_class = CPUEngine  # benchmarks/simulated_server.py decodes in batches on top of it

    def __init__(self, model_path: str, *, api_key: str | None = None,
                 weight_update_timeout_s: float = 600.0, device: str = "cpu",
                 weights_cpu_backup: bool = False):
        self.engine = self.engine_class(model_path, device, weights_cpu_backup)
        self.api_key = api_key
        self.weight_version = "default"  # SGLang's initial weight_version
        self.session = False  # inside begin_weight_update ... end_weight_update
        self.weight_update_timeout_s = weight_update_timeout_s
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.running = asyncio.Event()
        self.running.set()

    async def _on_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=1 << 30)
        r = app.router
        for path in ("/generate",):
            r.add_post(path, self.generate)
            r.add_put(path, self.generate)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health_generate)
        for path in ("/get_model_info", "/model_info"):
            r.add_get(path, self.model_info)
        for path in ("/get_server_info", "/server_info"):
            r.add_get(path, self.server_info)
        r.add_post("/begin_weight_update", self.begin_update)
        r.add_post("/end_weight_update", self.end_update)
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_post("/pause_generation", self.pause)
        r.add_post("/continue_generation", self.resume)
        r.add_post("/init_weights_update_group", self.init_group)
        r.add_post("/destroy_weights_update_group", self.destroy_group)
        r.add_post("/update_weights_from_distributed", self.update_from_distributed)
        r.add_post("/update_weights_from_disk", self.update_from_disk)
        r.add_post("/update_weights_from_tensor", self.update_from_tensor)
        r.add_post("/update_weight_version", self.update_weight_version)
        for path, handler in (("/release_memory_occupation", self.release_memory),
                              ("/resume_memory_occupation", self.resume_memory)):
            r.add_route("GET", path, handler)
            r.add_route("POST", path, handler)
        r.add_route("*", "/get_weights_by_name", self.get_weights_by_name)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        # As SGLang's add_api_key_middleware: health probes stay open.
        if self.api_key and not request.path.startswith("/health"):
            if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def _json(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError as e:
            raise ProtocolError(f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise ProtocolError(f"request body must be a JSON object, got {type(body).__name__}")
        return body

    # ------------------------------------------------------------------ /generate
    def _jobs(self, body: dict[str, Any]) -> tuple[list[_Job], bool]:
        if "text" in body and body["text"] is not None:
            raise ProtocolError("text input needs a tokenizer; this server runs with "
                                "skip_tokenizer_init: send input_ids")
        ids = body.get("input_ids")
        if not isinstance(ids, list) or not ids:
            raise ProtocolError("input_ids must be a non-empty list of token ids or of lists")
        batch = isinstance(ids[0], list)
        prompts = ids if batch else [ids]
        n_prompts = len(prompts)

        def per_item(key, default):
            value = body.get(key, default)
            if isinstance(value, list) and key != "input_ids":
                if len(value) != n_prompts:
                    raise ProtocolError(f"{key} has {len(value)} entries for {n_prompts} prompts")
                return value
            return [value] * n_prompts

        sps = per_item("sampling_params", {})
        rls = per_item("return_logprob", False)
        starts = per_item("logprob_start_len", -1)
        jobs = []
        for i, prompt in enumerate(prompts):
            where = f"input_ids[{i}]" if batch else "input_ids"
            if not prompt or not all(isinstance(t, int) for t in prompt):
                raise ProtocolError(f"{where} must be a non-empty list of ints")
            bad = [t for t in prompt if not 0 <= t < self.engine.vocab_size]
            if bad:
                raise ProtocolError(f"{where} has token id {bad[0]} outside the vocabulary "
                                    f"[0, {self.engine.vocab_size})")
            params = SamplingParams.from_json(sps[i])
            if len(prompt) + params.max_new_tokens > self.engine.max_context:
                raise ProtocolError(
                    f"Requested token count exceeds the model's maximum context length of "
                    f"{self.engine.max_context} tokens. You requested a total of "
                    f"{len(prompt) + params.max_new_tokens} tokens: {len(prompt)} tokens from the "
                    f"input messages and {params.max_new_tokens} tokens for the completion."
                )
            start = starts[i]
            if start is None or start == -1:
                start = len(prompt) - 1
            if not isinstance(start, int) or not 0 <= start < len(prompt):
                raise ProtocolError(f"logprob_start_len must be -1 or in [0, {len(prompt)}), got {start}")
            for j in range(params.n):
                jobs.append(_Job(list(prompt), params, j, bool(rls[i]), start))
        return jobs, batch or len(jobs) > 1

    def _run_jobs(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        return [self.engine.run(job) for job in jobs]

    async def generate(self, request: web.Request) -> web.Response:
        t0 = time.monotonic()
        try:
            body = await self._json(request)
            jobs, as_list = self._jobs(body)
        except (ProtocolError, TypeError) as e:
            return _error(str(e))
        while True:
            await self.running.wait()
            try:
                outs = await self._on_model_thread(self._run_jobs, jobs)
                break
            except _Released as e:
                return _error(str(e))
            except _Retracted:
                continue  # retract: start over from scratch after /continue_generation
        rid = body.get("rid") or uuid.uuid4().hex
        for k, out in enumerate(outs):
            out["meta_info"].update(id=rid if len(outs) == 1 else f"{rid}-{k}",
                                    weight_version=self.weight_version,
                                    e2e_latency=time.monotonic() - t0)
        return web.json_response(outs if as_list else outs[0])

    # ------------------------------------------------------------------ info / health
    async def health(self, request):
        return web.Response(status=200)

    async def health_generate(self, request):
        job = _Job([0], SamplingParams(max_new_tokens=1, temperature=0.0), 0, False, 0)
        try:
            await asyncio.wait_for(self._on_model_thread(self.engine.run, job), timeout=20)
        except Exception:  # noqa: BLE001 - any failure means unhealthy, as in SGLang
            return web.Response(status=503)
        return web.Response(status=200)

    async def model_info(self, request):
        return web.json_response({
            "model_path": self.engine.model_path, "tokenizer_path": None, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": self.weight_version,
        })

    async def server_info(self, request):
        return web.json_response({
            "model_path": self.engine.model_path, "tp_size": 1, "dp_size": 1, "pp_size": 1,
            "device": self.engine.device.type, "skip_tokenizer_init": True,
            "weight_version": self.weight_version,
            "released_memory_tags": sorted(self.engine.released),
            "device_memory_allocated": await self._on_model_thread(self.engine.memory_allocated),
            "max_total_num_tokens": self.engine.max_context, "internal_states": [{}],
            "version": "maspo-megatron-cpu-server",
        })

    async def flush_cache(self, request):
        # No prefix cache on this server: nothing to flush.
        return web.Response(text="Cache flushed.\n", status=200)

    # ------------------------------------------------------------------ pause / continue
    async def pause(self, request):
        try:
            mode = (await self._json(request)).get("mode", "abort")
        except ProtocolError as e:
            return _error(str(e))
        if mode not in ("abort", "retract"):
            return _error(f"pause mode {mode!r} is not supported by the CPU server; "
                          "use 'abort' or 'retract'")
        self.running.clear()
        self.engine.retract = mode == "retract"
        self.engine.abort_event.set()
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def resume(self, request):
        # Drain aborted jobs on the model thread before new ones start.
        await self._on_model_thread(lambda: None)
        self.engine.abort_event.clear()
        self.running.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    # ------------------------------------------------------------------ weights
    async def _weight_op(self, request, fn, *, fields: tuple[str, ...] = (), **extra):
        try:
            body = await self._json(request)
            missing = [f for f in fields if f not in body]
            if missing:
                raise ProtocolError(f"missing field(s) {missing}")
            message = await self._on_model_thread(fn, body)
        except (ProtocolError, ValueError, KeyError, TypeError, RuntimeError) as e:
            logger.error("%s failed: %s", request.path, e)
            return _result(False, f"Failed to {request.path.strip('/')}: {e}", **extra)
        version = body.get("weight_version")
        if version is not None:
            self.weight_version = str(version)
            message += f" Weight version updated to {version}."
        return _result(True, message, **extra)

    async def begin_update(self, request):
        # As SGLang 0.5.23: distributed and tensor updates must run inside a session.
        if self.session:
            return _result(False, "a weight-update session is already open; call end_weight_update() first")
        self.session = True
        return _result(True, "Success")

    async def end_update(self, request):
        if not self.session:
            return _result(False, "no weight-update session is open; call begin_weight_update() first")
        self.session = False
        return _result(True, "Success")

    def _needs_session(self, path: str):
        if not self.session:
            return _result(False, f"{path} must run between begin_weight_update() and end_weight_update()")
        return None

    async def init_group(self, request):
        return await self._weight_op(
            request, lambda b: self.engine.init_group(b, self.weight_update_timeout_s),
            fields=("master_address", "master_port", "rank_offset", "world_size"))

    async def destroy_group(self, request):
        return await self._weight_op(request, self.engine.destroy_group)

    async def update_from_distributed(self, request):
        if (refused := self._needs_session("update_weights_from_distributed")) is not None:
            return refused
        return await self._weight_op(request, self.engine.update_from_distributed,
                                     fields=("names", "dtypes", "shapes"))

    async def update_from_disk(self, request):
        return await self._weight_op(request, self.engine.update_from_disk,
                                     fields=("model_path",), num_paused_requests=0)

    async def update_from_tensor(self, request):
        if (refused := self._needs_session("update_weights_from_tensor")) is not None:
            return refused
        return await self._weight_op(request, self.engine.update_from_tensor,
                                     fields=("serialized_named_tensors",))

    async def _memory_op(self, request, fn):
        # SGLang answers 200 on success and 400 {"error": {"message"}} on failure.
        try:
            message = await self._on_model_thread(fn, await self._json(request))
        except (ProtocolError, ValueError) as e:
            logger.error("%s failed: %s", request.path, e)
            return _error(f"{request.path.strip('/')}: {e}")
        return web.json_response({"success": True, "message": message})

    async def release_memory(self, request):
        return await self._memory_op(request, self.engine.release_memory)

    async def resume_memory(self, request):
        return await self._memory_op(request, self.engine.resume_memory)

    async def update_weight_version(self, request):
        try:
            body = await self._json(request)
            self.weight_version = str(body["new_version"])
        except (ProtocolError, KeyError) as e:
            return _result(False, f"Failed to update weight version: {e}")
        return web.json_response({"success": True, "new_version": self.weight_version,
                                  "message": f"Weight version updated to {self.weight_version}"})

    async def get_weights_by_name(self, request):
        try:
            body = await self._json(request)
            name = body["name"]
            truncate = int(body.get("truncate_size", 100))
            values = await self._on_model_thread(self.engine.get_weights, name, truncate)
        except KeyError as e:
            return _error(f"Get parameter by name failed: no parameter {e}")
        except (ProtocolError, ValueError, TypeError) as e:
            return _error(str(e))
        return web.json_response(values)


def emulator_manager(model_path: str, n: int, log_dir: str, device: str = "cuda"):
    """A ServerManager running this double (``--device cuda``: the colocated GPU tests)."""
    import sys

    from maspo_megatron.rollout.servers import ServerManager

    return ServerManager(lambda port, host: [sys.executable, __file__, "--model-path", model_path,
                                             "--host", host, "--port", str(port), "--device", device],
                         n, startup_timeout_s=120, log_dir=log_dir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--weight-update-timeout", type=float, default=600.0,
                    help="seconds before a weight-update collective gives up")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the model lives; cuda enables /update_weights_from_tensor (CUDA-IPC)")
    ap.add_argument("--weights-cpu-backup", action="store_true",
                    help="keep a CPU copy of released weights (SGLang's --enable-weights-cpu-backup)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cpu_server %(message)s")
    torch.set_num_threads(args.threads)
    server = CPUServer(args.model_path, api_key=args.api_key,
                       weight_update_timeout_s=args.weight_update_timeout, device=args.device,
                       weights_cpu_backup=args.weights_cpu_backup)
    logger.info("serving %s on %s (%s):%d", args.model_path, args.host, args.device, args.port)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
