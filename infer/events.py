"""What a generation reports, token by token: plain data, no JAX.

The batcher (infer/batcher.py) calls a request's `emit` with each `Token`, then one
`Finished`; the server's answers (infer/responses.py) are built from them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token: its id, log-probability and the top alternatives (ids, log-probabilities)."""

    id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a request: reason "stop" (a stop token), "length" (max_tokens), "cancelled", or
    "error" (the worker failed)."""

    reason: str
