"""Chat prompts for Llama 2, Llama 3.x and Llama 4, as token ids.

The format follows `tokenizer.generation`, never a model name. Both layouts
mirror Meta's reference code (REFERENCE.md, "Tokenizers and chat formats"):

Llama 2: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`
  per completed exchange (Meta encodes `f"{B_INST} {user} {E_INST} {answer} "`,
  trailing space included, with BOS and EOS), then `<s>[INST] {user} [/INST]`
  for the open turn. The system prompt rides inside the first user turn.
Llama 3.x: `<|begin_of_text|>`, then per message
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`,
  then an open `<|start_header_id|>assistant<|end_header_id|>\\n\\n`.

Llama 4: `<|begin_of_text|>`, then per message
  `<|header_start|>{role}<|header_end|>\n\n{content}<|eot|>`, then an open
  `<|header_start|>assistant<|header_end|>\n\n`, as Meta's ChatFormat
  (llama_models/llama4/chat_format.py) writes it: content is not stripped,
  a tool's output (role `ipython`, Meta's `tool`) and an assistant turn
  that calls a tool end with `<|eom|>`, and a call is written as Meta's JSON
  format, `{"type": "function", "name": ..., "parameters": {...}}`.

Stop tokens for generation are `tokenizer.stop_ids`.

Tools (Llama 3.1): `format_chat(..., tools=[...])` offers function
definitions and assistant messages may carry `tool_calls` (a list of one
`llama_jax.text.tool_use.ToolCall`), in the layout `llama_jax.text.tool_use` describes.

Images (Llama 3.2 Vision): a message's content may be a list of parts,
`{"type": "text", "text": ...}` and `{"type": "image"}` (any other keys, such
as the image itself, are the caller's), as in Meta's prompt format: each
image part becomes one `<|image|>` id where it stands in the user turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from llama_jax.text import tool_use
from llama_jax.text.tokenizer import Tokenizer

LLAMA2_ROLES = ("system", "user", "assistant")
LLAMA3_ROLES = ("system", "user", "assistant", "ipython")

_B_INST, _E_INST = "[INST]", "[/INST]"
_B_SYS, _E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def format_chat(tokenizer: Tokenizer, messages: Sequence[dict], image_token_id: int | None = None,
                tools: Sequence[dict] | None = None, date: str | None = None) -> list[int]:
    """Token ids of a conversation, ready for the model to write the next answer.

    `messages` are dicts `{"role": ..., "content": str}`. Llama 2 takes an
    optional leading system message, then user and assistant alternating,
    ending with a user message. Llama 3.x takes any order of the roles
    system, user, assistant and ipython (the 3.1 tool-output role), and
    content given as parts with images (module docstring), which need the
    model's `image_token_id`. `tools` (Llama 3.x only): function definitions
    to offer, as of `date` (default today), in the first user message, which
    must then come first after an optional system message; an assistant
    message may then be `{"role": "assistant", "tool_calls": [ToolCall]}`.
    Raises ValueError with one line on a malformed list.
    """
    if tools and tokenizer.generation != "llama3":
        raise ValueError(f"tools need a Llama 3.1 chat format; this tokenizer is {tokenizer.generation}'s "
                         "(Llama 4 takes tool results and calls as messages, not offered tools)")
    return _encode(tokenizer, messages, open_answer=True, image_token_id=image_token_id, tools=tools or None,
                   date=date)[0]


def prompt_messages(record) -> list[dict]:
    """The conversation a prompt line asks to continue: its `"messages"` (a non-empty list) or, for
    `{"prompt": str}`, one user turn (the prompts files of infer.rejection and RL runs).
    ValueError (one line) for anything else."""
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
        return record["messages"]
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    raise ValueError('a prompt line needs "messages" (a list) or "prompt" (a string)')


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[dict],
                        image_token_id: int | None = None) -> tuple[list[int], list[int]]:
    """A finished conversation for fine-tuning: (token ids, a 0/1 loss weight per id).

    The weights are 1 on every assistant answer and on the token that closes
    it (`<|eot_id|>` in Llama 3, `</s>` in Llama 2), 0 on everything the
    model is given (system, user, tool output, headers, images). The
    conversation must end with an assistant message; otherwise the rules of
    `format_chat`.
    """
    return _encode(tokenizer, messages, open_answer=False, image_token_id=image_token_id)


def _encode(tokenizer: Tokenizer, messages: Sequence[dict], open_answer: bool, image_token_id: int | None,
            tools: Sequence[dict] | None = None, date: str | None = None):
    llama3 = tokenizer.generation == "llama3"
    _check_messages(messages, LLAMA2_ROLES if tokenizer.generation == "llama2" else LLAMA3_ROLES)
    last = messages[-1]["role"]
    if not open_answer and last != "assistant":
        raise ValueError(f"chat for training: the last message must be the assistant's answer, got {last!r}")
    if llama3:
        prefixes = {} if tools is None else _tool_prefixes(messages, tools, date or tool_use.today())
        return _format_llama3(tokenizer, messages, open_answer, image_token_id, prefixes)
    if tokenizer.generation == "llama4":
        return _format_llama4(tokenizer, messages, open_answer)
    if any(not isinstance(m["content"], str) for m in messages):
        raise ValueError("Llama 2 chat: message content must be a string (Llama 2 takes no images)")
    return _format_llama2(tokenizer, messages, open_answer)


def _check_messages(messages: Sequence[dict], roles: Sequence[str]) -> None:
    if not messages:
        raise ValueError("chat needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in roles:
            role = message.get("role") if isinstance(message, dict) else message
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(roles)}")
        content = message.get("content")
        calls = message.get("tool_calls")
        if calls:
            if message["role"] != "assistant" or "ipython" not in roles:
                raise ValueError(f"message {i}: only a Llama 3.1 assistant message has tool_calls")
            if len(calls) != 1:
                raise ValueError(f"message {i}: Llama 3.1 makes one tool call per message, got {len(calls)}")
            if not isinstance(calls[0], tool_use.ToolCall):
                raise ValueError(f"message {i}: a tool call must be a llama_jax.text.tool_use.ToolCall")
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image") or (kind == "text" and not isinstance(part.get("text"), str)):
                    raise ValueError(f"message {i}: a content part must be {{'type': 'text', 'text': str}} "
                                     f"or {{'type': 'image'}}, got {part!r}"[:200])
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of parts")


def _format_llama2(tokenizer: Tokenizer, messages: Sequence[dict], open_answer: bool):
    turns = [dict(m) for m in messages]
    offset = 0  # turn i is message i + offset, for error messages
    if turns[0]["role"] == "system":
        if len(turns) < 2:
            raise ValueError("Llama 2 chat: a system message must be followed by a user message")
        # Llama 2 has no system turn: the prompt rides inside the first user turn.
        system, first = turns[0], turns[1]
        merged = _B_SYS + system["content"] + _E_SYS + first["content"]
        turns = [{"role": first["role"], "content": merged}]
        turns += [dict(m) for m in messages[2:]]
        offset = 1
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ValueError(
                f"Llama 2 chat: message {i + offset} is {turn['role']!r}, expected {expected!r} "
                "(optional system first, then user and assistant alternating)"
            )
    if open_answer and turns[-1]["role"] != "user":
        raise ValueError("Llama 2 chat: the last message must be from the user")
    ids: list[int] = []
    weights: list[int] = []
    for prompt, answer in zip(turns[::2], turns[1::2]):
        # Meta's reference (llama/generation.py) keeps this space before EOS.
        question = f"{_B_INST} {prompt['content'].strip()} {_E_INST}"
        exchange = tokenizer.encode(f"{question} {answer['content'].strip()} ", bos=True, eos=True)
        # The exchange is encoded whole, as Meta does; the answer is what follows
        # the longest prefix it shares with the question alone.
        asked = tokenizer.encode(question, bos=True)
        shared = next((i for i, (a, b) in enumerate(zip(asked, exchange)) if a != b), len(asked))
        ids += exchange
        weights += [0] * shared + [1] * (len(exchange) - shared)
    if open_answer:
        question = tokenizer.encode(f"{_B_INST} {turns[-1]['content'].strip()} {_E_INST}", bos=True)
        ids += question
        weights += [0] * len(question)
    return ids, weights


def _tool_prefixes(messages: Sequence[dict], tools: Sequence[dict], date: str) -> dict[int, str]:
    """Text that goes before a message's own (stripped) text when tools are offered, by message
    index; index -1 is a system turn the caller did not send (llama_jax.text.tool_use)."""
    first = int(messages[0]["role"] == "system")
    if first >= len(messages) or messages[first]["role"] != "user":
        raise ValueError("with tools, the first message after the system prompt must be the user's "
                         "(it carries the tools)")
    return {first - 1: tool_use.system_text("", date), first: tool_use.offer_text(tools, "")}


def _format_llama3(tokenizer: Tokenizer, messages: Sequence[dict], open_answer: bool,
                   image_token_id: int | None, prefixes: dict[int, str]):
    eot, eom = tokenizer.token_id("<|eot_id|>"), tokenizer.token_id("<|eom_id|>")
    ids, weights = [tokenizer.bos_id], [0]
    if -1 in prefixes:  # tools offered without a system message: the system turn is the template's alone
        turn = _llama3_header(tokenizer, "system") + tokenizer.encode(prefixes[-1]) + [eot]
        ids += turn
        weights += [0] * len(turn)
    for i, message in enumerate(messages):
        header = _llama3_header(tokenizer, message["role"])
        calls, end = message.get("tool_calls"), eot
        if calls and calls[0].name == tool_use.CODE_INTERPRETER:  # Meta's ChatFormat: tag, code, <|eom_id|>
            body = [tokenizer.token_id(tool_use.PYTHON_TAG)] + tokenizer.encode(tool_use.call_text(calls[0]))
            end = eom
        elif calls:
            body = tokenizer.encode(tool_use.call_text(calls[0]))
        else:
            body = _llama3_content(tokenizer, message["content"], prefixes.get(i, ""), image_token_id, i)
        body.append(end)
        ids += header + body
        weights += [0] * len(header) + [int(message["role"] == "assistant")] * len(body)
    if open_answer:
        header = _llama3_header(tokenizer, "assistant")
        ids += header
        weights += [0] * len(header)
    return ids, weights


def _llama3_content(tokenizer: Tokenizer, content, prefix: str, image_token_id: int | None, i: int) -> list[int]:
    body = []
    for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
        if part["type"] == "text":
            # The template's own text is joined to the message's before encoding, as one string.
            body += tokenizer.encode(prefix + part["text"].strip())
        elif image_token_id is None:
            raise ValueError(f"message {i} has an image, but this model is text-only (no image token)")
        else:
            body += tokenizer.encode(prefix) + [image_token_id]
        prefix = ""
    return body


def _llama3_header(tokenizer: Tokenizer, role: str) -> list[int]:
    # Pieces are encoded separately, as Meta's ChatFormat does, so the ids do
    # not depend on how BPE would merge across the boundaries.
    return (
        [tokenizer.token_id("<|start_header_id|>")]
        + tokenizer.encode(role)
        + [tokenizer.token_id("<|end_header_id|>")]
        + tokenizer.encode("\n\n")
    )


def _format_llama4(tokenizer: Tokenizer, messages: Sequence[dict], open_answer: bool):
    eot, eom = tokenizer.token_id("<|eot|>"), tokenizer.token_id("<|eom|>")
    ids, weights = [tokenizer.bos_id], [0]
    for i, message in enumerate(messages):
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise ValueError(f"message {i}: Llama 4 chat takes text content (images are not supported yet)")
        header = _llama4_header(tokenizer, message["role"])
        body = tokenizer.encode(content)  # Meta's ChatFormat keeps the content as it is
        calls = message.get("tool_calls")
        if calls:
            call = json.dumps({"type": "function", "name": calls[0].name, "parameters": calls[0].arguments})
            body += tokenizer.encode(call)
        body.append(eom if calls or message["role"] == "ipython" else eot)
        ids += header + body
        weights += [0] * len(header) + [int(message["role"] == "assistant")] * len(body)
    if open_answer:
        header = _llama4_header(tokenizer, "assistant")
        ids += header
        weights += [0] * len(header)
    return ids, weights


def _llama4_header(tokenizer: Tokenizer, role: str) -> list[int]:
    return ([tokenizer.token_id("<|header_start|>")] + tokenizer.encode(role)
            + [tokenizer.token_id("<|header_end|>")] + tokenizer.encode("\n\n"))
