"""Llama 4 through the commands users run: `python -m infer` (a prompt, and --chat) and
`python -m infer.serve` driven by the openai client's plain streaming loop, on a tiny Llama 4
checkpoint with Meta's own Llama 4 tokenizer.model (shipped in llama-models). Every answer
is checked token for token against a plain forward pass's greedy argmax, recomputed over the
whole sequence at each step: MoE layers, a NoPE layer, chunked attention across a chunk
boundary and Llama 4's chat format all take part."""

import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import llama_models
import numpy as np
import openai
import pytest

from llama_jax.config import load_model_config
from llama_jax.formats.checkpoint import save_params
from llama_jax.model.llama import Llama
from llama_jax.params import init_params
from llama_jax.text.chat import format_chat
from llama_jax.text.tokenizer import load_tokenizer
from servers import Server, environment, free_port

REPO = Path(__file__).resolve().parent.parent
META_TOKENIZER = Path(llama_models.__file__).parent / "llama4" / "tokenizer.model"
NEW_TOKENS = 12
PADDED = 64  # the reference's one sequence length
CHUNK = 16  # attention chunks short enough that prompts and answers cross a boundary


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """llama4_tiny's kinds of layers (MoE everywhere, NoPE every 4th, QK norm, temperature
    tuning) at Meta's full 202,048-token vocabulary, random weights, Meta's tokenizer beside."""
    directory = tmp_path_factory.mktemp("llama4")
    tokenizer = load_tokenizer(META_TOKENIZER)
    config = load_model_config("llama4_tiny", vocab_size=tokenizer.vocab_size, dim=64, ffn_dim=128,
                               attention_chunk_size=CHUNK, max_seq_len=PADDED)
    save_params(directory, config, init_params(config, jax.random.PRNGKey(4)))
    shutil.copy(META_TOKENIZER, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def greedy(checkpoint):
    """ids -> the next NEW_TOKENS greedy ids, by full forward passes (no cache, no decode loop)."""
    from infer import load_model

    config, params, _ = load_model(checkpoint)
    model = Llama(config)
    # One shape for every call (causal: what follows the last real token cannot change its logits).
    forward = jax.jit(lambda tokens, last: model.apply({"params": params}, tokens,
                                                       jnp.arange(tokens.shape[1])[None])[0][0, last])
    tokenizer = load_tokenizer(checkpoint)

    def answer(ids: list[int]) -> list[int]:
        """The ids a greedy answer to `ids` holds: up to NEW_TOKENS, ended before a stop token."""
        ids, out = list(ids), []
        for _ in range(NEW_TOKENS):
            padded = np.zeros((1, PADDED), np.int32)
            padded[0, :len(ids)] = ids
            token = int(np.argmax(forward(padded, len(ids) - 1)))
            if token in tokenizer.stop_ids:
                break
            ids.append(token)
            out.append(token)
        return out

    return answer


def run_infer(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "infer", *map(str, args)], cwd=REPO, env=environment(),
                          input=stdin, capture_output=True, text=True, timeout=300)


def test_infer_prints_the_greedy_continuation_of_a_prompt(checkpoint, greedy):
    tokenizer = load_tokenizer(checkpoint)
    prompt = "The llama is a domesticated South American camelid, used"
    ids = tokenizer.encode(prompt, bos=True)
    assert len(ids) < CHUNK < len(ids) + NEW_TOKENS, "the answer should cross a chunk boundary"
    expected = tokenizer.decode(greedy(ids))
    result = run_infer("--checkpoint", checkpoint, "--prompt", prompt, "--max-new-tokens", NEW_TOKENS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == expected + "\n"


def test_infer_chat_uses_llama4s_format(checkpoint, greedy):
    tokenizer = load_tokenizer(checkpoint)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello llama"}]
    ids = format_chat(tokenizer, messages)
    assert tokenizer.decode(ids[:3]) == "<|begin_of_text|><|header_start|>system"
    expected = tokenizer.decode(greedy(ids))
    result = run_infer("--checkpoint", checkpoint, "--chat", "--system", "Be brief.", "--max-new-tokens",
                       NEW_TOKENS, stdin="Hello llama\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == expected + "\n"


def test_server_streams_llama4_chat_and_completions_as_the_forward_pass_does(checkpoint, greedy):
    tokenizer = load_tokenizer(checkpoint)
    messages = [{"role": "user", "content": "Name three animals of the Andes."}]
    chat_expected = tokenizer.decode(greedy(format_chat(tokenizer, messages)))
    prompt_ids = tokenizer.encode("Llamas live in herds", bos=True)
    completion_expected = greedy(prompt_ids)
    with Server(checkpoint, "--model-name", "llama4", "--port", free_port(), "--max-batch", 2) as server:
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=120)
        stream = client.chat.completions.create(model="llama4", messages=messages, max_tokens=NEW_TOKENS,
                                                temperature=0, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        completion = client.completions.create(model="llama4", prompt=prompt_ids, max_tokens=NEW_TOKENS,
                                               temperature=0, logprobs=0)
    assert text == chat_expected
    assert completion.choices[0].text == tokenizer.decode(completion_expected)
