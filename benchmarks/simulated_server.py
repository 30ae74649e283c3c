"""SIMULATED rollout server for the overlap benchmark (benchmarks/overlap.py): not SGLang, not a GPU.

Real SGLang on these CPUs generates far too slowly next to the tiny model's training for overlap
to show honestly, so this server *paces* decoding to a GPU-like latency model, with a
running-request limit and a waiting queue as SGLang's scheduler has. It runs on the trainer's
cores, so it must cost them next to nothing: response tokens are NOT the model's but drawn from a
stated distribution (:class:`SimEngine`: valid token ids, their stated log-probs, EOS with a set
probability per token), while it holds the real HF model for what the trainer checks: the weight
sync lands in it and the sync's proof gets prompt log-probs from a real forward of those
weights. Weight versions per token, finish reasons and pause behaviour are SGLang's.

Protocol: the HTTP surface of ``tests/doubles/sglang_emulator.py`` (SGLang 0.5.23's, as the
trainer uses it: weight-update group over gloo, ``/update_weights_from_distributed``,
``/model_info``, ``/health``, ...), reused by subclassing, with generation replaced by a
continuous-batching scheduler: ``/generate`` with n / log-probs, finish reasons, per-token
``meta_info.weight_versions`` spans, pause modes ``abort`` (running and queued requests end with
finish type ``abort``) and ``retract`` (running requests go back to the queue with their tokens and
are recomputed, under the weights then loaded, after ``/continue_generation``), and
``/server_info`` with ``internal_states[0].effective_max_running_requests_per_dp``.
``GET /sim_stats`` returns the scheduler's cumulative counters (running-batch size integrated
over busy time, tokens, decode steps, the host's real compute time, overruns).

Latency model (a roofline, not a measurement): Llama-3.1-8B in bf16 on one H100 SXM.
One decode step of a running batch of B requests with total context C tokens takes

    t(B, C) = T_OVERHEAD + max(bytes / (HBM_BW * BW_EFF), flops / (PEAK_FLOPS * MFU))
    bytes   = WEIGHT_BYTES + C * KV_BYTES_PER_TOKEN,   flops = 2 * PARAMS * B

with PARAMS = 8.03e9 (WEIGHT_BYTES = 2 * PARAMS), KV_BYTES_PER_TOKEN = 32 layers * 8 KV heads *
128 dims * 2 (K, V) * 2 bytes = 131072, HBM_BW = 3.35e12 B/s (H100 SXM datasheet), BW_EFF = 0.7,
PEAK_FLOPS = 989e12 (dense bf16), MFU = 0.5, T_OVERHEAD = 1.5 ms (scheduling, sampling, launch).
At B = 1 that is ~8.3 ms per token (~120 tokens/s single-stream, in the range usually reported
for 8B models on an H100); it stays memory-bound, nearly flat in B, until the KV reads grow -- the
reason a server should be kept full. A step that admits new requests adds their prefill,
2 * PARAMS * prompt tokens / (PEAK_FLOPS * MFU). ``--time-scale`` multiplies every modelled
time (the benchmark uses it to make a rollout last about as long as the tiny model's CPU training
step, where overlap matters; say which scale in any figure quoted).

The real CPU compute of a step runs before its modelled time is slept off; a step whose compute
alone exceeds the modelled time counts as an overrun (``/sim_stats``), and then the server is
slower than the model says.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import math
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from aiohttp import web

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "doubles"))
from sglang_emulator import (  # noqa: E402
    CPUEngine, CPUServer, ProtocolError, _error, _filtered_probs, _Job, _Released,
)
from sglang_receiver import SAMPLING_EPS  # noqa: E402

logger = logging.getLogger("maspo_megatron.simulated_server")

PARAMS = 8.03e9
WEIGHT_BYTES = 2 * PARAMS
KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2
HBM_BW, BW_EFF = 3.35e12, 0.7
PEAK_FLOPS, MFU = 989e12, 0.5
T_OVERHEAD = 1.5e-3


def decode_step_s(batch: int, context_tokens: int) -> float:
    """The modelled time of one decode step (see the module docstring), unscaled."""
    memory = (WEIGHT_BYTES + context_tokens * KV_BYTES_PER_TOKEN) / (HBM_BW * BW_EFF)
    compute = 2 * PARAMS * batch / (PEAK_FLOPS * MFU)
    return T_OVERHEAD + max(memory, compute)


def prefill_s(tokens: int) -> float:
    return 2 * PARAMS * tokens / (PEAK_FLOPS * MFU)


@dataclass
class _Seq:
    job: _Job
    future: asyncio.Future
    gen: torch.Generator
    out_ids: list[int] = field(default_factory=list)
    out_lp: list[list] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    input_lp: list | None = None
    prefill: bool = True  # the next step (re)computes prompt + output so far (modelled cost)
    finish: dict | None = None
    cancelled: bool = False


class SimEngine(CPUEngine):
    """CPUEngine's model and weight-update groups, with cheap decoding.

    Response tokens are drawn from a STATED distribution, not from the model: fixed seeded
    logits over the vocabulary (standard normal), with the first EOS id's logit set so that it
    has probability ``eos_prob`` at temperature 1 (response lengths then end like a truncated
    geometric). Temperature, top-k and top-p apply to those logits as in SGLang, and each
    token's reported log-prob is ``log_softmax(logits / temperature)[token]`` (untempered when
    greedy). So a decode step costs the host microseconds, and only the modelled GPU time is
    slept: the trainer on the same cores is not slowed by the simulation. Prompt log-probs
    (``logprob_start_len``, the weight-sync proof's probe) come from a real forward of the served
    weights, so the proof still checks what the trainer sent.
    """

    def __init__(self, *args, eos_prob: float = 0.05, **kw):
        super().__init__(*args, **kw)
        self.eos_prob = eos_prob
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(self.vocab_size, generator=g, dtype=torch.float64)
        if self.eos_ids:
            eos = min(self.eos_ids)
            rest = torch.logsumexp(torch.cat([logits[:eos], logits[eos + 1:]]), 0)
            logits[eos] = rest + math.log(eos_prob / (1 - eos_prob))
        self.logits = logits
        self._dists: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _dist(self, p) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs to report, probabilities to sample from) for ``p``'s sampling settings."""
        key = (p.temperature, p.top_k, p.top_p)
        if key not in self._dists:
            greedy = p.temperature < SAMPLING_EPS
            scaled = self.logits if greedy else self.logits / p.temperature
            self._dists[key] = (torch.log_softmax(scaled, -1), _filtered_probs(scaled, p.top_k, p.top_p))
        return self._dists[key]

    def _stops(self, p) -> set[int]:
        stop = set(p.stop_token_ids or ())
        return stop if p.ignore_eos else stop | self.eos_ids

    @torch.no_grad()
    def iteration(self, seqs: list[_Seq], version: str) -> int:
        """One decode step for ``seqs`` (model thread). Returns the number of prompt (and, after
        a retract, output) tokens a GPU would prefill in it."""
        if self.released:
            raise _Released(f"memory is released ({sorted(self.released)})")
        prefilled = 0
        for s in seqs:
            p = s.job.params
            if s.prefill:
                prefilled += len(s.job.input_ids) + len(s.out_ids)
                s.prefill = False
                ids, start = s.job.input_ids, s.job.logprob_start_len
                if s.job.return_logprob and s.input_lp is None:
                    # Only a request asking for prompt log-probs pays for a real forward.
                    s.input_lp = self._input_logprobs(ids, self._forward(ids, None)[0], start) \
                        if start < len(ids) - 1 else [[None, ids[start], None]]
                if p.max_new_tokens == 0:  # a prefill-only request (the proof's probe)
                    s.finish = {"type": "length", "length": 0}
                    continue
            logprobs, probs = self._dist(p)
            tok = int(torch.argmax(self.logits)) if p.temperature < SAMPLING_EPS else \
                int(torch.multinomial(probs, 1, generator=s.gen))
            s.out_ids.append(tok)
            s.out_lp.append([float(logprobs[tok]), tok, None])
            s.versions.append(version)
            if len(s.out_ids) >= p.max_new_tokens:  # SGLang checks the length before stop tokens
                s.finish = {"type": "length", "length": p.max_new_tokens}
            elif tok in self._stops(p):
                s.finish = {"type": "stop", "matched": tok}
        return prefilled


class SimulatedServer(CPUServer):
    def __init__(self, model_path: str, *, max_running: int, time_scale: float, eos_prob: float = 0.05, **kw):
        self.engine_class = functools.partial(SimEngine, eos_prob=eos_prob)
        super().__init__(model_path, **kw)
        self.max_running, self.time_scale = max_running, time_scale
        self.queue: deque[_Seq] = deque()
        self.running_seqs: list[_Seq] = []
        self.wake = asyncio.Event()
        self.stats = {"decode_steps": 0, "busy_s": 0.0, "running_x_s": 0.0, "peak_running": 0,
                      "peak_queued": 0, "tokens": 0, "prefill_tokens": 0, "overruns": 0, "compute_s": 0.0,
                      "requests": 0, "aborted": 0, "retracted": 0}

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/sim_stats", self.sim_stats)
        app.on_startup.append(self._start_scheduler)
        return app

    async def _start_scheduler(self, app):
        app["scheduler"] = asyncio.get_running_loop().create_task(self._schedule())

    # ------------------------------------------------------------------ scheduler
    async def _schedule(self):
        while True:
            self.running_seqs = [s for s in self.running_seqs if not s.cancelled]
            while self.queue and len(self.running_seqs) < self.max_running and self.running.is_set():
                s = self.queue.popleft()
                if not s.cancelled:
                    self.running_seqs.append(s)
            if not self.running_seqs or not self.running.is_set():
                self.wake.clear()
                await self.wake.wait()
                continue
            batch = list(self.running_seqs)
            t0 = time.monotonic()
            try:
                prefilled = await self._on_model_thread(self.engine.iteration, batch, self.weight_version)
            except _Released as e:
                for s in batch:
                    self._finish(s, error=str(e))
                self.running_seqs = []
                continue
            context = sum(len(s.job.input_ids) + len(s.out_ids) for s in batch)
            modelled = self.time_scale * (decode_step_s(len(batch), context) + prefill_s(prefilled))
            compute = time.monotonic() - t0
            if compute > modelled:
                self.stats["overruns"] += 1
            else:
                await asyncio.sleep(modelled - compute)
            step = time.monotonic() - t0
            st = self.stats
            st["decode_steps"] += 1
            st["compute_s"] += compute
            st["busy_s"] += step
            st["running_x_s"] += len(batch) * step
            st["peak_running"] = max(st["peak_running"], len(batch))
            st["tokens"] += len(batch)
            st["prefill_tokens"] += prefilled
            for s in batch:
                if s.finish is not None:
                    self._finish(s)
            self.running_seqs = [s for s in self.running_seqs if s.finish is None]

    def _finish(self, s: _Seq, error: str | None = None):
        if not s.future.done():
            s.future.set_result(error if error is not None else s)

    # ------------------------------------------------------------------ /generate
    async def generate(self, request: web.Request) -> web.Response:
        t0 = time.monotonic()
        try:
            body = await self._json(request)
            jobs, as_list = self._jobs(body)
        except (ProtocolError, TypeError) as e:
            return _error(str(e))
        await self.running.wait()  # requests arriving while paused wait for /continue_generation
        loop = asyncio.get_running_loop()
        seqs = []
        for job in jobs:
            gen = torch.Generator()
            if job.params.sampling_seed is not None:
                gen.manual_seed(int(job.params.sampling_seed) + job.sample_index)
            else:
                gen.seed()
            seqs.append(_Seq(job, loop.create_future(), gen))
        self.queue.extend(seqs)
        self.stats["requests"] += len(seqs)
        self.stats["peak_queued"] = max(self.stats["peak_queued"], len(self.queue))
        self.wake.set()
        try:
            results = await asyncio.gather(*(s.future for s in seqs))
        except asyncio.CancelledError:  # the client closed the connection: SGLang aborts the request
            for s in seqs:
                s.cancelled = True
            raise
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            return _error(errors[0])
        rid = body.get("rid") or uuid.uuid4().hex
        outs = []
        for k, s in enumerate(seqs):
            meta: dict[str, Any] = {
                "finish_reason": s.finish, "prompt_tokens": len(s.job.input_ids),
                "completion_tokens": len(s.out_ids), "cached_tokens": 0,
                "id": rid if len(seqs) == 1 else f"{rid}-{k}", "weight_version": self.weight_version,
                "weight_versions": _spans(s.versions), "e2e_latency": time.monotonic() - t0,
            }
            if s.job.return_logprob:
                meta["output_token_logprobs"] = s.out_lp
                if s.input_lp is not None:
                    meta["input_token_logprobs"] = s.input_lp
            outs.append({"output_ids": s.out_ids, "meta_info": meta})
        return web.json_response(outs if as_list else outs[0])

    # ------------------------------------------------------------------ pause / continue
    async def pause(self, request):
        try:
            mode = (await self._json(request)).get("mode", "abort")
        except ProtocolError as e:
            return _error(str(e))
        if mode not in ("abort", "retract"):
            return _error(f"pause mode {mode!r} is not supported by the simulated server; use 'abort' or 'retract'")
        self.running.clear()
        # Let the decode step under way end, so no sequence changes while it is handled here.
        await self._on_model_thread(lambda: None)
        if mode == "abort":
            for s in [*self.running_seqs, *self.queue]:
                if s.finish is None:
                    s.finish = {"type": "abort", "message": "Abort in waiting queue or running batch."}
                    self.stats["aborted"] += 1
                self._finish(s)
            self.running_seqs, self.queue = [], deque()
        else:  # retract: back to the queue's front, tokens kept, recomputed after continue
            for s in reversed(self.running_seqs):
                if s.finish is None:
                    s.prefill = True
                    self.queue.appendleft(s)
                    self.stats["retracted"] += 1
            self.running_seqs = [s for s in self.running_seqs if s.finish is not None]
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def resume(self, request):
        await self._on_model_thread(lambda: None)
        self.running.set()
        self.wake.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    # ------------------------------------------------------------------ info
    async def server_info(self, request):
        return web.json_response({
            "model_path": self.engine.model_path, "tp_size": 1, "dp_size": 1, "pp_size": 1,
            "device": "cpu", "skip_tokenizer_init": True, "weight_version": self.weight_version,
            "released_memory_tags": sorted(self.engine.released),
            "max_total_num_tokens": self.engine.max_context,
            "max_running_requests": self.max_running,
            "internal_states": [{"effective_max_running_requests_per_dp": self.max_running}],
            "version": "maspo-megatron-SIMULATED-server",
            "simulated": f"GPU latency model (Llama-3.1-8B bf16, H100 roofline) x{self.time_scale}; "
                         f"response tokens from a stated distribution (EOS p={self.engine.eos_prob})",
        })

    async def sim_stats(self, request):
        return web.json_response({**self.stats, "max_running": self.max_running,
                                  "time_scale": self.time_scale, "eos_prob": self.engine.eos_prob, "queued": len(self.queue),
                                  "running": len(self.running_seqs)})


def _spans(versions: list[str]) -> list[dict]:
    """SGLang's ``weight_versions``: contiguous ``{version, start, end}`` runs over the output."""
    spans: list[dict] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == v:
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": v, "start": i, "end": i + 1})
    return spans


def simulated_manager(model_path: str, n: int, log_dir: str, *, max_running: int, time_scale: float,
                      eos_prob: float = 0.05):
    """A ServerManager running ``n`` simulated servers."""
    from maspo_megatron.rollout.servers import ServerManager

    return ServerManager(lambda port, host: [sys.executable, os.path.abspath(__file__), "--model-path", model_path,
                                             "--host", host, "--port", str(port), "--max-running", str(max_running),
                                             "--time-scale", str(time_scale), "--eos-prob", str(eos_prob)],
                         n, startup_timeout_s=120, log_dir=log_dir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--max-running", type=int, default=16, help="running-request limit (SGLang's --max-running-requests)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiplies every modelled GPU time")
    ap.add_argument("--eos-prob", type=float, default=0.05,
                    help="probability of EOS per response token (temperature 1) in the stated distribution")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.max_running < 1 or args.time_scale <= 0 or not 0 < args.eos_prob < 1:
        ap.error("--max-running must be >= 1, --time-scale > 0 and --eos-prob in (0, 1)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s simulated_server %(message)s")
    torch.set_num_threads(args.threads)
    server = SimulatedServer(args.model_path, max_running=args.max_running, time_scale=args.time_scale,
                             eos_prob=args.eos_prob)
    logger.info("SIMULATED server (GPU latency model x%s, max %d running, stated token distribution with "
                "EOS p=%s) for %s on %s:%d", args.time_scale, args.max_running, args.eos_prob, args.model_path,
                args.host, args.port)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None,
                handler_cancellation=True)  # a closed connection aborts its request, as in SGLang


if __name__ == "__main__":
    main()
