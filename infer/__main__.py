"""`python -m infer`: generate from a checkpoint, or chat with it.

    python -m infer --checkpoint DIR --prompt "Once upon a time" --max-new-tokens 64
    python -m infer --checkpoint DIR --chat --system "You are terse."
    python -m infer --checkpoint DIR --prompt-file long_prompt.txt     # or --prompt - < file
    python -m infer --checkpoint DIR --prompt "Hi" --dtype bfloat16 --quantize int8 --kv-cache-dtype int8
    python -m infer --checkpoint VISION_DIR --image cat.jpg --prompt "Describe the picture."
    python -m infer --checkpoint VISION_DIR --image cat.jpg --chat     # the image in the first user turn
    python -m infer --checkpoint DIR --prompt "A llama as JSON:" --json-schema llama.schema.json

DIR is our checkpoint directory or a Hugging Face one (config.json,
safetensors, tokenizer files), served in its stored dtype unless --dtype
says otherwise; --quantize int8|fp8 quantises the weights as they load.
Text is printed as it is generated. Bad input (missing checkpoint, unknown
layout, a prompt too long for the context, a mesh that does not fit the
devices, an unknown --quantize, a file that is not an image, more images
than the model takes, an image for a text-only model) prints one line on
stderr and exits 2.

With --image (Llama 3.2 Vision): a plain prompt becomes
`<|begin_of_text|><|image|>...{prompt}` (Meta's completion form); in chat
the images open the first user turn, `<|image|>...{message}`.

With --json-schema FILE (a JSON schema; structured outputs) every answer is a
JSON value the schema admits, decoded under its grammar (`llama_jax.text.grammar`);
a file that is not JSON, or a schema the grammar library cannot compile, is one
line and exit 2 before anything loads.
"""

from __future__ import annotations

import argparse
import json
import sys

from infer.options import ServingOptions, check_checkpoint
from llama_jax.cli import run_cli
from llama_jax.paths import user_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m infer", description="Generate text with a Llama checkpoint (ours or Hugging Face).")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="our checkpoint directory, or a Hugging Face directory with config.json")
    parser.add_argument("--prompt", help="the prompt (with --chat: the first user message); "
                        "- reads it from standard input, byte for byte")
    parser.add_argument("--prompt-file", metavar="PATH",
                        help="read the prompt from a UTF-8 file, byte for byte (trailing newlines kept)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K")
    parser.add_argument("--top-p", type=float, default=None, metavar="P")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (same seed, same text)")
    parser.add_argument("--layout", default=None, metavar="NAME",
                        help="layout from configs/layouts (sharded over all devices); default: one device")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="tokenizer file or directory (default: found in the checkpoint directory)")
    parser.add_argument("--chat", action="store_true",
                        help="interactive chat with the model's chat template (reads lines from stdin)")
    parser.add_argument("--system", default=None, help="system prompt for --chat")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image for the prompt (Llama 3.2 Vision checkpoints); repeat for several")
    parser.add_argument("--json-schema", default=None, metavar="FILE",
                        help="answer with JSON that this JSON schema admits (structured outputs)")
    parser.add_argument("--stream-every", type=int, default=8, metavar="N",
                        help="tokens per compiled decode call between prints (default 8)")
    parser.add_argument("--dtype", default=None, metavar="DTYPE",
                        help="bfloat16 or float32: compute and weight dtype (default: the checkpoint's)")
    parser.add_argument("--attention", default=None, metavar="IMPL",
                        help="xla or blocked (default: the checkpoint's config)")
    parser.add_argument("--quantize", default=None, metavar="KIND",
                        help="quantise the weights as they load: int8 (every projection, per output "
                             "channel) or fp8 (Llama 3's recipe: feed-forward weights and inputs, not the "
                             "first and last layers); a quantised checkpoint loads as it is")
    parser.add_argument("--kv-cache-dtype", default=None, metavar="KIND",
                        help="int8 or fp8: quantise the KV cache per token and head (default: the compute dtype)")
    args = parser.parse_args(argv)
    if args.prompt is not None and args.prompt_file is not None:
        parser.error("give --prompt or --prompt-file, not both")
    if not args.chat and args.prompt is None and args.prompt_file is None:
        parser.error("--prompt or --prompt-file is required (or use --chat)")
    if args.system is not None and not args.chat:
        parser.error("--system only applies with --chat")
    return args


def main(argv=None) -> int:
    return run_cli(lambda argv: _run(parse_args(argv)), argv)


def _run(args) -> None:
    from llama_jax.decoding.sampling import Sampling

    # Cheap checks first, so bad input fails before anything loads or compiles.
    check_checkpoint(args.checkpoint)
    options = ServingOptions.from_args(args)
    Sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.stream_every < 1:
        raise ValueError(f"--stream-every must be at least 1, got {args.stream_every}")

    args.prompt = _read_prompt(args)
    schema = None if args.json_schema is None else _read_schema(args.json_schema)

    from infer.generate import checkpoint_config, load_served
    from llama_jax.vision.image import load_image

    images = [load_image(path) for path in args.image]
    if images:
        _check_images(checkpoint_config(args.checkpoint), len(images))

    config, params, tokenizer = load_served(args.checkpoint, options, args.tokenizer)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, layout=args.layout, config=config,
                    stream_every=args.stream_every, json_schema=schema)
    if args.chat:
        _chat(params, tokenizer, args, settings, images)
    else:
        _say(params, tokenizer, args.prompt, settings, images)


def _check_images(config, count: int) -> None:
    """ValueError (one line) unless the model takes `count` images per prompt."""
    if config.vision is None:
        raise ValueError("--image: this checkpoint is a text-only model (its config has no vision section); "
                         "use a Llama 3.2 Vision checkpoint")
    if count > config.vision.max_images:
        raise ValueError(f"--image: {count} images given; this model takes at most {config.vision.max_images} "
                         "per prompt (vision.max_images)")


def _read_schema(path: str):
    """The JSON schema in `path`, checked by the grammar library; ValueError (one line) otherwise."""
    from llama_jax.text.grammar import json_grammar

    try:
        schema = json.loads(user_path(path).read_text())
    except OSError as err:
        raise ValueError(f"--json-schema {path}: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--json-schema {path}: not JSON ({err})") from None
    try:
        json_grammar(schema, None)
    except ValueError as err:
        raise ValueError(f"--json-schema {path}: the schema cannot be compiled: {err}") from None
    return schema


def _read_prompt(args) -> str | None:
    """The prompt text exactly as given: an argument, a file or standard input (`--prompt -`).

    Files and standard input are read as bytes and decoded as UTF-8 without newline
    translation, so a prompt's trailing newlines reach the model (a shell would strip them).
    """
    if args.prompt_file is not None:
        try:
            raw, source = user_path(args.prompt_file).read_bytes(), args.prompt_file
        except OSError as err:
            raise ValueError(f"--prompt-file {args.prompt_file}: {err.strerror}") from None
    elif args.prompt == "-":
        raw, source = sys.stdin.buffer.read(), "standard input"
    else:
        return args.prompt
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{source}: the prompt is not UTF-8 text (byte {err.start})") from None


def _say(params, tokenizer, prompt, settings, images=()):
    """Generate for one prompt (text or ids) and its images, printing text as it arrives."""
    from infer.generate import generate

    def show(chunk):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()

    result = generate(params, tokenizer, [prompt], stream=show, images=[list(images)] if images else None,
                      **settings)[0]
    sys.stdout.write("\n")
    sys.stdout.flush()
    return result


def _chat(params, tokenizer, args, settings, images=()) -> None:
    """Read user turns from stdin until EOF (or an empty line); answer each with the template.

    The images open the first user turn; they stay with it while it is in the conversation.
    """
    from llama_jax.text.chat import format_chat

    config = settings["config"]
    image_token = config.vision.image_token_id if config.vision is not None else None
    context = config.max_seq_len
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    first = args.prompt
    pending = [{"type": "image", "image": image} for image in images]
    while True:
        if first is not None:
            user, first = first, None
        else:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line or not line.strip():
                return
            user = line.rstrip("\n")
        content = pending + [{"type": "text", "text": user}] if pending else user
        messages.append({"role": "user", "content": content})
        pending = []
        prompt = format_chat(tokenizer, messages, image_token)
        # When the conversation outgrows the context, forget the oldest exchanges.
        start = 1 if args.system is not None else 0
        while len(prompt) + settings["max_new_tokens"] > context and len(messages) > start + 1:
            del messages[start:start + 2]
            prompt = format_chat(tokenizer, messages, image_token)
        shown = [part["image"] for m in messages if isinstance(m["content"], list) for part in m["content"]
                 if part["type"] == "image"]
        result = _say(params, tokenizer, prompt, settings, shown)
        messages.append({"role": "assistant", "content": result.text})


if __name__ == "__main__":
    sys.exit(main())
