"""The OpenAI API's shapes: request bodies, their checks, and the JSON answered.

Requests are pydantic models (unknown fields are ignored, as OpenAI's own
server ignores fields it does not use); `check_*` turns a parsed request and
a prompt's length into `Settings` for the batcher, or raises `ApiError`,
which the server answers with OpenAI's error body:
`{"error": {"message", "type", "param", "code"}}`.
What is answered is built in `infer.responses`.

Tools (chat): `tools` are OpenAI's function definitions, offered to the
model in Llama 3.1's layout (`llama_jax.text.tool_use`); `tool_choice` "auto"
(the default), "none" (tools not offered, replies never read as calls),
"required" (the reply is a call of one of them) or `{"type": "function",
"function": {"name": ...}}` (a call of that one); a forced call's arguments
follow the function's `parameters` schema, as structured outputs do.

Structured outputs (both endpoints): `response_format` {"type": "json_object"}
(the answer is a JSON object) or {"type": "json_schema", "json_schema":
{"name", "schema", "strict"}} (a JSON value the schema admits), decoded under
a grammar (`llama_jax.text.grammar`); {"type": "text"} or none: free text.
An assistant message's `tool_calls` (arguments a JSON object in a string)
and `tool` messages (Llama's `ipython` turn; `tool_call_id` has no place
in Llama's format and is not checked) continue a conversation.

Images (chat, Llama 3.2 Vision): user messages' `image_url` parts whose URL is
a `data:image/...;base64,...` URL, each becoming `<|image|>` where it stands;
the server fetches nothing, so any other URL is a 400.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import re

from pydantic import BaseModel, Field

from llama_jax.decoding.logprobs import TOP_LOGPROBS
from llama_jax.decoding.sampling import Sampling
from llama_jax.text.grammar import ANY_OBJECT
from llama_jax.text.tool_use import ToolCall, call_schema, tool_names

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # the completions API's `logprobs` bound (OpenAI's)
INT32 = 2 ** 31
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name


class ApiError(Exception):
    """A request the server refuses: HTTP status, message, and OpenAI's error type, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the usage and no choices (others say usage null)


class Sampled(BaseModel):
    """Fields shared by both endpoints. `top_k` is an extension (0 or -1: no top-k)."""

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    skip_special_tokens: bool = True  # vLLM's name: False keeps special tokens' text (<|eot_id|>) in the answer
    response_format: dict | None = None  # text, json_object or json_schema (`response_schema`)


class CompletionRequest(Sampled):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt or several, as text or token ids
    logprobs: int | None = None
    echo: bool = False  # answer the prompt's text (and, with logprobs, its tokens') before the completion


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCallMade(BaseModel):
    """A call in an assistant message sent back (`id` and `type` are the client's, not checked)."""

    id: str | None = None
    type: str = "function"
    function: FunctionCall


class Message(BaseModel):
    role: str
    content: str | list[dict] | None = None
    tool_calls: list[ToolCallMade] | None = None
    tool_call_id: str | None = None


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None  # kept as sent: the prompt shows each one's JSON in the client's key order
    tool_choice: str | dict | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    """A checked request: what the batcher needs, plus stop strings and logprobs to report."""

    max_tokens: int
    sampling: Sampling
    seed: int | None
    stops: tuple[str, ...]
    logprobs: int | None  # alternatives per token to report; None: no logprobs
    n: int = 1  # choices, each its own decode slot and seed (`choice_seed`)
    tool_names: frozenset[str] | None = None  # chat: functions a reply may call; None: replies are text
    skip_special_tokens: bool = True  # leave special tokens' text out of the answer (their logprobs stay)
    grammar: object = None  # structured outputs: a llama_jax.text.grammar.Grammar the answer follows


def check_sampled(request: Sampled, prompt_tokens: int, context: int, default_max_tokens: int | None,
                  logprobs: int | None, max_choices: int, tool_names: frozenset[str] | None = None) -> Settings:
    """`Settings` for a request whose prompt has `prompt_tokens` tokens, or ApiError (400).
    `max_choices`: the most choices one request may ask for (the server's decode slots)."""
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    if not 1 <= request.n <= max_choices:
        raise ApiError(400, f"n must be in [1, {max_choices}] (each choice takes one of this server's "
                       f"{max_choices} decode slots, --max-batch), got {request.n}", "n")
    if not 0.0 <= request.temperature <= 2.0:
        raise ApiError(400, f"temperature must be in [0, 2], got {request.temperature}", "temperature")
    if not 0.0 < request.top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {request.top_p}", "top_p")
    if request.top_k is not None and request.top_k < -1:
        raise ApiError(400, f"top_k must be a positive integer (0 or -1: off), got {request.top_k}", "top_k")
    if request.seed is not None and not -INT32 <= request.seed < INT32:
        raise ApiError(400, f"seed must fit in 32 bits, got {request.seed}", "seed")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(400, f"stop: give up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    if prompt_tokens < 1:
        raise ApiError(400, "the prompt is empty (it needs at least one token)", "prompt")
    least = 0 if getattr(request, "echo", False) else 1  # an echoed prompt may be all that is asked for
    room = context - prompt_tokens
    if room < least:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this model's context is {context} "
                       "tokens and leaves no room for an answer",
                       "messages" if isinstance(request, ChatRequest) else "prompt", "context_length_exceeded")
    max_tokens = request.max_tokens
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    if max_tokens < least:
        raise ApiError(400, f"max_tokens must be at least {least}" + (" (0 with echo)" if least else "")
                       + f", got {max_tokens}", "max_tokens")
    if max_tokens > room:
        raise ApiError(400, f"max_tokens {max_tokens} plus the prompt's {prompt_tokens} tokens is over this "
                       f"model's context of {context} tokens; ask for at most {room}", "max_tokens",
                       "context_length_exceeded")
    top_k = request.top_k if request.top_k and request.top_k > 0 else None
    top_p = request.top_p if request.top_p < 1.0 else None
    sampling = Sampling(request.temperature, top_k, top_p)
    return Settings(max_tokens, sampling, request.seed, tuple(stops), logprobs, request.n, tool_names,
                    request.skip_special_tokens)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request with `seed`: seed + index, wrapped into int32, so
    choice 0 is the one-choice answer and choice i that of a request with seed + i."""
    return (seed + index + INT32) % (2 * INT32) - INT32


def completion_logprobs(request: CompletionRequest) -> int | None:
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {request.logprobs}", "logprobs")
    return request.logprobs


def completion_prompts(request: CompletionRequest, tokenizer, vocab_size: int | None = None) -> list[list[int]]:
    """The token ids of each prompt of a completions request: text (encoded with BOS), a list of
    texts, token ids, or a list of token-id lists (used as they are). ApiError (400) for a
    token id outside the model's `vocab_size` ids (default: the tokenizer's; a model's table
    may be padded past its tokenizer, and such ids carry no text)."""
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
        return [tokenizer.encode(text, bos=True) for text in ([prompt] if isinstance(prompt, str) else prompt)]
    prompts = [list(ids) for ids in prompt] if prompt and isinstance(prompt[0], list) else [list(prompt)]
    vocab_size = vocab_size or tokenizer.vocab_size
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            where = f"prompt {i}" if len(prompts) > 1 else "prompt"
            raise ApiError(400, f"{where}: token id {bad[0]} is outside the vocabulary (0 to {vocab_size - 1})",
                           "prompt")
    return prompts


def chat_logprobs(request: ChatRequest) -> int | None:
    if request.top_logprobs is not None:
        if not request.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if not 0 <= request.top_logprobs <= TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in [0, {TOP_LOGPROBS}], got {request.top_logprobs}",
                           "top_logprobs")
    return (request.top_logprobs or 0) if request.logprobs else None


def chat_messages(request: ChatRequest, vision=None) -> list[dict]:
    """The messages as `llama_jax.text.chat.format_chat` takes them: OpenAI's `tool` role is Llama
    3.1's `ipython` (a tool's output), its `developer` role (instructions, o1 on) the system
    prompt, content parts keep their text, an assistant's `tool_calls` become `ToolCall`s.
    `image_url` parts (user turns only, data URLs only) become `{"type": "image", "image":
    PIL image}` parts where they stand, for a model with `vision` (its VisionConfig; None:
    text-only, which takes no images). ApiError (400) for an image the model cannot take."""
    seen = sum(isinstance(m.content, list) and sum(isinstance(p, dict) and p.get("type") == "image_url"
                                                   for p in m.content) for m in request.messages)
    if seen and vision is None:
        raise ApiError(400, "this model takes no images (it is not a Llama 3.2 Vision checkpoint); send text "
                       "content only", "messages")
    if seen and seen > vision.max_images:
        raise ApiError(400, f"the messages hold {seen} images; this model takes at most {vision.max_images} per "
                       "request (vision.max_images)", "messages")
    messages = []
    for i, message in enumerate(request.messages):
        role = {"tool": "ipython", "developer": "system"}.get(message.role, message.role)
        content = message.content or ""
        if isinstance(content, list):
            content = [_content_part(f"messages.{i}.content.{j}", part, message.role) for j, part in enumerate(content)]
        messages.append({"role": role, "content": content})
        if message.tool_calls:
            messages[-1]["tool_calls"] = [_call_made(i, j, call) for j, call in enumerate(message.tool_calls)]
    return messages


def _content_part(where: str, part, role: str) -> dict:
    """A content part as format_chat takes it: text as it is, an image_url's data URL decoded."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return part
    if kind != "image_url":
        raise ApiError(400, f"{where}: a content part must be {{'type': 'text', 'text': ...}} or {{'type': "
                       f"'image_url', 'image_url': {{'url': 'data:image/png;base64,...'}}}}, got type {kind!r}"[:300],
                       where)
    if role != "user":
        raise ApiError(400, f"{where}: only user messages may hold images, not {role!r} ones", where)
    url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
    return {"type": "image", "image": data_url_image(f"{where}.image_url.url", url)}


def data_url_image(where: str, url):
    """The image (PIL) in a `data:image/...;base64,...` URL; ApiError (400) for any other URL (the
    server never fetches from the network) or bytes that are not an image."""
    from llama_jax.vision.image import load_image

    if not isinstance(url, str):
        raise ApiError(400, f"{where}: give the image as a data URL string (data:image/png;base64,...)", where)
    if not url.startswith("data:"):
        raise ApiError(400, f"{where}: only data URLs are taken (data:image/png;base64,...); this server does not "
                       f"fetch {url.split(':', 1)[0][:10]!r} URLs", where)
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ApiError(400, f"{where}: expected data:image/<type>;base64,<data>, got {header[:40]!r}", where)
    try:
        raw = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise ApiError(400, f"{where}: the data URL's base64 does not decode", where) from None
    try:
        return load_image(io.BytesIO(raw), name=where)
    except ValueError as err:
        raise ApiError(400, str(err)[:300], where) from None


def _call_made(i: int, j: int, call: ToolCallMade) -> ToolCall:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ApiError(400, f"messages.{i}.tool_calls.{j}.function.arguments must be a JSON object "
                       "(in a string)", f"messages.{i}.tool_calls.{j}.function.arguments")
    return ToolCall(call.function.name, arguments)


def response_schema(request: Sampled) -> dict | bool | None:
    """The JSON schema an answer must follow under `response_format` (None: free text), or
    ApiError (400) for a format this server does not write."""
    spec = request.response_format
    kind = None if spec is None else spec.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        inner = spec.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), (dict, bool)):
            raise ApiError(400, "response_format.json_schema must be {'name': ..., 'schema': a JSON schema "
                           "(an object)}", "response_format")
        return inner.get("schema", ANY_OBJECT)
    raise ApiError(400, f"response_format type {kind!r} is not supported; use 'text', 'json_object' or "
                   "'json_schema'"[:300], "response_format")


def chat_tools(request: ChatRequest) -> tuple[list[dict] | None, frozenset[str] | None, dict | None]:
    """(the function definitions to offer in the prompt or None, the names a reply may call or
    None when replies are plain text, the JSON schema a forced call follows or None) for a chat
    request's `tools` and `tool_choice`. Replies are read as calls only when tools were offered
    (then `<|python_tag|>` code is one too)."""
    choice = request.tool_choice
    named = isinstance(choice, dict)
    if named and (choice.get("type") != "function" or not isinstance(choice.get("function"), dict)
                  or not isinstance(choice["function"].get("name"), str)):
        raise ApiError(400, "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                       "{'name': ...}}", "tool_choice")
    if not named and choice not in (None, "auto", "none", "required"):
        raise ApiError(400, f"tool_choice {choice!r} is not supported; use 'auto', 'none', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}"[:300], "tool_choice")
    for i, tool in enumerate(request.tools or []):
        function = tool.get("function")
        if (tool.get("type") != "function" or not isinstance(function, dict)
                or not isinstance(function.get("name"), str) or not FUNCTION_NAME.fullmatch(function["name"])
                or not isinstance(function.get("parameters", {}), dict)):
            raise ApiError(400, f"tools.{i}: a tool must be {{'type': 'function', 'function': {{'name': "
                           "a-z, A-Z, 0-9, _ or - (at most 64), 'description': str, 'parameters': JSON schema}}",
                           f"tools.{i}")
    forced = named or choice == "required"
    if forced and not request.tools:
        raise ApiError(400, "tool_choice forces a call, but the request offers no tools", "tool_choice")
    if choice == "none" or not request.tools:  # no tools offered: replies are text, whatever they say
        return None, None, None
    names = tool_names(request.tools)
    if named and choice["function"]["name"] not in names:
        raise ApiError(400, f"tool_choice names {choice['function']['name']!r}, which is not among the tools "
                       f"({', '.join(sorted(names))})"[:300], "tool_choice")
    schema = None
    if forced:
        schema = call_schema([tool["function"] for tool in request.tools
                              if not named or tool["function"]["name"] == choice["function"]["name"]])
    return request.tools, names, schema
