"""Training small tokenizers on local text, for models trained from scratch.

`train_bpe` shapes a byte-level BPE the way Llama 3's was (Meta's pre-tokenizer
regex, tiktoken's file format), trained by the `tokenizers` library;
`train_sentencepiece` wraps SentencePiece's trainer with Llama 2's conventions.
Both files load with `llama_jax.text.tokenizer.load_tokenizer`.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import tokenizers
from tokenizers import Regex, models, pre_tokenizers, trainers

from llama_jax.cli import first_line
from llama_jax.text.hf_tokenizer import byte_level_chars
from llama_jax.text.tokenizer import LLAMA3_PATTERN


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> Path:
    """Train a byte-level BPE the way Llama 3's was shaped, write a tiktoken file.

    Texts are split with Meta's pre-tokenizer regex, then the most frequent
    adjacent token pair is merged until there are `vocab_size` regular tokens
    (256 byte tokens included; fewer if the texts run out of pairs). See
    `byte_level_bpe` and `write_tiktoken_ranks`. The file loads with
    `load_tokenizer`, which adds the 256 special tokens after the ranks.
    Returns the path written.
    """
    return write_tiktoken_ranks(byte_level_bpe(texts, vocab_size), path)


def byte_level_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A `tokenizers` BPE trained on `texts` over bytes, pre-tokenized with Meta's regex.

    Its vocabulary: the 256 byte tokens (GPT-2's byte-to-character strings,
    as every byte-level model of the library spells them), then one token
    per merge, in merge order, up to `vocab_size` tokens in all.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte tokens")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def write_tiktoken_ranks(tokenizer: tokenizers.Tokenizer, path: str | os.PathLike) -> Path:
    """Write a byte-level BPE's vocabulary as tiktoken `base64token rank` lines.

    Ranks: the 256 single bytes by byte value, then the merged tokens in the
    order the merges made them. tiktoken merges the adjacent pair whose
    concatenation has the lowest rank, so these ranks replay the merges.
    Returns the path written.
    """
    to_byte = byte_level_chars()
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    if sorted(token for token, _ in by_id[:256]) != sorted(to_byte):
        raise ValueError("expected the 256 byte tokens of a byte-level BPE as its first ids")
    vocab = [bytes([b]) for b in range(256)]
    vocab += [bytes(to_byte[c] for c in token) for token, _ in by_id[256:]]
    path = Path(path)
    lines = (f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for rank, tok in enumerate(vocab))
    path.write_text("".join(lines), encoding="ascii")
    return path


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
        raise ValueError(f"sentencepiece training failed: {first_line(e)}") from None
    path = Path(path)
    path.write_bytes(model.getvalue())
    return path
