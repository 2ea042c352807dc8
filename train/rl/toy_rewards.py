"""The verifiable reward of the toy sums (configs/data/toy/sum_prompts.jsonl, configs/runs/grpo_tiny.yaml):
1 for the right sum of the two numbers the last user turn gives ("3 + 4 ="), else 0."""

from __future__ import annotations

import re

_SUM = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


def sum_reward(messages: list[dict], answer: str) -> float:
    """1.0 if `answer` is the sum asked for by the last message ("a + b ="), else 0.0."""
    asked = _SUM.match(messages[-1]["content"])
    if asked is None:
        raise ValueError(f"not a sum prompt: {messages[-1]['content']!r}")
    return float(answer.strip() == str(int(asked[1]) + int(asked[2])))
