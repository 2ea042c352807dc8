"""`DataConfig`: what a run's `data:` section holds (train/data/pipeline.py reads it).

Kept apart from the grain pipeline so that run configs (train/config.py) and
the data's row builders can name it without importing grain. A bad field is
a ConfigError naming it, in the run config's style: `data.seq_len: must be a
positive integer, got 0`.
"""

from __future__ import annotations

import dataclasses
import os

from llama_jax.config import ConfigError

SOURCES = ("tokens", "text", "synthetic", "chat", "completion", "preference", "prompts")
EXAMPLE_SOURCES = ("chat", "completion")  # fine-tuning examples with per-token loss weights
OVERLONG = ("drop", "truncate")
SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training rows come from and how they are cut and batched.

    source: "tokens" (directories written by train.prepare), "text" (.txt
      files, one document each, and .jsonl files, one document per line,
      tokenized on the fly), "synthetic" (random ids from `seed`), "chat" or
      "completion" (fine-tuning examples, train/data/sources.py `Examples`), or
      "preference" (DPO pairs, `Preferences`: one pair per row, the chosen
      conversation as segment 1 and the rejected one as segment 2; a pair
      longer than seq_len loses the start of its prompt, and is dropped only
      if its answers alone do not fit, train/data/example_rows.py `fit_pair`), or "prompts"
      (reinforcement learning, `Prompts`: one prompt a row, seq_len its longest, `PromptRows`).
    paths: token directories, or text files and globs.
    tokenizer: tokenizer file or directory for the "text" source.
    text_key: the JSONL field holding a document's text.
    seq_len: tokens per row; global_batch: rows per step over all processes.
    packing: pack documents into full rows (True) or one document per row.
    shuffle, seed: shuffle documents with a permutation drawn from `seed`.
    num_epochs: passes over the documents; None repeats forever.
    vocab_size, synthetic_docs: size of the synthetic source.
    read_threads: threads reading (and tokenizing) documents or rows ahead.
    shuffle_window: streamed packed rows (text and synthetic sources) are
      shuffled within windows of this many rows; restoring replays at most
      one window. 0 or 1 keeps stream order. Token directories shuffle all
      rows globally and ignore it.
    overlong: fine-tuning examples (chat, completion) longer than seq_len
      inputs are dropped, or truncated to seq_len (then dropped if no
      weighted token is left); the count is logged at start.
    holdout, split: a fraction of the documents (examples), drawn from
      `seed`, is held out for evaluation; split "train" reads the others,
      "eval" only those. 0 holds nothing out.
    reference_log_probs: source "preference" only: a file of the DPO
      reference's log-probabilities of every pair (train/data/reference_log_probs.py),
      read into each row instead of running a reference model.
    """

    source: str = "synthetic"
    paths: tuple[str, ...] = ()
    tokenizer: str | None = None
    text_key: str = "text"
    seq_len: int = 2048
    global_batch: int = 8
    packing: bool = True
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None
    vocab_size: int = 32000
    synthetic_docs: int = 10_000
    read_threads: int = 8
    shuffle_window: int = 1024
    overlong: str = "drop"
    holdout: float = 0.0
    split: str = "train"
    reference_log_probs: str | None = None

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else self.paths
        if not all(isinstance(p, (str, os.PathLike)) for p in paths):
            raise ConfigError(f"data.paths: must be a list of paths, got {self.paths!r}")
        object.__setattr__(self, "paths", tuple(str(p) for p in paths))
        if self.source not in SOURCES:
            raise ConfigError(f"data.source: {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.source != "synthetic" and not self.paths:
            raise ConfigError(f"data.paths: must name at least one input for source {self.source!r}")
        if not isinstance(self.text_key, str) or not self.text_key:
            raise ConfigError(f"data.text_key: must be a non-empty string, got {self.text_key!r}")
        for name in ("seq_len", "global_batch", "vocab_size", "synthetic_docs"):
            _integer(name, getattr(self, name), 1, "a positive integer")
        if self.num_epochs is not None:
            _integer("num_epochs", self.num_epochs, 1, "a positive integer or null (repeat forever)")
        _integer("seed", self.seed, 0, "an integer in [0, 2**32)", below=2**32)
        for name in ("read_threads", "shuffle_window"):
            _integer(name, getattr(self, name), 0, "a non-negative integer")
        for name, allowed in (("overlong", OVERLONG), ("split", SPLITS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"data.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) \
                or not 0 <= self.holdout < 1:
            raise ConfigError(f"data.holdout: must be a fraction in [0, 1), got {self.holdout!r}")
        if self.reference_log_probs is not None and self.source != "preference":
            raise ConfigError("data.reference_log_probs: holds DPO reference log-probabilities of preference "
                              f"pairs; the source is {self.source!r}")


def _integer(name: str, value, least: int, what: str, below: int | None = None):
    """ConfigError unless `value` is an int (not a bool) in [least, below); `what` says what is wanted."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least \
            or (below is not None and value >= below):
        raise ConfigError(f"data.{name}: must be {what}, got {value!r}")
