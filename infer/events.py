"""What a generation reports, token by token: plain data, no JAX.

The batcher (infer/batcher.py) calls a request's `emit` with its `Prompt` (if it asked for
its prompt's log-probabilities), each `Token`, then one `Finished`; the server's answers
(infer/responses.py) are built from them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Token:
    """One token: its id, log-probability and the top alternatives (ids, log-probabilities).
    A prompt's first token has logprob None and no alternatives: nothing precedes it."""

    id: int
    logprob: float | None
    top_ids: list[int]
    top_logprobs: list[float]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A request's prompt scored by the model (`Request.score_prompt`): one `Token` per prompt
    token, each given those before it."""

    tokens: list[Token]


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a request: reason "stop" (a stop token), "length" (max_tokens), "cancelled", or
    "error" (the worker failed)."""

    reason: str
