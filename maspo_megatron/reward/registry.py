"""Reward results and the registry of reward functions.

A reward function has the signature ``fn(response: str, answer: str) -> RewardResult | float``:
``response`` is the decoded model output, ``answer`` the dataset's reference answer. It must be a
module-level function (pickled by reference) so that ``RewardPool`` worker processes can import it;
its module is imported again in every worker, which re-runs the ``@register_reward`` decorator there.

``get_reward`` takes a registered name (``"math"``) or ``"module:function"``: the module is
imported (from ``sys.path``, else from the working directory) and the function taken from it, no
registration needed (``reward.fn=my_rewards:exact``).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Union

__all__ = ["RewardResult", "RewardFn", "register_reward", "get_reward", "list_rewards", "as_result"]


@dataclass(frozen=True)
class RewardResult:
    """The score of one response.

    reward:    the scalar reward used for advantages.
    no_answer: the response holds no answer the verifier could find (e.g. no ``\\boxed{}``).
    timeout:   the verifier exceeded the per-sample time limit (``reward`` is then 0).
    error:     the verifier raised or its worker died; the message (``reward`` is then 0).
    extracted: the answer string taken from the response, for logging; None when there is none.
    """

    reward: float
    no_answer: bool = False
    timeout: bool = False
    error: str | None = None
    extracted: str | None = None

    @property
    def correct(self) -> bool:
        """Full reward (1): what accuracy, Avg@k and Pass@k count. A partial-credit reward (the
        synthetic task's per-digit score) is not a correct answer."""
        return self.reward >= 1.0


RewardFn = Callable[[str, str], Union[RewardResult, float]]

_REGISTRY: dict[str, RewardFn] = {}


def _qualified_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``; returns ``fn`` unchanged.

    Registering another function under a taken name raises; registering the same function again
    (a module imported twice, e.g. in a worker process) is allowed.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"register_reward({name!r}) expects a callable, got {type(fn).__name__}")
        existing = _REGISTRY.get(name)
        if existing is not None and _qualified_name(existing) != _qualified_name(fn):
            raise ValueError(
                f"reward name {name!r} is already registered to {_qualified_name(existing)}; "
                f"cannot register {_qualified_name(fn)}"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """The reward function registered under ``name``, or ``"module:function"`` imported."""
    if ":" in name:
        return _import_reward(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown reward function {name!r}; registered: {', '.join(list_rewards()) or '(none)'}. "
            "Give your own as 'module:function' (an importable module), or register it with "
            "@register_reward(name) in a module imported before the trainer starts."
        ) from None


def _import_reward(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise KeyError(f"reward function {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module_name.split(".")[0] or cwd in sys.path:
            raise KeyError(f"reward function {spec!r}: cannot import module {module_name!r} ({e})") from None
        # ``maspo-megatron`` (a console script) does not put the working directory on sys.path,
        # ``python -m`` (torchrun's ranks, spawned workers) does: the same module either way.
        sys.path.append(cwd)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e2:
            raise KeyError(f"reward function {spec!r}: cannot import module {module_name!r} ({e2}); "
                           "it must be on PYTHONPATH or in the working directory") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise KeyError(f"reward function {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                       f"has no attribute {attr!r}")
    if not callable(fn):
        raise KeyError(f"reward function {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


def as_result(value: RewardResult | float | int | bool, fn_name: str) -> RewardResult:
    """Normalise a reward function's return value (a bare number means a plain reward)."""
    if isinstance(value, RewardResult):
        return value
    if isinstance(value, (int, float)):
        return RewardResult(reward=float(value))
    raise TypeError(
        f"reward function {fn_name!r} returned {type(value).__name__}; expected RewardResult or a number"
    )
