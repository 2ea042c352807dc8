"""Where training documents come from: text files, prepared token files, synthetic ids.

Each source gives random access to documents (`docs[i]`), so the pipeline in
`train/data/pipeline.py` can shuffle and shard them and resume from an index.
"""

from __future__ import annotations

import json
import math
from typing import Protocol

import numpy as np
from etils import epath

from llama_jax.paths import check_bucket, expand_glob, has_magic, is_url, open_ranged, user_path
from train.data.ranged_reads import RangedFile, RangedTokens

# A prepared token directory (written by `python -m train.prepare`).
TOKENS_FILE = "tokens.bin"  # flat uint16/uint32 ids, every document framed BOS ... EOS
INDEX_FILE = "index.npy"  # int64 [num_docs + 1]: start of each document, then the total
META_FILE = "meta.json"  # dtype, vocab_size, bos_id, eos_id, counts
TOKENS_FORMAT = "llama-jax-tokens-v1"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding ids in [0, vocab_size)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class TextTokenizer(Protocol):
    """What the data pipeline needs from `llama_jax.text.tokenizer.Tokenizer`."""

    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


def expand_paths(patterns: tuple[str, ...] | list[str]) -> list[epath.Path]:
    """Files named by `patterns` (local or gs:// paths or globs), in order; ValueError if
    one matches nothing."""
    files = []
    for pattern in patterns:
        check_bucket(pattern)  # a gs:// path: the bucket and credentials, in one line
        if has_magic(pattern):
            matches = expand_glob(pattern)
            if not matches:
                raise ValueError(f"{pattern}: no file matches this pattern")
            files.extend(matches)
        elif user_path(pattern).is_file():
            files.append(user_path(pattern))
        else:
            raise ValueError(f"{pattern}: file not found")
    return files


def no_text_error(paths) -> ValueError:
    """The one-line error for inputs in which no document holds any text."""
    return ValueError(f"{', '.join(map(str, paths))}: no document holds any text")


class TextDocuments:
    """The documents of text files: .jsonl files hold one per non-blank line, and
    any other non-empty file (.txt, source code, ...) is one document.

    `docs[i]` is the text of document i, read from disk on demand; only byte
    offsets are kept in memory. ValueError names file and line of a bad one,
    and the inputs if they hold no document at all (empty files).
    """

    def __init__(self, paths, text_key: str = "text"):
        self.files = expand_paths(paths)
        self._readers = [RangedFile(path) for path in self.files]
        self.text_key = text_key
        entries = []  # (file, byte offset, byte length, line) per document
        for f, path in enumerate(self.files):
            if path.suffix != ".jsonl":
                if path.stat().length:
                    entries.append((f, 0, path.stat().length, 1))
                continue
            with open_ranged(path) as fh:
                offset = 0
                for lineno, line in enumerate(fh, start=1):
                    if line.strip():
                        entries.append((f, offset, len(line), lineno))
                    offset += len(line)
        if not entries:
            raise no_text_error(paths)
        table = np.asarray(entries, np.int64).reshape(-1, 4)
        self._file, self._start, self._length, self._line = table.T

    def __len__(self) -> int:
        return len(self._file)

    def location(self, i: int) -> str:
        """`file:line` of document i, for messages."""
        return f"{self.files[self._file[i]]}:{self._line[i]}"

    def file(self, i: int) -> epath.Path:
        """The file document i is in."""
        return self.files[self._file[i]]

    def nbytes(self, i: int) -> int:
        return int(self._length[i])

    def _text(self, i: int) -> str:
        raw = self._readers[self._file[i]].read(int(self._start[i]), int(self._length[i]))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.location(i)}: not valid UTF-8") from None

    def record(self, i: int) -> dict:
        """The JSON object on line i of the .jsonl inputs (ValueError naming file and line)."""
        try:
            record = json.loads(self._text(i))
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.location(i)}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{self.location(i)}: expected a JSON object, got {type(record).__name__}")
        return record

    def __getitem__(self, i: int) -> str:
        if self.files[self._file[i]].suffix != ".jsonl":
            return self._text(i)
        record = self.record(i)
        if not isinstance(record.get(self.text_key), str):
            raise ValueError(f"{self.location(i)}: no string field {self.text_key!r} (set text_key)")
        return record[self.text_key]


class JsonlRecords:
    """Records of JSONL files, one a line: `len`, `location(i)` ("file:line") and `self.lines`
    (TextDocuments: `record(i)`, `file(i)`). ValueError (one line) if a file is not .jsonl:
    `what` names what the lines hold."""

    def __init__(self, paths, tokenizer, what: str):
        self.lines = TextDocuments(paths)
        non_jsonl = [f for f in self.lines.files if f.suffix != ".jsonl"]
        if non_jsonl:
            raise ValueError(f"{non_jsonl[0]}: {what} are read from .jsonl files")
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.lines)

    def location(self, i: int) -> str:
        return self.lines.location(i)


class Examples(JsonlRecords):
    """Fine-tuning examples from JSONL files: token ids with a 0/1 loss weight per id.

    kind "chat": each line is `{"messages": [{"role": ..., "content": ...}, ...]}`,
      formatted with the tokenizer's chat format (llama_jax.text.chat.encode_conversation):
      the loss is on the assistant's answers and their end-of-turn tokens.
    kind "completion": each line is `{"prompt": str, "completion": str}`, encoded
      as BOS + prompt + completion + EOS with no template: the loss is on the
      completion and EOS.
    `examples[i]` is int32 [2, n]: ids, then weights. ValueError (one line)
    names the file and line of a malformed example.
    With `vision` (a Llama 3.2 Vision model's VisionConfig), chat content may
    hold image parts `{"type": "image", "path": "cat.png"}` (a path relative
    to the JSONL file), each one <|image|> token; `examples.images(i, tokens)`
    reads and preprocesses them when a row needs them.
    """

    def __init__(self, paths, tokenizer, kind: str, vision=None):
        if kind not in ("chat", "completion"):
            raise ValueError(f"examples: kind {kind!r} is not chat or completion")
        super().__init__(paths, tokenizer, f"{kind} examples")
        self.kind, self.vision = kind, vision

    def __getitem__(self, i: int) -> np.ndarray:
        record = self.lines.record(i)
        try:
            ids, weights = (self._chat if self.kind == "chat" else self._completion)(record)
            if self.vision is not None and self.kind == "chat":
                paths = image_paths(record["messages"], self.lines.file(i).parent)
                if len(paths) > self.vision.max_images:
                    raise ValueError(f"{len(paths)} images; this model takes at most {self.vision.max_images} "
                                     "per example (vision.max_images)")
                if any(w and t == self.vision.image_token_id for t, w in zip(ids, weights)):
                    raise ValueError("an image in an assistant message: the model reads images, it does not "
                                     "write them; put images in user messages")
        except ValueError as err:
            raise ValueError(f"{self.location(i)}: {err}") from None
        return np.asarray([ids, weights], np.int32)

    def images(self, i: int, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Example i's images as one row of `LlamaVision`'s `images` (no batch axis), for the row
        of input ids `tokens` (example i, maybe truncated: images whose <|image|> token was cut
        off are left out). ValueError (one line, naming file and line) for a file that is not
        an image."""
        from llama_jax.vision.image import image_inputs, load_image

        record = self.lines.record(i)
        paths = image_paths(record["messages"], self.lines.file(i).parent) if self.kind == "chat" else []
        kept = int(np.count_nonzero(np.asarray(tokens) == self.vision.image_token_id))
        try:
            arrays = image_inputs([[load_image(p) for p in paths[:kept]]], [list(tokens)], self.vision)
        except ValueError as err:
            raise ValueError(f"{self.location(i)}: {err}") from None
        return {name: array[0] for name, array in arrays.items()}

    def _chat(self, record: dict):
        from llama_jax.text.chat import encode_conversation

        messages = record.get("messages")
        if not isinstance(messages, list):
            raise ValueError('a chat example needs a "messages" list')
        return encode_conversation(self.tokenizer, messages,
                                   None if self.vision is None else self.vision.image_token_id)

    def _completion(self, record: dict):
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ValueError('a completion example needs string "prompt" and non-empty "completion" fields')
        asked = self.tokenizer.encode(prompt, bos=True)
        answer = self.tokenizer.encode(completion, eos=True)
        return asked + answer, [0] * len(asked) + [1] * len(answer)


def image_paths(messages: list, directory: epath.Path) -> list[epath.Path]:
    """The files of a chat example's image parts (`{"type": "image", "path": ...}`), in order,
    relative paths taken from `directory`; ValueError (one line) for a missing one."""
    paths = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image":
                path = part.get("path")
                if not isinstance(path, str) or not path:
                    raise ValueError('an image part needs a "path": an image file, relative to the JSONL file')
                if not (directory / path).is_file():
                    raise ValueError(f"image {path}: file not found (relative to {directory})")
                paths.append(directory / path)
    return paths
class Preferences(JsonlRecords):
    """Preference pairs from JSONL files, for DPO (train/objectives/dpo.py) and reward models
    (train/objectives/reward.py).

    Each line is `{"messages": [...], "chosen": A, "rejected": B}` (the
    conversation so far, in the chat schema) or `{"prompt": str, "chosen": A,
    "rejected": B}` (one user turn); an answer A or B is a string or an
    assistant message `{"role": "assistant", "content": str}`. Both answers
    are chat-formatted after the conversation (llama_jax.text.chat.encode_conversation).
    `pairs[i]` is (chosen, rejected), each int32 [2, n]: ids, then loss
    weights, 1 on the final answer and the token that closes it only.
    A line may carry `"margin": m`, a number (Llama 2's m(rating): how much
    better chosen is), which `margin(i)` reads (0 without one).
    ValueError (one line) names the file and line of a malformed pair.
    """

    def __init__(self, paths, tokenizer):
        super().__init__(paths, tokenizer, "preference pairs")

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        record = self.lines.record(i)
        try:
            return self._pair(record)
        except ValueError as err:
            raise ValueError(f"{self.location(i)}: {err}") from None

    def margin(self, i: int) -> float:
        """Pair i's `margin` field, 0.0 without one; ValueError (one line) if it is not a finite number."""
        value = self.lines.record(i).get("margin", 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f'{self.location(i)}: a preference pair\'s "margin" must be a finite number, '
                             f"got {value!r}")
        return float(value)

    def _pair(self, record: dict):
        from llama_jax.text.chat import encode_conversation

        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages:
                raise ValueError('a preference pair\'s "messages" must be a non-empty list')
        elif isinstance(record.get("prompt"), str):
            messages = [{"role": "user", "content": record["prompt"]}]
        else:
            raise ValueError('a preference pair needs "messages" (a list) or "prompt" (a string)')
        answers = []
        for key in ("chosen", "rejected"):
            answer = record.get(key)
            if isinstance(answer, str):
                answer = {"role": "assistant", "content": answer}
            if not isinstance(answer, dict) or answer.get("role") != "assistant" \
                    or not isinstance(answer.get("content"), str):
                raise ValueError(f'a preference pair needs a "{key}" answer: a string or an assistant '
                                 'message {"role": "assistant", "content": str}')
            ids, weights = encode_conversation(self.tokenizer, [*messages, answer])
            answers.append(np.stack([np.asarray(ids), last_answer(weights)]).astype(np.int32))
        return tuple(answers)


def last_answer(weights: list[int]) -> np.ndarray:
    """The loss weights with only their last run of weighted ids kept (a conversation's final
    answer): earlier answers are the same in both halves of a pair and carry no preference."""
    weights = np.asarray(weights)
    unweighted = np.flatnonzero(weights == 0)
    start = unweighted[-1] + 1 if len(unweighted) else 0
    return np.where(np.arange(len(weights)) >= start, weights, 0)


class TokenDocuments:
    """The documents of token directories written by train.prepare: memory-mapped
    when local, read by ranged reads from gs://.

    `docs[i]` is document i's ids as int32 [n], BOS and EOS included.
    `vocab_sizes[k]` is the vocabulary directory k was prepared with (its meta.json).
    """

    def __init__(self, dirs):
        self.dirs = [user_path(d) for d in dirs]
        self._tokens, self._index, counts = [], [], [0]
        self.vocab_sizes = []
        for d in self.dirs:
            check_bucket(d)
            meta = self._read_meta(d)
            dtype = np.dtype(meta["dtype"])
            if is_url(d):  # the index (8 bytes a document) is read whole, the tokens by range
                tokens = RangedTokens(d / TOKENS_FILE, dtype)
                with (d / INDEX_FILE).open("rb") as f:
                    index = np.load(f)
            else:
                tokens = np.memmap(d / TOKENS_FILE, dtype=dtype, mode="r")
                index = np.load(d / INDEX_FILE, mmap_mode="r")
            if len(index) != meta["num_docs"] + 1 or int(index[-1]) != len(tokens):
                raise ValueError(f"{d}: {TOKENS_FILE} and {INDEX_FILE} disagree; prepare the directory again")
            self._tokens.append(tokens)
            self._index.append(index)
            counts.append(meta["num_docs"])
            self.vocab_sizes.append(int(meta["vocab_size"]))
        self._first_doc = np.cumsum(counts)

    @staticmethod
    def _read_meta(d: epath.Path) -> dict:
        try:
            meta = json.loads((d / META_FILE).read_text())
        except FileNotFoundError:
            raise ValueError(f"{d}: not a prepared token directory (no {META_FILE}); run python -m train.prepare") from None
        except json.JSONDecodeError:
            raise ValueError(f"{d}/{META_FILE}: not valid JSON") from None
        if meta.get("format") != TOKENS_FORMAT:
            raise ValueError(f"{d}: token format {meta.get('format')!r}, expected {TOKENS_FORMAT!r}")
        if meta["num_tokens"] == 0:
            raise ValueError(f"{d}: holds no tokens")
        return meta

    def __len__(self) -> int:
        return int(self._first_doc[-1])

    def lengths(self) -> np.ndarray:
        """int64 [num_docs]: every document's length in ids."""
        return np.concatenate([np.diff(np.asarray(index, np.int64)) for index in self._index])

    def read(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int32 ids [start:stop] of document i, read from disk without the rest of it."""
        part = int(np.searchsorted(self._first_doc, i, side="right")) - 1
        j = i - int(self._first_doc[part])
        begin, end = int(self._index[part][j]), int(self._index[part][j + 1])
        stop = end - begin if stop is None else min(stop, end - begin)
        return np.asarray(self._tokens[part][begin + start : begin + stop], dtype=np.int32)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.read(i)


class SyntheticDocuments:
    """`num_docs` documents of random ids in [0, vocab_size), 1 to 2*seq_len long.

    Document i depends only on (seed, i), so any slice of it is reproducible.
    """

    def __init__(self, vocab_size: int, num_docs: int, seq_len: int, seed: int):
        self.vocab_size, self._num_docs, self._max_len, self._seed = vocab_size, num_docs, 2 * seq_len, seed

    def __len__(self) -> int:
        return self._num_docs

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self._seed, i])
        length = int(rng.integers(1, self._max_len + 1))
        return rng.integers(0, self.vocab_size, length, dtype=np.int32)


def encode_document(tokenizer: TextTokenizer, text: str) -> np.ndarray:
    """A document's ids, framed by BOS and EOS, as int32; none at all for a document
    with no text (empty or only whitespace), which training and prepare skip."""
    if not text.strip():
        return np.zeros(0, np.int32)
    return np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int32)

