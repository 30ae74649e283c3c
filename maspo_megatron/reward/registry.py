"""Reward results and the registry of reward functions.

A reward function has the signature ``fn(response: str, answer: str) -> RewardResult | float``:
``response`` is the decoded model output, ``answer`` the dataset's reference answer. It must be a
module-level function (pickled by reference) so that ``RewardPool`` worker processes can import it;
its module is imported again in every worker, which re-runs the ``@register_reward`` decorator there.
"""

from __future__ import annotations

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
    """The reward function registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown reward function {name!r}; registered: {', '.join(list_rewards()) or '(none)'}. "
            "Custom functions must be registered with @register_reward(name) in a module imported "
            "before the trainer starts."
        ) from None


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
