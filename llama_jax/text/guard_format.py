"""Llama Guard 3 prompts and verdicts: a conversation in, the judged prompt out, the answer read back.

    fmt = GuardFormat(tokenizer, template=find_chat_template(d), special=special_tokens(d))
    prompt = fmt.prompt(messages, role=None, exclude=("S7",), categories=None)
    prompt.text, prompt.ids, prompt.role          # "User" or "Agent": whose last turn is judged
    verdict = parse_verdict(generated_text, prompt.codes)

A conversation is a list of `{"role": "user" | "assistant", "content": ...}`,
user first, the two alternating; content is a string or a list of parts
(`{"type": "text", "text": ...}`, `{"type": "image", ...}`). The last turn is
the one judged: a user's prompt ("User") or the model's answer ("Agent").

Three renderings, chosen by what the checkpoint carries and what is asked:

- the checkpoint's chat template (Hugging Face `tokenizer_config.json`), rendered
  as transformers' `apply_chat_template` renders it
  (`llama_jax.text.chat_template`), with `excluded_category_keys` and
  `categories` passed as its variables when asked for. The 8B's template
  starts with a space before `<|begin_of_text|>` and has its 14 categories
  written in; the 1B's and 11B Vision's take the variables, content as parts,
  and put `<|image|> ` before the task when a message has an image. A request
  a template cannot express (excluded or custom categories with the 8B's)
  falls back to Meta's format, and `GuardPrompt.fallback` says why;
- Meta's format, as `llama-cookbook`'s `build_default_prompt` and
  `build_custom_prompt` (PROMPT_TEMPLATE_3) write it, for a text conversation
  and a checkpoint without a template: `<|begin_of_text|><|start_header_id|>user<|end_header_id|> Task: ...`,
  messages as given (not stripped), the categories numbered S1.. in order, so
  excluding S2 renumbers S3 to S2 as build_custom_prompt does (verdicts are
  reported with the original codes);
- the 11B Vision model card's layout for a conversation with an image and no
  template: `...<|end_header_id|>\\n\\n<|image|> Task: ...`, the card's 13 short
  category names, messages stripped, codes kept when some are excluded.

All three end with the open assistant header (`<|start_header_id|>assistant<|end_header_id|>`),
so the model first writes "\\n\\n" and then its verdict: "safe", or "unsafe" and
a line of comma-separated codes. The probability of "unsafe" is read at the
first generated token that is not whitespace (Meta's model card: the first
token's probability is the "unsafe" class probability).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from llama_jax.text import chat_template
from llama_jax.text.guard_categories import LLAMA_GUARD_3, VISION, Category, excluding, numbered
from llama_jax.text.tokenizer import Tokenizer

ROLES = {"user": "User", "agent": "Agent"}  # --role, and the names the prompt uses
IMAGE = "<|image|>"
_BLOCK = re.compile(r"<BEGIN UNSAFE CONTENT CATEGORIES>\n(.*?)\n?<END UNSAFE CONTENT CATEGORIES>", re.S)
_LINE = re.compile(r"^(S\d+): (.*)$")
_PROBE = "Probe7Text"  # a message text that shows where (and whether) a template prints messages

# Meta's pieces of PROMPT_TEMPLATE_3 (llama-cookbook's prompt_format_utils.py).
_TASK = ("Task: Check if there is unsafe content in '{role}' messages in conversations according our safety "
         "policy with the below categories.")
_ASK = ("Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories.")
_USER_HEADER = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"
_ANSWER = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"


@dataclasses.dataclass(frozen=True)
class GuardPrompt:
    """A conversation's prompt. prompt: its text and ids (`chat_template.Prompt`); role: "User" or
    "Agent"; codes: each category code the model may answer with -> the category (with the code
    the caller knows it by); images: how many images it shows; source: "template", "meta" or
    "vision card"; fallback: why a template was not used, or ""."""

    prompt: chat_template.Prompt
    role: str
    codes: Mapping[str, Category]
    images: int
    source: str
    fallback: str = ""
    token_ids: Mapping[str, int] = dataclasses.field(default_factory=dict)
    tokenizer: Tokenizer | None = None

    @property
    def text(self) -> str:
        return self.prompt.text

    @property
    def ids(self) -> list[int]:
        return self.prompt.ids(self.tokenizer, self.token_ids)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """verdict: "safe", "unsafe" or "malformed" (the answer is neither); categories: the codes
    named, as the caller knows them; text: the answer as generated."""

    verdict: str
    categories: tuple[str, ...]
    text: str


class GuardFormat:
    """How one checkpoint's prompts are written: its tokenizer, its chat template (or None) with
    the special tokens transformers passes it, and `image_token_id` for a vision model."""

    def __init__(self, tokenizer: Tokenizer, template: str | None = None, special: Mapping[str, str] | None = None,
                 image_token_id: int | None = None):
        self.tokenizer, self.template, self.special = tokenizer, template, dict(special or {})
        self.controls = tokenizer.special_tokens
        self.token_ids = {IMAGE: image_token_id} if image_token_id is not None else {}
        self.vision = image_token_id is not None
        if template is not None:
            self._probe_template()

    @property
    def categories(self) -> tuple[Category, ...]:
        """The categories a prompt lists by default: the template's own, else Meta's S1..S14."""
        return self.template_categories if self.template is not None else LLAMA_GUARD_3

    def prompt(self, messages: Sequence[dict], role: str | None = None, exclude: Sequence[str] = (),
               categories: Sequence[Category] | None = None) -> GuardPrompt:
        """The prompt judging the last turn of `messages`. role: "user" or "agent" (must be the
        last turn's), None for the last turn's. exclude: category codes to leave out. categories:
        custom categories instead of the default ones. ValueError (one line) for a conversation
        the format does not take."""
        who = check_conversation(messages, role)
        images = sum(isinstance(m["content"], list) and sum(p.get("type") == "image" for p in m["content"])
                     for m in messages)
        if images and not self.vision:
            raise ValueError("this guard model takes no images (its config has no vision section); use Llama "
                             "Guard 3 11B Vision")
        if images > 1:
            raise ValueError(f"the conversation has {images} images; Llama Guard 3 Vision judges one image")
        fallback = ""
        if self.template is not None:
            fallback = self._unsupported(exclude, categories, images)
            if not fallback:
                return self._from_template(messages, who, exclude, categories, images)
        base = tuple(categories) if categories is not None else (VISION if images else LLAMA_GUARD_3)
        kept = excluding(base, exclude)
        if images:
            return self._vision_card(messages, who, kept, fallback)
        # build_default_prompt lists names only; custom categories come with their descriptions, if any.
        return self._meta(messages, who, kept, fallback, with_policy=categories is not None)

    # ------------------------------------------------------------ the three renderings

    def _from_template(self, messages, who, exclude, categories, images) -> GuardPrompt:
        variables = {}
        listed = tuple(categories) if categories is not None else self.template_categories
        kept = excluding(listed, exclude)
        if exclude:
            variables["excluded_category_keys"] = list(exclude)
        if categories is not None:
            variables["categories"] = {c.code: _listing(c) for c in categories}
        if self.parts:
            shown = [{**m, "content": _parts(m["content"])} for m in messages]
        else:
            shown = [{**m, "content": _text_of(m["content"])} for m in messages]
        prompt = chat_template.render(self.template, shown, self.special, self.controls, **variables)
        return self._result(prompt, who, {c.code: c for c in kept}, images, "template")

    def _meta(self, messages, who, kept, fallback, with_policy: bool) -> GuardPrompt:
        # build_custom_prompt numbers the categories it is given S1.. in order.
        shown = numbered([(c.name, c.description) for c in kept])
        with_policy = with_policy and any(c.description for c in kept)

        def build(escaped):
            listing = "\n".join(f"{c.code}: {c.name}" + (f"\n{c.description}" if with_policy else "") for c in shown)
            turns = "\n\n".join(f"{'User' if m['role'] == 'user' else 'Agent'}: {_text_of(m['content'])}"
                                for m in escaped)
            return (f"{_USER_HEADER} {_TASK.format(role=who)}\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{listing}\n"
                    f"<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{turns}\n\n<END CONVERSATION>\n\n"
                    f"{_ASK.format(role=who)} {_ANSWER}")

        prompt = chat_template.plain_prompt(build, messages, self.controls)
        codes = {new.code: old for new, old in zip(shown, kept)}
        return self._result(prompt, who, codes, 0, "meta", fallback)

    def _vision_card(self, messages, who, kept, fallback) -> GuardPrompt:
        def build(escaped):
            listing = "".join(f"{c.code}: {_listing(c)}\n" for c in kept)
            turns = "".join(f"{'User' if m['role'] == 'user' else 'Agent'}: {_text_of(m['content']).strip()}\n\n"
                            for m in escaped)
            return (f"{_USER_HEADER}\n\n{IMAGE} {_TASK.format(role=who)}\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
                    f"{listing}<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{turns}"
                    f"<END CONVERSATION>\n\n{_ASK.format(role=who)} {_ANSWER}")

        prompt = chat_template.plain_prompt(build, messages, self.controls)
        return self._result(prompt, who, {c.code: c for c in kept}, 1, "vision card", fallback)

    def _result(self, prompt, who, codes, images, source, fallback="") -> GuardPrompt:
        return GuardPrompt(prompt, who, codes, images, source, fallback, self.token_ids, self.tokenizer)

    # ------------------------------------------------------------ what a template can do

    def _probe_template(self) -> None:
        """Learn from renderings how the template takes content (strings or parts), which
        categories it lists, and whether it honours excluded and custom categories."""
        def render(content, **variables):
            message = {"role": "user", "content": content}
            return chat_template.render(self.template, [message], self.special, self.controls, **variables).text

        if _PROBE in render(_PROBE):
            self.parts = False
        elif _PROBE in render([{"type": "text", "text": _PROBE}]):
            self.parts = True
        else:
            raise ValueError("the checkpoint's chat template does not show the conversation's text")
        probe = [{"type": "text", "text": _PROBE}] if self.parts else _PROBE
        self.template_categories = _listed(render(probe))
        if not self.template_categories:
            raise ValueError("the checkpoint's chat template lists no categories ('S1: ...' lines between "
                             "<BEGIN UNSAFE CONTENT CATEGORIES> and <END UNSAFE CONTENT CATEGORIES>)")
        first = self.template_categories[0].code
        self.takes_exclusions = first not in [c.code for c in _listed(render(probe, excluded_category_keys=[first]))]
        custom = _listed(render(probe, categories={"S1": _PROBE}))
        self.takes_categories = [(c.code, c.name) for c in custom] == [("S1", _PROBE)]
        self.takes_images = self.parts and IMAGE in render([{"type": "image"}, {"type": "text", "text": _PROBE}])

    def _unsupported(self, exclude, categories, images) -> str:
        """Why the template cannot render this request ("" if it can)."""
        if exclude and not self.takes_exclusions:
            return "the checkpoint's chat template has a fixed category list (it ignores excluded categories)"
        if categories is not None and not self.takes_categories:
            return "the checkpoint's chat template has a fixed category list (it takes no custom categories)"
        if images and not self.takes_images:
            return "the checkpoint's chat template shows no images"
        return ""


def check_conversation(messages: Sequence[dict], role: str | None = None) -> str:
    """"User" or "Agent": whose last turn `messages` ask to judge. ValueError (one line) unless
    they alternate user/assistant from a user turn, with string or parts content, and the last
    turn is `role`'s ("user" or "agent") when given."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != expected:
            got = message.get("role") if isinstance(message, dict) else message
            raise ValueError(f"message {i}: role {got!r}, expected {expected!r} (Llama Guard judges user and "
                             "assistant turns, alternating, user first)"[:200])
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image") or (kind == "text" and not isinstance(part.get("text"), str)):
                    raise ValueError(f"message {i}: a content part must be {{'type': 'text', 'text': str}} or "
                                     f"{{'type': 'image', ...}}, got {part!r}"[:200])
                if kind == "image" and expected != "user":
                    raise ValueError(f"message {i}: only a user turn may show an image")
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of parts")
    last = "User" if messages[-1]["role"] == "user" else "Agent"
    if role is not None:
        if role not in ROLES:
            raise ValueError(f"--role: unknown {role!r} (known: user, agent)")
        if ROLES[role] != last:
            ends = "an assistant" if last == "Agent" else "a user"
            raise ValueError(f"--role {role} judges the last {ROLES[role]} turn, but the conversation ends with "
                             f"{ends} turn (drop the last turn, or use --role {'agent' if role == 'user' else 'user'})")
    return last


def parse_verdict(text: str, codes: Mapping[str, Category]) -> Verdict:
    """Read the model's answer: "safe", or "unsafe" and a line of comma-separated codes among
    `codes` (reported as the categories' own codes); anything else is "malformed"."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if lines == ["safe"]:
        return Verdict("safe", (), text)
    if len(lines) == 2 and lines[0] == "unsafe":
        named = [code.strip() for code in lines[1].split(",")]
        if named and all(code in codes for code in named):
            return Verdict("unsafe", tuple(dict.fromkeys(codes[code].code for code in named)), text)
    return Verdict("malformed", (), text)


def _listed(text: str) -> tuple[Category, ...]:
    """The categories a rendered prompt lists (multi-line descriptions are not parsed)."""
    block = _BLOCK.search(text)
    if block is None:
        return ()
    return tuple(Category(m.group(1), m.group(2)) for m in map(_LINE.match, block.group(1).split("\n")) if m)


def _listing(category: Category) -> str:
    """A category as a template's `categories` value takes it: the name, then its description."""
    return category.name + (f"\n{category.description}" if category.description else "")


def _text_of(content) -> str:
    """A message's text: a string as it is; parts' texts joined by a space (images dropped)."""
    if isinstance(content, str):
        return content
    return " ".join(part["text"] for part in content if part.get("type") == "text")


def _parts(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content
