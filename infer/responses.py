"""What the server answers: each choice built from its tokens as they arrive, streamed or whole.

A request has `n` choices, each generated in its own decode slot. A
`Choice` takes the batcher's events for its slot (`Token`s, then one
`Finished`) and gives the chunk choices to stream (`add`), or, at the end,
the whole choice (`result`), so a streamed answer and a whole one are the
same text, logprobs and finish reason:

- `TextStream` decodes the tokens, drops stop tokens (and special tokens,
  unless the request keeps them) and cuts the text at the first stop string;
- logprobs carry each token's own bytes (`Tokenizer.token_bytes`) and where
  its text starts in the answer, the same streamed or whole;
- with `echo` (completions), the prompt's text comes first, as its tokens
  decode, and with logprobs each prompt token's (the first one null: nothing
  precedes it, as OpenAI answers), from the batcher's `Prompt` event; the
  answer's tokens follow, a stop token included, so that a client can count
  on one entry per token (lm-eval's `local-completions` drops the last one as
  the generated token);
- in a chat whose replies may be tool calls (`Settings.tool_names`),
  `ToolCallText` holds the text back while it may still be a call (it
  begins with `<|python_tag|>`, or with "{" when functions are offered)
  and reads it whole at the end (`llama_jax.text.tool_use.parse_call`): a call
  is answered as OpenAI's `tool_calls` with finish_reason "tool_calls", in
  one chunk when streamed; anything else is the reply's text, as it was.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection

from infer.events import Finished, Prompt, Token
from infer.openai_api import Settings
from llama_jax.text.stream_decoder import StreamDecoder
from llama_jax.text.tokenizer import Tokenizer
from llama_jax.text.tool_use import PYTHON_TAG, ToolCall, parse_call


class Choice:
    """One choice of an answer, built as its events arrive (module docstring).

    index: the choice's place in `choices`. chat: chat (`message`/`delta`) or completions
    (`text`) shape. call_id: the id its tool call gets, if it makes one. echo: the prompt's
    ids, to answer first (completions' `echo`), or None. `finish` is None until the choice
    has ended; `generated` counts its tokens, a stop token included.
    """

    def __init__(self, index: int, chat: bool, tokenizer: Tokenizer, settings: Settings, call_id: str,
                 echo: list[int] | None = None):
        self.index, self.chat, self.tokenizer, self.settings, self.call_id = index, chat, tokenizer, settings, call_id
        self.echo, self.every_token = echo, echo is not None
        self.base = 0  # where the answer's own text starts (after an echoed prompt)
        self.calls = ToolCallText(settings.tool_names) if chat and settings.tool_names is not None else None
        hidden = frozenset()
        if settings.skip_special_tokens:  # but a tool call's <|python_tag|> is read as one
            kept = {tokenizer.token_id(PYTHON_TAG)} if self.calls is not None else set()
            hidden = tokenizer.special_ids - kept
        self.text = TextStream(tokenizer, tokenizer.stop_ids, settings.stops, hidden)
        self.finish: str | None = None
        self.generated = 0
        self.call: ToolCall | None = None
        self.sent: list[str] = []  # the text so far, as released
        # (token, where its text starts in the answer's text) of every token with text (logprobs of
        # a whole answer), and of those whose logprobs no chunk has carried yet
        self.tokens: list[tuple[Token, int]] = []
        self.pending: list[tuple[Token, int]] = []
        self.role_sent = False  # chat streams: the role goes in a choice's first delta only

    def add(self, event: Prompt | Token | Finished) -> list[dict]:
        """The chunk choices to stream for the next event (none once the choice has ended)."""
        if self.finish is not None:
            return []
        if self.echo is not None:  # the echoed prompt comes first, with its tokens' logprobs if scored
            echoed = self._echo(event.tokens if isinstance(event, Prompt) else None)
            return [echoed] if isinstance(event, Prompt) else [echoed, *self._add(event)]
        return [] if isinstance(event, Prompt) else self._add(event)

    def _add(self, event: Token | Finished) -> list[dict]:
        if isinstance(event, Finished):
            return self._end(event.reason, self.text.finish())
        self.generated += 1
        at = self.base + self.text.decoded  # decoded, not released: held-back text (a stop string's start) counts
        text = self.text.add(event)
        if self.every_token or event.id not in self.tokenizer.stop_ids:
            self.tokens.append((event, at))
            self.pending.append((event, at))
        if self.text.stopped:
            return self._end("stop", text)
        if self.calls is not None:
            text = self.calls.add(text)
            if self.calls.deciding:
                return []  # held: its tokens' logprobs wait with it
        if text or (self.pending and self.settings.logprobs is not None):
            return [self._chunk(text, None)]
        return []

    def result(self) -> dict:
        """The whole choice of a non-streamed answer (after the choice has ended)."""
        logprobs = self._logprobs(self.tokens)
        text = "".join(self.sent)
        if not self.chat:
            return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": self.finish}
        message = {"role": "assistant", "content": text}
        if self.call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [self._tool_call()]}
        return {"index": self.index, "message": message, "logprobs": logprobs, "finish_reason": self.finish}

    def _echo(self, tokens: list[Token] | None) -> dict:
        """The chunk choice of the echoed prompt: its text as its tokens decode (the answer's
        silent tokens silent here too), and the scored `tokens` at their offsets if given."""
        stream = TextStream(self.tokenizer, (), (), self.text.silent)
        pieces, offsets = [], []
        for token_id in self.echo:
            offsets.append(stream.decoded)
            pieces.append(stream.add(Token(token_id, None, [], [])))
        text = "".join(pieces) + stream.finish()
        self.echo, self.base = None, len(text)
        if tokens is not None:
            self.tokens += list(zip(tokens, offsets))
            self.pending += list(zip(tokens, offsets))
        return self._chunk(text, None)

    def _end(self, reason: str, text: str) -> list[dict]:
        if self.calls is not None:
            text, self.call = self.calls.finish(text)
        self.finish = "tool_calls" if self.call is not None else reason
        return [self._chunk(text, self.finish)]

    def _chunk(self, text: str, finish: str | None) -> dict:
        self.sent.append(text)
        tokens, self.pending = self.pending, []
        logprobs = self._logprobs(tokens)
        if not self.chat:
            return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        delta = {"content": text}
        if self.call is not None:
            delta = {"content": None, "tool_calls": [{"index": 0, **self._tool_call()}]}
        if not self.role_sent:
            delta, self.role_sent = {"role": "assistant", **delta}, True
        return {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def _tool_call(self) -> dict:
        return {"id": self.call_id, "type": "function",
                "function": {"name": self.call.name, "arguments": json.dumps(self.call.arguments, ensure_ascii=False)}}

    def _logprobs(self, tokens: list[tuple[Token, int]]) -> dict | None:
        top = self.settings.logprobs
        if top is None:
            return None
        if self.chat:
            return chat_logprob_entries(self.tokenizer, [token for token, _ in tokens], top)
        return completion_logprob_entries(self.tokenizer, [token for token, _ in tokens], top,
                                          [at for _, at in tokens])


class ToolCallText:
    """A chat reply's text, held back while it may still be a tool call (module docstring).

    names: the functions offered (may be empty: then only `<|python_tag|>` code is a call).
    """

    def __init__(self, names: Collection[str]):
        self.names, self.held, self.deciding = names, "", True

    def add(self, text: str) -> str:
        """The text to send now ("" while deciding, or while the reply may be a call)."""
        if not self.deciding:
            return text
        self.held += text
        head = self.held.lstrip()
        if not head or head.startswith(PYTHON_TAG) or (self.names and head.startswith("{")):
            return ""
        self.deciding, text, self.held = False, self.held, ""
        return text

    def finish(self, text: str) -> tuple[str, ToolCall | None]:
        """(the text still to send, the call the whole reply makes or None) at the reply's end."""
        if not self.deciding:
            return text, None
        self.held += text
        call = parse_call(self.held, self.names)
        return ("", call) if call is not None else (self.held, None)


class TextStream:
    """A request's text as its tokens arrive: `add` returns text safe to send, `finish` the rest.

    Stop tokens (`stop_ids`) and `hidden` ones (special tokens, unless a request keeps them)
    add no text. After a stop string matched, `stopped` is True and
    the text ends before it. `decoded`: characters decoded so far, sent or held back (where the
    next token's text starts; a character split over tokens starts at its first one).
    """

    def __init__(self, tokenizer: Tokenizer, stop_ids, stops: tuple[str, ...], hidden=frozenset()):
        self.tokenizer, self.stops = tokenizer, stops
        self.silent = frozenset(stop_ids) | frozenset(hidden)  # ids that add no text
        self.decoder = StreamDecoder(tokenizer)
        self.pending = ""  # decoded, not yet sent: it may begin a stop string
        self.stopped = False
        self.decoded = 0

    def add(self, token: Token) -> str:
        if self.stopped or token.id in self.silent or token.id >= self.tokenizer.vocab_size:
            return ""
        return self._release(self.decoder.feed(token.id))

    def finish(self) -> str:
        if self.stopped:
            return ""
        text = self._release(self.decoder.flush())
        rest, self.pending = self.pending, ""
        return text + rest

    def _release(self, text: str) -> str:
        self.decoded += len(text)
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.stopped = self.pending[:min(found)], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out


def new_id(prefix: str, separator: str = "-") -> str:
    """A fresh id such as "chatcmpl-..." (OpenAI's tool call ids read "call_...")."""
    return f"{prefix}{separator}{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def raw_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """A token's own bytes (`Tokenizer.token_bytes`); none for an id past the tokenizer's vocabulary."""
    return tokenizer.token_bytes(token_id) if token_id < tokenizer.vocab_size else b""


def token_string(raw: bytes, prefix: str = "") -> str:
    """A token's bytes as the `token` string of logprobs: its text, or for bytes that are not
    UTF-8 on their own (part of a character), `prefix` and the bytes escaped, "\\xe2\\x82"."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return prefix + raw.decode("utf-8", "backslashreplace")


def chat_logprob_entries(tokenizer: Tokenizer, tokens: list[Token], top: int) -> dict:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}; `bytes`
    are the token's own bytes, `token` its text or, for part of a character, "\\xe2"-escaped bytes."""
    def entry(token_id, logprob):
        raw = raw_bytes(tokenizer, token_id)
        return {"token": token_string(raw), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(t.id, t.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in zip(t.top_ids[:top], t.top_logprobs[:top])]}
                        for t in tokens]}


def completion_logprob_entries(tokenizer: Tokenizer, tokens: list[Token], top: int, offsets: list[int]) -> dict:
    """The completions API's `logprobs`: tokens, token_logprobs, top_logprobs, and `offsets` as
    text_offset (where each token's text starts in the answer's text). A token that is part of
    a character is written as OpenAI writes it, "bytes:\\xe2\\x82"."""
    def text(token_id):
        return token_string(raw_bytes(tokenizer, token_id), "bytes:")

    return {"tokens": [text(t.id) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else {text(i): lp for i, lp in zip(t.top_ids[:top],
                                                                                         t.top_logprobs[:top])}
                             for t in tokens],
            "text_offset": list(offsets)}
