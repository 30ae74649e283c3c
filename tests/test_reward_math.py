"""The math reward against a table of real answer formats, and the boxed-answer rule."""

import pytest

from maspo_megatron.reward import extract_last_boxed, get_reward, math_reward

# (reference answer, model response, expected reward)
FORMATS = [
    # fractions in their usual spellings
    ("\\frac{1}{2}", "The answer is \\boxed{0.5}.", 1.0),
    ("\\frac{1}{2}", "So $\\boxed{1/2}$", 1.0),
    ("0.5", "Thus \\boxed{\\dfrac{1}{2}}", 1.0),
    ("\\frac12", "\\boxed{\\tfrac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0.0),
    ("\\frac{1}{3}", "\\boxed{0.33}", 0.0),
    # units are dropped
    ("5", "The side is \\boxed{5 \\text{ cm}}", 1.0),
    ("5", "\\boxed{5\\text{ cm}}", 1.0),
    ("5", "\\boxed{5 cm}", 1.0),
    ("12", "\\boxed{12^\\circ}", 1.0),
    # percentages (math-verify is lenient: 50% == 50 == 0.5)
    ("50\\%", "\\boxed{50}", 1.0),
    ("50", "\\boxed{50\\%}", 1.0),
    ("40\\%", "\\boxed{50\\%}", 0.0),
    # integers, decimals, thousands separators
    ("10", "\\boxed{10.0}", 1.0),
    ("1000", "\\boxed{1,000}", 1.0),
    ("3", "\\boxed{4}", 0.0),
    # nested braces and symbolic answers
    ("\\frac{a}{b}", "\\boxed{\\frac{a}{b}}", 1.0),
    ("\\sqrt{2}", "\\boxed{2^{1/2}}", 1.0),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt{3}}{2}}", 1.0),
    ("\\{1,2\\}", "\\boxed{\\{1, 2\\}}", 1.0),
    ("x=3", "\\boxed{3}", 1.0),
    ("\\infty", "\\boxed{\\infty}", 1.0),
    # multiple boxes: the last one counts
    ("7", "First \\boxed{5}, wait, actually \\boxed{7}", 1.0),
    ("5", "First \\boxed{5}, wait, actually \\boxed{7}", 0.0),
    # \fbox is a box too
    ("9", "\\fbox{9}", 1.0),
    # a reference that is itself a boxed solution is reduced to its box
    ("so the total is \\boxed{42}", "\\boxed{42}", 1.0),
]


@pytest.mark.parametrize("answer,response,expected", FORMATS)
def test_math_reward_formats(answer, response, expected):
    result = math_reward(response, answer)
    assert result.reward == expected, result
    assert not result.no_answer and result.error is None and not result.timeout


@pytest.mark.parametrize(
    "response",
    [
        "The answer is 7.",  # no box at all: an unboxed 7 does not count
        "\\boxed{}",  # empty box
        "\\boxed{\\frac{1}{2}",  # truncated: the last box never closes
        "\\boxed{7} then \\boxed{\\frac{7",  # the last box is unclosed; the earlier one is not used
    ],
)
def test_missing_boxed_answer_is_zero_with_flag(response):
    result = math_reward(response, "7")
    assert result.reward == 0.0 and result.no_answer


def test_extract_last_boxed():
    assert extract_last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
    assert extract_last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_last_boxed("\\boxed {  3 }") == "3"
    assert extract_last_boxed("\\boxed{2} and \\fbox{x^{2}}") == "x^{2}"
    assert extract_last_boxed("nothing here") is None
    assert extract_last_boxed("\\boxed{") is None
    assert extract_last_boxed("\\boxed x") is None


def test_unparseable_reference_is_reported():
    result = math_reward("\\boxed{3}", "")
    assert result.reward == 0.0 and result.error and "could not be parsed" in result.error


def test_builtin_registered():
    assert get_reward("math") is math_reward
