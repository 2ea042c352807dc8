"""`python -m infer.serve`: an OpenAI-compatible HTTP server with continuous batching.

    python -m infer.serve --checkpoint DIR [--layout NAME] [--dtype bfloat16] [--quantize int8]
                          [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--max-seq-len 2048]
                          [--api-key KEY]          # or LLAMA_JAX_API_KEY

Endpoints: POST /v1/completions, POST /v1/chat/completions (Llama 2 and 3.x
chat formats; Llama 3.1 tool use: OpenAI's `tools` offered in Llama 3.1's
layout, replies that call a function or run `<|python_tag|>` code answered
as `tool_calls`, the `tool` role taken as Llama's `ipython`), GET /v1/models,
GET /v1/models/{name}, GET /health. Streaming by server-sent events; `n` choices per request, each
in its own decode slot. Completions take several prompts at once (text or token ids; choice i of
prompt p at index p * n + i) and `echo`, with logprobs the prompt's own from a forward pass over
it, which is what lm-eval's `local-completions` model scores with (docs/evaluation.md). Generation runs in `infer.batcher.Batcher`: this
module is the thin FastAPI layer over it (checks in `infer.openai_api`, the
answers' JSON in `infer.responses`). With `--guard DIR` a Llama Guard model screens
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
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from infer import guard_hook
from infer.options import ServingOptions, check_checkpoint
from llama_jax.cli import run_cli
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


@dataclasses.dataclass
class Service:
    """What the endpoints share: the batcher, the tokenizer, names and bounds."""

    batcher: object
    tokenizer: object
    model_name: str
    context: int
    api_key: str | None
    max_body_bytes: int
    max_waiting: int
    compiles: int = 0
    body_timeout: float = 30.0
    vocab_size: int | None = None  # the model's token ids (default: the tokenizer's)
    guard: object = None  # infer.guard_hook.Screen with --guard


def _load(args) -> Service:
    import jax

    from infer.batcher import Batcher
    from infer.engine import engine_for
    from infer.generate import checkpoint_config, load_served

    options = ServingOptions.from_args(args)
    stored = checkpoint_config(args.checkpoint)
    context = args.max_seq_len or stored.max_seq_len
    if not 2 <= context <= stored.max_seq_len:
        raise ValueError(f"--max-seq-len must be in [2, {stored.max_seq_len}] (the model's context), got {context}")
    config, params, tokenizer = load_served(args.checkpoint, options, args.tokenizer)
    service = Service(None, tokenizer, args.model_name or Path(args.checkpoint).resolve().name, context,
                      args.api_key or None, args.max_body_bytes, args.max_waiting, body_timeout=args.body_timeout,
                      vocab_size=config.vocab_size)
    service.guard = guard_hook.load(args, options.layout, tokenizer)

    def count(event: str, duration: float, **_):
        if event == BACKEND_COMPILE_EVENT:
            service.compiles += 1

    jax.monitoring.register_event_duration_secs_listener(count)
    engine = engine_for(config, options.layout)
    batcher = Batcher(engine, params, args.max_batch, context, tokenizer.stop_ids, args.steps_per_call,
                      args.prefill_batch)
    buckets = sorted({engine.prompt_shape(n)[0] for n in range(1, context)})
    print(f"compiling the decode step and the prefill of {len(buckets)} prompt buckets x groups of "
          f"{list(batcher.shape.prefill_rows)}", file=sys.stderr, flush=True)
    batcher.warm_up(buckets)
    batcher.start()
    service.batcher = batcher
    return service


def create_app(service: Service):
    """The FastAPI app over a started batcher."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from infer import listener
    from infer import openai_api as api
    from llama_jax.text.chat import format_chat

    app = FastAPI(title="llama-jax", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(api.ApiError)
    async def refused(_, err: api.ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            message, param = f"the request body is not valid JSON ({first.get('msg')})", None
        else:
            param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
            message = f"{param or 'body'}: {first.get('msg')}"
        return JSONResponse(api.ApiError(400, message, param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, err: HTTPException):
        return JSONResponse(api.ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.get("/health")
    async def health():
        failed = service.batcher.error is not None
        body = {"status": "error" if failed else "ok", **service.batcher.load(), "compiles": service.compiles}
        if service.guard is not None:
            body["guard"] = service.guard.counts()
        return JSONResponse(body, status_code=503 if failed else 200)

    def model_card():
        return {"id": service.model_name, "object": "model", "created": 0, "owned_by": "llama-jax",
                "max_model_len": service.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")  # a name may hold "/", as Hugging Face's do
    async def model(name: str):
        _check_model(service, name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest):
        _check_model(service, body.model)
        logprobs = api.completion_logprobs(body)
        prompts = api.completion_prompts(body, service.tokenizer, service.vocab_size)
        settings = [api.check_sampled(body, len(ids), service.context, 16, logprobs, service.batcher.slots)
                    for ids in prompts]
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt if isinstance(body.prompt[0], str) \
            else [service.tokenizer.decode(ids) for ids in prompts]
        asked = [[{"role": "user", "content": text}] for text in texts]
        return await _respond(service, prompts, settings, body, "text_completion", "cmpl", asked)

    @app.post("/v1/chat/completions")
    async def chat(body: api.ChatRequest):
        _check_model(service, body.model)
        logprobs = api.chat_logprobs(body)
        if body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        tools, names = api.chat_tools(body)
        messages = api.chat_messages(body)
        try:
            ids = format_chat(service.tokenizer, messages, tools=tools)
        except ValueError as err:
            raise api.ApiError(400, str(err), "messages") from None
        names = names if service.tokenizer.generation == "llama3" else None  # Llama 2 makes no calls
        settings = api.check_sampled(body, len(ids), service.context, None, logprobs, service.batcher.slots, names)
        return await _respond(service, [ids], [settings], body, "chat.completion", "chatcmpl",
                              [guard_hook.chat_conversation(messages)])

    async def _respond(service, prompts, settings, body, kind, prefix, conversations):
        """Answer `n` choices for each prompt (its `settings`), choice i of prompt p at index p * n + i;
        with --guard, each prompt's conversation is screened first and the answers after."""
        from infer.responses import Choice, new_id

        guard = service.guard
        if guard is not None:  # an unsafe prompt is refused before it is queued
            if len(prompts) > 1:
                raise api.ApiError(400, "with --guard, give one prompt per request", "prompt")
            await guard.check_prompt(conversations[0])
        echo = getattr(body, "echo", False)
        requests, queue = _submit(service, prompts, settings, score_prompts=echo and settings[0].logprobs is not None)
        each = [(ids, s) for ids, s in zip(prompts, settings) for _ in range(s.n)]  # in the order of `index`
        choices = [Choice(i, kind.startswith("chat"), service.tokenizer, s, new_id("call", "_"), ids if echo else None)
                   for i, (ids, s) in enumerate(each)]
        events = _chunks(requests, queue, choices)
        head = {"id": new_id(prefix), "object": kind, "created": int(time.time()), "model": service.model_name}
        prompt_tokens = sum(map(len, prompts))
        chat = kind.startswith("chat")
        if body.stream:
            if guard is not None:
                events = guard.streamed(events, requests, conversations[0], chat)
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_stream(events, choices, head, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        answer = await _collect(events, choices, head, prompt_tokens)
        return answer if guard is None else await guard.check_answers(answer, conversations[0], chat)

    return listener.Guard(app, service.api_key, service.max_body_bytes, service.body_timeout)


def _submit(service: Service, prompts: list[list[int]], settings: list, score_prompts: bool = False):
    """Queue one generation per choice of each prompt (before any answer starts, so a refusal
    gets its own status); returns (the batcher's Requests, in the choices' order, and the
    asyncio queue their (choice, event) pairs arrive on). `score_prompts`: each request
    reports its prompt's log-probabilities first (echo with logprobs)."""
    from infer import openai_api as api
    from infer.batcher import Request, WorkerFailed

    batcher = service.batcher
    failed = api.ApiError(503, "the generation worker failed; restart the server", kind="server_error")
    if batcher.error is not None:
        raise failed
    if batcher.load()["waiting"] + sum(s.n for s in settings) > service.max_waiting:
        raise api.ApiError(429, "too many requests are waiting; retry later", kind="rate_limit_error")
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    seed = secrets.randbelow(api.INT32) if settings[0].seed is None else settings[0].seed

    def emitter(index):
        def emit(event):  # called from the batcher's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop has closed (a shutdown that timed out): no one listens
                requests[index].cancelled = True
        return emit

    # Choice i of every prompt has seed + i: each prompt is answered as it would be alone.
    each = [(ids, s, i) for ids, s in zip(prompts, settings) for i in range(s.n)]
    requests = [Request(ids, s.max_tokens, s.sampling, api.choice_seed(seed, i), emit=emitter(index),
                        score_prompt=score_prompts)
                for index, (ids, s, i) in enumerate(each)]
    try:
        for request in requests:
            batcher.submit(request)
    except RuntimeError as err:  # WorkerFailed: it failed since the check above
        for request in requests:
            request.cancelled = True
        if isinstance(err, WorkerFailed):
            raise failed from None
        raise api.ApiError(503, "the server is shutting down", kind="server_error") from None
    return requests, queue


async def _chunks(requests, queue, choices):
    """The chunk choices of a request's choices as their events arrive, until every choice has
    ended; a choice that ends early (a stop string) and, when the consumer stops (a client that
    left), every choice have their requests cancelled, which frees their slots."""
    from infer import openai_api as api
    from infer.events import Finished

    try:
        while any(choice.finish is None for choice in choices):
            index, event = await queue.get()
            if isinstance(event, Finished) and event.reason == "error":
                raise api.ApiError(500, "the generation worker failed", kind="server_error")
            if isinstance(event, Finished) and event.reason == "cancelled" and choices[index].finish is None:
                # Not by this answer (a stop string, a client that left): the server is shutting down.
                raise api.ApiError(503, "the server shut down before this answer was finished", kind="server_error")
            for chunk in choices[index].add(event):
                yield chunk
            if choices[index].finish is not None:
                requests[index].cancelled = True  # no-op once its request has finished
    finally:
        for request in requests:
            request.cancelled = True


async def _collect(chunks, choices, head, prompt_tokens):
    from infer.responses import usage

    async with contextlib.aclosing(chunks):
        async for _ in chunks:
            pass
    return {**head, "choices": [choice.result() for choice in choices],
            "usage": usage(prompt_tokens, sum(choice.generated for choice in choices))}


async def _stream(chunks, choices, head, prompt_tokens, include_usage: bool):
    """Server-sent events: one chunk per chunk choice, then, if `include_usage` (OpenAI's
    stream_options), one with `usage` and no choices (the others carry usage null), then [DONE]."""
    from infer import openai_api as api
    from infer.responses import usage

    head = {**head, "object": head["object"] + ".chunk" if head["object"].startswith("chat") else head["object"]}
    if include_usage:
        head["usage"] = None
    try:
        async with contextlib.aclosing(chunks):  # a client that leaves closes it: its requests are cancelled
            async for chunk in chunks:
                yield f"data: {json.dumps({**head, 'choices': [chunk]})}\n\n"
    except api.ApiError as err:  # the status is sent already: report it in the stream
        yield f"data: {json.dumps(err.body())}\n\n"
    if include_usage:
        tokens = usage(prompt_tokens, sum(choice.generated for choice in choices))
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': tokens})}\n\n"
    yield "data: [DONE]\n\n"


def _check_model(service: Service, name: str) -> None:
    from infer.openai_api import ApiError

    if name != service.model_name:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {service.model_name!r} "
                       "(GET /v1/models)", "model", "model_not_found")


if __name__ == "__main__":
    sys.exit(main())
