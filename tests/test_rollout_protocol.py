"""Unit tests of the SGLang wire helpers and command builders (no processes)."""

import asyncio
import json

import pytest
import torch
from aiohttp import web

from maspo_megatron.rollout.client import (
    RolloutClient, RolloutClientConfig, RolloutError, RolloutRequest, RolloutRequestError,
)
from maspo_megatron.rollout.protocol import (
    ProtocolError, SamplingParams, bucket_layout, error_message, flatten_bucket,
    order_for_alignment, parse_generate_response, unflatten_bucket,
)
from maspo_megatron.rollout.servers import (
    SGLangServerConfig, cpu_server_command, free_port, router_command, sglang_server_command,
)
from maspo_megatron.rollout.weight_sync import WeightSyncConfig, WeightSyncer, iter_buckets


def _mixed():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.bf16_odd", torch.randn(3, 5, generator=g).to(torch.bfloat16)),  # 30 bytes
        ("b.fp32", torch.randn(7, generator=g)),
        ("c.int8", torch.randint(-5, 5, (3,), generator=g, dtype=torch.int8)),
        ("d.fp16", torch.randn(2, 3, generator=g).half()),
        ("e.fp64", torch.randn(2, generator=g, dtype=torch.float64)),
    ]


def test_flattened_bucket_mixed_dtypes_roundtrip_matches_sglang_layout():
    named = order_for_alignment(_mixed())
    assert [t.element_size() for _, t in named] == [8, 4, 2, 2, 1]
    flat, metas = flatten_bucket(named)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size() for _, t in named)
    # SGLang's receiver rebuilds the layout from the request's names/dtypes/shapes strings.
    recv = bucket_layout([m.name for m in metas], [str(m.dtype).removeprefix("torch.") for m in metas],
                         [list(m.shape) for m in metas])
    assert recv == metas
    for (name, sent), (rname, got) in zip(named, unflatten_bucket(flat.clone(), recv)):
        assert name == rname and got.dtype == sent.dtype and torch.equal(got, sent)
    # Byte offsets are contiguous (no padding), as SGLang's FlattenedTensorBucket.
    assert [m.start for m in metas[1:]] == [m.end for m in metas[:-1]]


def test_misaligned_bucket_order_is_rejected_with_the_fix_named():
    named = [("odd_bf16", torch.zeros(3, dtype=torch.bfloat16)), ("w", torch.zeros(2))]
    with pytest.raises(ProtocolError, match="'w' .* starts at byte 6.*largest first"):
        flatten_bucket(named)
    with pytest.raises(ProtocolError, match="unknown dtype 'torch.bfloat16'"):
        bucket_layout(["x"], ["torch.bfloat16"], [[2]])


def test_iter_buckets_respects_size_and_keeps_oversized_tensor_alone():
    named = [(f"t{i}", torch.zeros(10)) for i in range(5)] + [("big", torch.zeros(100))] + [
        ("tail", torch.zeros(10, dtype=torch.bfloat16))]
    buckets = list(iter_buckets(named, bucket_bytes=100))
    names = [[n for n, _ in b] for b in buckets]
    assert names == [["t0", "t1"], ["t2", "t3"], ["t4"], ["big"], ["tail"]]
    assert sorted(n for b in names for n in b) == sorted(n for n, _ in named)


def test_sampling_params_validation_uses_sglang_wording():
    with pytest.raises(ProtocolError, match=r"top_p must be in \(0, 1\], got 0"):
        SamplingParams.from_json({"top_p": 0})
    with pytest.raises(ProtocolError, match="top_k must be -1"):
        SamplingParams.from_json({"top_k": 0})
    with pytest.raises(ProtocolError, match="repetition_penalty=1.3 is not supported"):
        SamplingParams.from_json({"repetition_penalty": 1.3})
    assert SamplingParams.from_json({"repetition_penalty": 1.0}).temperature == 1.0


def test_parse_generate_response_checks_fields_and_token_alignment():
    ok = {"output_ids": [5, 6], "meta_info": {
        "finish_reason": {"type": "stop", "matched": 6}, "prompt_tokens": 3, "completion_tokens": 2,
        "weight_version": "3", "output_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None]]}}
    (out,) = parse_generate_response(ok, 1, True)
    assert out.output_logprobs == [-1.0, -2.0] and out.finish_reason == "stop" and out.weight_version == "3"
    bad = json.loads(json.dumps(ok))
    bad["meta_info"]["output_token_logprobs"][1][1] = 9
    with pytest.raises(ProtocolError, match=r"output_token_logprobs\[1\]: token id 9"):
        parse_generate_response(bad, 1, True)
    with pytest.raises(ProtocolError, match="missing field 'meta_info'"):
        parse_generate_response({"output_ids": []}, 1, True)
    with pytest.raises(ProtocolError, match="returned 1 outputs, expected 2"):
        parse_generate_response(ok, 2, True)


def test_error_message_extracts_sglang_shapes():
    assert error_message(400, '{"error": {"message": "bad top_p"}}') == "bad top_p"
    assert error_message(400, '{"success": false, "message": "no group"}') == "no group"
    assert error_message(502, "upstream died") == "upstream died"


def test_command_builders():
    cfg = SGLangServerConfig(model_path="/m", tp_size=2, mem_fraction_static=0.7,
                             enable_memory_saver=True, api_key="k", dtype="bfloat16",
                             extra_args=["--log-level", "warning"])
    cmd = sglang_server_command(cfg, 30001, python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    joined = " ".join(cmd)
    for part in ("--model-path /m", "--tp-size 2", "--port 30001", "--mem-fraction-static 0.7",
                 "--enable-memory-saver", "--skip-tokenizer-init", "--api-key k", "--dtype bfloat16",
                 "--log-level warning"):
        assert part in joined
    assert "--enable-memory-saver" not in sglang_server_command(SGLangServerConfig("/m"), 1)
    with pytest.raises(ValueError, match="mem_fraction_static must be in"):
        sglang_server_command(SGLangServerConfig("/m", mem_fraction_static=1.5), 1)
    r = router_command(["http://a:1", "http://b:2"], 30000, python="py")
    assert r[:3] == ["py", "-m", "sglang_router.launch_router"]
    assert r[r.index("--worker-urls") + 1:][:2] == ["http://a:1", "http://b:2"]
    assert cpu_server_command("/m", 5)[1:3] == ["-m", "maspo_megatron.rollout.cpu_server"]


def test_weight_sync_config_errors():
    with pytest.raises(ValueError, match="disk_dir is required"):
        WeightSyncer(["http://x"], WeightSyncConfig(mode="disk"))
    with pytest.raises(ValueError, match="turn_barrier"):
        WeightSyncer(["http://x"], num_senders=2, sender_index=1)


# --------------------------------------------------------------------------- client vs stubs
def _run_stub(handler, coro_fn):
    """Serves ``handler`` on a free port in this event loop while ``coro_fn(url)`` runs."""
    async def main():
        app = web.Application()
        app.router.add_post("/generate", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            return await coro_fn(f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()
    return asyncio.run(main())


def _valid(ids):
    return {"output_ids": ids, "meta_info": {
        "finish_reason": {"type": "length", "length": len(ids)}, "prompt_tokens": 1,
        "completion_tokens": len(ids), "weight_version": "default",
        "output_token_logprobs": [[-0.5, t, None] for t in ids]}}


FAST = RolloutClientConfig(backoff_initial_s=0.01, max_attempts=3)


def test_client_retries_5xx_and_abort_then_succeeds():
    calls = []

    async def handler(request):
        calls.append(1)
        if len(calls) == 1:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if len(calls) == 2:
            return web.json_response({"output_ids": [], "meta_info": {
                "finish_reason": {"type": "abort", "message": "paused"}}})
        return web.json_response(_valid([7, 8]))

    req = [RolloutRequest(0, (1, 2), SamplingParams(max_new_tokens=2))]
    (s,) = _run_stub(handler, lambda url: RolloutClient([url], FAST).generate(req))
    assert s.output_ids == [7, 8] and s.logprobs == [-0.5, -0.5] and s.attempts == 3


def test_client_quotes_4xx_and_malformed_bodies_without_retrying():
    calls = []

    async def reject(request):
        calls.append(1)
        return web.json_response({"error": {"message": "top_p must be in (0, 1]"}}, status=400)

    req = [RolloutRequest(0, (1,), SamplingParams())]
    with pytest.raises(RolloutRequestError, match=r"HTTP 400: top_p must be in \(0, 1\]"):
        _run_stub(reject, lambda url: RolloutClient([url], FAST).generate(req))
    assert len(calls) == 1

    async def garbage(request):
        return web.Response(text='{"output_ids": [1], "meta_info": {"finish_reason": 3}}')

    with pytest.raises(RolloutError, match="malformed /generate response.*finish_reason"):
        _run_stub(garbage, lambda url: RolloutClient([url], FAST).generate(req))


def test_client_rejects_duplicate_indices_and_n_gt_1():
    c = RolloutClient(["http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="unique"):
        asyncio.run(c.generate([RolloutRequest(0, (1,), SamplingParams())] * 2))
    with pytest.raises(ValueError, match="one request per sample"):
        asyncio.run(c.generate([RolloutRequest(0, (1,), SamplingParams(n=2))]))
