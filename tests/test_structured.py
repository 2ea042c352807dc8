"""Structured outputs: answers decoded under a JSON schema's grammar (llama_jax.text.grammar), with
the mask applied on the device inside the decode step (llama_jax.decoding.sampling).

A random tiny model at temperature 1 writes whatever its mask allows, so every answer below is
the grammar's doing: all must parse, validate with `jsonschema`, or parse into a forced call. The
server's app (`infer.app.create_app`) runs in this process over one started batcher, driven by
the official `openai` client through httpx's ASGI transport.
"""

import asyncio
import json
import threading

import httpx
import jax
import jsonschema
import llguidance.numpy
import numpy as np
import openai
import pytest

from infer.app import Service, create_app
from infer.batcher import Batcher
from infer.requests import Request
from infer.engine import Engine
from infer.events import Finished, Token
from llama_jax.arith import round_up
from llama_jax.config import ModelConfig
from llama_jax.decoding.sampling import Sampling, bitmask_words, mask_logits
from llama_jax.params import init_params
from llama_jax.text.grammar import GrammarVocabulary, json_grammar
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tokenizer_training import train_bpe
from llama_jax.text.tool_use import ToolCall, call_schema, call_text

MODEL = "tiny-structured"
CONTEXT = 2048  # room for a random model's long strings (every sampled answer below ends well inside it)
SLOTS = 16
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "tags", "owner"],
          "properties": {
              "name": {"type": "string", "maxLength": 12},
              "kind": {"enum": ["cat", "dog", "llama"]},
              "age": {"type": "integer", "minimum": 0, "maximum": 30},
              "tags": {"type": "array", "items": {"enum": ["soft", "tall", 7, None]}, "minItems": 1, "maxItems": 3},
              "owner": {"type": "object", "additionalProperties": False, "required": ["city"],
                        "properties": {"city": {"type": "string", "maxLength": 8},
                                       "verified": {"type": "boolean"}}}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}}]
CHAT = [{"role": "user", "content": "Describe a llama as JSON."}]
# Merges of JSON's punctuation end a random model's strings sooner than byte tokens alone would.
CORPUS = ['{"name": "Oslo", "tags": ["soft", "tall"], "age": 7, "ok": true, "owner": null}',
          "The llama is a domesticated South American camelid."] * 30


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_bpe(CORPUS, 400, path)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def config(tokenizer):
    # The model's table padded past the tokenizer's ids (and even, for the tensor axis): never allowed.
    return ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                       vocab_size=round_up(tokenizer.vocab_size + 40, 8), max_seq_len=CONTEXT)


def started(config, tokenizer, layout=None) -> Batcher:
    engine = Engine(config, layout)
    params = engine.place_params(init_params(config, jax.random.key(0)))
    batcher = Batcher(engine, params, SLOTS, CONTEXT, tokenizer.stop_ids, steps_per_call=4)
    batcher.start()
    return batcher


@pytest.fixture(scope="module")
def batcher(config, tokenizer):
    batcher = started(config, tokenizer)
    yield batcher
    batcher.stop()


@pytest.fixture(scope="module")
def vocabulary(tokenizer, config):
    return GrammarVocabulary(tokenizer, config.vocab_size)


@pytest.fixture(scope="module")
def app(batcher, tokenizer, config, vocabulary):
    service = Service(batcher, tokenizer, MODEL, CONTEXT, None, 1 << 20, 4096, vocab_size=config.vocab_size)
    service.grammar_vocabulary = vocabulary
    return create_app(service)


def ask(app, bodies: list[dict], endpoint: str = "chat") -> list:
    """The openai client's answers to these requests, sent at once (so they share decode calls)."""
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", http_client=http, max_retries=0)
            create = client.chat.completions.create if endpoint == "chat" else client.completions.create
            return await asyncio.gather(*(create(model=MODEL, **body) for body in bodies))
    return asyncio.run(main())


def sampled(count: int, max_tokens: int = 1500, **body) -> list[dict]:
    """Requests for `count` answers at temperature 1, 8 choices each, each with its own seed."""
    return [{"n": 8, "temperature": 1.0, "seed": 100 * i, "max_tokens": max_tokens, **body}
            for i in range(count // 8)]


def test_a_bitmask_masks_logits_as_the_grammar_librarys_own_numpy_kernel_does():
    rng = np.random.default_rng(0)
    vocab = 200
    bits = rng.integers(-2 ** 31, 2 ** 31, (3, bitmask_words(vocab)), dtype=np.int64).astype(np.int32)
    bits[2] = -1  # a free row
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    expected = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, bits)
    masked = np.asarray(mask_logits(logits, bits))
    np.testing.assert_array_equal(masked, expected)
    np.testing.assert_array_equal(masked[2], logits[2])  # every bit set: the logits exactly


def test_200_sampled_json_object_answers_all_parse(app):
    answers = ask(app, sampled(200, messages=CHAT, response_format={"type": "json_object"}))
    texts = [choice.message.content for answer in answers for choice in answer.choices]
    assert len(texts) == 200 and len(set(texts)) > 150  # sampled, not one answer repeated
    assert all(isinstance(json.loads(text), dict) for text in texts)
    assert {choice.finish_reason for answer in answers for choice in answer.choices} == {"stop"}


def test_200_sampled_json_schema_answers_all_validate(app):
    schema_format = {"type": "json_schema", "json_schema": {"name": "llama", "schema": SCHEMA, "strict": True}}
    answers = ask(app, sampled(192, messages=CHAT, response_format=schema_format))
    texts = [choice.message.content for answer in answers for choice in answer.choices]
    # The completions endpoint takes response_format too (the client sends it as an extra field).
    completions = ask(app, sampled(8, prompt="A llama:", extra_body={"response_format": schema_format}), "completions")
    texts += [choice.text for answer in completions for choice in answer.choices]
    assert len(texts) == 200 and len(set(texts)) > 150
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    kinds = {json.loads(text)["kind"] for text in texts}
    assert kinds == {"cat", "dog", "llama"}  # the enum's values, all drawn


def test_forced_tool_calls_all_parse_into_their_functions_schema(app):
    # Llama 3.1's tool-use prompt is long in this tokenizer's tokens (about 1,300).
    required = ask(app, sampled(48, 400, messages=CHAT, tools=TOOLS, tool_choice="required"))
    named = ask(app, sampled(8, 400, messages=CHAT, tools=TOOLS,
                             tool_choice={"type": "function", "function": {"name": "add"}}))
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    called = []
    for answers, names in ((required, {"get_weather", "add"}), (named, {"add"})):
        for choice in (choice for answer in answers for choice in answer.choices):
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            call, = choice.message.tool_calls
            assert call.function.name in names
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            called.append(call.function.name)
    assert len(called) == 56 and set(called) == {"get_weather", "add"}


def test_the_forced_call_schema_admits_the_calls_llama_31_writes_and_no_others():
    schema = call_schema([tool["function"] for tool in TOOLS])
    jsonschema.validate(json.loads(call_text(ToolCall("add", {"a": 1, "b": -2}))), schema)
    for wrong in ({"name": "add", "parameters": {"a": 1}}, {"name": "sub", "parameters": {"a": 1, "b": 2}},
                  {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "K"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


@pytest.mark.parametrize("schema, problem", [
    ({"type": "strng"}, "Invalid type: strng"),
    ({"type": "string", "pattern": "(unclosed"}, "unclosed group"),  # the library's message is three lines
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
])
def test_a_schema_the_library_cannot_compile_is_a_400_naming_its_problem_in_one_line(app, schema, problem):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(app, [{"messages": CHAT, "max_tokens": 4,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}])
    error = refused.value.body
    assert refused.value.status_code == 400 and error["param"] == "response_format"
    assert problem in error["message"] and "\n" not in error["message"] and len(error["message"]) < 300
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    with pytest.raises(openai.BadRequestError) as refused:
        ask(app, [{"messages": CHAT, "max_tokens": 4, "tools": bad_tool, "tool_choice": "required"}])
    error = refused.value.body  # the problem as the library sees it inside the call's schema
    assert error["param"] == "tools" and "tools: the schema cannot be compiled: " in error["message"]
    assert "\n" not in error["message"]


class Recorder:
    def __init__(self):
        self.tokens, self.reason, self.done, self.started = [], None, threading.Event(), threading.Event()

    def __call__(self, event):
        if isinstance(event, Token):
            self.tokens.append(event.id)
            self.started.set()
        elif isinstance(event, Finished):
            self.reason = event.reason
            self.done.set()


def submit(batcher, prompt, max_tokens, sampling=Sampling(), seed=0, grammar=None) -> Recorder:
    recorder = Recorder()
    batcher.submit(Request(prompt, max_tokens, sampling, seed, recorder, grammar=grammar))
    return recorder


def test_a_free_row_beside_constrained_ones_decodes_as_it_does_alone(batcher, tokenizer, vocabulary):
    prompt = tokenizer.encode("The llama is", bos=True)
    alone = submit(batcher, prompt, 24)
    assert alone.done.wait(120)
    # A 200-character string takes the constrained rows past the free row's 24 tokens: every decode
    # call of the free row is the masked one-step program, its own mask all bits set.
    long_string = json_grammar({"type": "string", "minLength": 200, "maxLength": 200}, vocabulary)
    constrained = [submit(batcher, prompt, 400, Sampling(1.0), seed, long_string) for seed in range(3)]
    assert all(c.started.wait(120) for c in constrained)
    beside = submit(batcher, prompt, 24)
    assert beside.done.wait(120) and not any(c.done.is_set() for c in constrained)
    assert beside.tokens == alone.tokens and beside.reason == alone.reason
    for c in constrained:
        assert c.done.wait(120) and c.reason == "stop"
        assert len(json.loads(tokenizer.decode(c.tokens[:-1]))) == 200


def test_constrained_greedy_answers_on_fsdp_tp_equal_one_device(batcher, config, tokenizer, vocabulary):
    grammar = json_grammar(SCHEMA, vocabulary)
    prompts = [tokenizer.encode(text, bos=True) for text in ("A llama", "Oslo", "The owner is")]

    def answers(on):
        recorders = [submit(on, p, 200, grammar=grammar) for p in prompts]
        assert all(r.done.wait(300) for r in recorders)
        return [(r.tokens, r.reason) for r in recorders]

    sharded = started(config, tokenizer, "fsdp_tp")  # batch over 4 fsdp shards, heads and vocab over 2
    try:
        assert sharded.engine.placement.mesh.devices.size == 8
        on_eight = answers(sharded)
    finally:
        sharded.stop()
    assert on_eight == answers(batcher)
    for tokens, reason in on_eight:
        assert reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode(tokens[:-1])), SCHEMA)
