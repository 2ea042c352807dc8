"""The OpenAI API's shapes: request bodies, their checks, and the JSON answered.

Requests are pydantic models (unknown fields are ignored, as OpenAI's own
server ignores fields it does not use); `check_*` turns a parsed request and
a prompt's length into `Settings` for the batcher, or raises `ApiError`,
which the server answers with OpenAI's error body:
`{"error": {"message", "type", "param", "code"}}`.

`TextStream` turns a request's tokens into the text to send: it decodes
incrementally, drops stop tokens, and cuts at the first stop string (text
that could begin a stop string is held back until it cannot).
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from pydantic import BaseModel, Field

from infer.batcher import TOP_LOGPROBS, Token
from llama_jax.sampling import Sampling
from llama_jax.tokenizer import StreamDecoder, Tokenizer

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # the completions API's `logprobs` bound (OpenAI's)
INT32 = 2 ** 31


class ApiError(Exception):
    """A request the server refuses: HTTP status, message, and OpenAI's error type, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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
    n: int = 1


class CompletionRequest(Sampled):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None
    echo: bool = False


class Message(BaseModel):
    role: str
    content: str | list[dict] | None = None


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    """A checked request: what the batcher needs, plus stop strings and logprobs to report."""

    max_tokens: int
    sampling: Sampling
    seed: int | None
    stops: tuple[str, ...]
    logprobs: int | None  # alternatives per token to report; None: no logprobs


def check_sampled(request: Sampled, prompt_tokens: int, context: int, default_max_tokens: int | None,
                  logprobs: int | None) -> Settings:
    """`Settings` for a request whose prompt has `prompt_tokens` tokens, or ApiError (400)."""
    if request.n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {request.n}", "n")
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
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this model's context is {context} "
                       "tokens and leaves no room for an answer",
                       "messages" if isinstance(request, ChatRequest) else "prompt", "context_length_exceeded")
    max_tokens = request.max_tokens
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if max_tokens > room:
        raise ApiError(400, f"max_tokens {max_tokens} plus the prompt's {prompt_tokens} tokens is over this "
                       f"model's context of {context} tokens; ask for at most {room}", "max_tokens",
                       "context_length_exceeded")
    top_k = request.top_k if request.top_k and request.top_k > 0 else None
    top_p = request.top_p if request.top_p < 1.0 else None
    sampling = Sampling(request.temperature, top_k, top_p)
    return Settings(max_tokens, sampling, request.seed, tuple(stops), logprobs)


def completion_logprobs(request: CompletionRequest) -> int | None:
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {request.logprobs}", "logprobs")
    if request.echo:
        raise ApiError(400, "echo is not supported", "echo")
    return request.logprobs


def chat_logprobs(request: ChatRequest) -> int | None:
    if request.top_logprobs is not None:
        if not request.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if not 0 <= request.top_logprobs <= TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in [0, {TOP_LOGPROBS}], got {request.top_logprobs}",
                           "top_logprobs")
    return (request.top_logprobs or 0) if request.logprobs else None


def chat_messages(request: ChatRequest) -> list[dict]:
    """The messages as `llama_jax.chat.format_chat` takes them: OpenAI's `tool` role is Llama
    3.1's `ipython` (a tool's output), content parts keep their text."""
    messages = []
    for message in request.messages:
        role = "ipython" if message.role == "tool" else message.role
        messages.append({"role": role, "content": message.content or ""})
    return messages


class TextStream:
    """A request's text as its tokens arrive: `add` returns text safe to send, `finish` the rest.

    Stop tokens (`stop_ids`) add no text. After a stop string matched, `stopped` is True and
    the text ends before it.
    """

    def __init__(self, tokenizer: Tokenizer, stop_ids, stops: tuple[str, ...]):
        self.tokenizer, self.stop_ids, self.stops = tokenizer, frozenset(stop_ids), stops
        self.decoder = StreamDecoder(tokenizer)
        self.pending = ""  # decoded, not yet sent: it may begin a stop string
        self.stopped = False

    def add(self, token: Token) -> str:
        if self.stopped or token.id in self.stop_ids or token.id >= self.tokenizer.vocab_size:
            return ""
        return self._release(self.decoder.feed(token.id))

    def finish(self) -> str:
        if self.stopped:
            return ""
        text = self._release(self.decoder.flush())
        rest, self.pending = self.pending, ""
        return text + rest

    def _release(self, text: str) -> str:
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.stopped = self.pending[:min(found)], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def piece(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]) if token_id < tokenizer.vocab_size else ""


def chat_logprob_entries(tokenizer: Tokenizer, tokens: list[Token], top: int) -> dict:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def entry(token_id, logprob):
        text = piece(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(t.id, t.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in zip(t.top_ids[:top], t.top_logprobs[:top])]}
                        for t in tokens]}


def completion_logprob_entries(tokenizer: Tokenizer, tokens: list[Token], top: int, offset: int = 0) -> dict:
    """The completions API's `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    texts = [piece(tokenizer, t.id) for t in tokens]
    offsets, at = [], offset
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{piece(tokenizer, i): lp for i, lp in zip(t.top_ids[:top], t.top_logprobs[:top])}
                             for t in tokens],
            "text_offset": offsets}
