"""Tokenize text or JSONL files once into a token directory for training.

    python -m train.prepare --tokenizer PATH --input 'data/*.jsonl' --output DIR

A .txt file is one document; a .jsonl file holds one document per line, its
text under --text-key. Every document is framed BOS ... EOS; documents with
no text (empty or only whitespace) are skipped, and inputs with none at all
are an error. DIR receives `tokens.bin` (flat uint16 ids when the vocabulary
fits, else uint32), `index.npy` (int64 start of each document, then the
total) and `meta.json`; `DataConfig(source="tokens", paths=(DIR,))` reads
them back.

DIR (and the inputs) may be local or gs:// paths (llama_jax/paths.py). The
directory is written under a temporary name and renamed when complete,
so an interrupted or failed run leaves no half-written output. Bad input
(a missing file, a broken JSON line, an id outside the vocabulary) stops the
run with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from llama_jax.cli import run_cli
from llama_jax.paths import check_bucket, remove_tree, user_path

from train.data.sources import (
    INDEX_FILE,
    META_FILE,
    TOKENS_FILE,
    TOKENS_FORMAT,
    TextDocuments,
    TextTokenizer,
    encode_document,
    no_text_error,
    token_dtype,
)


def prepare(
    tokenizer: TextTokenizer,
    inputs: list[str],
    output: str | os.PathLike,
    *,
    text_key: str = "text",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize the documents of `inputs` (paths or globs) into directory `output`.

    Returns the metadata written to meta.json. Raises ValueError (one line,
    naming the file and line) on bad input; `output` is then left untouched.
    """
    output = user_path(output)
    check_bucket(output)
    if output.exists() and not overwrite:
        raise ValueError(f"{output}: already exists; choose another --output or pass --overwrite")
    docs = TextDocuments(inputs, text_key)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    try:
        starts = [0]
        total_bytes = sum(docs.nbytes(i) for i in range(len(docs)))
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
        with (tmp / TOKENS_FILE).open("wb") as out, bar:
            for i in range(len(docs)):
                ids = encode_document(tokenizer, docs[i])
                bar.update(docs.nbytes(i))
                if not len(ids):  # a document with no text
                    continue
                bad = ids[(ids < 0) | (ids >= tokenizer.vocab_size)]
                if bad.size:
                    raise ValueError(
                        f"{docs.location(i)}: token id {bad[0]} is outside the vocabulary "
                        f"[0, {tokenizer.vocab_size}); the tokenizer is inconsistent"
                    )
                out.write(ids.astype(dtype).tobytes())
                starts.append(starts[-1] + len(ids))
        if len(starts) == 1:
            raise no_text_error(inputs)
        with (tmp / INDEX_FILE).open("wb") as f:
            np.save(f, np.asarray(starts, np.int64))
        meta = {
            "format": TOKENS_FORMAT,
            "dtype": dtype.name,
            "vocab_size": int(tokenizer.vocab_size),
            "bos_id": int(tokenizer.bos_id),
            "eos_id": int(tokenizer.eos_id),
            "num_docs": len(starts) - 1,
            "num_tokens": starts[-1],
            "inputs": [str(f) for f in docs.files],
            "text_key": text_key,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        remove_tree(output)
        tmp.rename(output)  # on gs://, a server-side copy of each object, then the deletes
    except BaseException:
        remove_tree(tmp)
        raise
    return meta


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 on bad input)."""
    return run_cli(_main, argv, prog="prepare")


def _main(argv):
    parser = argparse.ArgumentParser(
        prog="python -m train.prepare",
        description="Tokenize .txt files (one document each) or .jsonl files (one document per "
        "line) into a token directory for DataConfig(source='tokens').",
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer file or directory")
    parser.add_argument("--input", required=True, nargs="+", metavar="FILE_OR_GLOB", help=".txt/.jsonl files or globs")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from llama_jax.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    meta = prepare(tokenizer, args.input, args.output, text_key=args.text_key, overwrite=args.overwrite,
                   progress=not args.quiet)
    print(f"wrote {meta['num_tokens']:,} tokens in {meta['num_docs']:,} documents to {args.output}")


if __name__ == "__main__":
    sys.exit(main())
