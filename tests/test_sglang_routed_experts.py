"""Routing replay (R3), rollout side: the real SGLang 0.5.23 CPU server returns each token's
routed experts for a tiny HF Qwen3-MoE, and they are the experts HF transformers routes to.

The server runs with ``--enable-return-routed-experts``; on CPU that needs
``cpu_shim/sitecustomize.py`` (unpinned host buffer; the test checks the patch ran). The
reference is an HF forward of prompt + output with ``output_router_logits=True``: top-k of the
router's softmax per layer and token, compared as sets (SGLang's top-k order is its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import pytest
import torch

from maspo_megatron.rollout.backend import SamplingParams
from maspo_megatron.rollout.client import RolloutClient, RolloutRequest
from maspo_megatron.rollout.sglang import BACKEND, cpu_shim, wire

from test_sglang_real import cpu_server as real_cpu_server

LAYERS, EXPERTS, TOPK = 2, 4, 2


def build_tiny_qwen3_moe(path: str, seed: int = 0, scale: float = 0.3):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, num_experts=EXPERTS, num_experts_per_tok=TOPK, norm_topk_prob=True,
                         decoder_sparse_step=1, max_position_embeddings=128, bos_token_id=0,
                         eos_token_id=1, tie_word_embeddings=False, dtype="float32")
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, scale)
    model.save_pretrained(path)
    return model


def hf_routes(model, ids: list[int]) -> torch.Tensor:
    """``[len(ids), layers, topk]`` top-k experts of HF's router, sorted per token."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
    per_layer = [torch.topk(torch.softmax(r.float(), -1), TOPK, -1).indices for r in out.router_logits]
    return torch.stack(per_layer, 1).sort(-1).values


@contextlib.contextmanager
def cpu_server(model_dir: str, log_dir: str, *, dtype: str = "float32", routes: bool = True):
    """A real SGLang CPU server for ``model_dir`` (with routed experts when ``routes``); yields
    ``(url, shim_log)``."""
    with real_cpu_server(model_dir, log_dir, dtype=dtype, max_total_tokens=4096,
                         extra_args=BACKEND.routing_replay_args() if routes else []) as (url, shim_log, _):
        yield url, shim_log


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang_r3")
    model_dir = str(root / "model")
    model = build_tiny_qwen3_moe(model_dir)
    with cpu_server(model_dir, str(root)) as (url, shim_log):
        yield url, model, shim_log


@pytest.mark.sglang
def test_server_returns_the_routes_hf_computes(moe_server):
    url, model, shim_log = moe_server
    prompts = [[5, 17, 9, 42, 3, 28], [7, 2, 30], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    client = RolloutClient([url], vocab_size=64, routes=(LAYERS, TOPK))
    requests = [RolloutRequest(i, tuple(p), SamplingParams(max_new_tokens=7, temperature=1.0, ignore_eos=True,
                                                           sampling_seed=i))
                for i, p in enumerate(prompts)]
    samples = client.run(requests)
    total = same = 0
    for s in samples:
        ids = s.prompt_ids + s.output_ids
        routes = s.routed_experts
        # Every forwarded token: the prompt and all output tokens but the last.
        assert routes.shape == (len(ids) - 1, LAYERS, TOPK) and routes.dtype == torch.int32
        ref = hf_routes(model, ids)[:-1]
        got = routes.sort(-1).values
        total += got.numel()
        same += int((got == ref).sum())
    print(f"routes equal to HF's: {same}/{total}", file=sys.stderr)
    assert same == total
    with open(shim_log) as f:
        events = [json.loads(line) for line in f]
    assert any(e["event"] == "patch" for e in events), "the unpinned-allocator patch did not run"
    assert not [e for e in events if e["event"] == "call" and e["op"] != "assign_req_to_token_pool_cpu"]


@pytest.mark.sglang
def test_an_answer_without_routes_is_an_error(moe_server):
    url, _, _ = moe_server
    # A request that does not ask for routes: the server's answer has none, and a parse that
    # expects them fails naming the field (the client adds the sample's index).
    sampling = SamplingParams(max_new_tokens=2, ignore_eos=True)
    body = BACKEND.generate_request([5, 6, 7], sampling)
    assert "return_routed_experts" not in body
    import urllib.request

    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        answer = json.loads(resp.read().decode())
    assert "routed_experts" not in answer["meta_info"]
    with pytest.raises(wire.ProtocolError, match="routed_experts"):
        BACKEND.parse_generate(answer, 1, True, (LAYERS, TOPK))
    asked = BACKEND.generate_request([5, 6, 7], sampling, routed_experts=True)
    assert asked["return_routed_experts"] is True and asked["routed_experts_start_len"] == 0


def test_decode_routed_experts_checks_the_size():
    import base64

    import numpy as np

    arr = np.arange(3 * 2 * 2, dtype=np.int32)
    meta = {"routed_experts": base64.b64encode(arr.tobytes()).decode()}
    out = wire.decode_routed_experts(meta, "x", tokens=4, layers=2, topk=2)
    assert out.tolist() == torch.from_numpy(arr).reshape(3, 2, 2).tolist()
    with pytest.raises(wire.ProtocolError, match="expected 16"):
        wire.decode_routed_experts(meta, "x", tokens=5, layers=2, topk=2)
    with pytest.raises(wire.ProtocolError, match="enable-return-routed-experts"):
        wire.decode_routed_experts({}, "x", tokens=4, layers=2, topk=2)


def test_sitecustomize_patches_only_cpu_and_refuses_cuda(monkeypatch):
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("maspo_cpu_sitecustomize",
                                                  os.path.join(cpu_shim.SHIM_DIR, "sitecustomize.py"))
    site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(site)
    try:
        sentinel = object()
        module = types.SimpleNamespace(ALLOC_MEMORY_FUNCS={"xpu": sentinel})
        site.patch(module)
        assert module.ALLOC_MEMORY_FUNCS["cpu"] is site.alloc_unpinned
        assert module.ALLOC_MEMORY_FUNCS["xpu"] is sentinel
        buf = site.alloc_unpinned((3, 2), torch.int32, "cpu", True, None)
        assert buf.shape == (3, 2) and not buf.is_pinned()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises(RuntimeError, match="CUDA device visible"):
            site.patch(types.SimpleNamespace(ALLOC_MEMORY_FUNCS={}))
    finally:
        import sys as _sys
        _sys.meta_path[:] = [f for f in _sys.meta_path if type(f).__name__ != "_PatchAfterLoad"]
