"""Chat formats: ids equal the reference layouts of Llama 2 and Llama 3.x."""

import importlib.resources

import pytest
import sentencepiece as spm
from llama_models.datatypes import RawMessage, StopReason
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from llama_jax.chat import encode_conversation, format_chat
from llama_jax.tokenizer import load_tokenizer
from llama_jax.tokenizer_training import train_bpe, train_sentencepiece

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
