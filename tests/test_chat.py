"""Chat formats: ids equal the reference layouts of Llama 2 and Llama 3.x."""

import importlib.resources

import pytest
import sentencepiece as spm
from llama_models.datatypes import BuiltinTool, RawMessage, StopReason
from llama_models.datatypes import ToolCall as MetaToolCall
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from llama_jax.text.chat import encode_conversation, format_chat
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tool_use import CODE_INTERPRETER, ToolCall, parse_call
from llama_jax.text.tokenizer_training import train_bpe, train_sentencepiece

CORPUS = [
    "You are a helpful assistant. Answer briefly and politely.",
    "What is the capital of Norway? Oslo is the capital of Norway.",
    "[INST] <<SYS>> [/INST] <</SYS>> user assistant system ipython",
    "Hvor ligger Tromsø? Tromsø ligger i Nord-Norge. 你好！",
    "def add(a, b):\n    return a + b\n",
] * 30

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of Norway?"},
    {"role": "assistant", "content": "Oslo."},
    {"role": "user", "content": "And where is Tromsø? "},
]
USER = {"role": "user", "content": "a"}


@pytest.fixture(scope="module")
def llama2_path(tmp_path_factory):
    return train_sentencepiece(CORPUS, 400, tmp_path_factory.mktemp("sp") / "tokenizer.model")


@pytest.fixture(scope="module")
def llama2(llama2_path):
    return load_tokenizer(llama2_path)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    return load_tokenizer(train_bpe(CORPUS, 500, path))


def test_llama2_conversation_matches_meta_reference_layout(llama2_path, llama2):
    # Meta's llama/generation.py: each completed exchange is
    # encode(f"{B_INST} {prompt} {E_INST} {answer} ", bos=True, eos=True), the
    # open turn encode(f"{B_INST} {prompt} {E_INST}", bos=True). The pieces are
    # encoded here by SentencePiece itself, framed with <s> = 1 and </s> = 2.
    sp = spm.SentencePieceProcessor(model_file=str(llama2_path))
    expected = (
        [1]
        + sp.encode(
            "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n"
            "What is the capital of Norway? [/INST] Oslo. "
        )
        + [2]
        + [1]
        + sp.encode("[INST] And where is Tromsø? [/INST]")
    )
    assert format_chat(llama2, CONVERSATION) == expected


def test_llama2_conversation_reads_back_as_the_reference_string(llama2):
    text = llama2.decode(format_chat(llama2, CONVERSATION))
    assert text == (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n"
        "What is the capital of Norway? [/INST] Oslo. </s>"
        "<s>[INST] And where is Tromsø? [/INST]"
    )


def test_llama2_without_system_prompt_starts_with_the_user_turn(llama2):
    ids = format_chat(llama2, [{"role": "user", "content": " Hi "}])
    assert ids == llama2.encode("[INST] Hi [/INST]", bos=True)


def test_llama3_conversation_matches_reference_layout(llama3):
    ids = format_chat(llama3, CONVERSATION)
    reference = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of Norway?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nOslo.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd where is Tromsø?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ids == llama3.encode(reference, allow_special=True)
    assert llama3.decode(ids) == reference


def test_llama3_accepts_the_ipython_tool_role(llama3):
    messages = [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "add(2, 3)"},
        {"role": "ipython", "content": " 5\n"},
    ]
    # Llama 3.1's layout, written out; the tool output is stripped like any content.
    reference = (
        "<|begin_of_text|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 3.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nadd(2, 3)<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\n5<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = format_chat(llama3, messages)
    assert ids == llama3.encode(reference, allow_special=True)
    assert llama3.decode(ids) == reference


def test_llama3_chat_ids_equal_metas_chat_format_on_the_real_tokenizer():
    # Meta's ChatFormat (llama-models) encodes content as given; ours strips it,
    # as Meta's first Llama 3 release did, so these contents carry no outer spaces.
    path = importlib.resources.files("llama_models.llama3") / "tokenizer.model"
    with importlib.resources.as_file(path) as path:
        ours, meta = load_tokenizer(path), ChatFormat(MetaTokenizer(path))
    messages = [
        {"role": "system", "content": "You are a helpful assistant.\nAnswer in Norwegian."},
        {"role": "user", "content": "What is 12 * 34? Hvor ligger Tromsø?"},
        {"role": "assistant", "content": "408. Tromsø ligger i Nord-Norge. 🦙"},
        {"role": "ipython", "content": '{"result": 408}'},
        {"role": "user", "content": "Say <|eot_id|> as text, then\n\n\tstop."},
    ]
    raw = [RawMessage(role="tool" if m["role"] == "ipython" else m["role"], content=m["content"],
                      stop_reason=StopReason.end_of_turn if m["role"] == "assistant" else None)
           for m in messages]
    assert format_chat(ours, messages) == meta.encode_dialog_prompt(raw).tokens


def test_special_token_strings_in_messages_stay_text(llama2, llama3):
    sneaky = [{"role": "user", "content": "end here <|eot_id|> </s> <s>"}]
    assert format_chat(llama3, sneaky).count(llama3.token_id("<|eot_id|>")) == 1
    ids = format_chat(llama2, sneaky)
    assert ids.count(llama2.eos_id) == 0 and ids.count(llama2.bos_id) == 1


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "at least one message"),
        ([{"role": "robot", "content": "hi"}], "message 0: role 'robot' is not one of"),
        ([{"role": "user", "content": 3}], "message 0: content must be a string"),
        ([{"role": "ipython", "content": "5"}], "'ipython' is not one of system, user, assistant"),
        ([{"role": "system", "content": "s"}], "system message must be followed by a user message"),
        ([USER, USER], "message 1 is 'user', expected 'assistant'"),
        ([{"role": "assistant", "content": "a"}], "message 0 is 'assistant', expected 'user'"),
        ([USER, {"role": "assistant", "content": "b"}], "last message must be from the user"),
        (CONVERSATION[:1] + CONVERSATION, "message 1 is 'system', expected 'user'"),
        (CONVERSATION[:2] + CONVERSATION[3:], "message 2 is 'user', expected 'assistant'"),
    ],
)
def test_bad_llama2_message_lists_raise_one_line(llama2, messages, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        format_chat(llama2, messages)
    assert "\n" not in str(err.value)


def test_unknown_role_in_llama3_raises(llama3):
    with pytest.raises(ValueError, match="'tool' is not one of system, user, assistant, ipython"):
        format_chat(llama3, [{"role": "tool", "content": "x"}])


def test_stop_ids_end_a_chat_turn(llama2, llama3):
    assert llama3.token_id("<|eot_id|>") in llama3.stop_ids
    assert llama2.stop_ids == {llama2.eos_id}


FINISHED = CONVERSATION[:3] + [{"role": "user", "content": "And where is Tromsø? "},
                               {"role": "assistant", "content": " In Nord-Norge."}]


def test_llama3_training_weights_cover_each_answer_and_its_eot(llama3):
    ids, weights = encode_conversation(llama3, FINISHED)
    header = lambda role: llama3.encode(f"<|start_header_id|>{role}<|end_header_id|>\n\n",  # noqa: E731
                                        allow_special=True)
    eot = [llama3.token_id("<|eot_id|>")]
    given = lambda role, text: header(role) + llama3.encode(text) + eot  # noqa: E731
    oslo, nord = llama3.encode("Oslo."), llama3.encode("In Nord-Norge.")
    expected_ids = ([llama3.bos_id] + given("system", "You are a helpful assistant.")
                    + given("user", "What is the capital of Norway?")
                    + header("assistant") + oslo + eot + given("user", "And where is Tromsø?")
                    + header("assistant") + nord + eot)
    expected_weights = ([0] * (1 + len(given("system", "You are a helpful assistant."))
                               + len(given("user", "What is the capital of Norway?")) + len(header("assistant")))
                        + [1] * (len(oslo) + 1)
                        + [0] * (len(given("user", "And where is Tromsø?")) + len(header("assistant")))
                        + [1] * (len(nord) + 1))
    assert ids == expected_ids
    assert weights == expected_weights
    assert llama3.decode([i for i, w in zip(ids, weights) if w]) == "Oslo.<|eot_id|>In Nord-Norge.<|eot_id|>"


def test_llama2_training_weights_cover_each_answer_and_its_eos(llama2_path, llama2):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_path))
    first_q = sp.encode("[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n"
                        "What is the capital of Norway? [/INST]")
    first = sp.encode("[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n"
                      "What is the capital of Norway? [/INST] Oslo. ")
    second_q = sp.encode("[INST] And where is Tromsø? [/INST]")
    second = sp.encode("[INST] And where is Tromsø? [/INST] In Nord-Norge. ")
    assert first[:len(first_q)] == first_q and second[:len(second_q)] == second_q
    ids, weights = encode_conversation(llama2, FINISHED)
    assert ids == [1] + first + [2] + [1] + second + [2]
    assert weights == ([0] * (1 + len(first_q)) + [1] * (len(first) - len(first_q) + 1)
                       + [0] * (1 + len(second_q)) + [1] * (len(second) - len(second_q) + 1))
    assert llama2.decode([i for i, w in zip(ids, weights) if w]) == "Oslo. </s>In Nord-Norge. </s>"  # SentencePiece drops a leading space


@pytest.mark.parametrize("generation", ["llama2", "llama3"])
def test_a_training_conversation_must_end_with_the_answer(generation, llama2, llama3):
    tokenizer = llama2 if generation == "llama2" else llama3
    with pytest.raises(ValueError, match="the last message must be the assistant's answer, got 'user'"):
        encode_conversation(tokenizer, CONVERSATION)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# Llama 3.1 Instruct's chat template with tools (tools in the first user turn), rendered by hand.
TOOLS_SYSTEM = ("<|start_header_id|>system<|end_header_id|>\n\n"
                "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
TOOLS_USER = (
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
    "{\n"
    '    "type": "function",\n'
    '    "function": {\n'
    '        "name": "get_weather",\n'
    '        "description": "The weather in a city",\n'
    '        "parameters": {\n'
    '            "type": "object",\n'
    '            "properties": {\n'
    '                "city": {\n'
    '                    "type": "string"\n'
    "                }\n"
    "            },\n"
    '            "required": [\n'
    '                "city"\n'
    "            ]\n"
    "        }\n"
    "    }\n"
    "}\n\n"
    "What is the weather in Oslo?<|eot_id|>")
ASK = {"role": "user", "content": " What is the weather in Oslo? "}


def test_llama31_tools_are_offered_as_its_chat_template_does(llama3):
    messages = [{"role": "system", "content": "You are a helpful assistant. "}, ASK]
    reference = ("<|begin_of_text|>" + TOOLS_SYSTEM + "You are a helpful assistant.<|eot_id|>" + TOOLS_USER
                 + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = format_chat(llama3, messages, tools=[WEATHER], date="26 Jul 2024")
    assert llama3.decode(ids) == reference
    assert ids == llama3.encode(reference, allow_special=True)


def test_llama31_tool_calls_and_results_follow_the_template_without_a_system_message(llama3):
    messages = [ASK, {"role": "assistant", "content": None, "tool_calls": [ToolCall("get_weather", {"city": "Oslo"})]},
                {"role": "ipython", "content": '{"temperature": 7}'}]
    reference = ("<|begin_of_text|>" + TOOLS_SYSTEM + "<|eot_id|>" + TOOLS_USER
                 + '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
                 '"parameters": {"city": "Oslo"}}<|eot_id|>'
                 '<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 7}<|eot_id|>'
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = format_chat(llama3, messages, tools=[WEATHER], date="26 Jul 2024")
    assert llama3.decode(ids) == reference
    assert ids == llama3.encode(reference, allow_special=True)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "system", "content": "s"}], "with tools, the first message after the system prompt must be the user's"),
    ([{"role": "assistant", "content": "a"}, ASK], "with tools, the first message after the system prompt"),
    ([ASK, {"role": "assistant", "tool_calls": [ToolCall("f", {})] * 2}], "message 1: Llama 3.1 makes one tool call"),
    ([ASK, {"role": "user", "content": "x", "tool_calls": [ToolCall("f", {})]}],
     "message 1: only a Llama 3.1 assistant message has tool_calls"),
])
def test_bad_tool_conversations_raise_one_line(llama3, messages, message):
    with pytest.raises(ValueError, match=message):
        format_chat(llama3, messages, tools=[WEATHER])


@pytest.fixture(scope="module")
def real_llama3():
    """(our tokenizer, Meta's ChatFormat) over the real Llama 3 tokenizer."""
    path = importlib.resources.files("llama_models.llama3") / "tokenizer.model"
    with importlib.resources.as_file(path) as path:
        return load_tokenizer(path), ChatFormat(MetaTokenizer(path))


def test_a_code_interpreter_call_is_encoded_as_metas_chat_format_does(real_llama3):
    ours, meta = real_llama3
    code = "def is_prime(n):\n    return n > 1 and all(n % k for k in range(2, n))\n\nprint(is_prime(7))"
    messages = [{"role": "system", "content": "Environment: ipython"},
                {"role": "user", "content": "Is 7 prime? Use code."},
                {"role": "assistant", "content": "", "tool_calls": [ToolCall(CODE_INTERPRETER, {"code": code})]},
                {"role": "ipython", "content": "True"}]
    raw = [RawMessage(role="system", content="Environment: ipython"),
           RawMessage(role="user", content="Is 7 prime? Use code."),
           RawMessage(role="assistant", content="", stop_reason=StopReason.end_of_message,
                      tool_calls=[MetaToolCall(call_id="1", tool_name=BuiltinTool.code_interpreter,
                                               arguments={"code": code})]),
           RawMessage(role="tool", content="True")]
    assert format_chat(ours, messages) == meta.encode_dialog_prompt(raw).tokens


NAMES = {"get_weather"}


@pytest.mark.parametrize("reply", [
    '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}',
    ' <|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Tromsø"}}',
    "<|python_tag|>import math\nprint(math.pi)",
    "It is sunny in Oslo.",
    '{"name": "get_weather", "parameters": {"city": "Oslo"}',  # cut short: not JSON
])
def test_a_reply_reads_as_the_call_metas_decoder_finds(real_llama3, reply):
    meta = real_llama3[1].decode_assistant_message_from_content(reply, StopReason.end_of_turn)
    expected = [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in meta.tool_calls]
    call = parse_call(reply, NAMES)
    assert ([] if call is None else [(call.name, call.arguments)]) == expected


@pytest.mark.parametrize("reply", [
    '{"name": "get_time", "parameters": {}}',  # a function not offered
    '{"name": "get_weather", "parameters": "Oslo"}',  # parameters not an object
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}',  # not Llama 3.1's key
    '{"type": "tool", "name": "get_weather", "parameters": {}}',
    '[{"name": "get_weather", "parameters": {}}]',
    '<|python_tag|>{"name": "get_weather"',
    "<|python_tag|>",
    'The call is {"name": "get_weather", "parameters": {}}',
])
def test_a_malformed_or_unknown_call_is_plain_text(reply):
    assert parse_call(reply, NAMES) is None
