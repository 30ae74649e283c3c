"""Reward of the demo's synthetic tasks (see ``maspo_megatron.data.synthetic``)."""

from __future__ import annotations

import re

from .registry import RewardResult, register_reward

# The demo tokenizer's special tokens decode to "<name>"; each is one position, like a character.
_POSITION = re.compile(r"<[^<>]*>|.", re.S)

__all__ = ["synthetic_reward"]


@register_reward("synthetic")
def synthetic_reward(response: str, answer: str) -> RewardResult:
    """The fraction of the answer's characters that the response reproduces in place.

    Character i of the answer counts when token i of the response (a character, or a special
    token such as ``<eos>``) equals it; whatever follows the answer's length is ignored. A
    one-character answer thus scores 1 exactly when the response starts with it; a long one earns
    partial credit per digit, which gives a random policy signal. Decode responses with
    ``skip_special_tokens=False``: a special token then takes its position and matches nothing,
    so a response cut short by EOS scores only the characters before it; an empty response
    scores 0 with ``no_answer=True``.
    """
    answer = str(answer)
    if not answer:
        return RewardResult(reward=0.0, error="empty reference answer")
    if not response:
        return RewardResult(reward=0.0, no_answer=True)
    positions = _POSITION.findall(response)[: len(answer)]
    right = sum(r == a for r, a in zip(positions, answer))
    return RewardResult(reward=right / len(answer), extracted="".join(positions))
