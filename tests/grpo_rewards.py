"""Reward functions for tests/test_grpo.py, named as `grpo_rewards:<function>` (tests/ is on the path)."""

from __future__ import annotations


def answer_length(messages, answer):
    """Longer answers score higher: a reward that random weights already spread."""
    return float(len(answer))


def raises(messages, answer):
    raise KeyError("no expected answer in this prompt")


def not_a_number(messages, answer):
    return float("nan")


def agrees(messages, answer):
    """1 for "yes" to an "Agree: ..." prompt and "no" to a "Disagree: ..." one (the answer's
    first word), else 0."""
    words = answer.split()
    want = "yes" if messages[-1]["content"].startswith("Agree:") else "no"
    return float(bool(words) and words[0] == want)
