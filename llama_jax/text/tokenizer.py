"""Tokenizers for the Llama family, loaded from local files.

Three file formats, one interface (`Tokenizer`):

- SentencePiece `tokenizer.model` (Llama 2), via the `sentencepiece` package;
- tiktoken-format `tokenizer.model` (Llama 3.x and 4): lines of `base64token rank`,
  with Meta's special tokens appended after the regular ranks (256 for Llama 3;
  2048 and another pattern for Llama 4, llama_jax/text/llama4_tokens.py);
- Hugging Face `tokenizer.json`, via the `tokenizers` package.

`load_tokenizer(path)` picks one from the files. The interface is in
`llama_jax.text.tokenizer_base`, the Hugging Face kind in `llama_jax.text.hf_tokenizer`.
`llama_jax.text.stream_decoder` turns a stream of generated ids into text. Small
tokenizers of the first two kinds are trained by `llama_jax.text.tokenizer_training`.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable

import sentencepiece as spm
import tiktoken
from etils import epath

from llama_jax.paths import check_bucket, user_path
from llama_jax.text import llama4_tokens
from llama_jax.text.hf_tokenizer import HFTokenizer
from llama_jax.text.tokenizer_base import LLAMA3_STOPS, Tokenizer, llama3_special_tokens, piece_bytes

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
        return piece_bytes(self._sp.id_to_piece(token_id), self._sp.is_byte(token_id))


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
            names, pattern, stops, pad = llama3_special_tokens(), LLAMA3_PATTERN, LLAMA3_STOPS, \
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
