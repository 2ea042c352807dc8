"""`python -m infer` end to end on a tiny Hugging Face directory with a tokenizer
trained here: it prints the generated text, and bad input is one line, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from infer import generate, load_model
from llama_jax.config import ModelConfig
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tokenizer_training import train_sentencepiece
from tiny import hf_model

REPO = Path(__file__).resolve().parent.parent
CORPUS = ["The llama is a domesticated South American camelid, used as a pack animal.",
          "Llamas are social animals and live with others as a herd.",
          "Once upon a time there was a small llama who wanted to see the sea."] * 30
CONTEXT = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """config.json + safetensors from a random HF model, and a SentencePiece tokenizer.model."""
    directory = tmp_path_factory.mktemp("tiny_hf")
    train_sentencepiece(CORPUS, 320, directory / "tokenizer.model")
    vocab = load_tokenizer(directory).vocab_size
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=vocab,
                         rope_theta=10000.0, max_seq_len=CONTEXT)
    hf_model(config, seed=1).save_pretrained(directory)
    return directory


def run_cli(*args, stdin=None, one_device=False):
    env = dict(os.environ)
    if one_device:  # the test session emulates 8 devices; a child may see just one
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    return subprocess.run([sys.executable, "-m", "infer", *map(str, args)], cwd=REPO, env=env,
                          input=stdin, capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_describes_the_options():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k",
                   "--top-p", "--seed", "--layout", "--chat", "--system", "--dtype", "--attention", "--quantize",
                   "--kv-cache-dtype", "--json-schema"):
        assert option in result.stdout


def test_prints_the_generated_text(checkpoint):
    result = run_cli("--checkpoint", checkpoint, "--prompt", "Once upon a time", "--max-new-tokens", 16,
                     "--stream-every", 3)
    assert result.returncode == 0, result.stderr
    config, params, tokenizer = load_model(checkpoint)
    expected = generate(params, tokenizer, "Once upon a time", max_new_tokens=16, config=config)[0]
    assert expected.text.strip(), "the tiny model should produce some text"
    assert result.stdout == expected.text + "\n"


def test_prompt_from_a_file_or_stdin_keeps_its_trailing_newlines(checkpoint, tmp_path):
    prompt = "Once upon a time\n\n"
    config, params, tokenizer = load_model(checkpoint)
    expected = generate(params, tokenizer, prompt, max_new_tokens=8, config=config)[0].text
    stripped = generate(params, tokenizer, prompt.rstrip("\n"), max_new_tokens=8, config=config)[0].text
    assert expected != stripped, "the test needs a prompt whose trailing newlines change the output"
    path = tmp_path / "prompt.txt"
    path.write_bytes(prompt.encode())
    from_file = run_cli("--checkpoint", checkpoint, "--prompt-file", path, "--max-new-tokens", 8)
    from_stdin = run_cli("--checkpoint", checkpoint, "--prompt", "-", "--max-new-tokens", 8, stdin=prompt)
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_file.stderr + from_stdin.stderr
    assert from_file.stdout == from_stdin.stdout == expected + "\n"
    assert_one_line_error(run_cli("--checkpoint", checkpoint, "--prompt-file", tmp_path / "nope.txt"),
                          "nope.txt", "No such file")


def test_load_model_returns_a_config_that_fits_its_params(checkpoint):
    from llama_jax import Llama

    config, params, tokenizer = load_model(checkpoint)
    tokens = np.asarray([tokenizer.encode("Once upon", bos=True)], np.int32)
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    logits, _ = Llama(config).apply({"params": params}, tokens, positions)
    expected = generate(params, tokenizer, [tokens[0].tolist()], max_new_tokens=1, config=config)[0]
    assert int(np.argmax(logits[0, -1])) == expected.tokens[0]


def test_chat_answers_each_line_with_the_template(checkpoint):
    result = run_cli("--checkpoint", checkpoint, "--chat", "--system", "Be brief.", "--max-new-tokens", 8,
                     "--temperature", 0.7, "--top-p", 0.9, "--seed", 3, stdin="Hello llama\nAnd again\nOnce more, with feeling\n")
    assert result.returncode == 0, result.stderr
    # Three answers (old turns are forgotten as the context fills), then the
    # fourth request for input meets the end of stdin.
    assert result.stderr.count("> ") == 4
    assert result.stdout.count("\n") >= 3 and result.stdout.endswith("\n")


LLAMA_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["kind", "legs"],
                "properties": {"kind": {"enum": ["llama", "alpaca"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 4}}}


def test_a_json_schema_file_makes_the_answer_follow_it(checkpoint, tmp_path):
    path = tmp_path / "llama.schema.json"
    path.write_text(json.dumps(LLAMA_SCHEMA))
    sampled = ("--temperature", 1, "--seed", 4, "--max-new-tokens", 48)
    result = run_cli("--checkpoint", checkpoint, "--prompt", "A llama as JSON:", "--json-schema", path, *sampled)
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), LLAMA_SCHEMA)  # a SentencePiece vocabulary's tokens
    config, params, tokenizer = load_model(checkpoint)
    expected = generate(params, tokenizer, "A llama as JSON:", max_new_tokens=48, config=config, temperature=1,
                        seed=4, json_schema=LLAMA_SCHEMA)[0]
    assert result.stdout == expected.text + "\n" and expected.finish_reason == "stop"
    bad, broken = tmp_path / "bad.json", tmp_path / "broken.json"
    bad.write_text('{"type": "strng"}')
    broken.write_text('{"type": ')
    assert_one_line_error(run_cli("--checkpoint", checkpoint, "--prompt", "hi", "--json-schema", bad),
                          "bad.json: the schema cannot be compiled: Invalid type: strng")
    assert_one_line_error(run_cli("--checkpoint", checkpoint, "--prompt", "hi", "--json-schema", broken),
                          "broken.json: not JSON")


def test_missing_checkpoint_is_one_line_exit_2(tmp_path):
    assert_one_line_error(run_cli("--checkpoint", tmp_path / "nope", "--prompt", "hi"), "not found")


def test_unknown_layout_is_one_line_exit_2(checkpoint):
    assert_one_line_error(run_cli("--checkpoint", checkpoint, "--prompt", "hi", "--layout", "diagonal"),
                          "diagonal", "not found")


def test_prompt_longer_than_the_context_is_one_line_exit_2(checkpoint):
    result = run_cli("--checkpoint", checkpoint, "--prompt", "llama " * CONTEXT, "--max-new-tokens", 4)
    assert_one_line_error(result, "context of 128")


def test_mesh_that_does_not_fit_the_devices_is_one_line_exit_2(checkpoint):
    # fsdp_tp needs an even number of devices (tensor = 2); the child has one.
    result = run_cli("--checkpoint", checkpoint, "--prompt", "hi", "--layout", "fsdp_tp", one_device=True)
    assert_one_line_error(result, "fsdp_tp", "devices")


def test_bad_sampling_settings_are_one_line_exit_2(checkpoint):
    assert_one_line_error(run_cli("--checkpoint", checkpoint, "--prompt", "hi", "--top-p", 2),
                          "top_p")


def test_our_checkpoint_format_generates_what_the_hf_directory_does(checkpoint, tmp_path):
    from llama_jax.formats.checkpoint import save_params
    from llama_jax.formats.hf import load_hf_params

    config, params = load_hf_params(checkpoint)
    ours = tmp_path / "ckpt"
    save_params(ours, config, params, step=10)
    (tmp_path / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    from_hf = generate(checkpoint, None, "Once upon a time", max_new_tokens=8)[0]
    from_ours = generate(ours, None, "Once upon a time", max_new_tokens=8)[0]  # tokenizer found in parent
    assert from_ours.tokens == from_hf.tokens
    result = run_cli("--checkpoint", ours, "--prompt", "Once upon a time", "--max-new-tokens", 8)
    assert result.returncode == 0, result.stderr
    assert result.stdout == from_hf.text + "\n"


def test_dtype_and_quantisation_flags_serve_what_load_model_serves(checkpoint):
    flags = dict(dtype="bfloat16", quantize="int8", kv_cache_dtype="int8")
    config, params, tokenizer = load_model(checkpoint, **flags)
    assert (config.dtype, config.quantize, config.kv_cache_dtype) == ("bfloat16", "int8", "int8")
    assert params["layers_0"]["feed_forward"]["w1"]["kernel"].dtype == np.int8  # unrolled on CPU
    expected = generate(params, tokenizer, "Once upon a time", max_new_tokens=8, config=config)[0]
    result = run_cli("--checkpoint", checkpoint, "--prompt", "Once upon a time", "--max-new-tokens", 8,
                     "--dtype", "bfloat16", "--quantize", "int8", "--kv-cache-dtype", "int8", "--attention", "blocked")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"


@pytest.mark.parametrize("flag, value, fragment", [
    ("--quantize", "int4", "--quantize: unknown 'int4' (known: int8, fp8)"),
    ("--kv-cache-dtype", "int2", "--kv-cache-dtype: unknown 'int2' (known: int8, fp8)"),
    ("--dtype", "float64", "--dtype: unknown 'float64' (known: bfloat16, float32)"),
])
def test_unknown_precision_settings_are_one_line_exit_2(checkpoint, flag, value, fragment):
    assert_one_line_error(run_cli("--checkpoint", checkpoint, "--prompt", "hi", flag, value), fragment)


def test_requantising_a_quantised_checkpoint_is_one_line_exit_2(checkpoint, tmp_path):
    from llama_jax.convert.quantize import quantize_checkpoint

    quantize_checkpoint(checkpoint, tmp_path / "int8", "int8", show_progress=False)
    (tmp_path / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    result = run_cli("--checkpoint", tmp_path / "int8", "--prompt", "hi", "--quantize", "fp8")
    assert_one_line_error(result, "stored quantised as int8; it cannot be re-quantised as fp8")
