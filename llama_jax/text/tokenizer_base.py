"""The tokenizer interface (`Tokenizer`) and Meta's Llama 3 special-token names, shared by
the three file formats in llama_jax/text/tokenizer.py and llama_jax/text/hf_tokenizer.py."""

from __future__ import annotations

import abc
from collections.abc import Iterable

# Meta's names in id order, as its current reference tokenizer (the
# llama-models package) has them; reserved_2... follow (REFERENCE.md).
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
RESERVED_PREFIX = "<|reserved_special_token_"
LLAMA3_STOPS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")


def llama3_special_tokens(count: int = 256) -> list[str]:
    """Meta's Llama 3 special-token names in id order (ids start after the ranks)."""
    reserved = [
        f"{RESERVED_PREFIX}{i}|>" for i in range(2, 2 + count - len(LLAMA3_NAMED_SPECIALS))
    ]
    return list(LLAMA3_NAMED_SPECIALS) + reserved


class Tokenizer(abc.ABC):
    """Text <-> token ids, with the special tokens a Llama model needs.

    Attributes set by every implementation:
      generation: "llama2", "llama3" or "llama4" (chat format and special tokens).
      vocab_size: number of ids, special tokens included.
      bos_id, eos_id: begin/end of text; pad_id: an id for padding, or None.
      stop_ids: frozenset of ids that end generation.
      special_ids: frozenset of the special (control) tokens' ids: BOS, EOS, chat headers,
        reserved ones; what a server leaves out of returned text by default.
    """

    generation: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int | None
    stop_ids: frozenset[int]
    special_ids: frozenset[int]

    def encode(
        self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Encode `text` to ids, optionally framed by BOS/EOS.

        Special-token strings inside `text` (e.g. "<|eot_id|>", "</s>") are
        encoded as plain text unless `allow_special` is True, so user input
        cannot forge control tokens.
        """
        ids = self._encode(text, allow_special)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; special tokens come back as their strings.

        Bytes that do not form valid UTF-8 become U+FFFD.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self._decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, as the model sees them (logprobs report these).

        A token holding part of a character (a byte-level token, SentencePiece's
        `<0xE2>` byte piece) gives its raw bytes, where decoding it alone gives
        U+FFFD; a special token gives its string's UTF-8; SentencePiece's word
        mark `▁` is a space. ValueError for an id outside the vocabulary.
        """
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return self._token_bytes(token_id)

    @abc.abstractmethod
    def token_id(self, piece: str) -> int:
        """The id of a special token given its string, e.g. "<|eot_id|>"; ValueError if unknown."""

    @property
    def special_tokens(self) -> frozenset[str]:
        """The strings of the special tokens (each one `token_id` knows), e.g. "<|eot_id|>"."""
        return frozenset(self._specials) | frozenset(getattr(self, "_meta_names", ()))

    @abc.abstractmethod
    def _encode(self, text: str, allow_special: bool) -> list[int]: ...

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def _token_bytes(self, token_id: int) -> bytes: ...

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(generation={self.generation!r}, vocab_size={self.vocab_size})"


def piece_bytes(piece: str, is_byte: bool) -> bytes:
    """A SentencePiece piece's bytes: a byte piece `<0xE2>` is that byte, `▁` a space."""
    if is_byte:
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()
