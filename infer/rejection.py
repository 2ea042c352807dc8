"""Rejection sampling: N answers per prompt, scored by a reward function, the best kept as SFT data.

    python -m infer.rejection --checkpoint DIR --prompts prompts.jsonl --reward mymodule:score \\
        --samples 8 --output best.jsonl [--temperature 1.0] [--top-p 0.95] [--max-new-tokens 256] \\
        [--seed 0] [--batch 64] [--layout fsdp] [--tokenizer PATH]

Each line of the prompts file is `{"messages": [...]}` (a conversation ending
with a user turn) or `{"prompt": str}` (one user turn). Its N samples are
answers drawn from the model under its chat format, `--batch` rows (whole
prompts' samples) at a time. The reward function is named as `module:function`
and called as `function(messages, answer) -> float`; for each prompt the
highest-scoring answer (the first of equals) is written as a chat example,
`{"messages": [...the prompt..., {"role": "assistant", "content": answer}],
"reward": score}`, which `data.source: chat` trains on (Llama 3.1's rounds:
sample, keep the best, fine-tune, repeat).

The same seed, samples and batch give the same file: sample j of prompt i is
row j of its batch, whose random key depends only on the seed, the batch's
index and the row (llama_jax.decoding.sampling's per-row keys). The output is written
under a temporary name and renamed when complete. Bad input (a reward path
that does not import, a malformed prompt line) is one line on stderr, exit 2,
nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from llama_jax.cli import load_function, run_cli
from llama_jax.text.chat import prompt_messages


def read_prompts(path) -> list[list[dict]]:
    """The conversations of a prompts JSONL file (ValueError naming file and line)."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            try:
                conversations.append(prompt_messages(record))
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: {err}") from None
    if not conversations:
        raise ValueError(f"{path}: holds no prompt")
    return conversations


def rejection_sample(params, config, tokenizer, conversations: list[list[dict]], reward: Callable,
                     samples: int, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, max_new_tokens: int = 256, seed: int = 0,
                     batch: int = 64, layout=None, progress: bool = False) -> list[dict]:
    """For each conversation, `samples` answers with their rewards and the best one.

    Returns one dict per conversation: "answers" (str, in sample order),
    "rewards" (float each), "best" (index of the first highest reward).
    `batch` rows are generated at a time, each holding whole conversations'
    samples (at least one conversation a batch).
    """
    from infer.generate import generate
    from llama_jax.text.chat import format_chat

    per_batch = max(1, batch // samples)
    results = []
    bar = tqdm(total=len(conversations), unit="prompt", desc="sampling", disable=not progress)
    for index, start in enumerate(range(0, len(conversations), per_batch)):
        group = conversations[start:start + per_batch]
        prompts = []
        for i, messages in enumerate(group):
            try:
                prompts += [format_chat(tokenizer, messages)] * samples
            except ValueError as err:
                raise ValueError(f"prompt {start + i + 1}: {err}") from None
        outputs = generate(params, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed * 1_000_003 + index, layout=layout, config=config)
        for i, messages in enumerate(group):
            answers = [out.text.strip() for out in outputs[i * samples:(i + 1) * samples]]
            rewards = [float(reward(messages, answer)) for answer in answers]
            results.append({"answers": answers, "rewards": rewards, "best": rewards.index(max(rewards))})
        bar.update(len(group))
    bar.close()
    return results


def write_best(path, conversations, results) -> int:
    """Write each conversation's best answer as a chat example; atomically (temporary name, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for messages, result in zip(conversations, results):
                best = result["best"]
                example = {"messages": [*messages, {"role": "assistant", "content": result["answers"][best]}],
                           "reward": result["rewards"][best]}
                f.write(json.dumps(example) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(results)


def main(argv=None) -> int:
    """The command line; returns the exit status (2 on bad input)."""
    return run_cli(_main, argv, prog="infer.rejection")


def _main(argv):
    parser = argparse.ArgumentParser(prog="python -m infer.rejection", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="our checkpoint, a run directory or a HF directory")
    parser.add_argument("--prompts", required=True, help="JSONL: {\"messages\": [...]} or {\"prompt\": str} a line")
    parser.add_argument("--reward", required=True, metavar="MODULE:FUNCTION",
                        help="called as function(messages, answer) -> float; higher is better")
    parser.add_argument("--output", required=True, help="the chat JSONL to write (best answer per prompt)")
    parser.add_argument("--samples", type=int, default=8, metavar="N", help="answers per prompt (default 8)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64, help="rows generated at once (default 64)")
    parser.add_argument("--layout", default=None, help="layout name (default: one device)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: beside the checkpoint)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.samples < 1 or args.batch < 1:
        raise ValueError("--samples and --batch must be positive")
    reward = load_function(args.reward, "--reward")
    conversations = read_prompts(args.prompts)
    from infer.generate import load_model

    config, params, tokenizer = load_model(args.checkpoint, args.layout, args.tokenizer)
    results = rejection_sample(params, config, tokenizer, conversations, reward, args.samples,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               max_new_tokens=args.max_new_tokens, seed=args.seed, batch=args.batch,
                               layout=args.layout, progress=not args.quiet)
    count = write_best(args.output, conversations, results)
    mean = sum(r["rewards"][r["best"]] for r in results) / count
    print(f"wrote the best of {args.samples} answers for {count} prompts to {args.output} "
          f"(mean best reward {mean:.4f})")


if __name__ == "__main__":
    sys.exit(main())
