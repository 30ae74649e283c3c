"""Rewards computed in worker processes with a per-sample time limit.

Two layers bound the time a sample may take, so a hanging verifier cannot stall a training step:

1. *Soft limit* — each worker runs the reward function in its main thread under ``SIGALRM``
   (``signal.setitimer``) after ``timeout_s``: pure-Python hangs (e.g. a sympy simplification) are
   interrupted cheaply and the worker carries on. This is also why rewards run in processes and
   not threads: signal-based timeouts (ours and math-verify's own) only work in a main thread.
2. *Hard limit* — code that never returns to the interpreter (C extensions, ignored signals) is
   cut off by the parent, which kills the worker ``kill_grace_s`` after the soft limit and starts a
   replacement; the sample gets reward 0 with ``timeout=True``.

``num_workers=0`` scores inline in the calling process: only the soft limit applies, and only when
called from the main thread (a warning says so otherwise).

A reward function may carry a ``prepare`` attribute (a function of no arguments): it is called
once per worker process (or once by an inline pool) before the first sample, outside the time
limit -- the place for slow imports, which an alarm must not interrupt half-way.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_connections
from typing import Sequence

from .registry import RewardFn, RewardResult, as_result, get_reward

__all__ = ["RewardConfig", "RewardPool", "score_with_time_limit"]

logger = logging.getLogger(__name__)

_READY = "ready"


@dataclass
class RewardConfig:
    """How rewards are computed.

    fn:                the reward function: a registered name ("math", "synthetic") or your own
                       as "module:function" (an importable module, e.g. "my_rewards:exact").
    num_workers:       worker processes; 0 scores inline in the caller (no hard limit).
    timeout_s:         per-sample soft time limit; a sample over it gets reward 0, ``timeout=True``.
    kill_grace_s:      extra time after ``timeout_s`` before the worker is killed and replaced.
    start_method:      multiprocessing start method; "spawn" (default) because forking a trainer
                       that holds torch/NCCL/gloo threads is unsafe.
    startup_timeout_s: how long a new worker may take to import the reward function's module.
    max_error_rate:    stop the run when more than this fraction of a step's samples could not be
                       scored (the function raised, its worker died, or it ran past ``timeout_s``),
                       showing the first traceback; 1.0 never stops.
    """

    fn: str = "math"
    num_workers: int = 4
    timeout_s: float = 10.0
    kill_grace_s: float = 2.0
    start_method: str = "spawn"
    startup_timeout_s: float = 120.0
    max_error_rate: float = 0.25

    def __post_init__(self):
        if not isinstance(self.fn, str) or not self.fn.strip():
            raise ValueError(f"reward.fn must name a reward function ('math' or 'module:function'), got {self.fn!r}")
        if ":" in self.fn:
            module, _, name = self.fn.partition(":")
            if not module or not name.isidentifier():
                raise ValueError(f"reward.fn={self.fn!r}: expected 'module:function', e.g. 'my_rewards:exact'")
        if self.num_workers < 0:
            raise ValueError(f"reward.num_workers must be >= 0 (0: inline), got {self.num_workers}")
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
        if self.kill_grace_s < 0:
            raise ValueError(f"reward.kill_grace_s must be >= 0, got {self.kill_grace_s}")
        if self.start_method not in mp.get_all_start_methods():
            raise ValueError(f"reward.start_method must be one of {mp.get_all_start_methods()}, "
                             f"got {self.start_method!r}")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"reward.startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"reward.max_error_rate must lie in [0, 1], got {self.max_error_rate}")


class _SoftTimeout(BaseException):
    # BaseException so that a reward function's own ``except Exception`` cannot swallow it.
    pass


def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout()


def score_with_time_limit(fn: RewardFn, fn_name: str, response: str, answer: str, timeout_s: float | None) -> RewardResult:
    """Run ``fn(response, answer)``; exceptions become ``error`` results, overruns ``timeout`` ones.

    The limit uses ``SIGALRM`` and is applied only in the main thread (signals cannot be delivered
    to other threads); elsewhere the call is unbounded.
    """
    use_alarm = bool(timeout_s) and threading.current_thread() is threading.main_thread()
    previous_handler = None
    previous_timer = (0.0, 0.0)
    started = time.monotonic()
    try:
        if use_alarm:
            previous_handler = signal.signal(signal.SIGALRM, _raise_soft_timeout)
            previous_timer = signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            value = fn(response, answer)
        finally:
            # An alarm landing between the return and this line raises here: reported as a timeout.
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return as_result(value, fn_name)
    except _SoftTimeout:
        return RewardResult(reward=0.0, timeout=True)
    except Exception:
        return RewardResult(reward=0.0, error=f"reward function {fn_name!r} raised:\n{traceback.format_exc(limit=8)}")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGALRM, previous_handler)
            # Give back a caller's own pending alarm (e.g. a test timeout), minus the time spent;
            # one that fell due meanwhile fires now rather than being lost.
            delay, interval = previous_timer
            if delay > 0:
                signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - started), 1e-6), interval)


def _prepare(fn: RewardFn) -> None:
    prepare = getattr(fn, "prepare", None)
    if callable(prepare):
        prepare()


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the process that started it dies, even by SIGKILL (a
    worker stuck in a verifier would not notice its pipe closing)."""
    import sys

    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _worker_loop(conn, fn: RewardFn, fn_name: str, timeout_s: float, parent_pid: int | None = None) -> None:
    _die_with_parent()
    if parent_pid is not None and os.getppid() != parent_pid:
        return  # the parent died before the line above
    # Ctrl-C goes to the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _prepare(fn)
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        index, response, answer = task
        conn.send((index, score_with_time_limit(fn, fn_name, response, answer, timeout_s)))


class _Worker:
    def __init__(self, process, conn):
        self.process = process
        self.conn = conn
        self.ready = False
        self.started_at = time.monotonic()
        self.task: tuple[int, float] | None = None  # (sample index, hard deadline)


class RewardPool:
    """Scores (response, answer) pairs with a registered reward function in worker processes.

    >>> with RewardPool("math", num_workers=2, timeout_s=5.0) as pool:
    ...     results = pool.score(["... \\\\boxed{1/2}"], ["\\\\frac{1}{2}"])
    """

    def __init__(
        self,
        fn_name: str,
        num_workers: int = 4,
        timeout_s: float = 10.0,
        *,
        kill_grace_s: float = 2.0,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 0:
            raise ValueError(f"reward num_workers must be >= 0, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0, got {timeout_s}")
        if kill_grace_s < 0:
            raise ValueError(f"reward kill_grace_s must be >= 0, got {kill_grace_s}")
        self.fn_name = fn_name
        self.fn = get_reward(fn_name)
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.num_restarts = 0  # workers killed for overrunning (a metric worth logging)
        self._warned_error = self._warned_timeout = False
        self._workers: list[_Worker] = []
        self._score_lock = threading.Lock()
        if num_workers == 0:
            _prepare(self.fn)
            return
        try:
            pickle.dumps(self.fn)
        except Exception as e:
            raise TypeError(
                f"reward function {fn_name!r} cannot be sent to worker processes ({e}); it must be a "
                "module-level function in an importable module (or use num_workers=0)"
            ) from e
        self._ctx = mp.get_context(start_method)
        self._workers = [self._start_worker() for _ in range(num_workers)]

    @classmethod
    def from_config(cls, config: RewardConfig) -> "RewardPool":
        return cls(
            config.fn,
            config.num_workers,
            config.timeout_s,
            kill_grace_s=config.kill_grace_s,
            start_method=config.start_method,
            startup_timeout_s=config.startup_timeout_s,
        )

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_loop,
            args=(child_conn, self.fn, self.fn_name, self.timeout_s, os.getpid()),
            name=f"reward-{self.fn_name}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _kill(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()

    def _replace(self, slot: int) -> None:
        self._kill(self._workers[slot])
        self._workers[slot] = self._start_worker()

    def score(self, responses: Sequence[str], answers: Sequence[str]) -> list[RewardResult]:
        """One ``RewardResult`` per response, in order. Never takes much longer than
        ``ceil(len / num_workers) * (timeout_s + kill_grace_s)``, plus worker restarts."""
        if len(responses) != len(answers):
            raise ValueError(f"score() got {len(responses)} responses but {len(answers)} answers")
        with self._score_lock:  # a pipelined rollout's thread and an evaluation may both score
            return self._score(responses, answers)

    def _score(self, responses: Sequence[str], answers: Sequence[str]) -> list[RewardResult]:
        if self.num_workers == 0:
            if threading.current_thread() is not threading.main_thread():
                logger.warning("inline reward scoring outside the main thread runs without a time limit")
            results = [
                score_with_time_limit(self.fn, self.fn_name, r, a, self.timeout_s) for r, a in zip(responses, answers)
            ]
        else:
            results = self._score_in_workers(responses, answers)
        self._warn_first_error(results)
        return results

    def _score_in_workers(self, responses: Sequence[str], answers: Sequence[str]) -> list[RewardResult]:
        if not self._workers:
            raise RuntimeError("RewardPool is closed")
        results: list[RewardResult | None] = [None] * len(responses)
        pending = collections.deque(range(len(responses)))
        while pending or any(w.task for w in self._workers):
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.task is None and pending:
                    index = pending[0]
                    try:
                        worker.conn.send((index, responses[index], answers[index]))
                    except OSError:  # died while idle (e.g. the OOM killer): the sample waits for another
                        self._handle_death(slot, results)
                        continue
                    pending.popleft()
                    worker.task = (index, now + self.timeout_s + self.kill_grace_s)
            waits = [w.task[1] - now for w in self._workers if w.task]
            waits += [w.started_at + self.startup_timeout_s - now for w in self._workers if not w.ready]
            by_conn = {w.conn: slot for slot, w in enumerate(self._workers)}
            for conn in wait_connections(list(by_conn), timeout=max(0.0, min(waits))):
                slot = by_conn[conn]
                worker = self._workers[slot]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._handle_death(slot, results)
                    continue
                if message == _READY:
                    worker.ready = True
                    continue
                index, result = message
                results[index] = result
                worker.task = None
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.task is not None and now >= worker.task[1]:
                    results[worker.task[0]] = RewardResult(reward=0.0, timeout=True)
                    logger.warning(
                        "reward %r: sample %d ran past %.1fs; worker killed and replaced",
                        self.fn_name, worker.task[0], self.timeout_s + self.kill_grace_s,
                    )
                    self.num_restarts += 1
                    self._replace(slot)
                elif not worker.ready and now - worker.started_at > self.startup_timeout_s:
                    raise RuntimeError(
                        f"reward worker for {self.fn_name!r} did not start within {self.startup_timeout_s:.0f}s"
                    )
        return results  # type: ignore[return-value]  # every index was filled above

    def _handle_death(self, slot: int, results: list) -> None:
        worker = self._workers[slot]
        worker.process.join(timeout=5)
        if not worker.ready:
            # Dying before the first task means the function's module cannot be imported (see the
            # worker's stderr); restarting would only fail again.
            raise RuntimeError(
                f"reward worker for {self.fn_name!r} exited during start-up (exit code {worker.process.exitcode})"
            )
        if worker.task is not None:
            results[worker.task[0]] = RewardResult(
                reward=0.0, error=f"reward worker died (exit code {worker.process.exitcode})"
            )
        self.num_restarts += 1
        self._replace(slot)

    def _warn_first_error(self, results: list[RewardResult]) -> None:
        # Once each per pool; every step's rates are in the metrics (reward/error_rate,
        # reward/timeout_rate), and reward.max_error_rate stops a run that cannot be scored.
        if not self._warned_error:
            for result in results:
                if result.error:
                    logger.warning("reward %r reported an error (shown once): %s", self.fn_name, result.error)
                    self._warned_error = True
                    break
        if not self._warned_timeout and any(r.timeout for r in results):
            logger.warning("reward %r: a sample ran past timeout_s=%.1fs and scored 0 (shown once)",
                           self.fn_name, self.timeout_s)
            self._warned_timeout = True

    def close(self) -> None:
        """Stop the workers (politely, then by force)."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
