"""benchmarks/simulated_server.py (the overlap benchmark's SIMULATED rollout server) still answers
the trainer's protocol: the real client and SGLang backend talk to it, its prompt log-probs match
an HF forward of the served weights, response tokens follow the stated distribution at almost
no host cost, the running-request limit holds with the rest queued, decode is paced by the
latency model, and pause abort / retract behave as SGLang's."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import urllib.request

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from simulated_server import decode_step_s, simulated_manager  # noqa: E402

LIMIT, SCALE = 3, 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from maspo_megatron.demo import prepare_assets

    root = tmp_path_factory.mktemp("sim")
    assets = prepare_assets(str(root))
    manager = simulated_manager(assets["model"], 1, str(root), max_running=LIMIT, time_scale=SCALE)
    manager.start()
    try:
        yield {"url": manager.urls[0], "model": assets["model"]}
    finally:
        manager.stop()


def _post(url, path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _get(url, path):
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


def test_generate_logprobs_limit_and_pacing(server):
    from transformers import AutoModelForCausalLM

    from maspo_megatron.rollout.sglang import BACKEND

    url = server["url"]
    assert BACKEND.max_running_requests(url) == LIMIT
    prompt = [2, 5, 7, 9, 11]
    before = _get(url, "/sim_stats")
    t0 = time.monotonic()
    body = {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"n": 6, "max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True,
                                "sampling_seed": 1}}
    outs = _post(url, "/generate", body)
    wall = time.monotonic() - t0
    after = _get(url, "/sim_stats")
    assert len(outs) == 6
    for o in outs:
        meta = o["meta_info"]
        assert len(o["output_ids"]) == 8 and meta["finish_reason"] == {"type": "length", "length": 8}
        assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": 8}]
        assert len(meta["output_token_logprobs"]) == 8
    # Prompt log-probs of the served weights, against an HF forward.
    model = AutoModelForCausalLM.from_pretrained(server["model"], dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
    ref = [float(lp[q - 1, prompt[q]]) for q in range(1, len(prompt))]
    got = [t[0] for t in outs[0]["meta_info"]["input_token_logprobs"][1:]]
    assert got == pytest.approx(ref, abs=1e-5)
    # 6 requests, 3 at a time: two waves of 8 decode steps, none with more than LIMIT running.
    assert after["peak_running"] == LIMIT and after["decode_steps"] - before["decode_steps"] == 16
    assert after["tokens"] - before["tokens"] == 48
    modelled = SCALE * 16 * decode_step_s(LIMIT, 0)
    assert wall >= 0.95 * modelled, (wall, modelled)
    # Decoding is cheap for the host (the trainer shares its cores): the real compute, one prompt
    # forward included, is a small part of the modelled time slept.
    compute = after["compute_s"] - before["compute_s"]
    assert compute < 0.25 * (after["busy_s"] - before["busy_s"]), (compute, after, before)
    # A token's stated log-prob does not depend on the sample or the position.
    by_token = {}
    for o in outs:
        for lp, tok, _ in o["meta_info"]["output_token_logprobs"]:
            assert by_token.setdefault(tok, lp) == lp
    assert sum(math.exp(v) for v in by_token.values()) <= 1 + 1e-9
    # The trainer's parser accepts the answer (per-token versions included).
    from maspo_megatron.rollout.sglang import wire

    parsed = wire.parse_generate_response(outs, 6, True)
    assert all(p.output_ids == o["output_ids"] and p.token_versions == ["default"] * 8 for p, o in zip(parsed, outs))


def test_stated_eos_probability(server):
    """EOS has the stated probability (0.05 per token at temperature 1): its reported log-prob
    is log 0.05, and lengths follow the truncated geometric distribution's mean."""
    q, cap, n = 0.05, 40, 30
    body = {"input_ids": [2, 5, 7], "return_logprob": True,
            "sampling_params": {"n": n, "max_new_tokens": cap, "temperature": 1.0, "sampling_seed": 3}}
    outs = _post(server["url"], "/generate", body)
    stops = [o for o in outs if o["meta_info"]["finish_reason"]["type"] == "stop"]
    assert stops and all(o["meta_info"]["output_token_logprobs"][-1][0] == pytest.approx(math.log(q), abs=1e-9)
                         for o in stops)
    lengths = [len(o["output_ids"]) for o in outs]
    mean = (1 - (1 - q) ** cap) / q  # E[min(Geometric(q), cap)]
    sd = math.sqrt((1 - q)) / q  # the uncapped sd, larger than the capped one
    assert abs(sum(lengths) / n - mean) < 3 * sd / math.sqrt(n), (lengths, mean)
    again = _post(server["url"], "/generate", body)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in outs]  # sampling_seed


def _in_background(url, body):
    box = {}
    t = threading.Thread(target=lambda: box.update(out=_post(url, "/generate", body)))
    t.start()
    return t, box


def test_pause_abort_and_retract(server):
    url = server["url"]
    body = {"input_ids": [2, 5, 7], "return_logprob": True,
            "sampling_params": {"n": 2, "max_new_tokens": 40, "temperature": 1.0, "ignore_eos": True}}
    t, box = _in_background(url, body)
    time.sleep(0.3)
    _post(url, "/pause_generation", {"mode": "abort"})
    t.join(30)
    assert [o["meta_info"]["finish_reason"]["type"] for o in box["out"]] == ["abort", "abort"]
    assert all(0 < len(o["output_ids"]) < 40 for o in box["out"])
    _post(url, "/continue_generation", {})

    t, box = _in_background(url, body)
    time.sleep(0.3)
    _post(url, "/pause_generation", {"mode": "retract"})
    _post(url, "/update_weight_version", {"new_version": "1"})
    time.sleep(0.2)
    assert t.is_alive()  # retracted requests wait for continue
    _post(url, "/continue_generation", {})
    t.join(30)
    for o in box["out"]:
        spans = o["meta_info"]["weight_versions"]
        assert len(o["output_ids"]) == 40 and [s["version"] for s in spans] == ["default", "1"], spans
        assert spans[0]["end"] == spans[1]["start"] and spans[1]["end"] == 40
    _post(url, "/update_weight_version", {"new_version": "default"})
