"""`python -m infer.serve`: an OpenAI-compatible HTTP server with continuous batching.

    python -m infer.serve --checkpoint DIR [--layout NAME] [--dtype bfloat16] [--quantize int8]
                          [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-seq-len 2048]
                          [--api-key KEY]          # or LLAMA_JAX_API_KEY
                          [--prefill-chunk 8192] [--prefix-cache-mb 0]

Endpoints: POST /v1/completions, POST /v1/chat/completions (Llama 2 and 3.x
chat formats; Llama 3.1 tool use: OpenAI's `tools` offered in Llama 3.1's
layout, replies that call a function or run `<|python_tag|>` code answered
as `tool_calls`, the `tool` role taken as Llama's `ipython`; `tool_choice` "required" or a named
function forces a call whose arguments follow the function's schema), structured outputs on both
(`response_format` json_object or json_schema: answers decoded under a grammar), GET /v1/models,
GET /v1/models/{name}, GET /health. A Llama 3.2 Vision checkpoint's chat takes images as
`image_url` data URLs (each slot holds its image's cross-attention keys and values). Streaming by server-sent events; `n` choices per request, each
in its own decode slot. Completions take several prompts at once (text or token ids; choice i of
prompt p at index p * n + i) and `echo`, with logprobs the prompt's own from a forward pass over
it, which is what lm-eval's `local-completions` model scores with (docs/evaluation.md). Generation runs in `infer.batcher.Batcher`;
`infer.app` is the thin FastAPI layer over it (checks in `infer.openai_api`, the
answers' JSON in `infer.responses`); this module is the command that loads and starts both. With `--guard DIR` a Llama Guard model screens
prompts and answers (`infer.guard_hook`: refusals with code content_filter).

Start-up: flags are checked and the port bound before anything loads, so a
bad flag or a port in use is one line at once; "serving ... on" is printed
once the server listens. Bounds: it binds 127.0.0.1 unless told otherwise;
with an API key every endpoint but /health wants `Authorization: Bearer KEY`
(401 otherwise); request bodies over --max-body-bytes get 413, bodies (or
headers) slower than --body-timeout 408 (or a closed connection), a client
address past --max-connections-per-client 429 (infer.listener); prompts
longer than the context 400, more than --max-waiting queued requests 429.
SIGTERM: the server stops accepting connections, lets running requests
finish (at most --shutdown-timeout seconds; then each ends with a 503 error,
in its stream if it streams), and exits 0.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

from infer import guard_hook
from infer.options import ServingOptions, check_checkpoint
from llama_jax.cli import run_cli
from llama_jax.decoding.programs import PREFILL_CHUNK
from llama_jax.decoding.slots import PREFILL_BATCH, SLOTS, STEPS_PER_CALL

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # what jax.monitoring reports per compile
SHUTDOWN_GRACE = 5.0  # seconds past --shutdown-timeout for cancelled answers to end before uvicorn cuts them


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infer.serve",
                                     description="Serve a Llama checkpoint over an OpenAI-compatible HTTP API.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="our checkpoint directory, or a Hugging Face directory with config.json")
    parser.add_argument("--tokenizer", default=None, metavar="PATH", help="default: found in the checkpoint")
    parser.add_argument("--model-name", default=None, help="the model's name in the API (default: DIR's name)")
    parser.add_argument("--layout", default=None, metavar="NAME",
                        help="layout from configs/layouts (default: one device)")
    parser.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the checkpoint's)")
    parser.add_argument("--quantize", default=None, help="int8 or fp8 weights")
    parser.add_argument("--kv-cache-dtype", default=None, help="int8 or fp8 KV cache")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this host only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=SLOTS, metavar="N",
                        help=f"decode slots (requests decoded at once; default {SLOTS})")
    parser.add_argument("--max-seq-len", type=int, default=None, metavar="L",
                        help="context per request, prompt plus answer (default: the model's)")
    parser.add_argument("--steps-per-call", type=int, default=STEPS_PER_CALL, metavar="N",
                        help="decode steps per compiled call; new requests join between calls "
                             f"(default {STEPS_PER_CALL})")
    parser.add_argument("--prefill-batch", type=int, default=PREFILL_BATCH, metavar="N",
                        help=f"waiting requests prefilled together (default {PREFILL_BATCH}; also compiled: one alone)")
    parser.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                        help="prompt positions per row prefilled between two decode calls: a longer prompt is "
                             "prefilled in chunks of N, interleaved with the running slots' decode calls "
                             f"(default {PREFILL_CHUNK})")
    parser.add_argument("--prefix-cache-mb", type=float, default=0.0, metavar="MB",
                        help="memory for cached prompt prefixes (blocks of 16 positions' keys and values, least "
                             "recently used evicted); requests sharing a prefix prefill only the rest "
                             "(default 0: off)")
    parser.add_argument("--api-key", default=os.environ.get("LLAMA_JAX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LLAMA_JAX_API_KEY; none: open)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                        help="larger request bodies get 413 (default 1 MiB)")
    parser.add_argument("--max-waiting", type=int, default=256, metavar="N",
                        help="queued requests before answering 429 (default 256)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                        help="on SIGTERM, seconds running requests may take to finish (default 30)")
    parser.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                        help="seconds a request's headers, then its body, may take to arrive; slower ones "
                             "are cut (default 30)")
    parser.add_argument("--max-connections-per-client", type=int, default=64, metavar="N",
                        help="connections one client address may hold at once; more get 429 (default 64)")
    guard_hook.add_arguments(parser)
    return parser.parse_args(argv)


def check_flags(args) -> None:
    """ValueError (one line) for a flag out of its range; nothing is loaded or bound yet."""
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--steps-per-call", args.steps_per_call, 1),
                               ("--prefill-batch", args.prefill_batch, 1), ("--max-body-bytes", args.max_body_bytes, 1),
                               ("--prefill-chunk", args.prefill_chunk, 16), ("--prefix-cache-mb", args.prefix_cache_mb, 0),
                               ("--max-waiting", args.max_waiting, 1),
                               ("--max-connections-per-client", args.max_connections_per_client, 1),
                               ("--shutdown-timeout", args.shutdown_timeout, 0)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535] (0: any free port), got {args.port}")
    if not args.body_timeout > 0:
        raise ValueError(f"--body-timeout must be above 0 seconds, got {args.body_timeout}")


def main(argv=None) -> int:
    return run_cli(_serve, argv)


def _serve(argv) -> None:
    """Check, bind, load, compile and serve until SIGTERM; SystemExit(1) if the server could not start."""
    args = parse_args(argv)
    check_flags(args)
    check_checkpoint(args.checkpoint)
    import uvicorn

    from infer import listener
    from infer.app import create_app

    sock = listener.bind(args.host, args.port)  # before loading: a port in use is one line at once
    service = _load(args)

    def listening(port):
        print(f"serving {service.model_name} on http://{args.host}:{port}/v1", file=sys.stderr, flush=True)

    # uvicorn handles SIGTERM (graceful shutdown) and then raises it again with the handler
    # that was there before: make that one a no-op, so a graceful stop exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    limits = listener.Limits(args.body_timeout, args.max_connections_per_client)
    config = uvicorn.Config(create_app(service), log_level="warning", http=listener.connection_class(limits),
                            timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_GRACE)
    # Past --shutdown-timeout, what still runs is cancelled: each answer ends with an error (a
    # stream with an error event and [DONE]), before uvicorn would cut the tasks mid-write.
    server = listener.Server(config, listening, args.shutdown_timeout, service.batcher.cancel_all)
    server.run(sockets=[sock])
    # What is still queued or running has no one to answer (the shutdown timed out): end it.
    service.batcher.stop(timeout=args.shutdown_timeout, cancel=True)
    if not server.started:  # uvicorn logged why; not a bad-input error (exit 2), so exit 1
        raise SystemExit(1)


def _load(args):
    """Load the model, compile and start the batcher: the app's `infer.app.Service`."""
    import jax

    from infer.app import Service
    from infer.batcher import Batcher
    from infer.engine import engine_for
    from infer.generate import checkpoint_config, load_served
    from llama_jax.decoding.staged import unstageable
    from llama_jax.text.grammar import GrammarVocabulary

    options = ServingOptions.from_args(args)
    stored = checkpoint_config(args.checkpoint)
    if args.prefix_cache_mb and unstageable(stored):
        raise ValueError(f"--prefix-cache-mb: {unstageable(stored)}")
    context = args.max_seq_len or stored.max_seq_len
    if not 2 <= context <= stored.max_seq_len:
        raise ValueError(f"--max-seq-len must be in [2, {stored.max_seq_len}] (the model's context), got {context}")
    config, params, tokenizer = load_served(args.checkpoint, options, args.tokenizer)
    service = Service(None, tokenizer, args.model_name or Path(args.checkpoint).resolve().name, context,
                      args.api_key or None, args.max_body_bytes, args.max_waiting, body_timeout=args.body_timeout,
                      vocab_size=config.vocab_size, vision=config.vision)
    service.guard = guard_hook.load(args, options.layout, tokenizer, config.vision is not None)
    service.grammar_vocabulary = GrammarVocabulary(tokenizer, config.vocab_size)  # structured outputs' (~1.5 s)

    def count(event: str, duration: float, **_):
        if event == BACKEND_COMPILE_EVENT:
            service.compiles += 1

    jax.monitoring.register_event_duration_secs_listener(count)
    engine = engine_for(config, options.layout, args.prefill_chunk)
    batcher = Batcher(engine, params, args.max_batch, context, tokenizer.stop_ids, args.steps_per_call,
                      args.prefill_batch, args.prefix_cache_mb)
    buckets = sorted({engine.prompt_shape(n)[0] for n in range(1, context)})
    print(f"compiling the decode step and the prefill of {len(buckets)} prompt buckets x groups of "
          f"{list(batcher.shape.prefill_rows)}", file=sys.stderr, flush=True)
    batcher.warm_up(buckets)
    batcher.start()
    service.batcher = batcher
    return service


if __name__ == "__main__":
    sys.exit(main())
