"""A Llama Guard model loaded to classify: conversations in, verdicts out.

    guard = Guard.load("Llama-Guard-3-1B/", ServingOptions(layout="fsdp_tp"))
    prompts = [guard.format.prompt(messages) for messages in conversations]
    results = guard.classify(prompts, threshold=None, batch_size=8)
    results[0].verdict, results[0].categories, results[0].unsafe_probability

`guard_format(checkpoint)` reads only the config, the tokenizer and the chat
template, so prompts can be shown (`python -m infer.guard --show-prompt`)
without loading weights. The prompt format itself is
`llama_jax.text.guard_format`.

How a batch is classified: greedy decoding through the inference `Engine`
(prefill, then the compiled decode loop, sharded by the layout), a few tokens
per conversation. Conversations are sorted by length, so a batch pads little,
and the last batch is padded with copies to the full batch size, so every
batch of a prompt-length bucket runs one compiled program. The model writes
"\\n\\n" before its verdict (the prompt ends at the assistant header), so the
unsafe probability is read from the logits of the first generated token that
is not whitespace: the prefill's, or the first decode step's; only those two
steps return logits.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from infer.engine import Engine, engine_for
from infer.generate import checkpoint_config, load_served
from infer.options import ServingOptions
from llama_jax.config import ModelConfig
from llama_jax.decoding.programs import NO_TOKEN
from llama_jax.decoding.sampling import Sampling
from llama_jax.text.tokenizer import find_tokenizer
from llama_jax.paths import user_path
from llama_jax.text.chat_template import find_chat_template, special_tokens
from llama_jax.text.guard_format import GuardFormat, GuardPrompt, parse_verdict
from llama_jax.text.tokenizer import Tokenizer, load_tokenizer
from llama_jax.vision.image import image_inputs

GREEDY = Sampling(0.0, None, None)
MAX_NEW_TOKENS = 32  # "\n\n", "unsafe", "\n" and a few codes; rows stop at <|eot_id|> long before
UNSAFE, SAFE = "unsafe", "safe"


@dataclasses.dataclass(frozen=True)
class Classification:
    """One conversation's result. verdict: "safe", "unsafe" or "malformed" (the answer was
    neither; with a threshold, the probability decides instead); categories: the codes the
    answer named, and their names; unsafe_probability: the probability of "unsafe" as the first
    word; text: the answer as generated."""

    verdict: str
    categories: tuple[str, ...]
    names: tuple[str, ...]
    unsafe_probability: float
    text: str

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "categories": list(self.categories), "category_names": list(self.names),
                "unsafe_probability": round(self.unsafe_probability, 6), "output": self.text}


def guard_format(checkpoint, tokenizer: str | os.PathLike | None = None) -> tuple[GuardFormat, ModelConfig]:
    """(the prompt format, the model config) of a guard checkpoint, weights unread. The chat
    template and special tokens come from the tokenizer's directory."""
    config = checkpoint_config(checkpoint)
    directory = tokenizer_directory(checkpoint, tokenizer)
    tok = load_tokenizer(tokenizer or directory)
    image = config.vision.image_token_id if config.vision is not None else None
    return GuardFormat(tok, find_chat_template(directory), special_tokens(directory), image), config


def tokenizer_directory(checkpoint, tokenizer=None):
    """The directory holding the tokenizer: `tokenizer`'s (a file's parent), else the one
    `infer.generate.load_served` finds beside the checkpoint."""
    if tokenizer is not None:
        path = user_path(tokenizer)
        return path if path.is_dir() else path.parent
    return find_tokenizer(checkpoint)


class Guard:
    """A loaded guard model: its config, placed params, tokenizer, prompt format and engine."""

    def __init__(self, config: ModelConfig, params, tokenizer: Tokenizer, format: GuardFormat, engine: Engine,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        self.config, self.params, self.tokenizer, self.format, self.engine = config, params, tokenizer, format, engine
        self.max_new_tokens = max_new_tokens
        self.stops = tokenizer.stop_ids
        self.unsafe_id = tokenizer.encode(UNSAFE)[0]
        if self.unsafe_id == tokenizer.encode(SAFE)[0]:
            raise ValueError("this tokenizer starts 'safe' and 'unsafe' with the same token; the unsafe "
                             "probability cannot be read from the first token")

    @classmethod
    def load(cls, checkpoint, options: ServingOptions | None = None, tokenizer=None,
             max_new_tokens: int = MAX_NEW_TOKENS) -> Guard:
        """Load a guard checkpoint (ours or Hugging Face) served with `options` (layout, dtype, ...)."""
        options = options or ServingOptions()
        fmt, _ = guard_format(checkpoint, tokenizer)
        config, params, tok = load_served(checkpoint, options, tokenizer)
        layout = options.layout
        engine = engine_for(config, layout) if layout is None or isinstance(layout, str) else Engine(config, layout)
        return cls(config, params, tok, fmt, engine, max_new_tokens)

    def classify(self, prompts: Sequence[GuardPrompt], images: Sequence[Sequence] | None = None,
                 threshold: float | None = None, batch_size: int = 8,
                 progress: Callable[[int], None] | None = None) -> list[Classification]:
        """Classify prompts (`self.format.prompt(...)`), in order. images: one list of PIL images
        per prompt (vision models), matching the prompts' `<|image|>`. threshold: call a
        conversation unsafe when its unsafe probability is at least this (None: as the answer
        says). progress(n) is called after each batch with the conversations done."""
        if not prompts:
            return []
        ids = [p.ids for p in prompts]
        limit = self.config.max_seq_len
        for i, row in enumerate(ids):
            if len(row) + self.max_new_tokens > limit:
                raise ValueError(f"conversation {i}: its prompt has {len(row)} tokens; with {self.max_new_tokens} to "
                                 f"generate that is over the guard model's context of {limit}")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: list[Classification | None] = [None] * len(ids)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            padded = rows + [rows[-1]] * (batch_size - len(rows))  # one shape per bucket
            row_images = None if images is None else [images[i] for i in padded]
            texts, probabilities = self._run([ids[i] for i in padded], row_images)
            for k, i in enumerate(rows):
                results[i] = self._read(prompts[i], texts[k], probabilities[k], threshold)
            if progress is not None:
                progress(len(rows))
        return results

    def _run(self, ids: list[list[int]], images) -> tuple[list[str], np.ndarray]:
        """Greedy answers of a batch, and each row's unsafe probability."""
        arrays = None
        if images is not None and any(images):
            arrays = image_inputs(images, ids, self.config.vision)
        engine, n, stops = self.engine, len(ids), set(self.stops)
        state, first_b, logits_bv = engine.prefill(self.params, ids, self.max_new_tokens, GREEDY, 0, stops,
                                                   keep_logits=True, images=arrays)
        tokens = [[int(t)] for t in first_b]
        step_logits = [logits_bv]

        def finished():
            return all(len(row) >= self.max_new_tokens or stops.intersection(row) for row in tokens)

        # The first decode step's logits too: the verdict word may follow a whitespace token.
        for steps, keep in ((1, True), (self.max_new_tokens - 2, False)):
            if steps < 1 or finished():
                break
            state, out_bn, logits_bnv = engine.decode(self.params, state, steps, GREEDY, stops, keep, rows=n)
            if keep:
                step_logits.append(logits_bnv[:, 0])
            for row, out in enumerate(out_bn.tolist()):
                tokens[row] += [t for t in out if t != NO_TOKEN]
        texts, probabilities = [], np.zeros(n)
        for row, row_tokens in enumerate(tokens):
            answer = []
            for t in row_tokens:
                if t in stops:
                    break
                answer.append(t)
            texts.append(self.tokenizer.decode([t for t in answer if t < self.tokenizer.vocab_size]))
            # The first token that is not whitespace (at most the second) carries the verdict word.
            step = 1 if len(step_logits) > 1 and len(answer) > 1 and not self._text(answer[0]).strip() else 0
            probabilities[row] = _softmax(step_logits[step][row])[self.unsafe_id]
        return texts, probabilities

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if token < self.tokenizer.vocab_size else "?"

    def _read(self, prompt: GuardPrompt, text: str, probability: float, threshold: float | None) -> Classification:
        verdict = parse_verdict(text, prompt.codes)
        decided = verdict.verdict
        if threshold is not None:
            decided = UNSAFE if probability >= threshold else SAFE
        codes = verdict.categories if decided == UNSAFE else ()
        by_code = {c.code: c for c in prompt.codes.values()}
        return Classification(decided, codes, tuple(by_code[c].name.strip() for c in codes), float(probability), text)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()
