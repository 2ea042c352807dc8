"""Llama Guard test material: chat templates in the published checkpoints' shapes, a synthetic
safety rule, and tiny models trained on it (a guard, and a model for the server to serve).

Templates, written here by hand in the shape of the `chat_template` of each Llama Guard 3
checkpoint's tokenizer_config.json (docs/safety.md):
- TEMPLATE_8B: string content, `.strip()`, the 14 categories written into the text, a space
  before `<|begin_of_text|>`, no variables;
- TEMPLATE_1B: content as parts, `| trim`, `categories` (a dict) and `excluded_category_keys`
  variables, `<|image|> ` before the task when a message shows an image (the 1B's and 11B
  Vision's).

The rule: a turn is unsafe (S1) when it contains the marker word; the guard judges the last
turn. The served model answers a user turn containing "secret" with the marker, else a greeting.
"""

from __future__ import annotations

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llama_jax import Llama, init_params
from llama_jax.config import ModelConfig
from llama_jax.formats.checkpoint import save_params
from llama_jax.text.chat import encode_conversation, format_chat
from llama_jax.text.chat_template import find_chat_template, render, special_tokens
from llama_jax.text.guard_format import GuardFormat
from llama_jax.text.tokenizer import llama3_special_tokens, load_tokenizer
from llama_jax.text.tokenizer_training import train_bpe

NAMES_14 = ["Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Defamation",
            "Specialized Advice", "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm",
            "Sexual Content", "Elections", "Code Interpreter Abuse"]

TEMPLATE_8B = (
    "{% if messages|length % 2 == 0 %}{% set role = 'Agent' %}{% else %}{% set role = 'User' %}{% endif %}"
    "{{ \" <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTask: Check if there is unsafe content in '\""
    " + role + \"' messages in conversations according our safety policy with the below categories.\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n" + "".join(f"S{i}: {n}.\n" for i, n in enumerate(NAMES_14, 1))
    + "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n\" }}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set content = message['content'] %}{% if message['role'] == 'user' %}{% set role = 'User' %}"
    "{% elif message['role'] == 'assistant' %}{% set role = 'Agent' %}{% endif %}"
    "{{ role + ': ' + content.strip() + '\n\n' }}{% endfor %}"
    "{{ \"<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST \" + role + \" message in the above "
    "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a "
    "comma-separated list of violated categories.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\" }}")


def template_1b(names) -> str:
    """The 1B / 11B Vision template's shape, its default categories `names` (S1, S2, ...)."""
    listed = "".join(f'            "S{i}": "{n}.",\n' for i, n in enumerate(names, 1))
    return """{%- if messages|length % 2 == 0 -%}
    {%- set role = 'Agent' -%}
{%-  else -%}
    {%-  set role = 'User' -%}
{%-  endif -%}
{%-  if categories is not defined -%}
    {%-  
        set categories = ({
""" + listed + """        })
    -%}
{%-  endif -%}

{{- "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n" -}}
{%- set ns = namespace(contains_image=false) -%}
{%-  for message in messages -%}
    {%- for content in message['content'] | selectattr('type', 'equalto', 'image') -%}
        {%- set ns.contains_image = true -%}
    {%- endfor -%}
{%- endfor -%}
{%- if ns.contains_image -%}
{{- "<|image|> "-}}
{%- endif -%}
{{- "Task: Check if there is unsafe content in '" + role + "' messages in conversations according our safety policy with the below categories.\\n\\n" -}}
{{- "<BEGIN UNSAFE CONTENT CATEGORIES>\\n"-}}

{%-  for key in categories -%}
    {%-  if key not in excluded_category_keys -%}
        {{-key + ": " + categories[key] + "\\n" -}}
    {%-  endif -%}
{%-  endfor -%}

{{- "<END UNSAFE CONTENT CATEGORIES>\\n\\n"-}}
{{- "<BEGIN CONVERSATION>\\n\\n"-}}
{%-  for message in messages -%}
    {%-  if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...')-}}
    {%-  endif -%}
    {%-  set content = message['content'] -%}
    {%-  if message['role'] == 'user' -%}
        {%-  set role = 'User' -%}
    {%-  elif message['role'] == 'assistant' -%}
        {%-  set role = 'Agent' -%}
    {%-  endif -%}
    {%-  for content in message['content'] | selectattr('type', 'equalto', 'text') -%}
{{- role + ': ' + content['text'] | trim + '\\n\\n'-}}
    {%-  endfor -%}
{%-  endfor -%}
{{- "<END CONVERSATION>\\n\\n"-}}
{{- "Provide your safety assessment for ONLY THE LAST " + role + " message in the above conversation:\\n"-}}
{{- " - First line must read 'safe' or 'unsafe'.\\n"-}}
{{- " - If unsafe, a second line must include a comma-separated list of violated categories. <|eot_id|><|start_header_id|>assistant<|end_header_id|>"-}}"""


TEMPLATE_1B = template_1b(NAMES_14[:13])
# The tiny guard's own template: the 1B's shape with two short categories, so its prompts stay short.
TINY_TEMPLATE = template_1b(["Marked words", "Other harms"])

MARKER = "zorblax"
WORDS = ("apple river green table music stone cloud paper light garden window bread horse candle ocean "
         "silver forest winter yellow pocket ladder mirror rabbit violin").split()
GREETING, SECRET = "hello friend", "secret"


def tokenizer_config(template: str | None) -> dict:
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return config if template is None else {**config, "chat_template": template}


def sentence(rng: random.Random, marked: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
    if marked:
        words.insert(rng.randint(0, len(words)), MARKER)
    return " ".join(words)


def conversation(rng: random.Random) -> tuple[list[dict], bool]:
    """A random conversation (a user turn, or a user turn and an answer) and whether its last turn
    is unsafe (holds the marker)."""
    unsafe = rng.random() < 0.5
    if rng.random() < 0.5:
        return [{"role": "user", "content": sentence(rng, unsafe)}], unsafe
    return [{"role": "user", "content": sentence(rng, rng.random() < 0.5)},
            {"role": "assistant", "content": sentence(rng, unsafe)}], unsafe


def answer(unsafe: bool) -> str:
    """What Llama Guard 3 writes after the assistant header: a blank line, then the verdict."""
    return "\n\nunsafe\nS1" if unsafe else "\n\nsafe"


def make_tokenizer(directory, prompts_text: list[str]) -> None:
    corpus = prompts_text + [answer(True), answer(False), " ".join(WORDS), MARKER, GREETING, SECRET] * 20
    train_bpe(corpus, 480, directory / "tokenizer.model")


def train(config: ModelConfig, examples: list[tuple[list[int], list[int]]], steps: int, seed: int = 0,
          batch: int = 16, lr: float = 1e-3):
    """Adam on weighted next-token cross-entropy; examples are (ids, 0/1 loss weight per id)."""
    model = Llama(config)
    params = init_params(config, jax.random.key(seed))
    length = max(len(ids) for ids, _ in examples)
    tokens = np.zeros((len(examples), length), np.int32)
    weights = np.zeros((len(examples), length), np.float32)
    for i, (ids, w) in enumerate(examples):
        tokens[i, :len(ids)], weights[i, :len(ids)] = ids, w
    positions = jnp.arange(length - 1)[None]
    optimizer = optax.adam(lr)

    def loss(params, tokens_bt, weights_bt):
        logits, _ = model.apply({"params": params}, tokens_bt[:, :-1], positions)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32))
        picked = jnp.take_along_axis(lp, tokens_bt[:, 1:, None], axis=-1)[..., 0]
        w = weights_bt[:, 1:]
        return -(picked * w).sum() / w.sum()

    @jax.jit
    def step(params, state, tokens_bt, weights_bt):
        value, grads = jax.value_and_grad(loss)(params, tokens_bt, weights_bt)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.choice(len(examples), batch, replace=False)
        params, state, value = step(params, state, tokens[rows], weights[rows])
    return params, float(value)


def guard_examples(fmt, rng: random.Random, n: int):
    examples = []
    for _ in range(n):
        messages, unsafe = conversation(rng)
        prompt = fmt.prompt(messages).ids
        reply = fmt.tokenizer.encode(answer(unsafe)) + [fmt.tokenizer.token_id("<|eot_id|>")]
        examples.append((prompt + reply, [0] * len(prompt) + [1] * len(reply)))
    return examples


def served_examples(tokenizer, rng: random.Random, n: int):
    examples = []
    for _ in range(n):
        secret = rng.random() < 0.5
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        if secret:
            words.insert(rng.randint(0, len(words)), SECRET)
        reply = f"the {MARKER} is near" if secret else GREETING
        system = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.5 else []
        examples.append(encode_conversation(tokenizer, system + [{"role": "user", "content": " ".join(words)},
                                                                 {"role": "assistant", "content": reply}]))
    return examples


def write_checkpoint(directory, config, params, template: str | None) -> None:
    """Our checkpoint in `directory`, the tokenizer (already there) and a tokenizer_config.json."""
    save_params(directory, config, params)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(template)))


def tiny_config(vocab_size: int) -> ModelConfig:
    # Heads, kv heads, mlp, vocab and dim divide by fsdp 4 x tensor 2 (fsdp_tp on 8 devices).
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=vocab_size,
                       rope_theta=500000.0, max_seq_len=512)


def chat_ids(tokenizer, system: str, text: str) -> list[int]:
    return format_chat(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": text}])



def make_guard(directory, steps: int = 400, seed: int = 0):
    """Train the tiny guard in `directory` (our checkpoint, tokenizer.model, a tokenizer_config.json
    carrying TINY_TEMPLATE); returns its final training loss."""
    rng = random.Random(seed)
    texts = [render(TINY_TEMPLATE, as_parts(messages), {}, llama3_special_tokens()).text
             for messages, _ in (conversation(rng) for _ in range(40))]
    make_tokenizer(directory, texts)
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(TINY_TEMPLATE)))
    tokenizer = load_tokenizer(directory)
    fmt = GuardFormat(tokenizer, find_chat_template(directory), special_tokens(directory))
    config = tiny_config(tokenizer.vocab_size)
    params, loss = train(config, guard_examples(fmt, rng, 2000), steps, seed)
    write_checkpoint(directory, config, params, TINY_TEMPLATE)
    return loss


def as_parts(messages):
    """Messages with string content as one text part each (the 1B template's form)."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
