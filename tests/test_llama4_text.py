"""Llama 4's tokenizer and chat format give the ids of Meta's reference (llama_models/llama4)."""

from __future__ import annotations

import importlib.resources
import importlib.util
import sys
import types

import pytest
from llama_models.datatypes import RawMessage, StopReason, ToolCall as MetaToolCall
from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

# Meta's ChatFormat imports its image transforms, which need torchvision (not installed): text
# prompts never call them, so a stand-in module with their names lets the reference load.
if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
    sys.modules.setdefault("llama_models.llama4.preprocess", types.SimpleNamespace(
        ResizeNormalizeImageTransform=None, VariableSizeImageTransform=None))
from llama_models.llama4.chat_format import ChatFormat  # noqa: E402

from llama_jax.text.chat import encode_conversation, format_chat
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tool_use import ToolCall

MODEL_FILE = importlib.resources.files("llama_models.llama4") / "tokenizer.model"

SAMPLES = [
    "Hello, world! It's a test of the Llama 4 tokenizer.",
    "Das Straßenbahnnetz in Zürich ist 172,9 km lang; ÄÖÜ äöü.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Привет, как дела? Ελληνικά: καλημέρα. العربية: مرحبا بالعالم. हिन्दी: नमस्ते",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tif x:\r\n  y = 'It''s'\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }  // C++ comment\n/* path/to/file */",
    "Numbers 1234567890, 3.14159, 1e-10, and emoji 🦙🔥👍🏽 with ZWJ 👩‍💻.",
    "CamelCaseWords HTTPServerError don't WON'T I'M they'LL   spaces   \n\n\n trailing ",
    "<|begin_of_text|> <|header_start|>user<|header_end|> <|eot|> <|image|> <|reserved_special_token_5|>",
    "<|eot_id|> <|start_header_id|> <s> </s> [INST] <<SYS>> <|python_start|>print(1)<|python_end|>",
]


@pytest.fixture(scope="module")
def meta():
    return MetaTokenizer(MODEL_FILE)


@pytest.fixture(scope="module")
def ours():
    return load_tokenizer(str(MODEL_FILE))


def test_llama4_tokenizer_is_recognised_with_its_specials(meta, ours):
    assert ours.generation == "llama4"
    assert ours.vocab_size == meta.n_words == 202048
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (meta.bos_id, meta.eos_id, meta.pad_id)
    assert ours.stop_ids == frozenset(meta.stop_tokens)
    for name, i in meta.special_tokens.items():
        assert ours.token_id(name) == i, name


@pytest.mark.parametrize("text", SAMPLES)
def test_llama4_ids_equal_metas(meta, ours, text):
    assert ours.encode(text, bos=True, eos=True) == meta.encode(text, bos=True, eos=True)
    assert ours.encode(text, allow_special=True) == meta.encode(text, bos=False, eos=False,
                                                                 allowed_special="all")
    assert ours.decode(ours.encode(text)) == text


CONVERSATIONS = {
    "single": [RawMessage(role="user", content="What is the capital of France?")],
    "system": [RawMessage(role="system", content="You are terse.  "),
               RawMessage(role="user", content=" Name three rivers.\n")],
    "multi_turn": [RawMessage(role="system", content="Be helpful."),
                   RawMessage(role="user", content="Hi!"),
                   RawMessage(role="assistant", content="Hello! How can I help?", stop_reason=StopReason.end_of_turn),
                   RawMessage(role="user", content="Tell me a joke about <|eot|> tokens.")],
    "tools": [RawMessage(role="user", content="Weather in Oslo?"),
              RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_message,
                         tool_calls=[MetaToolCall(call_id="1", tool_name="get_weather",
                                                  arguments={"city": "Oslo"})]),
              RawMessage(role="tool", content='{"temperature": -3}'),
              RawMessage(role="user", content="Thanks.")],
}


def _ours(messages: list[RawMessage]) -> list[dict]:
    out = []
    for m in messages:
        message = {"role": "ipython" if m.role == "tool" else m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [ToolCall(t.tool_name, t.arguments) for t in m.tool_calls]
        out.append(message)
    return out


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_llama4_chat_prompt_equals_metas_chat_format(meta, ours, name):
    messages = CONVERSATIONS[name]
    want = ChatFormat(meta).encode_dialog_prompt(messages).tokens
    assert format_chat(ours, _ours(messages)) == want


def test_llama4_training_conversation_weights_the_answer_and_its_eot(ours):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, weights = encode_conversation(ours, messages)
    answer = [i for i, w in zip(ids, weights) if w]
    assert answer == ours.encode("4") + [ours.token_id("<|eot|>")]
    assert ids[:len(format_chat(ours, messages[:1]))] == format_chat(ours, messages[:1])
