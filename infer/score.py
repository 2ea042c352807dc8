"""`python -m infer.score`: score conversations with a reward model.

    python -m infer.score --checkpoint runs/reward_tiny --input chats.jsonl --output rewards.jsonl
    python -m infer.score --checkpoint RM_HF_DIR --input chats.jsonl --batch-size 16 --layout fsdp

The checkpoint is a reward model: a reward run's directory (train/objectives/reward.py),
one of our checkpoints with the score head, or a Hugging Face
LlamaForSequenceClassification directory with one label. Each input line is
`{"messages": [...]}`, a finished conversation in the chat schema (its last
message the assistant's answer); it is chat-formatted as training formats a
preference pair's conversations, and scored at its last token
(llama_jax/model/reward.py). Each output line (to --output, else standard
output), in input order: `{"reward": 1.234}`.

Conversations are scored --batch-size at a time, right-padded to a few
bucketed lengths (llama_jax/decoding/buckets.py), so few shapes compile.
Bad input (a line that is not a conversation, one longer than the model's
context, a checkpoint without the score head) is one line on stderr and exit
code 2, before any weights load; --output is written only once every
conversation is scored.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np
from tqdm import tqdm

from infer.guard import read_conversations
from infer.options import ServingOptions, check_checkpoint
from llama_jax.arith import round_up
from llama_jax.cli import run_cli
from llama_jax.config import ModelConfig
from llama_jax.decoding.buckets import pad_rows, row_length
from llama_jax.formats.weights import load_params, resolve, stored_config
from llama_jax.model.llama import Llama
from llama_jax.model.reward import conversation_rewards
from llama_jax.paths import user_path
from llama_jax.text.chat import encode_conversation
from llama_jax.text.tokenizer import find_tokenizer, load_tokenizer
from sharding.place import Placement, placement_for


class Scorer:
    """A reward model placed on a layout (None: the first device), scoring token-id rows."""

    def __init__(self, config: ModelConfig, params, placement: Placement):
        self.config, self.params, self.placement = config, params, placement
        model = Llama(config)
        self._rewards = jax.jit(lambda params, tokens, lengths: conversation_rewards(model, params, tokens, lengths))

    @classmethod
    def load(cls, checkpoint, config: ModelConfig, layout=None) -> "Scorer":
        """`checkpoint`'s weights as `config` (reward_config's) on `layout` (None: one device)."""
        placement = placement_for(config, layout)
        return cls(config, load_params(checkpoint, config, placement.param_shardings()), placement)

    def score(self, rows: list[list[int]], batch_size: int, progress=lambda n: None) -> list[float]:
        """Each row's reward (a float), `batch_size` rows at a time (rounded up to what the layout's
        batch axes divide; the last batch padded)."""
        multiple = self.placement.shards_along("batch")
        size = round_up(batch_size, multiple)
        shards = self.placement.shards_along("length")
        out = []
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            t = row_length(max(map(len, chunk)), self.config.max_seq_len, shards)
            tokens, lengths = pad_rows(chunk, size, t)
            batch = self.placement.global_batch({"tokens": tokens})["tokens"]
            lengths = jax.device_put(lengths, self.placement.sharding("batch"))
            with self.placement.activate():
                rewards = np.asarray(jax.device_get(self._rewards(self.params, batch, lengths)))
            out += [float(r) for r in rewards[:len(chunk)]]
            progress(len(chunk))
        return out


def reward_config(checkpoint, options: ServingOptions) -> ModelConfig:
    """The checkpoint's config served with `options`; ValueError (one line) unless it has the score head."""
    config = stored_config(checkpoint)
    if config.head != "score":
        kind = "Hugging Face LlamaForCausalLM" if resolve(checkpoint)[0] == "hf" else "checkpoint"
        raise ValueError(f"{checkpoint}: a {kind} with the next-token head, not a reward model (score head); "
                         "score with a reward run (python -m train with a reward section) or a "
                         "LlamaForSequenceClassification directory")
    return options.model_config(config)


def encode_all(tokenizer, conversations, max_len: int, source: str) -> list[list[int]]:
    """Every conversation's token ids, as training formats them; ValueError naming the first bad one."""
    rows = []
    for i, messages in enumerate(conversations):
        try:
            ids, _ = encode_conversation(tokenizer, messages)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{source} conversation {i + 1}: {err}") from None
        if len(ids) > max_len:
            raise ValueError(f"{source} conversation {i + 1}: {len(ids)} tokens, more than the model's context "
                             f"{max_len}")
        rows.append(ids)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infer.score",
                                     description="Score conversations with a reward model, one JSON line each.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a reward model: a reward run, our checkpoint or a HF LlamaForSequenceClassification "
                             "directory")
    parser.add_argument("--input", required=True, metavar="FILE", help='JSONL, one {"messages": [...]} a line')
    parser.add_argument("--output", metavar="FILE", help="write the rewards here (default: standard output)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="conversations per batch (default 8)")
    parser.add_argument("--layout", default=None, metavar="NAME",
                        help="layout from configs/layouts (sharded over all devices); default: one device")
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="default: found beside the checkpoint")
    parser.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the checkpoint's)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(lambda argv: _run(parse_args(argv)), argv, prog="infer.score")


def _run(args) -> None:
    check_checkpoint(args.checkpoint)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    options = ServingOptions.from_args(args)
    config = reward_config(args.checkpoint, options)
    _, conversations = read_conversations(args.input)
    tokenizer = load_tokenizer(args.tokenizer or find_tokenizer(resolve(args.checkpoint)[1], up=2))
    rows = encode_all(tokenizer, conversations, config.max_seq_len, args.input)
    scorer = Scorer.load(args.checkpoint, config, options.layout)
    with tqdm(total=len(rows), desc="score", unit="conv", file=sys.stderr, disable=None) as bar:
        rewards = scorer.score(rows, args.batch_size, progress=bar.update)
    text = "".join(json.dumps({"reward": r}) + "\n" for r in rewards)
    if args.output:
        user_path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    sys.exit(main())
