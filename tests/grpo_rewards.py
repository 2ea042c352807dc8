"""Reward functions for tests/test_grpo.py, named as `grpo_rewards:<function>` (tests/ is on the path)."""

from __future__ import annotations


def answer_length(messages, answer):
    """Longer answers score higher: a reward that random weights already spread."""
    return float(len(answer))


def raises(messages, answer):
    raise KeyError("no expected answer in this prompt")


def not_a_number(messages, answer):
    return float("nan")
