"""Llama Guard 3 end to end: `python -m infer.guard` classifies held-out conversations with a
tiny guard trained here on a synthetic rule, --filter keeps the safe ones, fsdp_tp equals one
device, a Vision guard reads an image, bad input is one line; `python -m infer.serve --guard`
refuses a marked prompt, serves an unmarked one unchanged and withholds a marked answer, and
refuses an image for its text-only model. (The tiny guard, `trained_guard`, is conftest.py's;
a Vision guard in the server: tests/test_serve_vision.py.)"""

import json
import random

import numpy as np
import pytest

import guard_tiny as gt
from infer import guard as guard_cli
from infer.guard_model import Guard
from infer.options import ServingOptions
from llama_jax.text.chat_template import find_chat_template, special_tokens
from llama_jax.text.guard_format import GuardFormat
from llama_jax.text.tokenizer import load_tokenizer
from servers import Server, free_port
from test_guard_prompt import META_MODEL, MULTI, with_template


# ---------------------------------------------------------------- python -m infer.guard, end to end

@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """(path, lines, truth): 64 conversations the guard was not trained on, as JSONL."""
    rng = random.Random(1)
    pairs = [gt.conversation(rng) for _ in range(64)]
    lines = [json.dumps({"messages": messages}) for messages, _ in pairs]
    path = tmp_path_factory.mktemp("held_out") / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, lines, [unsafe for _, unsafe in pairs]


def run_guard(*argv) -> int:
    return guard_cli.main([str(a) for a in argv])


def test_infer_guard_classifies_held_out_conversations_and_filter_keeps_the_safe_ones(trained_guard, held_out,
                                                                                       tmp_path):
    path, lines, truth = held_out
    out, kept = tmp_path / "verdicts.jsonl", tmp_path / "safe.jsonl"
    assert run_guard("--checkpoint", trained_guard, "--input", path, "--output", out, "--filter", kept,
                     "--batch-size", 16) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == len(truth)
    accuracy = np.mean([(r["verdict"] == "unsafe") == unsafe for r, unsafe in zip(results, truth)])
    assert accuracy >= 0.95, f"held-out accuracy {accuracy:.3f}"
    for r in results:
        if r["verdict"] == "unsafe":
            assert r["categories"] == ["S1"] and r["category_names"] == ["Marked words."]
        assert 0.0 <= r["unsafe_probability"] <= 1.0
    # The probability agrees with the answer where the model is sure of it.
    assert all((r["unsafe_probability"] > 0.5) == (r["verdict"] == "unsafe") for r in results
               if abs(r["unsafe_probability"] - 0.5) > 0.2)
    assert kept.read_text().splitlines() == [line for line, r in zip(lines, results) if r["verdict"] == "safe"]


def test_a_threshold_decides_by_the_unsafe_probability(trained_guard, held_out, tmp_path):
    path, _, _ = held_out
    out = tmp_path / "verdicts.jsonl"
    assert run_guard("--checkpoint", trained_guard, "--input", path, "--output", out, "--batch-size", 16,
                     "--threshold", 0.9) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["verdict"] for r in results] == ["unsafe" if r["unsafe_probability"] >= 0.9 else "safe"
                                               for r in results]


def test_fsdp_tp_over_8_devices_classifies_as_one_device(trained_guard, held_out):
    import jax

    path, lines, _ = held_out
    _, conversations = guard_cli.read_conversations(path)
    one = Guard.load(trained_guard)
    sharded = Guard.load(trained_guard, ServingOptions(layout="fsdp_tp"))
    assert len(jax.tree.leaves(sharded.params)[0].sharding.device_set) == 8
    prompts = [one.format.prompt(messages) for messages in conversations[:16]]
    expected = one.classify(prompts, batch_size=8)
    got = sharded.classify(prompts, batch_size=8)
    assert [r.text for r in got] == [r.text for r in expected]
    np.testing.assert_allclose([r.unsafe_probability for r in got], [r.unsafe_probability for r in expected],
                               atol=1e-5)


def test_show_prompt_prints_each_prompt_and_loads_no_weights(trained_guard, held_out, tmp_path, capsys):
    import shutil

    path, _, _ = held_out
    bare = tmp_path / "no_weights"  # the config and tokenizer, no weights at all
    bare.mkdir()
    from llama_jax.formats.checkpoint import read_config
    from llama_jax.formats.hf import config_to_hf

    (bare / "config.json").write_text(json.dumps(config_to_hf(read_config(trained_guard))))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(trained_guard / name, bare / name)
    assert run_guard("--checkpoint", bare, "--input", path, "--show-prompt", "--exclude", "S2") == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    fmt = GuardFormat(load_tokenizer(bare), find_chat_template(bare), special_tokens(bare))
    _, conversations = guard_cli.read_conversations(path)
    assert shown == [fmt.prompt(m, exclude=["S2"]).text for m in conversations]
    assert "S1: Marked words.\n<END UNSAFE" in shown[0]


def test_bad_input_is_one_line_and_exit_2(trained_guard, held_out, tmp_path, capsys):
    path, _, _ = held_out
    ends_with_answer = tmp_path / "answer.jsonl"
    ends_with_answer.write_text(json.dumps({"messages": MULTI}) + "\n")
    not_llama = tmp_path / "bert"
    not_llama.mkdir()
    (not_llama / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    (not_llama / "tokenizer.model").write_bytes((trained_guard / "tokenizer.model").read_bytes())
    cases = [
        (["--checkpoint", not_llama, "--input", path], "model_type 'bert' is not llama"),
        (["--checkpoint", trained_guard, "--input", path, "--exclude", "S2,S15"],
         "--exclude: unknown category 'S15' (this prompt's categories: S1, S2)"),
        (["--checkpoint", trained_guard, "--input", ends_with_answer, "--role", "user"],
         "conversation 1: --role user judges the last User turn, but the conversation ends with an assistant turn"),
        (["--checkpoint", trained_guard, "--input", tmp_path / "missing.jsonl"], "--input"),
        (["--checkpoint", trained_guard, "--input", path, "--threshold", "1.5"], "--threshold must be in [0, 1]"),
    ]
    for argv, fragment in cases:
        assert run_guard(*argv) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err


def test_infer_guard_judges_a_prompt_with_an_image_on_a_vision_guard(trained_guard, tmp_path, capsys):
    """A tiny Llama 3.2 Vision checkpoint (random weights) with the 11B Vision template's shape:
    --image puts the image in the prompt (shown) and the model reads it (classified)."""
    import dataclasses

    from test_vision import drawn_image
    from tiny import VISION_LIKE, save_hf_vision_model

    tokenizer = load_tokenizer(trained_guard)
    rows = tokenizer.vocab_size  # the image token is the row after the text vocabulary, as in HF's Mllama
    config = dataclasses.replace(VISION_LIKE, vocab_size=rows,
                                 vision=dataclasses.replace(VISION_LIKE.vision, image_token_id=rows))
    directory = tmp_path / "vision_guard"
    directory.mkdir()
    save_hf_vision_model(config, directory, seed=3)
    (directory / "tokenizer.model").write_bytes((trained_guard / "tokenizer.model").read_bytes())
    with_template(directory, gt.TEMPLATE_1B)
    picture = tmp_path / "picture.png"
    drawn_image(40, 30).save(picture)
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "what is this"}]}) + "\n")
    assert run_guard("--checkpoint", directory, "--input", chats, "--image", picture, "--show-prompt") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|> Task: ")
    out = tmp_path / "verdicts.jsonl"
    assert run_guard("--checkpoint", directory, "--input", chats, "--image", picture, "--output", out) == 0
    result = json.loads(out.read_text())
    assert result["verdict"] in ("safe", "unsafe", "malformed") and 0.0 <= result["unsafe_probability"] <= 1.0
    # Without the image the same conversation reads differently: the image reached the model.
    text_only = tmp_path / "text_only.jsonl"
    assert run_guard("--checkpoint", directory, "--input", chats, "--output", text_only) == 0
    assert json.loads(text_only.read_text())["unsafe_probability"] != result["unsafe_probability"]


# ---------------------------------------------------------------- python -m infer.serve --guard

@pytest.fixture(scope="module")
def served_model(trained_guard, tmp_path_factory):
    """A tiny chat model on the guard's tokenizer, trained to answer a turn holding "secret" with
    the guard's marker word ("the zorblax is near") and anything else with "hello friend"."""
    from llama_jax.formats.checkpoint import save_params

    directory = tmp_path_factory.mktemp("served")
    (directory / "tokenizer.model").write_bytes((trained_guard / "tokenizer.model").read_bytes())
    tokenizer = load_tokenizer(directory)
    config = gt.tiny_config(tokenizer.vocab_size).replace(max_seq_len=128)
    params, _ = gt.train(config, gt.served_examples(tokenizer, random.Random(2), 1000), steps=150, seed=1)
    save_params(directory, config, params)
    return directory


@pytest.fixture(scope="module")
def guarded_server(served_model, trained_guard):
    with Server(served_model, "--guard", trained_guard, "--model-name", "tiny", "--port", free_port(),
                "--max-batch", 2, "--max-seq-len", 128, "--guard-every", 2) as server:
        yield server.base


def chat(base, text, stream=False):
    import httpx

    body = {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": text}],
            "max_tokens": 12, "temperature": 0, "stream": stream}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)


def test_the_guarded_server_refuses_a_marked_prompt_before_generation(guarded_server):
    response = chat(guarded_server, f"apple {gt.MARKER} river")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "content_filter" and "S1: Marked words." in error["message"]


def test_the_guarded_server_serves_an_unmarked_prompt_unchanged(guarded_server, served_model):
    from infer import generate, load_model

    config, params, tokenizer = load_model(served_model)
    expected = generate(params, tokenizer, [gt.chat_ids(tokenizer, "Be brief.", "apple river green")],
                        max_new_tokens=12, config=config)[0]
    assert expected.text == gt.GREETING
    answer = chat(guarded_server, "apple river green").json()["choices"][0]
    assert answer["message"]["content"] == expected.text and answer["finish_reason"] == "stop"


def test_the_guarded_server_withholds_a_marked_answer_whole_and_streamed(guarded_server):
    import httpx

    answer = chat(guarded_server, "tell the secret now").json()["choices"][0]
    assert answer["finish_reason"] == "content_filter" and answer["message"]["content"] is None
    events = [line[6:] for line in chat(guarded_server, "tell the secret now", stream=True).text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    chunks = [c for e in map(json.loads, events) for c in e.get("choices", [])]
    assert chunks[-1]["finish_reason"] == "content_filter"
    assert gt.MARKER not in "".join(c["delta"].get("content") or "" for c in chunks)
    guard = httpx.get(f"{guarded_server}/health", timeout=10).json()["guard"]
    assert guard["prompts"]["S1"] >= 1 and guard["answers"]["S1"] >= 2


def test_a_guard_with_its_own_tokenizer_gets_a_note_not_an_error(trained_guard):
    from infer.guard_hook import tokenizer_note

    mine = load_tokenizer(trained_guard)
    assert tokenizer_note(mine, mine) == ""
    note = tokenizer_note(mine, load_tokenizer(META_MODEL))
    assert note.startswith("the guard model's tokenizer differs from the served model's") and "\n" not in note


def test_an_image_sent_to_a_text_only_model_is_one_400(guarded_server):
    import httpx

    from test_serve_vision import picture

    url = picture("wide")[1]
    body = {"model": "tiny", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}
    response = httpx.post(f"{guarded_server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("this model takes no images")



def test_a_text_guard_judges_an_image_request_on_its_text_alone(trained_guard):
    from infer.guard_hook import Screen, chat_conversation
    from test_serve_vision import picture

    screen = Screen(Guard.load(trained_guard))
    marked = f"apple {gt.MARKER} river"
    with_image = chat_conversation([{"role": "user", "content": [{"type": "image", "image": picture("wide")[0]},
                                                                 {"type": "text", "text": marked}]}])
    result = screen.judge(with_image)
    assert result == screen.judge([{"role": "user", "content": marked}]) and result.verdict == "unsafe"
