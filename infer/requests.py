"""What the server hands the batcher: a generation request, and the refusal once its worker failed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from infer.events import Finished, Prompt, Token
from llama_jax.decoding.sampling import Sampling
from llama_jax.text.grammar import Grammar


class WorkerFailed(RuntimeError):
    """The worker thread failed (`Batcher.error`): the batcher takes no more requests."""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation: token-id prompt, token limit (0: the prompt's score only), sampling
    settings, seed, and `emit`, called from the worker thread with the `Prompt` (if
    `score_prompt`), each `Token`, then one `Finished`. Setting `cancelled` (a stop string
    matched, the client left) frees its slot at the next step. `images` (Llama 3.2 Vision):
    the prompt's image arrays, one row (`llama_jax.vision.image.image_inputs` of this prompt),
    or None for a text prompt. `grammar` (structured outputs): what the answer must match
    (`llama_jax.text.grammar`), or None for free text."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    seed: int
    emit: Callable[[Prompt | Token | Finished], None]
    cancelled: bool = False
    score_prompt: bool = False
    images: dict | None = None
    grammar: Grammar | None = None
