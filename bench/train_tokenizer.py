"""Tokenizer training time on the demo's input: `train_bpe` against SentencePiece's trainer.

    python bench/train_tokenizer.py [--vocab-size 4096] [--repeats 3]

The input is demo.sh's: the .py files of Python's standard library top level
and of the packages it names (about 8.8 MB), read as demo.sh's
`train.tokenizer` reads them. Prints one JSON line per trainer:
    {"bench": "train_tokenizer", "impl": "train_bpe" | "train_sentencepiece", "model": "stdlib",
     "metric": "seconds", "value": ..., "unit": "s", "bytes": ...}
(the fastest of --repeats runs). Measures only; never asserts a timing.
"""

from __future__ import annotations

import argparse
import glob
import sys
import sysconfig
import tempfile
from pathlib import Path

# Run as a script from anywhere: the repository root holds llama_jax/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import best_time, emit  # noqa: E402
from llama_jax.text.tokenizer_training import train_bpe, train_sentencepiece  # noqa: E402

# demo.sh's SOURCES, below the standard library's directory.
DEMO_PACKAGES = ("asyncio", "collections", "concurrent/futures", "email", "encodings", "html", "http",
                 "importlib", "json", "logging", "multiprocessing", "sqlite3", "tomllib", "unittest", "urllib",
                 "xml/dom", "xml/etree", "zoneinfo")


def demo_texts() -> list[str]:
    """The demo's training files as text (files that are not UTF-8 skipped, as train.tokenizer does)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(f"{stdlib}/*.py"))
    files += [f for package in DEMO_PACKAGES for f in sorted(glob.glob(f"{stdlib}/{package}/*.py"))]
    texts = []
    for path in files:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    texts = demo_texts()
    size = sum(len(t.encode()) for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        for trainer in (train_bpe, train_sentencepiece):
            seconds = best_time(lambda: trainer(texts, args.vocab_size, Path(tmp) / "tokenizer.model"),
                                args.repeats)
            emit("train_tokenizer", trainer.__name__, "stdlib", "seconds", seconds, "s", bytes=size,
                 vocab_size=args.vocab_size)


if __name__ == "__main__":
    main()
