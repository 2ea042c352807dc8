"""What the server answers, built from the batcher's events without a model: each choice's
text, logprobs, offsets and tool calls (`infer.responses.Choice`), and the request checks
behind them (`infer.openai_api`). A tiny Llama 3 style tokenizer trained here."""

import pytest

from infer.events import Finished, Token
from infer.openai_api import ChatRequest, CompletionRequest, check_sampled, chat_tools
from infer.responses import Choice
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tokenizer_training import train_bpe

CORPUS = ["The llama is a domesticated South American camelid.", "print(1) costs 12 € in Oslo", "a X b c XY"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_bpe(CORPUS, 300, path)
    return load_tokenizer(path)


def replay(choice: Choice, ids: list[int], reason: str = "stop") -> list[dict]:
    """Feed a choice the events of a reply of token ids, as the batcher would; its chunk choices."""
    chunks = [c for i in ids for c in choice.add(Token(i, -0.5, [i], [-0.5]))]
    return chunks + choice.add(Finished(reason))


def chat(**fields) -> ChatRequest:
    return ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def test_a_chat_that_offers_no_tools_never_answers_with_tool_calls(tokenizer):
    for body in (chat(), chat(tools=[]), chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                             tool_choice="none")):
        assert chat_tools(body) == (None, None)
    offered = chat_tools(chat(tools=[{"type": "function", "function": {"name": "f"}}]))
    assert offered[1] == frozenset({"f"})
    settings = check_sampled(chat(), 5, 64, None, None, 1, chat_tools(chat())[1])
    choice = Choice(0, True, tokenizer, settings, "call_1")
    tag, eot = tokenizer.token_id("<|python_tag|>"), tokenizer.token_id("<|eot_id|>")
    chunks = replay(choice, [tag] + tokenizer.encode("print(1)") + [eot])
    assert all("tool_calls" not in chunk["delta"] for chunk in chunks)
    result = choice.result()
    assert result["finish_reason"] == "stop" and "tool_calls" not in result["message"]
    assert result["message"]["content"].endswith("print(1)")
