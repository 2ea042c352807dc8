"""Hugging Face chat templates: found in a checkpoint, rendered as transformers renders them,
and tokenized without letting message text forge control tokens.

    template = find_chat_template(directory)           # the Jinja source, or None
    prompt = render(template, messages, special_tokens(directory), specials, categories=...)
    prompt.text                                        # exactly what apply_chat_template(tokenize=False) gives
    prompt.ids(tokenizer)                              # its token ids

transformers renders `apply_chat_template` with Jinja in a sandbox (an immutable
sandboxed environment with `trim_blocks` and `lstrip_blocks`, the loopcontrols
extension, `raise_exception`, `strftime_now`, a `tojson` that does not escape
HTML, and a `{% generation %}` tag that marks assistant text), and passes the
template `messages`, `tools`, `documents`, `add_generation_prompt`, the
tokenizer's special tokens by name (`bos_token`, `eos_token`, ...) and any other
keyword argument as a variable. `render` sets up the same environment and passes
the same variables, so a template gives the same text here as there.

Where a checkpoint keeps its template, in the order transformers looks:
`chat_template.jinja`, `tokenizer_config.json`'s "chat_template" (a string, or a
list of named templates, of which "default"), a processor's `chat_template.json`.

Why the prompt is tokenized piece by piece: a rendered prompt is one string in
which the template's own control tokens (`<|eot_id|>`, ...) and the messages'
text sit side by side. Encoding it whole with special tokens allowed, as
transformers does, would turn a message that contains the text "<|eot_id|>"
into a real end of turn, so a user could write the classifier's answer into
the prompt. Here every special-token string inside a message is swapped for a
private-use placeholder before rendering; the rendered text is split at the
template's control tokens, and each piece between them, placeholders put back,
is encoded as plain text. Tokenizers split at control tokens before anything
else, so for messages without such strings the ids equal encoding the whole
string with specials allowed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_jax.paths import user_path
from llama_jax.text.tokenizer import Tokenizer

# Private-use code points that stand for a message's special-token string while the template renders.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class ChatTemplateError(ValueError):
    """A template that does not parse, or that refuses a conversation (its `raise_exception`)."""


def find_chat_template(directory) -> str | None:
    """The chat template a checkpoint directory carries (module docstring), or None."""
    directory = user_path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        template = _read_json(directory / name).get("chat_template")
        if isinstance(template, list):  # named templates: transformers' default is "default"
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None


def special_tokens(directory) -> dict[str, str]:
    """The named special tokens transformers passes a template (`bos_token`, `eos_token`, ...), as
    strings, from `tokenizer_config.json` and `special_tokens_map.json` (the latter wins)."""
    directory = user_path(directory)
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        for key, value in _read_json(directory / name).items():
            if isinstance(value, dict):  # an AddedToken stored as a dict
                value = value.get("content")
            if key.endswith("_token") and isinstance(value, str):
                found[key] = value
    return found


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A rendered prompt whose messages' special-token strings are held apart (module docstring).

    escaped: the text, each such string replaced by a placeholder; table: the strings, by
    placeholder number; controls: the control tokens the text may contain.
    """

    escaped: str
    table: tuple[str, ...]
    controls: frozenset[str]

    @property
    def text(self) -> str:
        """The prompt exactly as rendered (what apply_chat_template(tokenize=False) returns)."""
        return _PLACEHOLDER.sub(lambda m: self.table[int(m.group(1))], self.escaped)

    def ids(self, tokenizer: Tokenizer, token_ids: Mapping[str, int] | None = None) -> list[int]:
        """Token ids: the template's control tokens as their ids (`token_ids` overrides a token's
        id, e.g. `<|image|>` to a vision model's image id), everything else encoded as text."""
        token_ids = token_ids or {}
        pattern = _control_pattern(self.controls)
        ids: list[int] = []
        for i, piece in enumerate(pattern.split(self.escaped) if pattern else [self.escaped]):
            if i % 2:  # the split keeps the separators (control tokens) at odd places
                ids.append(token_ids[piece] if piece in token_ids else tokenizer.token_id(piece))
            elif piece:
                ids += tokenizer.encode(_PLACEHOLDER.sub(lambda m: self.table[int(m.group(1))], piece))
        return ids


def escape_messages(messages: Sequence[dict], controls: Collection[str]) -> tuple[list[dict], list[str]]:
    """Copies of `messages` whose text (a string content, or text parts) has every control-token
    string and placeholder character replaced by a placeholder; returns (messages, table)."""
    table: list[str] = []
    pattern = _control_pattern(set(controls) | {_OPEN, _CLOSE})

    def escape(text: str) -> str:
        def hold(match):
            table.append(match.group(0))
            return f"{_OPEN}{len(table) - 1}{_CLOSE}"
        return pattern.sub(hold, text)

    escaped = []
    for message in messages:
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = escape(content)
        elif isinstance(content, list):
            message["content"] = [{**part, "text": escape(part["text"])} if part.get("type") == "text" else dict(part)
                                  for part in content]
        escaped.append(message)
    return escaped, table


def render(template: str, messages: Sequence[dict], special: Mapping[str, str], controls: Collection[str],
           **variables: Any) -> Prompt:
    """Render `template` over `messages` with the variables transformers passes (module
    docstring) plus `variables`; `controls` are the tokenizer's special-token strings.
    ChatTemplateError (one line) if the template fails or raises."""
    escaped, table = escape_messages(messages, controls)
    try:
        text = _compile(template).render(messages=escaped, tools=None, documents=None,
                                         add_generation_prompt=False, **{**special, **variables})
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template: {err.message or type(err).__name__}") from None
    return Prompt(text, tuple(table), frozenset(controls))


def plain_prompt(build, messages: Sequence[dict], controls: Collection[str]) -> Prompt:
    """A prompt made by Python code rather than a template: `build(escaped_messages)` returns
    the text; messages are escaped as `render` escapes them."""
    escaped, table = escape_messages(messages, controls)
    return Prompt(build(escaped), tuple(table), frozenset(controls))


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it (for
    assistant-token masks); it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile(template: str) -> jinja2.Template:
    if template not in _TEMPLATES:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            _TEMPLATES[template] = env.from_string(template)
        except jinja2.TemplateSyntaxError as err:
            raise ChatTemplateError(f"chat template: line {err.lineno}: {err.message}") from None
    return _TEMPLATES[template]


_PATTERNS: dict[frozenset, re.Pattern | None] = {}


def _control_pattern(strings: Collection[str]) -> re.Pattern | None:
    """A regex matching any of `strings`, longest first, as one capturing group (None for none)."""
    key = frozenset(strings)
    if key not in _PATTERNS:
        alternatives = "|".join(map(re.escape, sorted(key, key=len, reverse=True)))
        _PATTERNS[key] = re.compile(f"({alternatives})") if alternatives else None
    return _PATTERNS[key]


def _read_json(path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}
