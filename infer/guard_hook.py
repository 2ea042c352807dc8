"""`python -m infer.serve --guard CHECKPOINT`: a Llama Guard model screens what the server takes
in and what it gives out.

    add_arguments(parser)                       # --guard, --guard-every
    screen = load(args, layout, served_tokenizer)   # None without --guard
    await screen.check_prompt(conversation)     # ApiError 400, code "content_filter", before generation
    body = await screen.check_answers(body, conversation, chat)    # whole answers: withheld if unsafe
    chunks = screen.streamed(chunks, requests, conversation, chat)  # streamed answers: judged as they grow
    screen.counts()                             # for /health

The guard model is loaded beside the served one, on the same layout (mesh),
with its own tokenizer: it judges text, so it need not share the served
model's vocabulary (a note line says when the two differ). Its prompt format
is the guard checkpoint's (`llama_jax.text.guard_format`).

- The prompt: a chat's user and assistant turns (system and tool turns
  dropped, consecutive turns of one role joined), up to the last user turn,
  judged as "User"; a completion's prompt is one user turn. Unsafe: the
  request is refused before it is queued, HTTP 400 with OpenAI's error shape
  and code "content_filter", the message naming the categories.
- A whole answer: judged as "Agent" after the conversation; unsafe: the
  choice's content is withheld (null) and its finish_reason is
  "content_filter".
- A streamed answer is judged in chunks as it grows: each choice's chunks
  are held until `--guard-every` more of them have arrived (or the choice
  ends), then the whole answer so far is judged; safe, they are released;
  unsafe, the choice ends at once with an empty chunk whose finish_reason is
  "content_filter", and its generation is cancelled. Why not hold the whole
  answer back and judge it once: that turns a stream into one late burst,
  and the client would wait for the full generation before the first word.
  Judging growing prefixes keeps text flowing (one guard call per chunk of
  tokens) and still never sends a token the guard has not seen; the price is
  a guard prefill per chunk, and text already released stays released if a
  later part of the answer turns it unsafe (the rest is withheld).
- Images (a Llama 3.2 Vision model served): a vision guard (Llama Guard 3
  11B Vision) judges the prompt and the answers with the request's image, in
  its prompt format with `<|image|>`; it takes one image, so a request with
  more is refused as a conversation it cannot take (below). A text guard
  judges the text alone (a note at start-up says so): refusing every image
  would make the vision model unusable behind the only guard at hand, and a
  text guard cannot judge pixels either way.
- A verdict that is neither safe nor unsafe (malformed), or a conversation
  the guard cannot take (longer than its context), counts as unsafe: the
  screen fails closed, as `python -m infer.guard --filter` does.

Judgements run one at a time on a worker thread (`asyncio.to_thread`), so
the event loop keeps serving while the guard computes. /health reports
`guard`: requests and answers refused, by category.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import threading

from infer.guard_model import Classification, Guard
from infer.openai_api import ApiError
from infer.options import ServingOptions, check_checkpoint
from llama_jax.cli import first_line

EVERY = 16  # chunks (about tokens) of a streamed answer per judgement


def add_arguments(parser) -> None:
    """The server's guard flags."""
    parser.add_argument("--guard", default=None, metavar="DIR",
                        help="a Llama Guard checkpoint: refuse unsafe prompts (400, code content_filter) and "
                             "withhold unsafe answers (finish_reason content_filter)")
    parser.add_argument("--guard-every", type=int, default=EVERY, metavar="N",
                        help=f"a streamed answer is judged every N chunks as it grows (default {EVERY})")


def load(args, layout, tokenizer, served_vision: bool = False) -> Screen | None:
    """The screen for `--guard` (None without it), its guard loaded on `layout` and compiled for
    a short conversation; prints a note when its tokenizer differs from the served `tokenizer`,
    and when the served model takes images (`served_vision`) that the guard cannot see."""
    if args.guard is None:
        return None
    if args.guard_every < 1:
        raise ValueError(f"--guard-every must be at least 1, got {args.guard_every}")
    check_checkpoint(args.guard)
    guard = Guard.load(args.guard, ServingOptions(layout=layout))
    note = tokenizer_note(tokenizer, guard.tokenizer)
    if note:
        print(f"infer.serve: note: {note}", file=sys.stderr, flush=True)
    if served_vision and not guard.format.vision:
        print("infer.serve: note: the guard model takes no images; a request's images are not judged, only its "
              "text (use Llama Guard 3 11B Vision to judge them)", file=sys.stderr, flush=True)
    screen = Screen(guard, args.guard_every)
    print("compiling the guard model", file=sys.stderr, flush=True)
    screen.judge([{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hello!"}])
    return screen


def tokenizer_note(served, guard) -> str:
    """A note when the guard's tokenizer is not the served model's ("" when they agree)."""
    sample = "Llama Guard judges text: <|eot_id|> 123 ünïcödé"
    if served.vocab_size == guard.vocab_size and served.encode(sample) == guard.encode(sample):
        return ""
    return ("the guard model's tokenizer differs from the served model's (vocabulary "
            f"{guard.vocab_size} vs {served.vocab_size}); it judges the text with its own tokenizer")


class Screen:
    """The guard, its judgements serialised, and the refusal counts /health reports."""

    def __init__(self, guard: Guard, every: int = EVERY):
        self.guard, self.every = guard, every
        self._lock = threading.Lock()
        self.refused = {"prompts": collections.Counter(), "answers": collections.Counter()}

    def judge(self, conversation: list[dict]) -> Classification:
        """Classify one conversation's last turn (blocking). A vision guard sees the images of
        its image parts; a text guard, the text alone."""
        images = [part["image"] for m in conversation if isinstance(m["content"], list) for part in m["content"]
                  if part["type"] == "image"]
        if not self.guard.format.vision:
            conversation, images = [{**m, "content": _message_text(m)} for m in conversation], []
        with self._lock:
            prompt = self.guard.format.prompt(conversation)
            return self.guard.classify([prompt], [images] if images else None, batch_size=1)[0]

    async def _judge(self, conversation: list[dict], kind: str) -> Classification | None:
        """The classification if the last turn is unsafe (counted under `kind`), else None."""
        try:
            result = await asyncio.to_thread(self.judge, conversation)
        except ValueError as err:  # a conversation the guard cannot take (past its context): fail closed
            result = Classification("malformed", (), (), 1.0, first_line(err))
        if result.verdict == "safe":
            return None
        self.refused[kind].update(result.categories or [result.verdict])
        return result

    def counts(self) -> dict:
        return {kind: dict(sorted(counter.items())) for kind, counter in self.refused.items()}

    async def check_prompt(self, conversation: list[dict]) -> None:
        """ApiError (400, code content_filter) if the conversation's last user turn is unsafe."""
        asked = _up_to_last_user(conversation)
        if not asked:
            return
        result = await self._judge(asked, "prompts")
        if result is not None:
            raise ApiError(400, f"the request was refused by the content filter ({_named(result)})", "messages",
                           code="content_filter")

    async def check_answers(self, body: dict, conversation: list[dict], chat: bool) -> dict:
        """A whole answer's body with each unsafe choice withheld (content_filter)."""
        asked = _up_to_last_user(conversation)
        for choice in body["choices"]:
            text = _answer_text(choice.get("message", {}) if chat else choice)
            if await self._judge(asked + [{"role": "assistant", "content": text}], "answers") is not None:
                if chat:
                    choice["message"] = {"role": "assistant", "content": None}
                else:
                    choice["text"] = ""
                choice.update(logprobs=None, finish_reason="content_filter")
        return body

    async def streamed(self, chunks, requests, conversation: list[dict], chat: bool):
        """The chunk choices of `chunks`, each choice's released only once judged safe (module
        docstring); an unsafe choice ends with a content_filter chunk and is cancelled."""
        asked = _up_to_last_user(conversation)
        held, text, blocked = collections.defaultdict(list), collections.defaultdict(str), set()
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                index = chunk["index"]
                if index in blocked:
                    continue
                held[index].append(chunk)
                text[index] += _answer_text(chunk.get("delta", {}) if chat else chunk)
                if chunk["finish_reason"] is None and len(held[index]) < self.every:
                    continue
                answer = asked + [{"role": "assistant", "content": text[index]}]
                if await self._judge(answer, "answers") is None:
                    for released in held.pop(index):
                        yield released
                    continue
                blocked.add(index)
                held.pop(index)
                requests[index].cancelled = True
                yield ({"index": index, "delta": {}, "logprobs": None, "finish_reason": "content_filter"} if chat
                       else {"index": index, "text": "", "logprobs": None, "finish_reason": "content_filter"})


def chat_conversation(messages: list[dict]) -> list[dict]:
    """A chat's messages as the guard takes them: user and assistant turns (a tool call as its
    JSON), system and tool turns dropped, consecutive turns of one role joined, from the first
    user turn. A turn with images is parts: its images (`{"type": "image", "image": ...}`, in
    order), then its text."""
    turns: list[dict] = []
    for message in messages:
        role = message.get("role")
        if role not in ("user", "assistant"):
            continue
        text = _message_text(message)
        images = [p for p in message.get("content") or () if isinstance(p, dict) and p.get("type") == "image"]
        if turns and turns[-1]["role"] == role:
            turns[-1]["text"] += "\n\n" + text
            turns[-1]["images"] += images
        elif turns or role == "user":
            turns.append({"role": role, "text": text, "images": images})
    return [{"role": t["role"], "content": t["images"] + [{"type": "text", "text": t["text"]}] if t["images"]
             else t["text"]} for t in turns]


def _up_to_last_user(conversation: list[dict]) -> list[dict]:
    last = max((i for i, m in enumerate(conversation) if m["role"] == "user"), default=-1)
    return conversation[:last + 1]


def _message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    calls = message.get("tool_calls") or []
    return " ".join([content or ""] + [f'{{"name": "{c.name}", "parameters": {c.arguments}}}' for c in calls]).strip()


def _answer_text(part: dict) -> str:
    """The text of a whole choice's message, a chunk's delta, or a completion choice."""
    text = part.get("content") if "content" in part or "tool_calls" in part else part.get("text")
    calls = part.get("tool_calls") or []
    return (text or "") + "".join(c.get("function", {}).get("arguments", "") for c in calls)


def _named(result: Classification) -> str:
    if result.verdict != "unsafe":
        return f"no verdict could be read ({result.text[:80]!r}), and the filter fails closed"
    return ", ".join(f"{code}: {name}" for code, name in zip(result.categories, result.names)) or "unsafe"
