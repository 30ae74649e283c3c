"""Full servers (issue 14, item 2) against a real SGLang 0.5.23 CPU server.

The server is started with ``--max-running-requests 3``; the client reads that limit from the
server's ``/server_info`` and keeps exactly that many requests in flight: the server's own log
(one line per decode step) shows 3 running requests and none queued, while the client's peak
is 3. Without per-server limits the client's ``max_concurrency`` over-fills it (requests queue
on the server), and a configured limit (``max_running_per_server``) is kept as well. Ending a
rollout early (over-sampling's abort) leaves the server idle: it aborted what was cancelled.
"""

from __future__ import annotations

import glob
import re
import time

import pytest

from maspo_megatron.rollout.backend import SamplingParams
from maspo_megatron.rollout.client import RolloutClient, RolloutClientConfig, RolloutRequest
from maspo_megatron.rollout.sglang import BACKEND
from sglang_servers import make_family_model, sglang_manager

pytestmark = [pytest.mark.slow, pytest.mark.sglang]

LIMIT = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    make_family_model(str(root / "model"), "llama")
    (root / "logs").mkdir()
    manager = sglang_manager(str(root / "model"), 1, str(root / "logs"),
                             extra_args=["--max-running-requests", str(LIMIT), "--decode-log-interval", "1"])
    manager.start()
    try:
        (log,) = glob.glob(str(root / "logs" / "*.log"))
        yield manager.urls[0], log
    finally:
        manager.stop()


def _requests(n: int, tokens: int) -> list[RolloutRequest]:
    return [RolloutRequest(i, (2, 3, 4 + i % 5), SamplingParams(max_new_tokens=tokens, ignore_eos=True,
                                                                  sampling_seed=i)) for i in range(n)]


def _decode_lines(log: str, since: int) -> list[tuple[int, int]]:
    """(running, queued) of every decode step the server logged after byte ``since``."""
    with open(log, errors="replace") as f:
        f.seek(since)
        text = f.read()
    return [(int(r), int(q)) for r, q in
            re.findall(r"Decode batch[^\n]*?#running-req: (\d+)[^\n]*?#queue-req: (\d+)", text)]


def _offset(log: str) -> int:
    """The log's end once the server has stopped writing (its last decode lines of an earlier
    rollout can land after that rollout returned)."""
    size = -1
    while True:
        with open(log, "rb") as f:
            now = f.seek(0, 2)
        if now == size:
            return now
        size = now
        time.sleep(1.0)


def test_client_keeps_the_server_at_the_limit_it_reads_from_server_info(server):
    url, log = server
    assert BACKEND.max_running_requests(url) == LIMIT
    client = RolloutClient([url])
    client.set_limits({url: BACKEND.max_running_requests(url)})
    since = _offset(log)
    samples = client.run(_requests(3 * LIMIT, 24))
    assert [s.index for s in samples] == list(range(3 * LIMIT)) and all(len(s.output_ids) == 24 for s in samples)
    assert client.peak_inflight[url] == LIMIT
    steps = _decode_lines(log, since)
    assert steps, "the server logged no decode step"
    running = [r for r, _ in steps]
    # Full: most decode steps run LIMIT requests (the rest: while one finishes and the next is
    # prefilled, and the last wave's tail); none is ever queued behind them.
    assert max(running) == LIMIT and running.count(LIMIT) >= len(running) // 2, running
    assert max(q for _, q in steps) == 0
    print(f"FULL read limit {LIMIT}: {len(steps)} decode steps, {running.count(LIMIT)} with {LIMIT} running, "
          f"client peak {client.peak_inflight[url]}")


def test_without_limits_the_client_overfills_and_a_configured_limit_is_kept(server):
    url, log = server
    over = RolloutClient([url], RolloutClientConfig(max_concurrency=64))
    since = _offset(log)
    over.run(_requests(3 * LIMIT, 8))
    assert over.peak_inflight[url] == 3 * LIMIT
    assert max(q for _, q in _decode_lines(log, since)) > 0  # the server queued what it could not run
    two = RolloutClient([url], RolloutClientConfig(max_running_per_server=2))
    since = _offset(log)
    two.run(_requests(6, 8))
    assert two.peak_inflight[url] == 2 and max(r for r, _ in _decode_lines(log, since)) == 2


def test_until_ends_the_rollout_and_the_server_aborts_the_rest(server):
    """Over-sampling's abort: once ``until`` says the batch is full, the requests left (running
    or queued on the server) are cancelled and the server stops working on them."""
    url, log = server
    client = RolloutClient([url], RolloutClientConfig(max_concurrency=64))
    done = []
    t0 = time.monotonic()
    # 30 waves of 240 tokens: on an idle machine (~500 decode steps/s) the requests left would
    # decode for ~14 s more, so a server that finished them instead of aborting them is still
    # busy in the window below.
    samples = client.run(_requests(30 * LIMIT, 240), until=lambda s: done.append(s) or len(done) == 2)
    took = time.monotonic() - t0
    assert len(samples) == 2 and all(len(s.output_ids) == 240 for s in samples)
    assert client._inflight[url] == 0
    # SGLang notices a closed connection within seconds (its disconnect check) and aborts the
    # request: the server falls idle long before the other 88 requests' 29 more waves would end.
    time.sleep(8.0)
    since = _offset(log)
    time.sleep(4.0)
    assert _decode_lines(log, since) == [], "the server kept decoding requests that were cancelled"
    with open(log, errors="replace") as f:
        assert "disconnected from the client side" in f.read()
    print(f"FULL abort: 2 of {30 * LIMIT} samples in {took:.1f}s, then the server idle")
