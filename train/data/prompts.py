"""Prompts for reinforcement learning: the conversations a policy's answers continue."""

from __future__ import annotations

import numpy as np

from llama_jax.text.chat import format_chat, prompt_messages
from train.data.sources import JsonlRecords


class Prompts(JsonlRecords):
    """Prompts from JSONL files, for reinforcement learning (train/rl/): the conversations a
    policy's answers continue.

    Each line is `{"messages": [...]}` (a conversation ending with a user turn) or
    `{"prompt": str}` (one user turn), as infer.rejection reads them; other fields (an expected
    answer, say) are the reward function's to read. `prompts[i]` is prompt i chat-formatted
    for the model to answer (int32 ids, llama_jax.text.chat.format_chat); `messages(i)` its
    conversation. ValueError (one line) names the file and line of a malformed prompt.
    """

    def __init__(self, paths, tokenizer):
        super().__init__(paths, tokenizer, "prompts")

    def messages(self, i: int) -> list[dict]:
        try:
            return prompt_messages(self.lines.record(i))
        except ValueError as err:
            raise ValueError(f"{self.location(i)}: {err}") from None

    def __getitem__(self, i: int) -> np.ndarray:
        try:
            return np.asarray(format_chat(self.tokenizer, self.messages(i)), np.int32)
        except ValueError as err:
            text = str(err)
            raise ValueError(text if text.startswith(self.location(i)) else f"{self.location(i)}: {text}") from None
