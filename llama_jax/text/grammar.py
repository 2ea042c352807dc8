"""Structured outputs, the host's side: JSON schemas turned into a mask of allowed tokens per step.

    vocabulary = GrammarVocabulary(tokenizer, vocab_size)  # once per tokenizer (~1.5 s for Llama 3's)
    grammar = json_grammar(schema, vocabulary)    # GrammarError (one line) for a schema it cannot compile
    rows = RowMatchers(rows=8, vocab_size)        # a batch's bitmask, all tokens allowed
    rows.start(row, grammar)                      # the row's mask: what may come first
    rows.advance(row, token)                      # the token sampled; the mask of what may follow
    rows.release(row)                             # a free row again: every token allowed

`RowMatchers.bits` is int32 [rows, words] (`bitmask_words(vocab_size)`): bit t % 32 of word
t // 32 is set where token t may come next; the decode step unpacks and applies it on the
device (`llama_jax.decoding.sampling.sample`'s `allowed_bw`). A row without a grammar has every
bit set, so constrained and free rows share one batch and one compiled step.

The grammar library is llguidance (docs/serving.md says why). The JSON it admits is written
as `json.dumps` writes it (", " and ": " between items, no other whitespace): a grammar that
allows any whitespace lets a model pad its answer with blank lines until its token limit.
When the grammar accepts, the tokenizer's stop tokens are allowed, so a row ends with a stop
token as an unconstrained one does; once the value is complete, they are all that is allowed.
"""

from __future__ import annotations

import llguidance
import numpy as np

from llama_jax.decoding.sampling import bitmask_words
from llama_jax.text.tokenizer_base import Tokenizer

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}  # response_format json_object: some JSON object
SPECIAL = b"\xff"  # llguidance's mark for a special token's bytes: no grammar ever writes them


class GrammarError(ValueError):
    """A schema the grammar library cannot compile, or one no value satisfies (one line)."""


class _Wrapped:
    """Our tokenizer as llguidance's TokenizerWrapper reads one: each id's bytes, special ids, and
    encoding (llguidance tokenizes a grammar's fixed strings with it and allows those tokens).

    SentencePiece (Llama 2) writes a space before a text's first word (its dummy prefix `▁`):
    text given to llguidance must come back as its own bytes, so such a tokenizer encodes a
    marker first (`MARKER`, a control byte that no word merges with) and drops the marker's tokens."""

    MARKER = "\x02"

    def __init__(self, tokenizer: Tokenizer):
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)
        specials = tokenizer.special_ids
        self.tokens = [SPECIAL + tokenizer.token_bytes(i) if i in specials else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]
        self._tokenizer = tokenizer
        prefixed = b"".join(self.tokens[i] for i in tokenizer.encode("a")) != b"a"
        self._marker = tokenizer.encode(self.MARKER) if prefixed else None

    def __call__(self, text: bytes | str) -> list[int]:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        if self._marker is None:
            return self._tokenizer.encode(text)
        ids = self._tokenizer.encode(self.MARKER + text)
        return ids[len(self._marker):] if ids[:len(self._marker)] == self._marker else ids


class GrammarVocabulary:
    """A tokenizer's vocabulary as the grammar library needs it (built once: ~1.5 s for Llama 3's).
    `vocab_size`: the model's ids (a model's table may be padded past its tokenizer; such ids
    are never allowed). The tokenizer's stop ids end a constrained row."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None):
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(tokenizer)),
                                                eos_token=sorted(tokenizer.stop_ids))
        self.words = bitmask_words(tokenizer.vocab_size)  # of the library's masks: the tokenizer's ids


class Grammar:
    """A compiled grammar over one vocabulary; `matcher()` makes one row's state."""

    def __init__(self, text: str, vocabulary: GrammarVocabulary):
        self.text, self.vocabulary = text, vocabulary

    def matcher(self) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.vocabulary.tokenizer, self.text, log_level=0)


def json_grammar(schema: dict | bool, vocabulary: GrammarVocabulary | None) -> Grammar:
    """The grammar of JSON values that `schema` (a JSON schema) admits. GrammarError (one line,
    the library's reason) for a schema it cannot compile or that no value satisfies. Without a
    `vocabulary` the schema is only checked (before a model loads); the grammar makes no matcher."""
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as err:
        raise GrammarError(_one_line(str(err))) from None
    error = llguidance.LLMatcher.validate_grammar(text, None if vocabulary is None else vocabulary.tokenizer)
    if error:
        raise GrammarError(_one_line(error))
    return Grammar(text, vocabulary)


def _one_line(message: str) -> str:
    return " ".join(message.split())[:200]


class RowMatchers:
    """The grammar state of a batch's rows and their bitmask `bits` (int32 [rows, words]); rows
    without a grammar allow every token. Rows are independent: a server's slots, a batch's prompts."""

    def __init__(self, rows: int, vocab_size: int):
        self.bits = np.full((rows, bitmask_words(vocab_size)), -1, np.int32)
        self._matchers: list[llguidance.LLMatcher | None] = [None] * rows
        self._grammars: list[Grammar | None] = [None] * rows

    def constrained(self, row: int) -> bool:
        return self._matchers[row] is not None

    def any(self) -> bool:
        return any(m is not None for m in self._matchers)

    def start(self, row: int, grammar: Grammar | None) -> None:
        """Give `row` a fresh state of `grammar` (None: free) and its first mask."""
        self._matchers[row] = None if grammar is None else grammar.matcher()
        self._grammars[row] = grammar
        self._fill(row)

    def advance(self, row: int, token: int) -> None:
        """Feed a constrained row the token it sampled and compute the mask of what may follow.
        Should the library fail on it (its resource limits), only stop tokens may follow."""
        matcher = self._matchers[row]
        if matcher.consume_token(int(token)) and not matcher.is_error():
            self._fill(row)
            return
        self.bits[row] = 0
        for stop in self._grammars[row].vocabulary.tokenizer.eos_tokens:
            self.bits.view(np.uint32)[row, stop // 32] |= np.uint32(1 << (stop % 32))

    def release(self, row: int) -> None:
        self._matchers[row] = self._grammars[row] = None
        self.bits[row] = -1

    def _fill(self, row: int) -> None:
        matcher = self._matchers[row]
        if matcher is None:
            self.bits[row] = -1
            return
        self.bits[row] = 0  # ids past the tokenizer's (a padded model table): never allowed
        matcher.unsafe_compute_mask_ptr(self.bits[row].ctypes.data, 4 * self._grammars[row].vocabulary.words)
