"""Reward of the demo's synthetic task (see ``maspo_megatron.data.synthetic``)."""

from __future__ import annotations

from .registry import RewardResult, register_reward

__all__ = ["synthetic_reward"]


@register_reward("synthetic")
def synthetic_reward(response: str, answer: str) -> RewardResult:
    """1.0 if the response *starts* with the answer (its first generated token(s)), else 0.0.

    Whatever follows the answer is ignored. Decode responses with ``skip_special_tokens=False``:
    a response that opens with a special token (e.g. ``<eos>``) then scores 0, as it should; an
    empty response scores 0 with ``no_answer=True``.
    """
    answer = str(answer)
    if not answer:
        return RewardResult(reward=0.0, error="empty reference answer")
    if not response:
        return RewardResult(reward=0.0, no_answer=True)
    extracted = response[: len(answer)]
    return RewardResult(reward=1.0 if extracted == answer else 0.0, extracted=extracted)
