"""Llama 3.1 tool use with custom tools: the prompt text that offers them, and replies read as calls.

The layout is the one of Meta's chat template for Llama 3.1 Instruct (the
`chat_template` published with the Hugging Face checkpoints; tools in the
first user turn, its default). With tools, the system turn reads

    Environment: ipython\\nCutting Knowledge Date: December 2023\\nToday Date: {date}\\n\\n{system}

and the first user turn is `TOOLS_OFFER`, then each tool as JSON (indent 4)
followed by a blank line, then the user's text. A tool is a function
definition as OpenAI and Hugging Face take it:
`{"type": "function", "function": {"name", "description", "parameters": JSON schema}}`.

The model calls a tool with one JSON object, `{"name": NAME, "parameters":
{...}}`, ending its turn with `<|eot_id|>` (or `<|eom_id|>`); a call sent
back in the conversation is written the same way, and the tool's result is
an `ipython` turn. `Environment: ipython` also turns on the built-in code
interpreter: a reply that starts with `<|python_tag|>` and is not a JSON
call is Python code to run (Meta's llama-models `ChatFormat` reads it as a
call of `code_interpreter` with `{"code": ...}` and writes it back as
`<|python_tag|>{code}<|eom_id|>`). Llama 3.1 makes one call per turn.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Collection, Sequence

PYTHON_TAG = "<|python_tag|>"
CODE_INTERPRETER = "code_interpreter"
TOOLS_OFFER = ("Given the following functions, please respond with a JSON for a function call "
               "with its proper arguments that best answers the given prompt.\n\n"
               'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
               'value}.Do not use variables.\n\n')  # no space after "value}." in Meta's template


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: dict


def today() -> str:
    """Today's date as the template writes it, e.g. "26 Jul 2024"."""
    return datetime.date.today().strftime("%d %b %Y")


def system_text(system: str, date: str) -> str:
    """The system turn's text when tools are offered (`system` already stripped)."""
    return f"Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}"


def offer_text(tools: Sequence[dict], user: str) -> str:
    """The first user turn's text when `tools` are offered (`user` already stripped)."""
    return TOOLS_OFFER + "".join(json.dumps(tool, indent=4, ensure_ascii=False) + "\n\n" for tool in tools) + user


def call_text(call: ToolCall) -> str:
    """The text of an assistant turn that made `call` (the code alone for the code interpreter,
    which the caller frames with `<|python_tag|>` and `<|eom_id|>`)."""
    if call.name == CODE_INTERPRETER:
        return call.arguments["code"]
    return json.dumps({"name": call.name, "parameters": call.arguments}, ensure_ascii=False)


def tool_names(tools: Sequence[dict]) -> frozenset[str]:
    """The function names of tool definitions."""
    return frozenset(tool["function"]["name"] for tool in tools)


def call_schema(functions: Sequence[dict]) -> dict:
    """The JSON schema of a reply that calls one of `functions` (OpenAI's function definitions:
    name, parameters) in Llama 3.1's layout, `{"name": NAME, "parameters": {...}}`, the
    arguments following the function's `parameters` schema (an object, if it gives none)."""
    def one(function):
        return {"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                "properties": {"name": {"const": function["name"]},
                               "parameters": function.get("parameters") or {"type": "object"}}}
    calls = [one(function) for function in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def parse_call(text: str, names: Collection[str]) -> ToolCall | None:
    """The call a whole reply makes, or None when it is plain text.

    A call is a JSON object `{"name": one of names, "parameters": {...}}` (a
    `"type": "function"` key, as Meta's own reference writes, is allowed), with
    or without a leading `<|python_tag|>`; or, after `<|python_tag|>`, code
    that is not JSON (a `code_interpreter` call). Anything else, a malformed
    or unknown call included, is None.
    """
    body = text.strip()
    tagged = body.startswith(PYTHON_TAG)
    if tagged:
        body = body[len(PYTHON_TAG):].strip()
    if body.startswith("{"):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("parameters"), dict)
                and call.get("type", "function") == "function"):
            return ToolCall(call["name"], call["parameters"])
        return None
    return ToolCall(CODE_INTERPRETER, {"code": body}) if tagged and body else None
