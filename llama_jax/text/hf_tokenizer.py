"""Hugging Face `tokenizer.json` files as a `Tokenizer` (llama_jax/text/tokenizer_base.py), via the
`tokenizers` package: Llama 2's SentencePiece-style files and the byte-level ones of Llama 3 and 4."""

from __future__ import annotations

import json
import os
import re

import tokenizers
from etils import epath

from llama_jax.cli import first_line
from llama_jax.paths import user_path
from llama_jax.text import llama4_tokens
from llama_jax.text.tokenizer_base import LLAMA3_NAMED_SPECIALS, LLAMA3_STOPS, RESERVED_PREFIX, Tokenizer, piece_bytes


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`; BOS/EOS/pad from a sibling
    `tokenizer_config.json` when present, else from Llama's special tokens.

    `token_id` takes the file's names, and for Llama 3 also Meta's names of
    ids the file leaves reserved: Hugging Face's 3.1 files call 128005 and
    128011 reserved_2 and reserved_3, Meta `<|step_id|>` and `<|image|>`.
    """

    def __init__(self, path: str | os.PathLike):
        path = user_path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            reason = first_line(e)
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({reason})") from None
        added = self._tok.get_added_tokens_decoder()
        self._specials = {tok.content: i for i, tok in added.items() if tok.special}
        config = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        self.generation = ("llama4" if "<|header_start|>" in self._specials
                           else "llama3" if "<|eot_id|>" in self._specials else "llama2")
        llama3 = self.generation in ("llama3", "llama4")
        bos = config.get("bos_token") or ("<|begin_of_text|>" if llama3 else "<s>")
        eos = config.get("eos_token") or ("<|end_of_text|>" if llama3 else "</s>")
        self.bos_id, self.eos_id = self._tok.token_to_id(bos), self._tok.token_to_id(eos)
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{path}: no BOS token {bos!r} or EOS token {eos!r} in this tokenizer")
        pad = config.get("pad_token")
        self.pad_id = self._tok.token_to_id(pad) if pad else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        stops = {self.eos_id}
        if llama3:
            names = llama4_tokens.STOPS if self.generation == "llama4" else LLAMA3_STOPS
            stops |= {self._specials[s] for s in names if s in self._specials}
        self.stop_ids = frozenset(stops)
        self._meta_names = self._meta_names_of_reserved_ids() if self.generation == "llama3" else {}
        self._added = {i: tok.content for i, tok in added.items()}
        self.special_ids = frozenset(self._specials.values())
        # Byte-level files (Llama 3's) spell each byte as one of GPT-2's 256 characters;
        # SentencePiece-style files (Llama 2's) have `▁` for a space and <0xNN> byte pieces.
        self._byte_level = _has_byte_level(json.loads(self._tok.to_str()).get("decoder"))
        self._char_bytes = byte_level_chars() if self._byte_level else {}

    def _meta_names_of_reserved_ids(self) -> dict[str, int]:
        """Meta's names (reserved ones aside) for ids this file calls reserved.

        The file's own names win in `token_id`, so a name never means two ids.
        """
        base = self._specials.get("<|begin_of_text|>")
        if base is None:
            return {}
        names = {}
        for offset, name in enumerate(LLAMA3_NAMED_SPECIALS):
            here = self._tok.id_to_token(base + offset) or ""
            if here.startswith(RESERVED_PREFIX) and not name.startswith(RESERVED_PREFIX):
                names[name] = base + offset
        return names

    def token_id(self, piece: str) -> int:
        i = self._tok.token_to_id(piece)
        if i is None:
            i = self._meta_names.get(piece)
        if i is None:
            raise ValueError(f"{piece!r} is not a token of this tokenizer")
        return i

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        # The flag makes the tokenizer treat special-token strings as text.
        # It is state on the shared tokenizer, so set it on every call.
        self._tok.encode_special_tokens = not allow_special
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _token_bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        token = self._tok.id_to_token(token_id) or ""
        if self._byte_level:
            return bytes(self._char_bytes[c] for c in token)
        return piece_bytes(token, re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) is not None)


def _has_byte_level(decoder) -> bool:
    """Whether a tokenizer.json decoder (a dict, maybe a Sequence of them) decodes byte-level tokens."""
    if not isinstance(decoder, dict):
        return False
    return decoder.get("type") == "ByteLevel" or any(_has_byte_level(d) for d in decoder.get("decoders") or [])


def byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: each of the 256 characters a
    byte-level token is spelt with, to its byte. Printable Latin-1 bytes stand
    for themselves; the other 68 take the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = (b for b in range(256) if b not in printable)
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(shifted)}


def _read_tokenizer_config(path: epath.Path) -> dict[str, str]:
    """bos/eos/pad token strings from a tokenizer_config.json, if it exists."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable tokenizer config ({e})") from None
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):  # older files store an AddedToken dict
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out
