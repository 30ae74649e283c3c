"""RewardPool: parallel scoring, the registry, and per-sample time limits (soft and hard)."""

import signal
import threading
import time

import pytest

from maspo_megatron.reward import RewardConfig, RewardPool, RewardResult, get_reward, list_rewards, register_reward


@register_reward("test_slow_on_hang")
def slow_reward(response: str, answer: str) -> RewardResult:
    """Sleeps forever on "hang" (interruptible: the soft limit applies)."""
    if response == "hang":
        time.sleep(3600)
    if response == "raise":
        raise ValueError("bad sample")
    return RewardResult(reward=float(response == answer), extracted=response)


@register_reward("test_ignores_alarm")
def stubborn_reward(response: str, answer: str) -> float:
    """Ignores SIGALRM on "hang", as C code stuck outside the interpreter would: only a kill helps."""
    if response == "hang":
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        while True:
            time.sleep(0.05)
    return float(response == answer)


def test_registry_errors():
    with pytest.raises(KeyError, match="unknown reward function 'nope'.*math"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(stubborn_reward)
    register_reward("test_slow_on_hang")(slow_reward)  # same function again: allowed
    assert {"math", "synthetic", "test_slow_on_hang"} <= set(list_rewards())


def test_pool_scores_in_order_and_matches_inline():
    responses = [f"\\boxed{{{i}}}" for i in range(12)] + ["no answer"]
    answers = [str(i if i % 3 else i + 1) for i in range(12)] + ["1"]
    with RewardPool("math", num_workers=2, timeout_s=10.0) as pool:
        parallel = pool.score(responses, answers)
    inline = RewardPool("math", num_workers=0, timeout_s=10.0).score(responses, answers)
    assert parallel == inline
    assert [r.reward for r in parallel] == [0.0 if i % 3 == 0 else 1.0 for i in range(12)] + [0.0]
    assert parallel[-1].no_answer


def test_hanging_sample_times_out_without_stalling_others():
    timeout_s, grace = 1.0, 1.0
    with RewardPool("test_slow_on_hang", num_workers=2, timeout_s=timeout_s, kill_grace_s=grace) as pool:
        pool.score(["warm"], ["warm"])  # workers are up
        start = time.monotonic()
        results = pool.score(["a", "hang", "b", "raise", "c"], ["a", "x", "b", "x", "x"])
        elapsed = time.monotonic() - start
        assert [r.reward for r in results] == [1.0, 0.0, 1.0, 0.0, 0.0]
        assert results[1].timeout and not results[0].timeout
        assert results[3].error and "bad sample" in results[3].error
        assert elapsed < timeout_s + 1.0  # soft limit: no kill needed
        assert pool.num_restarts == 0


def test_signal_ignoring_sample_is_killed_and_worker_replaced():
    timeout_s, grace = 0.5, 0.5
    with RewardPool("test_ignores_alarm", num_workers=1, timeout_s=timeout_s, kill_grace_s=grace) as pool:
        pool.score(["warm"], ["warm"])
        start = time.monotonic()
        results = pool.score(["hang"], ["x"])
        elapsed = time.monotonic() - start
        assert results == [RewardResult(reward=0.0, timeout=True)]
        assert timeout_s + grace <= elapsed < timeout_s + grace + 1.5
        assert pool.num_restarts == 1
        # the replacement worker scores the next batch
        assert [r.reward for r in pool.score(["a", "b"], ["a", "c"])] == [1.0, 0.0]


def test_inline_soft_timeout_in_main_thread():
    def outer_handler(signum, frame):
        fired.append(signum)

    fired = []
    previous = signal.signal(signal.SIGALRM, outer_handler)
    pytest_timer = signal.setitimer(signal.ITIMER_REAL, 30.0)  # a caller's own alarm must survive our use of SIGALRM
    pool = RewardPool("test_slow_on_hang", num_workers=0, timeout_s=0.3)
    start = time.monotonic()
    assert pool.score(["hang", "a"], ["x", "a"]) == [
        RewardResult(reward=0.0, timeout=True),
        RewardResult(reward=1.0, extracted="a"),
    ]
    assert time.monotonic() - start < 1.5
    remaining, _ = signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
    signal.setitimer(signal.ITIMER_REAL, *pytest_timer)  # pytest-timeout's own alarm, if any
    assert signal.getsignal(signal.SIGALRM) is previous
    assert 27.0 < remaining < 30.0 and not fired


def test_inline_scoring_off_the_main_thread_still_scores():
    out = []
    thread = threading.Thread(target=lambda: out.extend(RewardPool("math", 0).score(["\\boxed{2}"], ["2"])))
    thread.start()
    thread.join()
    assert out[0].reward == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        RewardPool("math", 0).score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        RewardPool("math", 0, timeout_s=0)
    with pytest.raises(TypeError, match="module-level function"):
        register_reward("test_lambda")(lambda r, a: 0.0)
        RewardPool("test_lambda", num_workers=1)


def test_from_config():
    with RewardPool.from_config(RewardConfig(fn="synthetic", num_workers=1, timeout_s=5.0)) as pool:
        assert [r.reward for r in pool.score(["7<eos>", "3", ""], ["7", "4", "1"])] == [1.0, 0.0, 0.0]


def test_worker_killed_while_idle_is_replaced():
    with RewardPool("synthetic", num_workers=1, timeout_s=5.0) as pool:
        assert pool.score(["1"], ["1"])[0].reward == 1.0
        victim = pool._workers[0].process
        victim.kill()
        victim.join()
        assert [r.reward for r in pool.score(["1", "2"], ["1", "1"])] == [1.0, 0.0]
        assert pool.num_restarts == 1
