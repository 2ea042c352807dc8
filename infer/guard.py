"""`python -m infer.guard`: classify conversations with Llama Guard 3.

    python -m infer.guard --checkpoint Llama-Guard-3-8B --input chats.jsonl --output verdicts.jsonl
    python -m infer.guard --checkpoint DIR --input chats.jsonl --filter safe.jsonl     # keep the safe ones
    python -m infer.guard --checkpoint DIR --input chats.jsonl --show-prompt           # no weights loaded
    python -m infer.guard --checkpoint DIR --input chats.jsonl --role user --exclude S7,S8 --threshold 0.3
    python -m infer.guard --checkpoint DIR --input chats.jsonl --categories policy.yaml
    python -m infer.guard --checkpoint Llama-Guard-3-11B-Vision --input chats.jsonl --image photo.jpg

Each input line is `{"messages": [{"role": "user", "content": ...}, ...]}`:
user and assistant turns alternating, user first; the last turn is judged
(a user's prompt, or the assistant's answer; `--role` insists on one).
Content is a string or OpenAI-style parts (`{"type": "text", "text": ...}`,
`{"type": "image", "image": "path.jpg"}` for the Vision model); `--image`
puts one image at the start of every conversation's first user turn.

Each output line (to --output, else standard output), in input order:
`{"verdict": "safe" | "unsafe" | "malformed", "categories": ["S1"],
"category_names": [...], "unsafe_probability": 0.97, "output": "..."}`.
"malformed" means the model's answer was neither "safe" nor "unsafe" with a
line of categories; with `--threshold P` the verdict is instead "unsafe"
when the probability of "unsafe" as the first word is at least P. `--filter`
writes the input lines of the conversations judged safe, byte for byte
(malformed ones are left out: the filter fails closed).

The prompt is the checkpoint's chat template when it carries one, else
Meta's format (llama_jax/text/guard_format.py; docs/safety.md). Bad input
(a line that is not a conversation, an unknown category, a role the
conversation does not end with, a checkpoint that is not a Llama) is one
line on stderr and exit code 2, before any weights load.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from infer.guard_model import Guard, guard_format
from infer.options import ServingOptions, check_checkpoint
from llama_jax.cli import run_cli
from llama_jax.paths import user_path
from llama_jax.text.guard_categories import load_categories
from llama_jax.vision.image import load_image


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infer.guard",
                                     description="Classify conversations as safe or unsafe with Llama Guard 3.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a Llama Guard checkpoint: Hugging Face directory (config.json) or ours")
    parser.add_argument("--input", required=True, metavar="FILE", help='JSONL, one {"messages": [...]} a line')
    parser.add_argument("--output", metavar="FILE", help="write the verdicts here (default: standard output)")
    parser.add_argument("--filter", metavar="FILE", help="write the input lines of the safe conversations here")
    parser.add_argument("--show-prompt", action="store_true",
                        help="print each conversation's prompt as one JSON string a line, and exit (no weights load)")
    parser.add_argument("--role", choices=("user", "agent"), default=None,
                        help="judge the last user turn or the last agent (assistant) turn; every conversation must "
                             "end with it (default: whichever turn is last)")
    parser.add_argument("--exclude", default="", metavar="CODES", help="categories to leave out, e.g. S7,S8")
    parser.add_argument("--categories", metavar="FILE",
                        help="custom categories (YAML or JSON list of names or {name, description}), numbered S1..")
    parser.add_argument("--threshold", type=float, default=None, metavar="P",
                        help="unsafe when the probability of 'unsafe' as the first word is >= P (default: as the "
                             "model answers)")
    parser.add_argument("--image", default=None, metavar="PATH",
                        help="an image shown in every conversation's first user turn (Llama Guard 3 11B Vision)")
    parser.add_argument("--layout", default=None, metavar="NAME",
                        help="layout from configs/layouts (sharded over all devices); default: one device")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="conversations per batch (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                        help="tokens of each answer at most (default 32)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="default: found beside the checkpoint")
    parser.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the checkpoint's)")
    parser.add_argument("--quantize", default=None, help="int8 or fp8 weights")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(lambda argv: _run(parse_args(argv)), argv, prog="infer.guard")


def _run(args) -> None:
    check_checkpoint(args.checkpoint)
    options = ServingOptions.from_args(args)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    lines, conversations = read_conversations(args.input)
    if args.image is not None:
        conversations = [with_image(messages, args.image) for messages in conversations]
    fmt, config = guard_format(args.checkpoint, args.tokenizer)
    prompts = build_prompts(fmt, conversations, args)
    notes = sorted({p.fallback for p in prompts if p.fallback})
    for note in notes:
        print(f"infer.guard: note: {note}; these prompts use Meta's format", file=sys.stderr)
    if args.show_prompt:
        for prompt in prompts:
            print(json.dumps(prompt.text, ensure_ascii=False))
        return
    images = load_images(conversations) if config.vision is not None else None
    guard = Guard.load(args.checkpoint, options, args.tokenizer, args.max_new_tokens)
    with tqdm(total=len(prompts), desc="guard", unit="conv", file=sys.stderr, disable=None) as bar:
        results = guard.classify(prompts, images, args.threshold, args.batch_size, progress=bar.update)
    out = user_path(args.output).open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        for result in results:
            out.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    finally:
        if args.output:
            out.close()
    if args.filter:
        with user_path(args.filter).open("w", encoding="utf-8") as kept:
            for line, result in zip(lines, results):
                if result.verdict == "safe":
                    kept.write(line + "\n")


def read_conversations(path) -> tuple[list[str], list[list[dict]]]:
    """(the non-blank lines, their conversations) of a JSONL file; ValueError naming the line."""
    try:
        text = user_path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError(f"--input {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"--input {path}: not UTF-8 text (byte {err.start})") from None
    lines, conversations = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path} line {number}: not JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise ValueError(f'{path} line {number}: expected {{"messages": [...]}}')
        lines.append(line)
        conversations.append(record["messages"])
    if not conversations:
        raise ValueError(f"--input {path}: no conversations in it")
    return lines, conversations


def build_prompts(fmt, conversations, args) -> list:
    """Every conversation's GuardPrompt; ValueError naming the first bad one by its number."""
    categories = load_categories(args.categories) if args.categories else None
    exclude = [code.strip() for code in args.exclude.split(",") if code.strip()]
    prompts = []
    for i, messages in enumerate(conversations):
        try:
            prompts.append(fmt.prompt(messages, role=args.role, exclude=exclude, categories=categories))
        except ValueError as err:
            if str(err).startswith(("--exclude", "--categories")):
                raise
            raise ValueError(f"{args.input} conversation {i + 1}: {err}") from None
    return prompts


def with_image(messages: list[dict], path: str) -> list[dict]:
    """`messages` with an image part opening the first user turn."""
    if not messages or not isinstance(messages[0], dict):
        return messages
    first = dict(messages[0])
    content = first.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    first["content"] = [{"type": "image", "image": path}] + parts
    return [first] + list(messages[1:])


def load_images(conversations) -> list[list]:
    """Each conversation's images (its image parts' "image" paths, loaded), in order."""
    images = []
    for i, messages in enumerate(conversations):
        row = []
        for message in messages:
            for part in message["content"] if isinstance(message["content"], list) else ():
                if part.get("type") == "image":
                    source = part.get("image")
                    if not isinstance(source, str):
                        raise ValueError(f"conversation {i + 1}: an image part needs \"image\": a file path")
                    row.append(load_image(source))
        images.append(row)
    return images


if __name__ == "__main__":
    sys.exit(main())
