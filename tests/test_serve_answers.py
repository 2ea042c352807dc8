"""What the server answers, built from the batcher's events without a model: each choice's
text, logprobs, offsets and tool calls (`infer.responses.Choice`), and the request checks
behind them (`infer.openai_api`). A tiny Llama 3 style tokenizer trained here."""

import pytest

from infer.events import Finished, Token
from infer.openai_api import ChatRequest, CompletionRequest, Settings, check_sampled, chat_tools
from infer.responses import Choice
from llama_jax.decoding.sampling import Sampling
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
        assert chat_tools(body) == (None, None, None)
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


def logprob_settings(logprobs: int = 1, **fields) -> Settings:
    return Settings(16, Sampling(), None, fields.pop("stops", ()), logprobs, **fields)


def test_logprobs_give_each_tokens_own_bytes_for_part_of_a_character(tokenizer):
    ids = tokenizer.encode("☃")  # in no training text: three byte tokens
    assert [tokenizer.token_bytes(i) for i in ids] == [b"\xe2", b"\x98", b"\x83"]
    chat_choice = Choice(0, True, tokenizer, logprob_settings(), "call_1")
    replay(chat_choice, ids, "length")
    content = chat_choice.result()["logprobs"]["content"]
    assert [e["bytes"] for e in content] == [[0xE2], [0x98], [0x83]]
    assert [e["top_logprobs"][0]["bytes"] for e in content] == [[0xE2], [0x98], [0x83]]
    assert bytes(b for e in content for b in e["bytes"]).decode() == "☃" == chat_choice.result()["message"]["content"]
    assert [e["token"] for e in content] == ["\\xe2", "\\x98", "\\x83"]  # the bytes, escaped: not U+FFFD
    text_choice = Choice(0, False, tokenizer, logprob_settings(), "call_1")
    replay(text_choice, ids, "length")
    logprobs = text_choice.result()["logprobs"]
    assert logprobs["tokens"] == ["bytes:\\xe2", "bytes:\\x98", "bytes:\\x83"]  # OpenAI's form for such tokens
    assert [list(top) for top in logprobs["top_logprobs"]] == [["bytes:\\xe2"], ["bytes:\\x98"], ["bytes:\\x83"]]
    whole = tokenizer.encode("The llama")  # whole characters: tokens are their text
    text_choice = Choice(0, False, tokenizer, logprob_settings(), "call_1")
    replay(text_choice, whole, "length")
    assert text_choice.result()["logprobs"]["tokens"] == [tokenizer.decode([i]) for i in whole]


def streamed_offsets(chunks: list[dict]) -> list[int]:
    return [at for chunk in chunks if chunk["logprobs"] for at in chunk["logprobs"]["text_offset"]]


def test_text_offsets_streamed_equal_the_whole_answers_after_held_back_stop_text(tokenizer):
    ids = [tokenizer.encode(c)[0] for c in "aXbc"]  # "X" is held back: it may begin the stop string "XY"
    streamed = Choice(0, False, tokenizer, logprob_settings(stops=("XY",)), "call_1")
    chunks = replay(streamed, ids, "length")
    assert "".join(c["text"] for c in chunks) == "aXbc"
    assert streamed.result()["logprobs"]["text_offset"] == [0, 1, 2, 3]
    assert streamed_offsets(chunks) == [0, 1, 2, 3]
    # A character in three byte tokens starts where its first byte does; the next token after it.
    snowman = tokenizer.encode("a☃") + tokenizer.encode("b")
    streamed = Choice(0, False, tokenizer, logprob_settings(stops=("XY",)), "call_1")
    chunks = replay(streamed, snowman, "length")
    assert streamed.result()["text"] == "a☃b"
    assert streamed.result()["logprobs"]["text_offset"] == streamed_offsets(chunks) == [0, 1, 1, 1, 2]


def test_special_tokens_are_left_out_of_the_text_unless_the_request_keeps_them(tokenizer):
    header = tokenizer.token_id("<|start_header_id|>")
    ids = tokenizer.encode("The") + [header] + tokenizer.encode(" llama")
    for body in (CompletionRequest(model="m", prompt="x", logprobs=0), chat(logprobs=True)):
        settings = check_sampled(body, 3, 64, 16, 0, 1)
        choice = Choice(0, isinstance(body, ChatRequest), tokenizer, settings, "call_1")
        chunks = replay(choice, ids, "length")
        result = choice.result()
        text = result["message"]["content"] if choice.chat else result["text"]
        assert text == "The llama" == "".join(c["delta"]["content"] if choice.chat else c["text"] for c in chunks)
        if not choice.chat:  # the token is still reported, where it stood
            assert "<|start_header_id|>" in result["logprobs"]["tokens"]
            at = ids.index(header)
            assert result["logprobs"]["text_offset"][at:at + 2] == [3, 3]
    kept = check_sampled(CompletionRequest(model="m", prompt="x", skip_special_tokens=False), 3, 64, 16, None, 1)
    choice = Choice(0, False, tokenizer, kept, "call_1")
    replay(choice, ids, "length")
    assert choice.result()["text"] == "The<|start_header_id|> llama"
    # A chat without tools: <|python_tag|> is a special token like any other.
    no_tools = check_sampled(chat(), 5, 64, None, None, 1, chat_tools(chat())[1])
    choice = Choice(0, True, tokenizer, no_tools, "call_1")
    replay(choice, [tokenizer.token_id("<|python_tag|>")] + tokenizer.encode("print(1)"))
    assert choice.result()["message"]["content"] == "print(1)"
