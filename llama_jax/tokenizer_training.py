"""Training small tokenizers on local text, for models trained from scratch.

`train_bpe` shapes a byte-level BPE the way Llama 3's was (Meta's pre-tokenizer
regex, tiktoken's file format); `train_sentencepiece` wraps SentencePiece's
trainer with Llama 2's conventions. Both files load with
`llama_jax.tokenizer.load_tokenizer`.
"""

from __future__ import annotations

import base64
import heapq
import io
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex
import sentencepiece as spm

from llama_jax.tokenizer import LLAMA3_PATTERN


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> Path:
    """Train a byte-level BPE the way Llama 3's was shaped, write a tiktoken file.

    Texts are split with Meta's pre-tokenizer regex, then the most frequent
    adjacent token pair is merged until there are `vocab_size` regular tokens
    (256 byte tokens included; fewer if the texts run out of pairs). Ranks
    are ids: bytes 0..255, then merges in order. The file loads with
    `load_tokenizer`, which adds the 256 special tokens after the ranks.
    Returns the path written.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte tokens")
    pattern = regex.compile(LLAMA3_PATTERN)
    chunk_counts: Counter[str] = Counter()
    for text in texts:
        chunk_counts.update(pattern.findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())

    vocab = [bytes([b]) for b in range(256)]
    index = {tok: i for i, tok in enumerate(vocab)}
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[w]
            where[pair].add(w)
    # Max-heap by count with lazy deletion: stale entries are skipped on pop.
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue
        merged = vocab[pair[0]] + vocab[pair[1]]
        new = index.get(merged)
        if new is None:  # the same bytes may already exist via another split
            new = index[merged] = len(vocab)
            vocab.append(merged)
        delta: defaultdict[tuple[int, int], int] = defaultdict(int)
        for w in where.pop(pair):
            word, c = words[w], counts[w]
            merged_word = _merge_pair(word, pair, new)
            if len(merged_word) == len(word):
                continue  # stale index entry
            for p in zip(word, word[1:]):
                delta[p] -= c
            for p in zip(merged_word, merged_word[1:]):
                delta[p] += c
                where[p].add(w)
            words[w] = merged_word
        for p, d in delta.items():
            if d:
                pair_counts[p] += d
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
                else:
                    del pair_counts[p]

    path = Path(path)
    lines = (f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for rank, tok in enumerate(vocab))
    path.write_text("".join(lines), encoding="ascii")
    return path


def _merge_pair(word: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """Replace each non-overlapping occurrence of `pair`, left to right, by `new`."""
    out, i, n = [], 0, len(word)
    first, second = pair
    while i < n:
        if i + 1 < n and word[i] == first and word[i + 1] == second:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> Path:
    """Train a Llama-2-style SentencePiece BPE model and write it to `path`.

    Settings follow Llama 2's model: BPE, byte fallback, digits split,
    identity normalisation (exact round trips), unk 0, bos 1, eos 2, no pad.
    `vocab_size` is an upper bound: small corpora yield fewer pieces.
    Returns the path written.
    """
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            minloglevel=2,  # the trainer is chatty on stderr
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed: {str(e).splitlines()[0]}") from None
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path
