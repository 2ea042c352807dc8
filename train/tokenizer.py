"""python -m train.tokenizer --input FILES_OR_GLOBS --vocab-size N --output PATH

Trains a tokenizer on local text for a model trained from scratch: a
Llama-3-style byte-level BPE in tiktoken's format (default) or a Llama-2-style
SentencePiece model. The file loads with `llama_jax.text.tokenizer.load_tokenizer`.
An existing --output is refused unless --overwrite is given; inputs without any
text are an error.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

from llama_jax.cli import run_cli


def _read_texts(files):
    """The non-blank UTF-8 texts of `files`, one a file, read as training asks for them."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a stray binary or latin-1 file among sources teaches nothing
        if text.strip():
            yield text


def main(argv=None) -> int:
    """The command line; returns the exit status (2 on bad input)."""
    return run_cli(_main, argv, prog="tokenizer")


def _main(argv):
    parser = argparse.ArgumentParser(prog="python -m train.tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="text files or globs (** allowed)")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="regular tokens (bpe: 256 byte tokens included; 256 special tokens are added)")
    parser.add_argument("--output", required=True, help="tokenizer file to write")
    parser.add_argument("--kind", choices=("bpe", "sentencepiece"), default="bpe")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)

    from llama_jax.text.tokenizer_training import train_bpe, train_sentencepiece
    from train.data.sources import expand_paths, no_text_error

    output = Path(args.output)
    files = expand_paths(args.input)
    if args.vocab_size < 256:
        raise ValueError(f"--vocab-size {args.vocab_size} is below the 256 byte tokens")
    if output.exists() and not args.overwrite:
        raise ValueError(f"{output}: already exists; choose another --output or pass --overwrite")
    texts = _read_texts(files)
    first = next(texts, None)  # without any text, BPE would write its 256 byte tokens alone
    if first is None:
        raise no_text_error(args.input)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    trainer = train_bpe if args.kind == "bpe" else train_sentencepiece
    print(f"training a {args.kind} tokenizer on {len(files)} files ...", file=sys.stderr)
    try:
        trainer(itertools.chain([first], texts), args.vocab_size, partial)
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)  # a failed training leaves nothing behind
    print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(main())
