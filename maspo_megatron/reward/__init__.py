"""Rewards: a registry of reward functions, the math verifier, the demo task, a worker pool.

Importing this package registers the built-in functions "math" and "synthetic".
"""

from .math_answer import extract_last_boxed, math_reward
from .pool import RewardConfig, RewardPool, score_with_time_limit
from .registry import RewardFn, RewardResult, as_result, get_reward, list_rewards, register_reward
from .synthetic import synthetic_reward

__all__ = [
    "RewardConfig",
    "RewardFn",
    "RewardPool",
    "RewardResult",
    "as_result",
    "extract_last_boxed",
    "get_reward",
    "list_rewards",
    "math_reward",
    "register_reward",
    "score_with_time_limit",
    "synthetic_reward",
]
