"""Unit tests of the SGLang wire format, the command builder and the client's retry logic.

References are SGLang 0.5.23's own code where it runs here (its FlattenedTensorBucket receiver);
the client-vs-stub tests inject faults the real server cannot be made to produce on demand
(a 503, an abort, a malformed body), which is what those stubs are for.
"""

import asyncio
import json

import pytest
import torch
from aiohttp import web

from maspo_megatron.rollout.backend import ServerSpec, SamplingConfig, SamplingParams
from maspo_megatron.rollout.client import (
    RolloutClient, RolloutClientConfig, RolloutError, RolloutRequest, RolloutRequestError,
)
from maspo_megatron.rollout.servers import free_port, router_command
from maspo_megatron.rollout.sglang import BACKEND, server as sglang_server
from maspo_megatron.rollout.sglang.wire import ProtocolError, error_message, parse_generate_response
from maspo_megatron.rollout.weight_sync import (
    WeightSyncConfig, WeightSyncer, flatten_bucket, iter_buckets, order_for_alignment,
)


def _mixed():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.bf16_odd", torch.randn(3, 5, generator=g).to(torch.bfloat16)),  # 30 bytes
        ("b.fp32", torch.randn(7, generator=g)),
        ("c.int8", torch.randint(-5, 5, (3,), generator=g, dtype=torch.int8)),
        ("d.fp16", torch.randn(2, 3, generator=g).half()),
        ("e.fp64", torch.randn(2, generator=g, dtype=torch.float64)),
    ]


def test_flattened_bucket_mixed_dtypes_is_what_sglangs_receiver_rebuilds():
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    named = order_for_alignment(_mixed())
    assert [t.element_size() for _, t in named] == [8, 4, 2, 2, 1]
    flat, metas = flatten_bucket(named)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size() for _, t in named)
    # SGLang's receiver allocates from the request's names/dtypes/shapes and rebuilds in place.
    recv = FlattenedTensorBucket.empty([m.name for m in metas],
                                       [str(m.dtype).removeprefix("torch.") for m in metas],
                                       [list(m.shape) for m in metas], "cpu")
    recv.get_flattened_tensor().copy_(flat)
    for (name, sent), (rname, got) in zip(named, recv.reconstruct_tensors()):
        assert name == rname and got.dtype == sent.dtype and torch.equal(got, sent)
    assert [m.start for m in metas[1:]] == [m.end for m in metas[:-1]]  # no padding


def test_misaligned_bucket_order_is_rejected_with_the_fix_named():
    named = [("odd_bf16", torch.zeros(3, dtype=torch.bfloat16)), ("w", torch.zeros(2))]
    with pytest.raises(ValueError, match="'w' would start at byte 6.*order_for_alignment"):
        flatten_bucket(named)


def test_iter_buckets_respects_size_and_keeps_oversized_tensor_alone():
    named = [(f"t{i}", torch.zeros(10)) for i in range(5)] + [("big", torch.zeros(100))] + [
        ("tail", torch.zeros(10, dtype=torch.bfloat16))]
    buckets = list(iter_buckets(named, bucket_bytes=100))
    names = [[n for n, _ in b] for b in buckets]
    assert names == [["t0", "t1"], ["t2", "t3"], ["t4"], ["big"], ["tail"]]
    assert sorted(n for b in names for n in b) == sorted(n for n, _ in named)


def test_sampling_config_is_validated_and_training_refuses_filtering():
    from maspo_megatron.config import ConfigError, apply_overrides
    from maspo_megatron.trainer import TrainerConfig

    with pytest.raises(ValueError, match=r"rollout.sampling.top_p must be in \(0, 1\]"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="rollout.sampling.top_k must be -1"):
        SamplingConfig(top_k=0)
    with pytest.raises(ValueError, match="rollout.sampling.temperature must be > 0"):
        SamplingConfig(temperature=0)
    for key in ("rollout.sampling.top_p=0.9", "rollout.sampling.top_k=20"):
        with pytest.raises(ConfigError, match="no correction for filtering"):
            apply_overrides(TrainerConfig(), [key])
    with pytest.raises(ConfigError, match="unknown config key 'rollout.temperature'"):
        apply_overrides(TrainerConfig(), ["rollout.temperature=0.7"])


def test_parse_generate_response_checks_fields_and_token_alignment():
    ok = {"output_ids": [5, 6], "meta_info": {
        "finish_reason": {"type": "stop", "matched": 6}, "prompt_tokens": 3, "completion_tokens": 2,
        "weight_version": "3", "output_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None]],
        "input_token_logprobs": []}}  # SGLang's default when no prompt log-probs are asked for
    (out,) = parse_generate_response(ok, 1, True)
    assert out.output_logprobs == [-1.0, -2.0] and out.finish_reason == "stop" and out.weight_version == "3"
    assert out.input_logprobs is None
    bad = json.loads(json.dumps(ok))
    bad["meta_info"]["output_token_logprobs"][1][1] = 9
    with pytest.raises(ProtocolError, match=r"output_token_logprobs\[1\]: token id 9"):
        parse_generate_response(bad, 1, True)
    with pytest.raises(ProtocolError, match="missing field 'meta_info'"):
        parse_generate_response({"output_ids": []}, 1, True)
    with pytest.raises(ProtocolError, match="returned 1 outputs, expected 2"):
        parse_generate_response(ok, 2, True)


def test_score_reads_prompt_logprobs_and_ignores_the_next_token_sglang_may_add():
    # The body SGLang 0.5.23 answered a score request (max_new_tokens=0) with in the one_step_off
    # abort run: no output ids, yet one output log-prob (the token it would sample next).
    body = {"output_ids": [], "meta_info": {
        "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": 3, "completion_tokens": 0,
        "output_token_logprobs": [[-2.82, 7, None]],
        "input_token_logprobs": [[None, 4, None], [-1.5, 9, None], [-0.25, 2, None]]}}
    assert BACKEND.parse_score([body], [3]) == [[-1.5, -0.25]]
    with pytest.raises(ProtocolError, match="1 entries for 0 tokens"):
        parse_generate_response(body, 1, True)
    short = json.loads(json.dumps(body))
    short["meta_info"]["input_token_logprobs"] = short["meta_info"]["input_token_logprobs"][:2]
    with pytest.raises(ProtocolError, match="2 input_token_logprobs for 3 tokens"):
        BACKEND.parse_score([short], [3])


def test_weight_version_spans_become_per_token_versions():
    # SGLang 0.5.23 records the spans when /update_weight_version lands during a request.
    body = {"output_ids": [5, 6, 7], "meta_info": {
        "finish_reason": {"type": "length"}, "weight_version": "4",
        "output_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None], [-1.5, 7, None]],
        "weight_versions": [{"version": "3", "start": 0, "end": 2}, {"version": "4", "start": 2, "end": 3}]}}
    (out,) = parse_generate_response(body, 1, True)
    assert out.token_versions == ["3", "3", "4"] and out.weight_version == "4"
    body["meta_info"]["weight_versions"][1]["start"] = 1
    with pytest.raises(ProtocolError, match="weight_versions: expected contiguous spans"):
        parse_generate_response(body, 1, True)
    body["meta_info"]["weight_versions"] = [{"version": "3", "start": 0, "end": 2}]
    with pytest.raises(ProtocolError, match="weight_versions cover 2 tokens, the output has 3"):
        parse_generate_response(body, 1, True)
    del body["meta_info"]["weight_versions"]
    assert parse_generate_response(body, 1, True)[0].token_versions is None


def test_error_message_extracts_the_shapes_sglang_0_5_23_answers():
    assert error_message(400, '{"error": "unknown field `foo`"}') == "unknown field `foo`"
    assert error_message(400, '{"object": "error", "message": "bad top_p", "code": 400}') == "bad top_p"
    assert error_message(400, '{"success": false, "message": "no group"}') == "no group"
    assert error_message(400, '{"error": {"message": "nested"}}') == "nested"
    assert error_message(502, "upstream died") == "upstream died"


def test_server_command_gpu_and_cpu():
    spec = ServerSpec(model_path="/m", tp_size=2, mem_fraction_static=0.7, memory_saver=True,
                      api_key="k", dtype="bfloat16", base_gpu_id=4, extra_args=["--log-level", "warning"])
    cmd, env = sglang_server.server_command(spec, 30001, "10.0.0.5", python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"] and env == {}
    joined = " ".join(cmd)
    for part in ("--model-path /m", "--tp-size 2", "--host 10.0.0.5", "--port 30001",
                 "--mem-fraction-static 0.7", "--enable-memory-saver", "--skip-tokenizer-init",
                 "--api-key k", "--dtype bfloat16", "--base-gpu-id 4", "--log-level warning"):
        assert part in joined
    assert "--device" not in cmd
    with pytest.raises(ValueError, match="mem_fraction_static must be in"):
        sglang_server.server_command(ServerSpec("/m", mem_fraction_static=1.5), 1, "h")
    cpu, env = sglang_server.server_command(ServerSpec("/m", device="cpu"), 1, "h")
    for flag in sglang_server.CPU_FLAGS + ["--dtype", "float32", "--max-total-tokens"]:
        assert flag in cpu
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    # The stand-in sgl_kernel goes on the server's path only when no real build is importable.
    assert env["PYTHONPATH"].split(":")[0] == sglang_server.SHIM_DIR
    r = router_command(["http://a:1", "http://b:2"], 30000, python="py")
    assert r[:3] == ["py", "-m", "sglang_router.launch_router"]
    assert r[r.index("--worker-urls") + 1:][:2] == ["http://a:1", "http://b:2"]


def test_model_checks_name_the_key():
    with pytest.raises(ValueError, match="rollout.sglang_tp=3 does not divide the model's 4 attention heads"):
        BACKEND.check_model(ServerSpec("/m", tp_size=3), {"num_attention_heads": 4})
    with pytest.raises(ValueError, match="rollout.sglang_tp=12 with 8 key/value heads"):
        BACKEND.check_model(ServerSpec("/m", tp_size=12), {"num_attention_heads": 96, "num_key_value_heads": 8})
    BACKEND.check_model(ServerSpec("/m", tp_size=16), {"num_attention_heads": 64, "num_key_value_heads": 8})


def test_weight_sync_config_errors():
    from maspo_megatron.config import ConfigError, apply_overrides
    from maspo_megatron.trainer import TrainerConfig

    with pytest.raises(ValueError, match="disk_dir is required"):
        WeightSyncer(["http://x"], WeightSyncConfig(mode="disk"))
    with pytest.raises(ValueError, match="sender_group"):
        WeightSyncer(["http://x"], num_senders=2, sender_index=1)
    with pytest.raises(ConfigError, match=r"weight_sync.mode must be one of \['distributed', 'disk', 'colocated'\], got 'typo'"):
        apply_overrides(TrainerConfig(), ["weight_sync.mode=typo"])


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

    with pytest.raises(RolloutError, match="malformed generate response.*finish_reason"):
        _run_stub(garbage, lambda url: RolloutClient([url], FAST).generate(req))


def test_client_rejects_duplicate_indices_and_n_gt_1():
    c = RolloutClient(["http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="unique"):
        asyncio.run(c.generate([RolloutRequest(0, (1,), SamplingParams())] * 2))
    with pytest.raises(ValueError, match="one request per sample"):
        asyncio.run(c.generate([RolloutRequest(0, (1,), SamplingParams(n=2))]))


def test_per_server_limits_are_validated_and_spread_by_room():
    with pytest.raises(ValueError, match="read_server_limits and max_running_per_server are exclusive"):
        RolloutClientConfig(read_server_limits=True, max_running_per_server=2)
    with pytest.raises(ValueError, match="max_running_per_server must be >= 1"):
        RolloutClientConfig(max_running_per_server=0)
    client = RolloutClient(["http://a:1", "http://b:2"])
    with pytest.raises(ValueError, match="a limit >= 1 for every URL"):
        client.set_limits({"http://a:1": 4})
    client.set_limits({"http://a:1": 4, "http://b:2": 2})
    assert client._capacity() == 6
    # Each pick goes to the server with the most room relative to its limit: a fills to 4, b to 2.
    picks = [client._pick(None) for _ in range(6)]
    assert picks.count("http://a:1") == 4 and picks.count("http://b:2") == 2
    assert client.peak_inflight == {"http://a:1": 4, "http://b:2": 2}
