"""Math answer verification with math-verify.

Rule (what a response is scored on):

* The answer is the content of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``) in the response;
  earlier boxes are ignored, so a model that revises its answer is scored on its final one.
  Braces are matched, so nested content such as ``\\boxed{\\frac{a}{b}}`` is taken whole, and
  escaped braces (``\\{ \\}``) do not count.
* If the response has no box, its last box is never closed (a truncated response), or the box is
  empty, the reward is 0 with ``no_answer=True``.
* Otherwise the boxed text and the reference answer are both parsed by math-verify (LaTeX first,
  then plain expressions) and compared with ``math_verify.verify(gold, pred)``: reward 1 if equal,
  else 0. Equivalences are math-verify's: ``\\frac{1}{2}`` = ``\\dfrac12`` = ``0.5`` = ``1/2``;
  units in ``\\text{}``/``\\mathrm{}`` or plain words are dropped (``5\\text{ cm}`` = ``5``);
  percentages are lenient (``50\\%`` = ``50`` = ``0.5``).
* A reference answer that may itself be a solution containing ``\\boxed{}`` is reduced to its last
  box first. A reference math-verify cannot parse gives reward 0 with ``error`` set (a data problem).

Time limits: math-verify's own ``signal.alarm`` timeouts only work in a process's main thread and
would cancel an outer alarm, so they are disabled here; ``RewardPool`` bounds the whole call
instead (an alarm in the worker's main thread, then a hard kill of the worker).
"""

from __future__ import annotations

import functools
import logging

from .registry import RewardResult, register_reward

__all__ = ["extract_last_boxed", "math_reward"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


@functools.cache
def _math_verify():
    """math-verify, imported on first use: it pulls in sympy (seconds), which every command that
    merely loads a recipe (``config``, the pre-flight checks of ``train``) would pay otherwise."""
    import math_verify

    # Boxed-first extraction: the text we hand over is always "\boxed{<answer>}".
    extraction = (math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig())
    return math_verify, extraction


class _DropDisabledTimeoutWarning(logging.Filter):
    # math-verify warns once per process that its timeout is disabled; ours replaces it.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


def _matching_brace(text: str, open_pos: int) -> int | None:
    """Index of the brace closing the one at ``open_pos``; None if it never closes."""
    depth = 0
    i = open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character (e.g. "\{") is not a group delimiter
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` in ``text``; None if absent or unclosed."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    pos = start + len(cmd)
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos >= len(text) or text[pos] != "{":
        return None
    close = _matching_brace(text, pos)
    if close is None:
        return None
    return text[pos + 1 : close].strip()


def _parse_boxed(content: str) -> list:
    math_verify, extraction = _math_verify()
    return math_verify.parse("\\boxed{" + content + "}", extraction_config=extraction, parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_reference(answer: str) -> tuple:
    # Every prompt's reference is scored against n samples: parse it once.
    boxed = extract_last_boxed(answer)
    return tuple(_parse_boxed(boxed if boxed is not None else answer.strip()))


@register_reward("math")
def math_reward(response: str, answer: str) -> RewardResult:
    """1.0 if the last boxed answer of ``response`` equals ``answer`` under math-verify, else 0.0."""
    extracted = extract_last_boxed(response)
    if not extracted:
        return RewardResult(reward=0.0, no_answer=True, extracted=extracted)
    gold = _parse_reference(str(answer))
    if not gold:
        return RewardResult(
            reward=0.0, error=f"reference answer {answer!r} could not be parsed", extracted=extracted
        )
    pred = _parse_boxed(extracted)
    correct = _math_verify()[0].verify(list(gold), pred, timeout_seconds=None)
    return RewardResult(reward=1.0 if correct else 0.0, extracted=extracted)


# RewardPool calls this once per worker (and inline pool) before the first sample, outside the
# per-sample time limit: an import interrupted by the alarm would leave sympy half-imported.
math_reward.prepare = _math_verify
