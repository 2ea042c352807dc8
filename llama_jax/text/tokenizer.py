"""Tokenizers for the Llama family, loaded from local files.

Three file formats, one interface (`Tokenizer`):

- SentencePiece `tokenizer.model` (Llama 2), via the `sentencepiece` package;
- tiktoken-format `tokenizer.model` (Llama 3.x and 4): lines of `base64token rank`,
  with Meta's special tokens appended after the regular ranks (256 for Llama 3;
  2048 and another pattern for Llama 4, llama_jax/text/llama4_tokens.py);
- Hugging Face `tokenizer.json`, via the `tokenizers` package.

`load_tokenizer(path)` picks one from the files. `llama_jax.text.stream_decoder`
turns a stream of generated ids into text. Small tokenizers of the first two
kinds are trained by `llama_jax.text.tokenizer_training`.
"""

from __future__ import annotations

import abc
import base64
import json
import os
import re
from collections.abc import Iterable

import sentencepiece as spm
import tiktoken
import tokenizers
from etils import epath

from llama_jax.cli import first_line
from llama_jax.paths import check_bucket, user_path
from llama_jax.text import llama4_tokens

# Meta's Llama 3 pre-tokenizer regex (`pat_str`), see REFERENCE.md.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta cuts long inputs before tiktoken sees them: tiktoken's regex matching
# and BPE slow down badly on huge strings and on very long runs without a
# change between whitespace and non-whitespace.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % ((_MAX_RUN_CHARS + 1,) * 2))

# Meta's names in id order, as its current reference tokenizer (the
# llama-models package) has them; reserved_2... follow (REFERENCE.md).
_LLAMA3_NAMED_SPECIALS = (
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
_RESERVED_PREFIX = "<|reserved_special_token_"
_LLAMA3_STOPS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")


def llama3_special_tokens(count: int = 256) -> list[str]:
    """Meta's Llama 3 special-token names in id order (ids start after the ranks)."""
    reserved = [
        f"{_RESERVED_PREFIX}{i}|>" for i in range(2, 2 + count - len(_LLAMA3_NAMED_SPECIALS))
    ]
    return list(_LLAMA3_NAMED_SPECIALS) + reserved


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


class SentencePieceTokenizer(Tokenizer):
    """Llama 2's SentencePiece model (BOS `<s>`, EOS `</s>`, no pad)."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<memory>"):
        self._sp = processor
        self.generation = "llama2"
        self.vocab_size = processor.vocab_size()
        self.bos_id, self.eos_id = processor.bos_id(), processor.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{source}: SentencePiece model defines no BOS or EOS piece")
        self.pad_id = processor.pad_id() if processor.pad_id() >= 0 else None
        self.stop_ids = frozenset({self.eos_id})
        # Control pieces (<s>, </s>) are never produced from text by
        # SentencePiece itself; allow_special=True splits them out by hand.
        self._specials = {
            processor.id_to_piece(i): i for i in range(self.vocab_size) if processor.is_control(i)
        }
        self.special_ids = frozenset(self._specials.values())
        longest_first = sorted(self._specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def token_id(self, piece: str) -> int:
        if piece not in self._specials:
            raise ValueError(f"{piece!r} is not a special token of this tokenizer")
        return self._specials[piece]

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special or not self._specials:
            return self._sp.encode(text)
        ids: list[int] = []
        for part in self._special_re.split(text):
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def _decode(self, ids: list[int]) -> str:
        # sp.decode drops control ids; decode the runs between them instead.
        out, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def _token_bytes(self, token_id: int) -> bytes:
        return _piece_bytes(self._sp.id_to_piece(token_id), self._sp.is_byte(token_id))


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE: regular ranks plus Meta's special tokens, Llama 3.x's or Llama 4's.

    `generation` None picks by the file: Meta's Llama 4 ranks are 200,000
    tokens (llama4_tokens.RANKS), anything else is read as Llama 3's layout.
    """

    def __init__(self, ranks: dict[bytes, int], source: str = "<memory>", generation: str | None = None):
        n = len(ranks)
        if n == 0:
            raise ValueError(f"{source}: tiktoken rank file holds no tokens")
        if max(ranks.values()) != n - 1 or len(set(ranks.values())) != n:
            raise ValueError(f"{source}: ranks must be the distinct integers 0..{n - 1}")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"{source}: no token for byte 0x{missing[0]:02x}; each byte needs one")
        self.generation = generation or ("llama4" if n == llama4_tokens.RANKS else "llama3")
        if self.generation == "llama4":
            names, pattern = llama4_tokens.special_tokens(), llama4_tokens.PATTERN
            stops, pad = llama4_tokens.STOPS, llama4_tokens.PAD
        elif self.generation == "llama3":
            # Llama 3.1 names its pad token for padding fine-tuning batches.
            names, pattern, stops, pad = llama3_special_tokens(), LLAMA3_PATTERN, _LLAMA3_STOPS, \
                "<|finetune_right_pad_id|>"
        else:
            raise ValueError(f"{source}: generation {generation!r} is not llama3 or llama4")
        self._specials = {s: n + i for i, s in enumerate(names)}
        self._enc = tiktoken.Encoding(
            name=os.path.basename(source),
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=self._specials,
        )
        self.vocab_size = n + len(self._specials)
        self.bos_id = self._specials["<|begin_of_text|>"]
        self.eos_id = self._specials["<|end_of_text|>"]
        self.pad_id = self._specials[pad]
        self.stop_ids = frozenset(self._specials[s] for s in stops)
        self.special_ids = frozenset(self._specials.values())

    @classmethod
    def from_file(cls, path: str | os.PathLike, generation: str | None = None) -> TiktokenTokenizer:
        """Load a `base64token rank` file; ValueError naming the file if it is not one."""
        try:
            ranks = _parse_ranks(user_path(path).read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return cls(ranks, str(path), generation)

    def token_id(self, piece: str) -> int:
        if piece not in self._specials:
            raise ValueError(f"{piece!r} is not a special token of this tokenizer")
        return self._specials[piece]

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for piece in _split_long_text(text):
            ids.extend(self._enc.encode(piece, allowed_special=allowed, disallowed_special=()))
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")

    def _token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)


def _split_long_text(text: str) -> Iterable[str]:
    """Cut text as Meta does: pieces of <= 400k chars, then runs of > 25k
    whitespace or non-whitespace chars into 25k-char slices."""
    for start in range(0, len(text), _MAX_ENCODE_CHARS):
        piece = text[start : start + _MAX_ENCODE_CHARS]
        if len(piece) <= _MAX_RUN_CHARS:
            yield piece
            continue
        cut = 0
        for run in _LONG_RUN.finditer(piece):
            for at in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                yield piece[cut:at]
                cut = at
        yield piece[cut:]


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse tiktoken's `base64token rank` lines; ValueError naming the first bad line."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(
                f"line {lineno} is not a tiktoken 'base64token rank' line: {line[:40]!r}"
            ) from None
    return ranks


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
            names = llama4_tokens.STOPS if self.generation == "llama4" else _LLAMA3_STOPS
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
        for offset, name in enumerate(_LLAMA3_NAMED_SPECIALS):
            here = self._tok.id_to_token(base + offset) or ""
            if here.startswith(_RESERVED_PREFIX) and not name.startswith(_RESERVED_PREFIX):
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
        return _piece_bytes(token, re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) is not None)


def _has_byte_level(decoder) -> bool:
    """Whether a tokenizer.json decoder (a dict, maybe a Sequence of them) decodes byte-level tokens."""
    if not isinstance(decoder, dict):
        return False
    return decoder.get("type") == "ByteLevel" or any(_has_byte_level(d) for d in decoder.get("decoders") or [])


def _piece_bytes(piece: str, is_byte: bool) -> bytes:
    """A SentencePiece piece's bytes: a byte piece `<0xE2>` is that byte, `▁` a space."""
    if is_byte:
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what `load_tokenizer` looks for in a directory


def tokenizer_beside(path: str | os.PathLike, up: int = 1) -> epath.Path | None:
    """The directory holding a tokenizer file (`TOKENIZER_FILES`) that is `path` itself or one of
    its `up` parents, nearest first (a tokenizer saved with a checkpoint or run); None if none is."""
    directory = user_path(path)
    for _ in range(up + 1):
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            return directory
        directory = directory.parent
    return None


def find_tokenizer(path: str | os.PathLike, up: int = 1) -> epath.Path:
    """`tokenizer_beside(path, up)`, or ValueError (one line) asking for the tokenizer's path."""
    found = tokenizer_beside(path, up)
    if found is None:
        where = "here or in the parent directory" if up == 1 else f"here or in its {up} parent directories"
        raise ValueError(f"{path}: no tokenizer.json or tokenizer.model {where} (pass the tokenizer's path)")
    return found


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a file or a directory holding one.

    A directory is searched for `tokenizer.json` (Hugging Face) then
    `tokenizer.model`. A `.json` file loads as Hugging Face; any other file
    as SentencePiece if it parses as one, else as a tiktoken rank file.
    Raises ValueError with one line naming the file when nothing fits.
    Local or gs:// (llama_jax/paths.py).
    """
    path = user_path(path)
    check_bucket(path)
    if path.is_dir():
        found = [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
        if not found:
            raise ValueError(f"{path}: directory holds no tokenizer.json or tokenizer.model")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"{path}: tokenizer file not found")
    if path.suffix == ".json":
        return HFTokenizer(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
    # SentencePiece loads empty bytes as an uninitialised model, which then
    # logs C++ errors to stderr on every call: refuse them first.
    if not data.strip():
        raise ValueError(f"{path}: empty or corrupt tokenizer (the file holds no tokens)")
    try:
        processor = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError:
        pass
    else:
        return SentencePieceTokenizer(processor, str(path))
    try:
        ranks = _parse_ranks(data)
    except ValueError as e:
        raise ValueError(f"{path}: empty or corrupt tokenizer (not a SentencePiece model; {e})") from None
    return TiktokenTokenizer(ranks, str(path))
