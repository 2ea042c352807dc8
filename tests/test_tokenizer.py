"""Tokenizers: round trips, special tokens, file detection, streaming.

Tokenizers are trained or built inside the test session from a tiny corpus,
except Meta's real Llama 3 tokenizer.model, which the `llama-models` package
(a test dependency) ships with Meta's own Tokenizer: nothing is downloaded.
"""

import base64
import importlib.resources
import json
import sysconfig
from pathlib import Path

import pytest
import tokenizers
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llama_jax.text.stream_decoder import StreamDecoder
from llama_jax.text.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    _split_long_text,
    llama3_special_tokens,
    load_tokenizer,
)
from llama_jax.text.tokenizer_training import (
    byte_level_bpe,
    train_bpe,
    train_sentencepiece,
    write_tiktoken_ranks,
)

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "french": "Où est la bibliothèque ? Ça coûte 12,50 € — très cher, n'est-ce pas ?",
    "norwegian": "Blåbærsyltetøy på brødskiva, sa Ærlige Øystein i Ålesund.",
    "chinese": "我们今天去公园散步，天气非常好。",
    "emoji": "Llamas 🦙 love 🌍 and 👩‍💻 family emoji 👨‍👩‍👧!",
    "code": (
        'def f(x):\n    """Doc."""\n    return {"a": [x ** 2, x // 3]}  # ok\n'
        "\n\tif x != 0:\n        pass\n"
    ),
    "whitespace": "  leading spaces\n\n\ntrailing \t \r\n",
}
CORPUS = [text for text in SAMPLES.values()] * 20 + [
    "Hello world, this is a small corpus for training a tiny tokenizer.",
    "import os\nfor name in os.listdir('.'):\n    print(name)\n",
] * 20

N_LLAMA3_RANKS = 128_000


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    train_sentencepiece(CORPUS, 400, path)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def llama3_model_file(tmp_path_factory):
    """A tiktoken rank file with exactly Llama 3's 128000 regular ranks:
    a small trained BPE padded with tokens no UTF-8 text can reach."""
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    train_bpe(CORPUS, 600, path)
    lines = path.read_text().splitlines()
    # 0xFF never occurs in UTF-8, so these pad tokens never match real text.
    pads = (b"\xff" + i.to_bytes(3, "big") for i in range(N_LLAMA3_RANKS - len(lines)))
    for rank, tok in enumerate(pads, len(lines)):
        lines.append(f"{base64.b64encode(tok).decode()} {rank}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tt_tokenizer(llama3_model_file):
    return load_tokenizer(llama3_model_file)


def _hf_tokenizer_json(path, specials):
    """Train a tiny byte-level BPE with the `tokenizers` library, save tokenizer.json."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(specials)  # after the regular ids, as in Llama's files
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    _hf_tokenizer_json(directory / "tokenizer.json", llama3_special_tokens())
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    return load_tokenizer(hf_dir)


@pytest.fixture(params=["sentencepiece", "tiktoken", "hf"])
def any_tokenizer(request):
    fixture = {"sentencepiece": "sp_tokenizer", "tiktoken": "tt_tokenizer", "hf": "hf_tokenizer"}
    return request.getfixturevalue(fixture[request.param])


# A special-token string each generation knows, for the "stays text" tests.
def _special_string(tok):
    return "<|eot_id|>" if tok.generation == "llama3" else "</s>"


# --- round trips -------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_text_round_trips_through_every_tokenizer(any_tokenizer, name):
    text = SAMPLES[name]
    ids = any_tokenizer.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert any_tokenizer.decode(ids) == text


def test_all_samples_joined_round_trip_with_bos_and_eos(any_tokenizer):
    text = "\n".join(SAMPLES.values())
    ids = any_tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == any_tokenizer.bos_id and ids[-1] == any_tokenizer.eos_id
    assert any_tokenizer.decode(ids[1:-1]) == text


def test_trained_bpe_compresses_text(tt_tokenizer):
    text = SAMPLES["english"]
    assert len(tt_tokenizer.encode(text)) < len(text.encode()) / 2


def test_train_bpe_writes_exactly_vocab_size_contiguous_ranks(tmp_path):
    path = train_bpe(CORPUS, 300, tmp_path / "small.model")
    lines = path.read_text().splitlines()
    assert len(lines) == 300
    assert [int(line.split()[1]) for line in lines] == list(range(300))
    byte_tokens = [base64.b64decode(line.split()[0]) for line in lines[:256]]
    assert byte_tokens == [bytes([b]) for b in range(256)]
    assert load_tokenizer(path).vocab_size == 300 + 256


def test_trained_ranks_replay_the_tokenizers_librarys_merges(tmp_path):
    # Real source text (as the demo trains on), where merge order matters: a
    # rank file ordered by token length instead of merge order fails here.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "argparse.py")]
    trained = byte_level_bpe(texts + CORPUS, 1000)
    path = write_tiktoken_ranks(trained, tmp_path / "tokenizer.model")
    ours = load_tokenizer(path)
    assert ours.vocab_size == 1000 + 256
    token_bytes = [base64.b64decode(line.split()[0]) for line in path.read_text().splitlines()]
    # The library's byte-level pre-tokenizer spells a text one character per
    # byte; cut that spelling at our tokens' byte lengths to get our tokens in
    # the library's alphabet, independently of our byte table.
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in [texts[0], *SAMPLES.values(), "Unseen: Ærlige 🦙 words 12345\n\n"]:
        [(spelt, _)] = spell.pre_tokenize_str(text)
        ids = ours.encode(text)
        lengths = [len(token_bytes[i]) for i in ids]
        starts = [sum(lengths[:k]) for k in range(len(lengths))]
        assert [spelt[a : a + n] for a, n in zip(starts, lengths)] == trained.encode(text).tokens
        assert ours.decode(ids) == text


def test_very_long_runs_are_cut_like_meta_before_encoding(tt_tokenizer):
    assert [len(p) for p in _split_long_text("x" * 60_000)] == [25_000, 25_000, 10_000]
    assert [len(p) for p in _split_long_text("ab " * 300_000)] == [400_000, 400_000, 100_000]
    mixed = "a" * 30_000 + " " * 26_000 + "b"
    assert "".join(_split_long_text(mixed)) == mixed
    run = "a" * 60_000
    enc = tt_tokenizer.encode
    assert enc(run) == enc("a" * 25_000) * 2 + enc("a" * 10_000)
    assert tt_tokenizer.decode(enc(mixed)) == mixed


# --- special tokens ------------------------------------------------------------


def test_llama3_special_tokens_have_reference_ids(tt_tokenizer):
    tok = tt_tokenizer
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|step_id|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|image|>": 128011,
        "<|reserved_special_token_2|>": 128012,
        "<|reserved_special_token_245|>": 128255,
    }
    assert {piece: tok.token_id(piece) for piece in expected} == expected
    with pytest.raises(ValueError, match="not a special token"):
        tok.token_id("<|reserved_special_token_246|>")
    assert tok.vocab_size == 128256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert tok.stop_ids == frozenset({128001, 128008, 128009})
    assert tok.generation == "llama3"
    assert len(llama3_special_tokens()) == 256


def test_llama2_special_tokens_match_reference(sp_tokenizer):
    tok = sp_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert (tok.token_id("<s>"), tok.token_id("</s>")) == (1, 2)
    assert tok.stop_ids == frozenset({2})
    assert tok.generation == "llama2"
    assert tok.vocab_size == 400


def test_unknown_special_token_name_raises(any_tokenizer):
    with pytest.raises(ValueError, match="not a"):
        any_tokenizer.token_id("<|no_such_token|>")


def test_special_token_strings_in_text_stay_plain_text(any_tokenizer):
    special = _special_string(any_tokenizer)
    text = f"say {special} then more"
    ids = any_tokenizer.encode(text)
    assert any_tokenizer.token_id(special) not in ids
    assert any_tokenizer.decode(ids) == text


def test_special_token_strings_become_ids_when_allowed(any_tokenizer):
    special = _special_string(any_tokenizer)
    ids = any_tokenizer.encode(f"say {special} then", allow_special=True)
    assert ids.count(any_tokenizer.token_id(special)) == 1


def test_decode_writes_special_tokens_as_their_strings(any_tokenizer):
    tok = any_tokenizer
    text = tok.decode(tok.encode("hi", bos=True, eos=True))
    llama3 = tok.generation == "llama3"
    bos, eos = ("<|begin_of_text|>", "<|end_of_text|>") if llama3 else ("<s>", "</s>")
    assert text.startswith(bos) and text.endswith(eos) and "hi" in text


def test_decode_rejects_ids_outside_the_vocabulary(any_tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        any_tokenizer.decode([0, any_tokenizer.vocab_size])



def test_special_ids_are_the_control_tokens_and_no_text_token(any_tokenizer):
    tok = any_tokenizer
    special = _special_string(tok)
    assert {tok.bos_id, tok.eos_id, tok.token_id(special)} <= tok.special_ids
    assert not tok.special_ids & set(tok.encode(SAMPLES["english"] + special))  # as plain text

SNOWMAN = "snow ☃ costs 12,50 €"  # ☃ is in no training text: byte tokens, or SentencePiece's byte pieces


def test_token_bytes_are_each_tokens_own_bytes_even_for_part_of_a_character(any_tokenizer):
    tok = any_tokenizer
    pieces = [tok.token_bytes(i) for i in tok.encode(SNOWMAN)]
    # SentencePiece's word mark before the first word is a space the decoded text drops.
    assert b"".join(pieces).decode().lstrip(" ") == SNOWMAN
    assert [p for p in pieces if len(p) == 1 and p[0] >= 0x80], "expected ☃ split into single bytes"
    assert all(p != "\ufffd".encode() for p in pieces)  # not U+FFFD's bytes, as decoding one id gives
    special = _special_string(tok)
    assert tok.token_bytes(tok.token_id(special)) == special.encode()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token_bytes(tok.vocab_size)


# --- Hugging Face tokenizer.json ------------------------------------------------


def test_hf_llama3_tokenizer_reads_specials_from_added_tokens(hf_tokenizer):
    tok = hf_tokenizer
    assert isinstance(tok, HFTokenizer) and tok.generation == "llama3"
    assert tok.bos_id == tok.token_id("<|begin_of_text|>")
    assert tok.eos_id == tok.token_id("<|end_of_text|>")
    stops = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
    assert tok.stop_ids == {tok.token_id(s) for s in stops}
    assert tok.pad_id is None


# Hugging Face's Llama 3.1 tokenizer.json names, written out: 128005 and 128011
# are reserved_2 and reserved_3 there, where Meta has <|step_id|> and <|image|>.
HF_LLAMA31_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]


def test_hf_llama31_names_and_meta_names_reach_the_same_ids(tmp_path):
    assert len(HF_LLAMA31_SPECIALS) == 256
    tok = load_tokenizer(_hf_tokenizer_json(tmp_path / "tokenizer.json", HF_LLAMA31_SPECIALS))
    base = tok.bos_id
    assert tok.token_id("<|step_id|>") == tok.token_id("<|reserved_special_token_2|>") == base + 5
    assert tok.token_id("<|image|>") == tok.token_id("<|reserved_special_token_3|>") == base + 11
    # A reserved name keeps the file's own meaning (Meta's reserved_5 would be base + 15).
    assert tok.token_id("<|reserved_special_token_5|>") == base + 13
    assert tok.token_id("<|eot_id|>") == base + 9 and tok.stop_ids == {base + 1, base + 8, base + 9}


def test_hf_file_with_meta_names_keeps_them(hf_tokenizer):
    base = hf_tokenizer.bos_id
    assert hf_tokenizer.token_id("<|image|>") == base + 11
    assert hf_tokenizer.token_id("<|reserved_special_token_2|>") == base + 12


def test_hf_tokenizer_config_sets_bos_eos_and_pad(tmp_path):
    _hf_tokenizer_json(tmp_path / "tokenizer.json", llama3_special_tokens())
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|eot_id|>"},  # older files store AddedToken dicts
        "pad_token": "<|finetune_right_pad_id|>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_id == tok.token_id("<|eot_id|>")
    assert tok.pad_id == tok.token_id("<|finetune_right_pad_id|>")
    assert tok.token_id("<|end_of_text|>") in tok.stop_ids


def test_hf_tokenizer_with_s_tokens_is_llama2(tmp_path):
    _hf_tokenizer_json(tmp_path / "tokenizer.json", ["<unk>", "<s>", "</s>"])
    tok = load_tokenizer(tmp_path)
    assert tok.generation == "llama2"
    assert (tok.bos_id, tok.eos_id) == (tok.token_id("<s>"), tok.token_id("</s>"))
    assert tok.stop_ids == {tok.eos_id}


# --- detection and errors ------------------------------------------------------------


def test_load_tokenizer_detects_each_format(sp_tokenizer, llama3_model_file, hf_dir, tmp_path):
    assert isinstance(sp_tokenizer, SentencePieceTokenizer)
    assert isinstance(load_tokenizer(llama3_model_file), TiktokenTokenizer)
    assert isinstance(load_tokenizer(llama3_model_file.parent), TiktokenTokenizer)
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(hf_dir / "tokenizer.json"), HFTokenizer)
    # Hugging Face repos ship both files; tokenizer.json wins.
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (both / "tokenizer.model").write_bytes(llama3_model_file.read_bytes())
    assert isinstance(load_tokenizer(both), HFTokenizer)


def test_missing_file_raises_value_error_naming_it(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(ValueError, match=r"nope\.model: tokenizer file not found"):
        load_tokenizer(missing)


def test_directory_without_tokenizer_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="holds no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("data, reason", [
    (b"", "the file holds no tokens"),
    (b" \n\n", "the file holds no tokens"),
    (b"\x00\x01garbage that is neither format\n", "not a SentencePiece model; line 1 is not a tiktoken"),
    (b"\x0a\x05hello", "not a SentencePiece model; line 2 is not a tiktoken"),  # a truncated model proto
])
def test_empty_or_corrupt_model_file_raises_one_line_and_logs_nothing(tmp_path, capfd, data, reason):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(data)
    with pytest.raises(ValueError) as err:
        load_tokenizer(bad)
    assert str(err.value).startswith(f"{bad}: empty or corrupt tokenizer (")
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert capfd.readouterr().err == ""  # SentencePiece's C++ logs go straight to fd 2


def test_rank_file_missing_byte_tokens_is_rejected(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("YQ== 0\nYg== 1\n")
    with pytest.raises(ValueError, match="no token for byte 0x00"):
        load_tokenizer(bad)


def test_corrupt_tokenizer_json_raises_value_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a Hugging Face tokenizer\.json"):
        load_tokenizer(bad)


# --- streaming ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["english", "code", "norwegian", "chinese", "emoji"])
def test_stream_decoder_yields_the_same_text_as_decode(any_tokenizer, name):
    ids = any_tokenizer.encode(SAMPLES[name], bos=True)
    stream = StreamDecoder(any_tokenizer)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == any_tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_a_character_split_across_tokens(tt_tokenizer):
    ids = tt_tokenizer.encode("🦙")
    assert len(ids) > 1  # the tiny BPE has no token for the llama: its bytes are split
    stream = StreamDecoder(tt_tokenizer)
    assert [stream.feed(i) for i in ids] == [""] * (len(ids) - 1) + ["🦙"]


def test_stream_decoder_flush_returns_incomplete_bytes_as_replacement(tt_tokenizer):
    stream = StreamDecoder(tt_tokenizer)
    assert stream.feed(tt_tokenizer.encode("🦙")[0]) == ""
    assert stream.flush() == "\ufffd"


# --- Meta's real Llama 3 tokenizer (the llama-models package) ----------------

META_TEXTS = [
    *SAMPLES.values(),
    "Привет, мир! Ελληνικά κείμενα. مرحبا بالعالم. नमस्ते दुनिया. こんにちは、世界。 안녕하세요",
    "Digits 1234567890, 3.14159, 2024-11-30, 1,000,000 and ١٢٣ or ١٢٣٤.",
    "I'm sure they'LL say WE'VE done it; don't you'd think? It'S fine.",
    "\t\t  \n\n\n   x    \r\n\r\n  y\u00a0z\u3000w  \n",
    "<|begin_of_text|>text <|eot_id|> with <|image|> special <|reserved_special_token_7|> strings",
    "a" * 30_000 + " " * 30_000 + "b",
]


@pytest.fixture(scope="module")
def meta_tokenizer_path():
    with importlib.resources.as_file(
        importlib.resources.files("llama_models.llama3") / "tokenizer.model"
    ) as path:
        yield path


@pytest.fixture(scope="module")
def meta_pair(meta_tokenizer_path):
    """(ours, Meta's) on Meta's real Llama 3 tokenizer.model."""
    return load_tokenizer(meta_tokenizer_path), MetaTokenizer(meta_tokenizer_path)


@pytest.mark.parametrize("index", range(len(META_TEXTS)))
def test_real_llama3_tokenizer_encodes_like_meta(meta_pair, index):
    ours, meta = meta_pair
    text = META_TEXTS[index]
    ids = ours.encode(text, bos=True, eos=True)
    assert ids == meta.encode(text, bos=True, eos=True)
    assert ours.encode(text, allow_special=True) == meta.encode(
        text, bos=False, eos=False, allowed_special="all"
    )
    assert ours.decode(ids) == meta.decode(ids)


def test_real_llama3_tokenizer_ids_and_special_tokens_match_meta(meta_pair):
    ours, meta = meta_pair
    assert isinstance(ours, TiktokenTokenizer) and ours.vocab_size == meta.n_words == 128256
    assert ours.encode("Hello world") == [9906, 1917]
    assert {name: ours.token_id(name) for name in meta.special_tokens} == meta.special_tokens
    assert llama3_special_tokens() == list(meta.special_tokens)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (meta.bos_id, meta.eos_id, meta.pad_id)
    assert ours.stop_ids == set(meta.stop_tokens)
    ids = ours.encode("Llamas 🦙 cost 12,50 € <|eot_id|>", allow_special=True)
    assert [ours.token_bytes(i) for i in ids] == [meta.model.decode_single_token_bytes(i) for i in ids]


def test_tokenizer_command_trains_a_loadable_tokenizer_and_bad_input_is_one_line(tmp_path, capsys):
    from train.tokenizer import main

    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    output = tmp_path / "out" / "tok.model"
    assert main(["--input", str(tmp_path / "*.txt"), "--vocab-size", "300", "--output", str(output)]) == 0
    tokenizer = load_tokenizer(output)
    assert tokenizer.decode(tokenizer.encode("the lazy fox")) == "the lazy fox"
    capsys.readouterr()
    bad = tmp_path / "out" / "bad.model"
    assert main(["--input", str(tmp_path / "*.txt"), "--vocab-size", "100", "--output", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == "tokenizer: error: --vocab-size 100 is below the 256 byte tokens\n"
    assert sorted(p.name for p in output.parent.iterdir()) == ["tok.model"]  # nothing half-written


def test_tokenizer_command_refuses_an_existing_output_and_empty_input(tmp_path, capsys):
    """An existing --output stays as it was unless --overwrite; inputs without text are an error,
    not a tokenizer of the 256 byte tokens alone."""
    from train.tokenizer import main

    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    (tmp_path / "empty.txt").write_text(" \n\n")
    output = tmp_path / "out" / "tok.model"
    output.parent.mkdir()
    output.write_bytes(b"kept")
    assert main(["--input", str(tmp_path / "a.txt"), "--vocab-size", "300", "--output", str(output)]) == 2
    assert capsys.readouterr().err == (f"tokenizer: error: {output}: already exists; choose another --output "
                                       "or pass --overwrite\n")
    assert output.read_bytes() == b"kept"
    empty = tmp_path / "out" / "empty.model"
    assert main(["--input", str(tmp_path / "empty.txt"), "--vocab-size", "300", "--output", str(empty)]) == 2
    assert capsys.readouterr().err == f"tokenizer: error: {tmp_path / 'empty.txt'}: no document holds any text\n"
    assert sorted(p.name for p in output.parent.iterdir()) == ["tok.model"]
    assert main(["--input", str(tmp_path / "a.txt"), "--vocab-size", "300", "--output", str(output),
                 "--overwrite"]) == 0
    assert load_tokenizer(output).decode(load_tokenizer(output).encode("the lazy fox")) == "the lazy fox"
