"""`python -m infer.serve` end to end: one server process on 127.0.0.1 (a tiny Llama 3 style
Hugging Face directory, 4 decode slots, an API key), driven with the official `openai` client
and httpx, and compared with `infer.generate` in this process. The last test stops the server
with SIGTERM. The answers' JSON for replies a random model does not write (tool calls) is
tested on `infer.responses.Choice` directly."""

import datetime
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jax
import numpy as np
import openai
import pytest

from infer import generate, load_model
from infer.events import Finished, Token
from infer.openai_api import Settings
from infer.responses import Choice
from llama_jax.text.chat import format_chat
from llama_jax.config import ModelConfig
from llama_jax.decoding.sampling import Sampling
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tokenizer_training import train_bpe
from servers import Server, environment, free_port
from tiny import hf_model

# Llama 3.1's tool-use text is in the corpus, so that a prompt offering a tool fits the context.
TOOL_TEXT = ["Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 30 Jan 2025\n\n",
             "Given the following functions, please respond with a JSON for a function call with its proper "
             "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
             "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n",
             '{\n    "type": "function",\n    "function": {\n        "name": "get_weather"\n    }\n}\n\n']
CORPUS = ["The llama is a domesticated South American camelid, used as a pack animal.",
          "Llamas are social animals and live with others as a herd.",
          "def add(a, b):\n    return a + b\n", "What is the capital of Norway? Oslo.", *TOOL_TEXT] * 30
CONTEXT = 256
KEY = "test-key-123"
MODEL = "tiny-llama3"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital?"}]
LONG = 100  # tokens of the long request (its prompt runs to this length greedily, checked)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp(MODEL)
    train_bpe(CORPUS, 600, directory / "tokenizer.model")
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                         vocab_size=load_tokenizer(directory).vocab_size, rope_theta=500000.0, max_seq_len=CONTEXT)
    hf_model(config, seed=1).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(checkpoint):
    """(config, params, tokenizer) loaded here, for `generate`."""
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, request):
    running = Server(checkpoint, "--model-name", MODEL, "--port", free_port(), "--max-batch", 4,
                     "--max-body-bytes", 65536, "--shutdown-timeout", 20,
                     # one decode step per call: a long request spans many calls
                     "--steps-per-call", 1, env=environment(LLAMA_JAX_API_KEY=KEY))
    request.getfixturevalue("reference")  # loads here while the server compiles
    with running.wait_until_serving():
        yield running.process, running.base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


def health(server) -> dict:
    return httpx.get(f"{server[1]}/health", timeout=10).json()


def post(server, path, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"} if key else {}
    return httpx.post(f"{server[1]}{path}", headers=headers, timeout=60, **kwargs,
                      **({"json": body} if not isinstance(body, (bytes, str)) else {"content": body}))


def prompt_ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 400, n).tolist()


def shown(tokenizer, generation) -> str:
    """What the server answers for a `generate` result: its text, special tokens' text left out
    (the API's default, `skip_special_tokens`; a random model writes many of them)."""
    hidden = tokenizer.special_ids
    return tokenizer.decode([t for t in generation.tokens if t < tokenizer.vocab_size and t not in hidden])


def stream_text(stream) -> tuple[str, str | None]:
    text, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            text.append(piece or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish


def test_a_greedy_chat_completion_equals_generate_streamed_and_not(client, reference):
    config, params, tokenizer = reference
    ids = format_chat(tokenizer, CHAT)
    expected = generate(params, tokenizer, [ids], max_new_tokens=24, config=config)[0]
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert answer.choices[0].message.content == shown(tokenizer, expected)
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.usage.completion_tokens == len(expected.tokens) + (expected.finish_reason == "stop")
    streamed = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True)
    assert stream_text(streamed) == (shown(tokenizer, expected), expected.finish_reason)


def test_the_openai_clients_plain_streaming_loop_reads_every_chunk(client, reference):
    config, params, tokenizer = reference
    expected = generate(params, tokenizer, [format_chat(tokenizer, CHAT)], max_new_tokens=24, config=config)[0]
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == shown(tokenizer, expected)
    prompt = prompt_ids(12, 5)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole
    # Asked for, the usage comes last, in a chunk of no choices; the others say usage null.
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == len(expected.tokens) + (expected.finish_reason == "stop")
    roles = [c.choices[0].delta.role for c in chunks[:-1]]
    assert len(roles) > 1 and roles[0] == "assistant" and not any(roles[1:])  # the role in the first delta only


def test_stream_options_without_stream_get_400(server):
    answer = post(server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT,
                                                   "stream_options": {"include_usage": True}})
    assert answer.status_code == 400 and "stream_options" in answer.json()["error"]["message"]


def test_a_tool_result_is_the_ipython_turn_of_llama_3_1(client, reference):
    config, params, tokenizer = reference
    call = [*CHAT, {"role": "tool", "content": "{\"capital\": \"Oslo\"}"}]
    ids = format_chat(tokenizer, [*CHAT, {"role": "ipython", "content": call[-1]["content"]}])
    assert tokenizer.token_id("<|eom_id|>") in tokenizer.stop_ids  # a tool call ends at <|eom_id|>
    expected = generate(params, tokenizer, [ids], max_new_tokens=8, config=config)[0]
    answer = client.chat.completions.create(model=MODEL, messages=call, max_tokens=8, temperature=0)
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.choices[0].message.content == shown(tokenizer, expected)


WEATHER = {"type": "function", "function": {"name": "get_weather"}}
CALLED = [*CHAT[:1], {"role": "user", "content": "What is the weather in Oslo?"},
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 7}'}]


def called_prompt(date: str | None) -> str:
    """CALLED in Llama 3.1 Instruct's chat template, written out by hand; tools offered as of
    `date`, or not offered (None)."""
    system, user = "You are terse.", "What is the weather in Oslo?"
    if date is not None:
        system = TOOL_TEXT[0].replace("30 Jan 2025", date) + system
        user = TOOL_TEXT[1] + TOOL_TEXT[2] + user
    return ("<|begin_of_text|>"
            f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
            '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Oslo"}}'
            "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n{\"temperature\": 7}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_tools_and_a_tool_call_turn_make_llama_31s_prompt(client, reference):
    config, params, tokenizer = reference
    dates = {datetime.date.today().strftime("%d %b %Y")}
    answer = client.chat.completions.create(model=MODEL, messages=CALLED, tools=[WEATHER], max_tokens=8,
                                            temperature=0)
    dates.add(datetime.date.today().strftime("%d %b %Y"))  # the server's date is one of these
    prompts = {len(ids): ids for ids in (tokenizer.encode(called_prompt(d), allow_special=True) for d in dates)}
    ids = prompts[answer.usage.prompt_tokens]
    expected = generate(params, tokenizer, [ids], max_new_tokens=8, config=config)[0]
    # A random model's reply is no call: it comes back as text, streamed or not.
    assert answer.choices[0].message.content == shown(tokenizer, expected)
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason == expected.finish_reason
    streamed = client.chat.completions.create(model=MODEL, messages=CALLED, tools=[WEATHER], max_tokens=8,
                                              temperature=0, stream=True)
    assert stream_text(streamed) == (shown(tokenizer, expected), expected.finish_reason)
    plain = client.chat.completions.create(model=MODEL, messages=CALLED, tools=[WEATHER], tool_choice="none",
                                           max_tokens=1)
    assert plain.usage.prompt_tokens == len(tokenizer.encode(called_prompt(None), allow_special=True))


@pytest.mark.parametrize("body, fragment", [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0: a tool must be"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice names 'get_time', which is not among the tools (get_weather)"),
    ({"tool_choice": "required"}, "tool_choice forces a call, but the request offers no tools"),
    ({"messages": [*CALLED[:2], {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "Oslo"}}]}]},
     "messages.2.tool_calls.0.function.arguments must be a JSON object"),
])
def test_bad_tools_get_400(server, body, fragment):
    answer = post(server, "/v1/chat/completions", {"model": MODEL, "messages": CALLED, **body})
    assert answer.status_code == 400 and fragment in answer.json()["error"]["message"], answer.text


def replay(choice: Choice, ids: list[int], reason: str = "stop") -> list[dict]:
    """Feed a choice the events of a reply of token ids, as the batcher would; its chunk choices."""
    chunks = [c for i in ids for c in choice.add(Token(i, -0.5, [i], [-0.5]))]
    return chunks + choice.add(Finished(reason))


def tool_choice(tokenizer, names=frozenset({"get_weather"}), logprobs=None) -> Choice:
    settings = Settings(16, Sampling(), None, (), logprobs, 1, names)
    return Choice(0, True, tokenizer, settings, "call_1")


def test_a_json_function_call_is_answered_as_openai_tool_calls(reference):
    tokenizer = reference[2]
    reply = tokenizer.encode('{"name": "get_weather", "parameters": {"city": "Tromsø"}}')
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Tromsø"}'}}
    choice = tool_choice(tokenizer)
    chunks = replay(choice, reply + [tokenizer.token_id("<|eot_id|>")])
    assert chunks == [{"index": 0, "delta": {"role": "assistant", "content": None,
                                             "tool_calls": [{"index": 0, **call}]},
                       "logprobs": None, "finish_reason": "tool_calls"}]
    assert choice.result() == {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                               "logprobs": None, "finish_reason": "tool_calls"}
    assert choice.generated == len(reply) + 1


def test_python_tag_code_is_a_code_interpreter_call_with_its_logprobs(reference):
    tokenizer = reference[2]
    reply = [tokenizer.token_id("<|python_tag|>")] + tokenizer.encode("print(2 + 3)")
    choice = tool_choice(tokenizer, frozenset(), logprobs=0)
    [chunk] = replay(choice, reply + [tokenizer.token_id("<|eom_id|>")])
    assert chunk["delta"]["tool_calls"] == [{"index": 0, "id": "call_1", "type": "function", "function": {
        "name": "code_interpreter", "arguments": '{"code": "print(2 + 3)"}'}}]
    assert chunk["finish_reason"] == "tool_calls"
    assert [e["token"] for e in chunk["logprobs"]["content"]] == ["<|python_tag|>"] + [
        tokenizer.decode([i]) for i in reply[1:]]


def test_a_malformed_call_falls_back_to_text_and_plain_text_streams_at_once(reference):
    tokenizer = reference[2]
    eot = tokenizer.token_id("<|eot_id|>")
    broken = '{"name": "get_weather", "parameters": {"city"'
    choice = tool_choice(tokenizer)
    assert replay(choice, tokenizer.encode(broken), "length") == [
        {"index": 0, "delta": {"role": "assistant", "content": broken}, "logprobs": None, "finish_reason": "length"}]
    assert choice.result()["message"] == {"role": "assistant", "content": broken}
    unknown = '{"name": "get_time", "parameters": {}}'
    assert tool_choice(tokenizer).add(Finished("stop")) == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": "stop"}]
    assert replay(tool_choice(tokenizer), tokenizer.encode(unknown) + [eot])[-1]["delta"]["content"] == unknown
    text = tokenizer.encode("Oslo is sunny.")
    choice = tool_choice(tokenizer)
    first = choice.add(Token(text[0], 0.0, [], []))  # not a call: no holding back
    assert first == [{"index": 0, "delta": {"role": "assistant", "content": tokenizer.decode(text[:1])},
                      "logprobs": None, "finish_reason": None}]
    tagged = [tokenizer.token_id("<|python_tag|>")] + tokenizer.encode("print(1)")
    no_tools = Choice(0, True, tokenizer, Settings(16, Sampling(), None, (), None, skip_special_tokens=False),
                      "call_1")  # tool_choice none, special tokens' text kept
    assert "".join(c["delta"]["content"] for c in replay(no_tools, tagged + [eot])) == "<|python_tag|>print(1)"
    assert no_tools.finish == "stop"


def test_n_greedy_chat_choices_are_equal_and_usage_sums_them(client, reference):
    config, params, tokenizer = reference
    expected = generate(params, tokenizer, [format_chat(tokenizer, CHAT)], max_new_tokens=24, config=config)[0]
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, n=2)
    assert [(c.index, c.message.content, c.finish_reason) for c in answer.choices] == [
        (i, shown(tokenizer, expected), expected.finish_reason) for i in (0, 1)]
    assert answer.usage.completion_tokens == 2 * (len(expected.tokens) + (expected.finish_reason == "stop"))
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, n=2,
                                                stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert texts == {0: shown(tokenizer, expected), 1: shown(tokenizer, expected)}
    assert finishes == {0: expected.finish_reason, 1: expected.finish_reason}
    assert usage.completion_tokens == answer.usage.completion_tokens


def test_concurrent_requests_of_mixed_lengths_each_equal_their_greedy_result(client, server, reference):
    config, params, tokenizer = reference
    lengths = [3, 9, 17, 30, 45, 60, 80, 100] * 4  # 32 requests, four prompt buckets
    limits = [4, 9, 16, 25]
    jobs = [(prompt_ids(n, i), limits[i % 4]) for i, n in enumerate(lengths)]
    expected = {}
    for limit in limits:  # ragged batches of `generate` equal its single-row results (test_generate.py)
        group = [ids for ids, m in jobs if m == limit]
        for ids, result in zip(group, generate(params, tokenizer, group, max_new_tokens=limit, config=config)):
            expected[tuple(ids)] = shown(tokenizer, result)
    calls_before = health(server)["decode_calls"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: client.completions.create(
            model=MODEL, prompt=job[0], max_tokens=job[1], temperature=0), jobs))
    assert [a.choices[0].text for a in answers] == [expected[tuple(ids)] for ids, _ in jobs]
    # One request alone needs a decode call per token after the first; the slots shared
    # calls if the whole burst needed fewer.
    alone = sum(a.usage.completion_tokens - 1 for a in answers)
    assert health(server)["decode_calls"] - calls_before < alone / 2


def test_short_requests_finish_while_a_long_one_streams(client, reference):
    config, params, tokenizer = reference
    long_prompt = prompt_ids(20, 99)
    assert generate(params, tokenizer, [long_prompt], max_new_tokens=LONG, config=config)[0].finish_reason == "length"
    stream = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=LONG, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)
    with ThreadPoolExecutor(3) as pool:
        shorts = [pool.submit(client.completions.create, model=MODEL, prompt=prompt_ids(5, i), max_tokens=3,
                              temperature=0) for i in range(3)]
        rest = list(chunks)  # the long stream, read to its end after the short ones were sent
        finished = [s.done() for s in shorts]
    assert all(finished), f"short requests should end before a {LONG}-token request started ahead of them"
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"


def test_stop_strings_cut_the_text_streamed_and_not(client, reference):
    config, params, tokenizer = reference
    prompt = prompt_ids(12, 5)
    full = shown(tokenizer, generate(params, tokenizer, [prompt], max_new_tokens=30, config=config)[0])
    stop = full[8:11]
    assert stop and full.index(stop) >= 1
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (full[:full.index(stop)], "stop")
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert stream_text(streamed) == (full[:full.index(stop)], "stop")


def test_a_seed_reproduces_a_sampled_answer_and_equals_generate(client, reference):
    config, params, tokenizer = reference
    prompt = prompt_ids(10, 7)
    expected = generate(params, tokenizer, [prompt], max_new_tokens=20, temperature=0.9, seed=3, config=config)[0]

    def sampled(seed, **extra):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0.9, seed=seed,
                                         **extra).choices[0].text

    assert sampled(3) == sampled(3) == shown(tokenizer, expected)
    other = sampled(4)
    assert other != shown(tokenizer, expected)
    # n choices: choice i has seed + i, streamed or not.
    two = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0.9, seed=3, n=2)
    assert [(c.index, c.text) for c in two.choices] == [(0, shown(tokenizer, expected)), (1, other)]
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0.9, seed=3,
                                           n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {0: shown(tokenizer, expected), 1: other}
    filtered = dict(top_p=0.8, extra_body={"top_k": 20})
    assert sampled(5, **filtered) == sampled(5, **filtered)


def test_logprobs_equal_log_softmax_of_generate_logits(client, reference):
    config, params, tokenizer = reference
    prompt = prompt_ids(15, 11)
    expected = generate(params, tokenizer, [prompt], max_new_tokens=10, config=config, return_logits=True)[0]
    logprobs_nv = np.asarray(jax.nn.log_softmax(expected.logits, axis=-1))
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, logprobs=3)
    got = answer.choices[0].logprobs
    n = len(expected.tokens)
    np.testing.assert_allclose(got.token_logprobs[:n], logprobs_nv[np.arange(n), expected.tokens], atol=1e-5)

    def key(i):  # a token's text; a lone byte of a UTF-8 character is "bytes:\\xNN", as OpenAI writes it
        raw = tokenizer.token_bytes(i)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + raw.decode("utf-8", "backslashreplace")

    for step in range(n):
        top = [(key(i), logprobs_nv[step, i]) for i in np.argsort(-logprobs_nv[step])[:3]]
        assert set(got.top_logprobs[step]) == {text for text, _ in top}
        for text, logprob in got.top_logprobs[step].items():
            assert any(text == t and abs(logprob - lp) <= 1e-5 for t, lp in top)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2)
    for entry in chat.choices[0].logprobs.content:
        assert entry.logprob == entry.top_logprobs[0].logprob and len(entry.top_logprobs) == 2


def test_traffic_of_every_kind_triggers_no_compile(client, server):
    before = health(server)["compiles"]
    for i, (n, settings) in enumerate([(2, {}), (20, {"temperature": 0.7, "top_p": 0.9}),
                                       (60, {"temperature": 1.2, "extra_body": {"top_k": 5}}),
                                       (125, {"temperature": 0, "logprobs": 5}), (250, {"n": 2})]):
        client.completions.create(model=MODEL, prompt=prompt_ids(n, i), max_tokens=3, **settings)
    assert health(server)["compiles"] == before


@pytest.mark.parametrize("body, status, fragment", [
    ('{"model": "tiny-llama3", "prompt": "hi",', 400, "not valid JSON"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model 'gpt-4' is not served here"),
    ({"model": MODEL, "prompt": list(range(300))}, 400, "context is 256 tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature must be in [0, 2]"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ({"model": MODEL, "prompt": "hi", "top_k": -5}, 400, "top_k must be a positive integer"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 300}, 400, "ask for at most"),
    ({"model": MODEL, "prompt": "hi", "n": 5}, 400, "n must be in [1, 4] (each choice takes one of"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 9}, 400, "logprobs must be in [0, 5]"),
    ({"model": MODEL, "prompt": [10**6]}, 400, "outside the vocabulary"),
])
def test_a_bad_request_gets_its_4xx_and_the_next_one_succeeds(server, body, status, fragment):
    answer = post(server, "/v1/completions", body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    good = post(server, "/v1/completions", {"model": MODEL, "prompt": "The llama", "max_tokens": 2})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1


def test_bad_chat_messages_get_400(server):
    answer = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
    assert answer.status_code == 400 and "role 'robot' is not one of" in answer.json()["error"]["message"]


def test_without_the_api_key_every_endpoint_but_health_answers_401(server):
    body = {"model": MODEL, "prompt": "The llama", "max_tokens": 2}
    for key in (None, "wrong-key"):
        for answer in (post(server, "/v1/completions", body, key=key),
                       httpx.get(f"{server[1]}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})):
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
            assert "choices" not in answer.text
    assert httpx.get(f"{server[1]}/health").status_code == 200
    models = httpx.get(f"{server[1]}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == [MODEL]


def test_models_retrieve_names_the_served_model_and_404s_any_other(client):
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "llama-jax")
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("gpt-4")
    error = refused.value.response.json()["error"]
    assert error["code"] == "model_not_found" and "'gpt-4' is not served here" in error["message"]


def test_a_developer_message_is_the_system_prompt(client, reference):
    tokenizer = reference[2]
    developer = [{"role": "developer", "content": CHAT[0]["content"]}, CHAT[1]]
    answer = client.chat.completions.create(model=MODEL, messages=developer, max_tokens=1)
    assert answer.usage.prompt_tokens == len(format_chat(tokenizer, CHAT))


def test_a_response_format_the_server_does_not_write_is_refused_not_ignored(server):
    for endpoint, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "hi"})):
        answer = post(server, endpoint, {"model": MODEL, "max_tokens": 1, **body, "response_format": {"type": "yaml"}})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "response_format" and "response_format type 'yaml'" in error["message"]
        text = post(server, endpoint, {"model": MODEL, "max_tokens": 1, **body, "response_format": {"type": "text"}})
        assert text.status_code == 200, text.text


CITY = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Bergen", "Tromsø"]}}, "required": ["city"],
        "additionalProperties": False}


def test_a_json_schema_answer_follows_its_schema_streamed_or_not(client):
    """Over HTTP with the openai client as it is usually called (tests/test_structured.py samples many
    answers and forced tool calls; a tool with parameters leaves this context no room to answer)."""
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    answer = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, response_format=schema_format)
    text = answer.choices[0].message.content
    assert json.loads(text)["city"] in CITY["properties"]["city"]["enum"] and answer.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, stream=True,
                                              response_format=schema_format)
    assert stream_text(streamed) == (text, "stop")


def test_an_oversized_body_gets_413(server):
    answer = post(server, "/v1/completions", {"model": MODEL, "prompt": "llama " * 20000})
    assert answer.status_code == 413 and "over 65536 bytes" in answer.json()["error"]["message"]


def test_a_client_that_drops_a_stream_frees_its_slot(client, server):
    before = health(server)["cancelled"]
    with httpx.stream("POST", f"{server[1]}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": prompt_ids(20, 99), "max_tokens": LONG, "temperature": 0,
                            "stream": True}, timeout=60) as answer:
        lines = answer.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 20
    while health(server)["cancelled"] == before and time.time() < deadline:
        time.sleep(0.05)
    assert health(server)["cancelled"] == before + 1 and health(server)["running"] == 0
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: client.completions.create(model=MODEL, prompt=prompt_ids(4, i), max_tokens=3),
                                range(32)))
    assert all(a.usage.completion_tokens >= 1 for a in answers)


def test_sigterm_during_a_stream_completes_it_and_exits_0(server, reference):
    """Last: it stops the module's server."""
    config, params, tokenizer = reference
    prompt = prompt_ids(20, 99)
    expected = shown(tokenizer, generate(params, tokenizer, [prompt], max_new_tokens=LONG, config=config)[0])
    process, base = server
    text = []
    with httpx.stream("POST", f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": prompt, "max_tokens": LONG, "temperature": 0, "stream": True},
                      timeout=60) as answer:
        for i, line in enumerate(answer.iter_lines()):
            if i == 0:
                process.send_signal(signal.SIGTERM)
            if line.startswith("data: {"):
                text += [c["text"] for c in json.loads(line[6:])["choices"]]
    assert "".join(text) == expected
    assert process.wait(timeout=30) == 0
