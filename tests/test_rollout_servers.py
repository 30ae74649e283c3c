"""End-to-end rollout and weight-sync tests: two real SGLang servers (CPU engine) behind the
real sglang-router.

The "trainer" is a plain HF transformers model in this process (the Megatron exporter plugs in
through the same ``(hf_name, tensor)`` iterable). References are HF forward passes.
"""

import asyncio
import threading
import time

import pytest
import torch

from maspo_megatron.rollout.backend import SamplingParams
from maspo_megatron.rollout.client import (
    RolloutClient, RolloutClientConfig, RolloutError, RolloutRequest, RolloutRequestError,
)
from maspo_megatron.rollout.servers import RouterManager
from maspo_megatron.rollout.weight_sync import WeightSyncConfig, WeightSyncError, WeightSyncer
from sglang_servers import make_family_model, sglang_manager

pytestmark = pytest.mark.slow

PROMPT = [3, 17, 9, 42, 5]
COMPLETION = [11, 30, 2, 57, 8, 21]


def _hf_logprobs(model, prompt, completion, temperature=1.0):
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return lp[len(prompt) - 1:].tolist()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    model = make_family_model(str(root / "model"), "llama")
    servers = sglang_manager(str(root / "model"), 2, str(root))
    router = None
    try:
        servers.start()
        router = RouterManager(servers.urls, log_dir=str(root), startup_timeout_s=60)
        router.start()
        yield {"model": model, "servers": servers, "router": router, "root": root}
    finally:
        if router is not None:
            router.stop()
        servers.stop()


def _score_all(cluster, prompt=PROMPT, completion=COMPLETION):
    urls = cluster["servers"].urls + [cluster["router"].url]
    client = RolloutClient(urls)
    ids = list(prompt) + list(completion)
    return {u: asyncio.run(client.score([ids], u))[0][len(prompt) - 1:] for u in urls}


def test_generate_logprobs_match_hf_reference(cluster):
    model, router = cluster["model"], cluster["router"]
    client = RolloutClient([router.url])
    reqs = [RolloutRequest(0, tuple(PROMPT), SamplingParams(max_new_tokens=6, temperature=0.0,
                                                            ignore_eos=True)),
            RolloutRequest(1, tuple(PROMPT), SamplingParams(max_new_tokens=6, temperature=0.7,
                                                            sampling_seed=5, ignore_eos=True))]
    greedy, sampled = client.run(reqs)
    assert greedy.finish_reason == "length" and len(greedy.output_ids) == 6
    # Greedy: untempered log_softmax; and the tokens are HF's argmax continuation.
    ref = _hf_logprobs(model, PROMPT, greedy.output_ids)
    assert greedy.logprobs == pytest.approx(ref, abs=1e-4)
    with torch.no_grad():
        hf_greedy = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert greedy.output_ids == hf_greedy
    # Sampling: SGLang's convention log_softmax(logits / T), before top-p/top-k.
    ref_t = _hf_logprobs(model, PROMPT, sampled.output_ids, temperature=0.7)
    assert sampled.logprobs == pytest.approx(ref_t, abs=1e-4)
    # Scoring a fixed completion (input_token_logprobs) on every server and through the router.
    for url, lp in _score_all(cluster).items():
        assert lp == pytest.approx(_hf_logprobs(model, PROMPT, COMPLETION), abs=1e-4), url


def test_stop_tokens_and_batch_n_follow_sglang(cluster):
    import json
    import urllib.request

    url = cluster["servers"].urls[0]
    greedy = RolloutClient([url]).run([RolloutRequest(
        0, tuple(PROMPT), SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))])[0]
    stop_at = greedy.output_ids[2]
    body = {"input_ids": [PROMPT, PROMPT[:3]], "return_logprob": True,
            # ignore_eos would disable stop_token_ids too (SGLang checks both only without it)
            "sampling_params": {"max_new_tokens": 6, "temperature": 0.0, "n": 2,
                                "stop_token_ids": [stop_at]}}
    req = urllib.request.Request(url + "/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert len(out) == 4  # prompt-major: prompt 0 x2, prompt 1 x2
    first = out[0]
    k = greedy.output_ids.index(stop_at)
    assert first["output_ids"] == greedy.output_ids[:k + 1]  # the stop token is included
    assert first["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}
    assert out[1]["output_ids"] == first["output_ids"]
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [5, 5, 3, 3]


def test_4xx_through_router_quotes_server_message(cluster):
    client = RolloutClient([cluster["router"].url])
    with pytest.raises(RolloutRequestError, match="HTTP 400: Requested token count exceeds the "
                                                  "model's maximum context length of 256 tokens"):
        client.run([RolloutRequest(0, tuple(PROMPT), SamplingParams(max_new_tokens=300))])


def test_unknown_sampling_key_is_a_400_naming_it(cluster):
    """SGLang 0.5.23's shape {"error": "unknown field ..."} (asked of a server's own URL: through
    the router the request passes)."""
    import json
    import urllib.error
    import urllib.request

    from maspo_megatron.rollout.sglang.wire import error_message

    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "no_such_key": 1}}
    req = urllib.request.Request(cluster["servers"].urls[0] + "/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 400
    assert error_message(400, err.value.read().decode()).startswith("unknown field `no_such_key`")


def test_out_of_vocabulary_ids_refused_before_reaching_the_server(cluster):
    # The real server crashes (whole process) on an out-of-vocabulary id: never send one.
    client = RolloutClient([cluster["router"].url], vocab_size=64)
    with pytest.raises(RolloutError, match=r"request 0: token ids \[99\] are outside .* \[0, 64\)"):
        client.run([RolloutRequest(0, (1, 99), SamplingParams(max_new_tokens=2))])
    assert not cluster["servers"].dead()


def _trainer_step(model, scale, seed):
    """Stands in for a training step: perturbs every weight, bf16-representable values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
            p.copy_(p.to(torch.bfloat16).float())


def _export(model, bf16_names=("mlp", "embed")):
    """HF-named tensors with mixed dtypes: some bf16 (lossless here), the rest fp32."""
    for name, t in model.state_dict().items():
        yield name, (t.to(torch.bfloat16) if any(k in name for k in bf16_names) else t)


def test_distributed_sync_two_servers_behind_router(cluster):
    model, servers, router = cluster["model"], cluster["servers"], cluster["router"]
    before = _score_all(cluster)
    _trainer_step(model, 0.2, seed=1)
    trainer_lp = _hf_logprobs(model, PROMPT, COMPLETION)
    for url, lp in before.items():
        assert max(abs(a - b) for a, b in zip(lp, trainer_lp)) > 1e-2, url  # differed before

    nbytes = sum(t.numel() * t.element_size() for _, t in _export(model))
    cfg = WeightSyncConfig(bucket_bytes=16 << 10, timeout_s=60, readback_tensors=6)
    syncer = WeightSyncer(servers.urls, cfg)
    try:
        stats = syncer.sync(_export(model), version=1)
    finally:
        syncer.close()
    assert stats.buckets > 3 and stats.bytes == nbytes  # larger than one bucket
    for url, lp in _score_all(cluster).items():
        assert lp == pytest.approx(trainer_lp, abs=1e-4), url
    # Generation resumed, reporting the new version through the router.
    s = RolloutClient([router.url]).run([RolloutRequest(0, tuple(PROMPT), SamplingParams(
        max_new_tokens=3, temperature=0.0, ignore_eos=True))])[0]
    assert s.weight_version == "1"
    assert s.logprobs == pytest.approx(_hf_logprobs(model, PROMPT, s.output_ids), abs=1e-4)


def test_disk_sync_and_readback_diagnostic_catches_a_stale_server(cluster, tmp_path):
    model, servers = cluster["model"], cluster["servers"]
    _trainer_step(model, 0.1, seed=2)
    syncer = WeightSyncer(servers.urls, WeightSyncConfig(mode="disk", disk_dir=str(tmp_path)))
    syncer.sync(_export(model), version=2)
    trainer_lp = _hf_logprobs(model, PROMPT, COMPLETION)
    for url, lp in _score_all(cluster).items():
        assert lp == pytest.approx(trainer_lp, abs=1e-4), url
    # A sync whose tensors never reach one server fails the read-back diagnostic: sync only the
    # first server, then read back from both.
    _trainer_step(model, 0.1, seed=3)
    WeightSyncer(servers.urls[:1], WeightSyncConfig(mode="disk", disk_dir=str(tmp_path))).sync(
        _export(model), version=3)
    checker = WeightSyncer(servers.urls, WeightSyncConfig(readback_tensors=50))
    from maspo_megatron.rollout.weight_sync import _Sampler
    sampler = _Sampler(50, 2, seed=0)
    for name, t in _export(model):
        sampler.offer(name, t)
    with pytest.raises(WeightSyncError, match=f"differs from the trainer's.*{servers.urls[1]}|"
                                              f"on {servers.urls[1]} differs"):
        checker._read_back(sampler.kept, 3)
    syncer2 = WeightSyncer(servers.urls, WeightSyncConfig(mode="disk", disk_dir=str(tmp_path)))
    syncer2.sync(_export(model), version=3)  # both servers current again


def test_server_killed_mid_rollout_loses_and_duplicates_nothing(cluster):
    servers = cluster["servers"]
    # Greedy, so that every server gives the same tokens (SGLang's sampling_seed is reproducible
    # only with --enable-deterministic-inference).
    reqs = [RolloutRequest(i, tuple(PROMPT[: 2 + i % 4]), SamplingParams(
        max_new_tokens=96, temperature=0.0, ignore_eos=True)) for i in range(24)]
    cfg = RolloutClientConfig(max_concurrency=4, backoff_initial_s=0.2, down_cooldown_s=2.0)
    reference = RolloutClient(servers.urls[:1], cfg).run(reqs)

    client = RolloutClient(servers.urls, cfg)
    victim = servers.procs[1]
    killed = threading.Event()

    def progress(done, total):
        if done == 3 and not killed.is_set():
            killed.set()
            victim.kill()

    restarted = []
    servers.watch(client.mark_down, lambda url: (restarted.append(url), client.mark_up(url)),
                  interval_s=0.5)
    try:
        samples = client.run(reqs, progress)
        deadline = time.monotonic() + 300
        while not restarted and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        servers._watch_stop.set()
        servers._watcher.join(timeout=60)
        servers._watch_stop.clear()
    assert restarted == [victim.url]  # the watcher restarted it and told the client
    assert killed.is_set()
    assert [s.index for s in samples] == list(range(24))  # each exactly once
    assert any(s.attempts > 1 for s in samples)  # the kill hit requests in flight
    for got, ref in zip(samples, reference):  # the same tokens whichever server served
        # Float sums differ slightly with how a server batches requests: 1e-4, not bitwise.
        assert got.output_ids == ref.output_ids and got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    servers.wait_healthy(servers.urls)
    # The restarted server came back with the checkpoint's weights: the client refuses its
    # samples until the trainer re-syncs it.
    version = reference[0].weight_version
    strict = RolloutClientConfig(max_attempts=2, backoff_initial_s=0.1, down_cooldown_s=0.1)
    with pytest.raises(RolloutError, match=rf"weight_version \['default'\], accepted: \['{version}'\]"):
        RolloutClient([victim.url], strict, accepted_weight_versions=[version]).run(reqs[:1])
    resync = WeightSyncer([victim.url], WeightSyncConfig())
    try:
        resync.sync(_export(cluster["model"]), version=version)
    finally:
        resync.close()
    after = RolloutClient([victim.url], cfg, accepted_weight_versions=[version]).run(reqs[:2])
    assert [a.output_ids for a in after] == [r.output_ids for r in reference[:2]]


def test_server_dying_during_sync_gives_clear_error_in_bounded_time(cluster):
    model, servers = cluster["model"], cluster["servers"]
    if servers.dead():
        servers.restart_dead()
    cfg = WeightSyncConfig(bucket_bytes=1 << 10, timeout_s=15, http_timeout_s=10)
    syncer = WeightSyncer(servers.urls, cfg)
    syncer.connect()
    threading.Timer(1.0, servers.procs[1].kill).start()
    t0 = time.monotonic()
    slow = ((n, t) for n, t in _export(model) for _ in [time.sleep(0.05)])
    with pytest.raises(WeightSyncError) as err:
        syncer.sync(slow, version=9)
    assert time.monotonic() - t0 < 45
    msg = str(err.value)
    print("sync error:", msg)
    assert "update_weights_from_distributed" in msg and "bucket" in msg, msg
