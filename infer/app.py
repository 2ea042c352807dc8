"""The HTTP layer of `python -m infer.serve`: the FastAPI app over a started batcher.

`Service` is what the endpoints share; `create_app(service)` builds the OpenAI-compatible
endpoints (the requests' checks in `infer.openai_api`, the answers' JSON in `infer.responses`).
`infer.serve` (the command) loads the model, starts the batcher and runs this app under uvicorn.
"""

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from infer import guard_hook, listener
from infer import openai_api as api
from infer.requests import Request, WorkerFailed
from infer.events import Finished
from infer.openai_api import ApiError
from infer.responses import Choice, new_id, usage
from llama_jax.text.chat import format_chat
from llama_jax.text.grammar import Grammar, GrammarError, GrammarVocabulary, json_grammar
from llama_jax.vision.image import image_inputs


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
    vision: object = None  # the served model's VisionConfig (Llama 3.2 Vision: chat takes images); None: text only
    grammar_vocabulary: GrammarVocabulary | None = None  # structured outputs' view of the tokenizer (made once)

    def grammar(self, schema, param: str) -> Grammar:
        """The grammar of answers that follow a JSON schema; ApiError (400, one line) naming the
        schema's problem where the grammar library cannot compile it. Called off the event loop."""
        if self.grammar_vocabulary is None:
            self.grammar_vocabulary = GrammarVocabulary(self.tokenizer, self.vocab_size)
        try:
            return json_grammar(schema, self.grammar_vocabulary)
        except GrammarError as err:
            raise api.ApiError(400, f"{param}: the schema cannot be compiled: {err}", param) from None


def create_app(service: Service):
    """The FastAPI app over a started batcher."""


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
        settings = await _constrained(service, settings, api.response_schema(body), "response_format")
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
        tools, names, call_schema = api.chat_tools(body)
        schema = api.response_schema(body)
        if schema is not None and call_schema is not None:
            raise api.ApiError(400, "give response_format or a tool_choice that forces a call, not both",
                               "response_format")
        vision = service.vision
        messages = await asyncio.to_thread(api.chat_messages, body, vision)  # images decoded off the event loop
        image_token = None if vision is None else vision.image_token_id
        try:
            ids = format_chat(service.tokenizer, messages, image_token, tools=tools)
        except ValueError as err:
            raise api.ApiError(400, str(err), "messages") from None
        if service.tokenizer.generation != "llama3":  # Llama 2 makes no calls
            if call_schema is not None:
                raise api.ApiError(400, "tool calls need Llama 3.1's chat format; this model's is "
                                   f"{service.tokenizer.generation}'s", "tool_choice")
            names = None
        settings = api.check_sampled(body, len(ids), service.context, None, logprobs, service.batcher.slots, names)
        if call_schema is not None:
            settings, = await _constrained(service, [settings], call_schema, "tools")
        else:
            settings, = await _constrained(service, [settings], schema, "response_format")
        images = [part["image"] for m in messages if isinstance(m["content"], list) for part in m["content"]
                  if part["type"] == "image"]
        arrays = await asyncio.to_thread(image_inputs, [images], [ids], vision) if images else None
        return await _respond(service, [ids], [settings], body, "chat.completion", "chatcmpl",
                              [guard_hook.chat_conversation(messages)], arrays)

    async def _respond(service, prompts, settings, body, kind, prefix, conversations, images=None):
        """Answer `n` choices for each prompt (its `settings`), choice i of prompt p at index p * n + i;
        with --guard, each prompt's conversation is screened first and the answers after.
        `images`: a chat prompt's image arrays (one row), or None."""

        guard = service.guard
        if guard is not None:  # an unsafe prompt is refused before it is queued
            if len(prompts) > 1:
                raise api.ApiError(400, "with --guard, give one prompt per request", "prompt")
            await guard.check_prompt(conversations[0])
        echo = getattr(body, "echo", False)
        requests, queue = _submit(service, prompts, settings, score_prompts=echo and settings[0].logprobs is not None,
                                  images=images)
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


async def _constrained(service: Service, settings: list, schema, param: str) -> list:
    """`settings` with the grammar of `schema` (None: as they are), compiled off the event loop."""
    if schema is None:
        return settings
    grammar = await asyncio.to_thread(service.grammar, schema, param)
    return [dataclasses.replace(s, grammar=grammar) for s in settings]


def _submit(service: Service, prompts: list[list[int]], settings: list, score_prompts: bool = False,
            images: dict | None = None):
    """Queue one generation per choice of each prompt (before any answer starts, so a refusal
    gets its own status); returns (the batcher's Requests, in the choices' order, and the
    asyncio queue their (choice, event) pairs arrive on). `score_prompts`: each request
    reports its prompt's log-probabilities first (echo with logprobs). `images`: the image
    arrays of a single prompt (a vision chat), shared by its choices."""

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
                        score_prompt=score_prompts, images=images, grammar=s.grammar)
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

    async with contextlib.aclosing(chunks):
        async for _ in chunks:
            pass
    return {**head, "choices": [choice.result() for choice in choices],
            "usage": usage(prompt_tokens, sum(choice.generated for choice in choices))}


async def _stream(chunks, choices, head, prompt_tokens, include_usage: bool):
    """Server-sent events: one chunk per chunk choice, then, if `include_usage` (OpenAI's
    stream_options), one with `usage` and no choices (the others carry usage null), then [DONE]."""

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
    if name != service.model_name:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {service.model_name!r} "
                       "(GET /v1/models)", "model", "model_not_found")
