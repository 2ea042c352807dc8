"""lm-eval over HTTP: its `local-completions` and `local-chat-completions` models against
`python -m infer.serve`. The completions API's `echo` with logprobs gives every prompt
token's log-probability (a plain forward pass's, to 1e-5), token prompts come one or many per
request, lm-eval's per-request log-likelihoods equal the forward pass's and the in-process
`llama-jax` model's, and lm-eval's own command runs to exit 0 with its default settings.

One server (test_lm_eval's checkpoint: random weights, a SentencePiece tokenizer), offline.
lm-eval tokenizes with Hugging Face's tokenizer from the checkpoint directory
(`tokenizer_backend=huggingface,tokenizer=DIR`); the tokenizer_config.json written here
makes it begin a sequence with BOS, as a Llama checkpoint's does.
"""

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from lm_eval import simple_evaluate

from test_lm_eval import (CHOICE, REPO, ROLLING, UNTIL, assert_samples_are_the_forward_pass, checkpoint,  # noqa: F401
                          manager, one_device, reference, token_log_probs)
from servers import Server, environment, free_port
from train.lm_eval import TASKS_DIR, LlamaJaxLM, evaluate

MODEL = "tiny"
CONTEXT = 128  # the checkpoint's max_seq_len


@pytest.fixture(scope="module")
def server(checkpoint):  # noqa: F811
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
         "eos_token": "</s>", "unk_token": "<unk>"}))
    with Server(checkpoint, "--model-name", MODEL, "--port", free_port(), "--max-batch", 4) as server:
        yield f"{server.base}/v1"


def complete(server, **body) -> httpx.Response:
    return httpx.post(f"{server}/completions", json={"model": MODEL, **body}, timeout=120)


def model_args(server, checkpoint, bos: bool, **extra) -> str:  # noqa: F811
    args = {"model": MODEL, "base_url": f"{server}/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(checkpoint), "max_length": CONTEXT, "add_bos_token": bos, **extra}
    return ",".join(f"{key}={value}" for key, value in args.items())


def test_echo_gives_every_prompt_tokens_logprob_and_one_choice_per_prompt_and_n(server, reference):
    prompts = [[1] + np.random.default_rng(seed).integers(3, 300, n).tolist() for seed, n in ((0, 9), (1, 30))]
    answer = complete(server, prompt=prompts, max_tokens=1, echo=True, logprobs=2, temperature=0, n=2)
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]  # prompt p, choice i: index p * n + i
    for choice, prompt in zip(choices, [prompts[0]] * 2 + [prompts[1]] * 2):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt) + 1  # the prompt's tokens, then the generated one
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        expected, _ = token_log_probs(reference, prompt)
        np.testing.assert_allclose(logprobs["token_logprobs"][1:len(prompt)], expected, atol=1e-5)
        logits = reference[0](prompt)  # position i predicts token i + 1; the last one the generated token
        log_z = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        tops = [max(top.values()) for top in logprobs["top_logprobs"][1:]]
        np.testing.assert_allclose(tops, logits.max(-1) - log_z, atol=1e-5)
        assert logprobs["token_logprobs"][-1] == tops[-1]  # greedy: the generated token is the top one
    # max_tokens 0: the prompt alone; streamed, the same text and logprobs.
    whole = complete(server, prompt=prompts[0], max_tokens=0, echo=True, logprobs=0).json()
    assert whole["usage"]["completion_tokens"] == 0 and whole["choices"][0]["finish_reason"] == "length"
    np.testing.assert_allclose(whole["choices"][0]["logprobs"]["token_logprobs"][1:],  # padded to another shape
                               choices[0]["logprobs"]["token_logprobs"][1:-1], atol=1e-5)
    streamed = complete(server, prompt=prompts[0], max_tokens=0, echo=True, logprobs=0, stream=True).text
    chunks = [json.loads(line[6:])["choices"][0] for line in streamed.splitlines()
              if line.startswith("data: {")]
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [x for c in chunks if c["logprobs"] for x in c["logprobs"]["token_logprobs"]] == \
        whole["choices"][0]["logprobs"]["token_logprobs"]


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": list(range(1, 126)), "echo": True, "logprobs": 1, "max_tokens": 5},
     "max_tokens 5 plus the prompt's 125 tokens is over this model's context of 128 tokens; ask for at most 3"),
    ({"prompt": [[1, 5], [1, 10 ** 6]], "echo": True, "max_tokens": 1},
     "prompt 1: token id 1000000 is outside the vocabulary"),
    ({"prompt": [1, 5], "echo": True, "max_tokens": -1}, "max_tokens must be at least 0, got -1"),
    ({"prompt": [1, 5], "max_tokens": 0}, "max_tokens must be at least 1 (0 with echo), got 0"),
])
def test_a_bad_echo_or_token_prompt_is_one_400(server, body, fragment):
    answer = complete(server, **body)
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]["message"]
    assert fragment in message and "\n" not in message


def test_local_completions_equals_a_forward_pass_and_the_in_process_model(server, checkpoint, reference,  # noqa: F811
                                                                          manager, one_device):  # noqa: F811
    # Token-id prompts, 4 per request (lm-eval's batch_size), contexts beginning with BOS.
    remote = simple_evaluate(model="local-completions", model_args=model_args(server, checkpoint, True,
                                                                               batch_size=4),
                             tasks=[CHOICE, UNTIL], task_manager=manager, log_samples=True)
    assert_samples_are_the_forward_pass(remote["samples"][CHOICE], reference)
    assert remote["results"][CHOICE]["acc,none"] == one_device["results"][CHOICE]["acc,none"]
    local = evaluate(LlamaJaxLM(checkpoint, batch_size=4), [UNTIL], manager=manager, log_samples=True)
    assert [s["resps"] for s in remote["samples"][UNTIL]] == [s["resps"] for s in local["samples"][UNTIL]]
    assert remote["results"][UNTIL] == local["results"][UNTIL]
    # Rolling: lm-eval's API models encode a document with BOS when add_bos_token is set (scoring
    # BOS given BOS); without it, every token given BOS and those before, as llama-jax does.
    rolling = simple_evaluate(model="local-completions", model_args=model_args(server, checkpoint, False),
                              tasks=[ROLLING], task_manager=manager, log_samples=True)
    for ours, theirs in zip(one_device["samples"][ROLLING], rolling["samples"][ROLLING], strict=True):
        assert theirs["filtered_resps"][0] == pytest.approx(ours["filtered_resps"][0], abs=1e-5)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert rolling["results"][ROLLING][metric] == pytest.approx(one_device["results"][ROLLING][metric], 1e-6)


def run_lm_eval(*args) -> subprocess.CompletedProcess:
    env = {**environment(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lm_eval", *args, "--include_path", str(TASKS_DIR)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_lm_evals_command_runs_local_completions_with_its_defaults(server, checkpoint):  # noqa: F811
    # Nothing but what lm-eval needs to reach the server and read the tokenizer: tokenized
    # requests, one prompt per request, its own max_length (2048, past the model's context).
    done = run_lm_eval("--model", "local-completions", "--model_args",
                       f"model={MODEL},base_url={server}/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={checkpoint}", "--tasks", f"{CHOICE},{UNTIL}", "--limit", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert CHOICE in done.stdout and "exact_match" in done.stdout, done.stdout


def test_lm_evals_command_runs_local_chat_completions(server):
    done = run_lm_eval("--model", "local-chat-completions", "--model_args",
                       f"model={MODEL},base_url={server}/chat/completions", "--apply_chat_template",
                       "--tasks", UNTIL, "--limit", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert UNTIL in done.stdout, done.stdout
