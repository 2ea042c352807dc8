"""lm-eval's `llama-jax` model type: its log-likelihoods and generations equal a plain
forward pass and a plain greedy loop, layouts agree with one device, a model that
knows the shipped tiny tasks' facts scores high, and bad input is one line, exit 2.

Everything runs offline: the tasks are train/lm_eval/tasks/ (the `llama_jax_tiny`
tag) or YAMLs written here, and the Hugging Face hub is switched off.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")  # before lm-eval imports datasets

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from llama_jax.config import ModelConfig  # noqa: E402
from llama_jax.formats.hf import load_hf_params  # noqa: E402
from llama_jax.model.llama import Llama  # noqa: E402
from llama_jax.text.tokenizer import load_tokenizer  # noqa: E402
from llama_jax.text.tokenizer_training import train_sentencepiece  # noqa: E402
from tiny import hf_model  # noqa: E402
from train.lm_eval import TASKS_DIR, LlamaJaxLM, evaluate  # noqa: E402
from train.lm_eval.run import task_manager  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = [json.loads(line)["text"] for line in (TASKS_DIR / "tiny_docs.jsonl").read_text().splitlines()]
CHOICE, ROLLING, UNTIL = "llama_jax_tiny_choice", "llama_jax_tiny_rolling", "llama_jax_tiny_until"
REFERENCE_LENGTH = 64  # longer than any sequence the tests score or generate
WINDOW = 6  # a max_length that cuts every tiny document into several rolling windows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Hugging Face directory of random weights with a SentencePiece tokenizer.model."""
    directory = tmp_path_factory.mktemp("hf")
    corpus = DOCS * 20 + ["Once upon a time there was a small llama who wanted to see the sea."] * 20
    train_sentencepiece(corpus, 400, directory / "tokenizer.model")
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                         vocab_size=load_tokenizer(directory).vocab_size, rope_theta=10000.0, max_seq_len=128)
    hf_model(config, seed=1).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(checkpoint):
    """(logits of one row, tokenizer), to compute what lm-eval should get without train/lm_eval:
    float64 logits [len(ids), vocab] of a plain forward pass over `ids` (right-padded to
    REFERENCE_LENGTH, which causal attention cannot see, so one shape compiles once)."""
    config, params = load_hf_params(checkpoint)
    apply = jax.jit(Llama(config).apply)

    def logits(ids):
        row = np.zeros((1, REFERENCE_LENGTH), np.int32)
        row[0, :len(ids)] = ids
        return np.asarray(apply({"params": params}, row)[0][0, :len(ids)], np.float64)
    return logits, load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def manager():
    return task_manager()


@pytest.fixture(scope="module")
def one_device(checkpoint, manager):
    """lm-eval's results with samples for the choice and rolling tasks, on one device."""
    return evaluate(LlamaJaxLM(checkpoint, batch_size=4), [CHOICE, ROLLING], manager=manager, log_samples=True)


def token_log_probs(reference, ids):
    """float64 [len(ids) - 1]: log p(ids[i + 1] | ids[:i + 1]) from one forward pass, and
    whether each was the argmax."""
    logits = reference[0](ids[:-1])
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    targets = np.asarray(ids[1:])
    return log_probs[np.arange(len(targets)), targets], logits.argmax(-1) == targets


def assert_samples_are_the_forward_pass(samples, reference):
    """Each (context, continuation) of lm-eval's logged samples scored the continuation's summed
    log-probability (to 1e-5) and greedy flag of a plain forward pass of BOS + context + continuation."""
    tokenizer = reference[1]
    for sample in samples:
        for (context, continuation), (got, greedy) in zip(sample["arguments"], sample["filtered_resps"]):
            whole = tokenizer.encode(context + continuation, bos=True)
            scored = len(whole) - len(tokenizer.encode(context, bos=True))
            log_probs, argmax = token_log_probs(reference, whole)
            assert got == pytest.approx(log_probs[-scored:].sum(), abs=1e-5)
            assert greedy == bool(argmax[-scored:].all())


def test_choice_log_likelihoods_equal_a_plain_forward_pass(one_device, reference):
    samples = one_device["samples"][CHOICE]
    assert len(samples) == 12
    assert_samples_are_the_forward_pass(samples, reference)


def test_rolling_log_likelihood_sums_every_token_given_bos(one_device, reference):
    tokenizer = reference[1]
    samples = one_device["samples"][ROLLING]
    assert len(samples) == len(DOCS)
    for sample in samples:
        (text,), got = sample["arguments"][0], sample["filtered_resps"][0]
        ids = [tokenizer.bos_id] + tokenizer.encode(text)
        assert got == pytest.approx(token_log_probs(reference, ids)[0].sum(), abs=1e-5)


def test_rolling_windows_longer_than_max_length_follow_lm_evals_windows(checkpoint, reference):
    tokenizer = reference[1]
    lm = LlamaJaxLM(checkpoint, batch_size=4, max_length=WINDOW)
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(DOCS)]
    for text, got in zip(DOCS, lm.loglikelihood_rolling(requests, disable_tqdm=True)):
        ids = tokenizer.encode(text)
        assert len(ids) > WINDOW, "each document must need several windows"
        expected = 0.0
        for context, predicted in map(make_disjoint_window, get_rolling_token_windows(ids, tokenizer.bos_id, WINDOW, 1)):
            expected += token_log_probs(reference, context + predicted)[0][-len(predicted):].sum()
        assert got == pytest.approx(expected, abs=1e-5)


def greedy_text(reference, prompt: str, steps: int) -> str:
    """Greedy decoding by a full forward pass per token, ending at a stop id."""
    logits, tokenizer = reference
    ids = tokenizer.encode(prompt, bos=True)
    new = []
    for _ in range(steps):
        token = int(np.argmax(logits(ids + new)[-1]))
        if token in tokenizer.stop_ids:
            break
        new.append(token)
    return tokenizer.decode(new)


def test_generate_until_equals_greedy_decoding_cut_at_the_stops(checkpoint, reference):
    prompts = ["The zorp is", "Once upon a time there was a small llama", "The", "The stiv is red. The vosk"]
    full = [greedy_text(reference, prompt, 12) for prompt in prompts]
    stop = full[0][len(full[0]) // 2:][:3]
    until = [stop, "\n\n"]
    expected = [text[:min(text.find(s) for s in until if s in text)] if any(s in text for s in until) else text
                for text in full]
    assert stop.strip() and expected[0] != full[0], "the test needs a stop string inside a generation"
    assert any(e == f for e, f in zip(expected, full)), "the test needs a generation the stops leave whole"
    lm = LlamaJaxLM(checkpoint, batch_size=2)  # two batches of ragged prompts
    requests = [Instance("generate_until", {}, (prompt, {"until": until, "max_gen_toks": 12}), i)
                for i, prompt in enumerate(prompts)]
    assert lm.generate_until(requests, disable_tqdm=True) == expected


@pytest.mark.parametrize("layout, rows", [("fsdp", 8), ("fsdp_sp", 4)])  # fsdp_sp splits each row's length too
def test_multiple_choice_on_a_layout_matches_one_device(checkpoint, manager, one_device, layout, rows):
    lm = LlamaJaxLM(checkpoint, layout=layout, batch_size=4)
    assert lm.scorer.rows == rows == lm.placement.shards_along("batch")
    sharded = evaluate(lm, [CHOICE], manager=manager, log_samples=True)
    for ours, theirs in zip(one_device["samples"][CHOICE], sharded["samples"][CHOICE], strict=True):
        for (a, greedy_a), (b, greedy_b) in zip(ours["filtered_resps"], theirs["filtered_resps"], strict=True):
            assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b
    assert sharded["results"][CHOICE]["acc,none"] == one_device["results"][CHOICE]["acc,none"]


def fit_the_facts(config, tokenizer, steps: int = 300):
    """Parameters of `config` fitted by Adam to every fact of the shipped tasks, as a sentence
    of its own and inside tiny_docs.jsonl (one full batch, one device)."""
    import jax.numpy as jnp
    import optax

    from llama_jax.params import init_params

    facts = [json.loads(line) for line in (TASKS_DIR / "tiny_facts.jsonl").read_text().splitlines()]
    texts = DOCS + [f"The {f['subject']} is {f['choices'][f['answer']]}." for f in facts]
    rows = [[tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id] for text in texts]
    tokens_bt = np.zeros((len(rows), max(map(len, rows))), np.int32)
    weights_bt = np.zeros((len(rows), tokens_bt.shape[1] - 1), np.float32)
    for i, row in enumerate(rows):
        tokens_bt[i, :len(row)], weights_bt[i, :len(row) - 1] = row, 1.0
    model, optimizer = Llama(config), optax.adam(3e-3)

    def loss(params):
        logits = model.apply({"params": params}, tokens_bt[:, :-1])[0]
        log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens_bt[:, 1:, None], -1)[..., 0]
        return -(log_probs * weights_bt).sum() / weights_bt.sum()

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = init_params(config, jax.random.key(0))
    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def test_a_model_fitted_to_the_facts_knows_them_and_a_random_one_guesses(checkpoint, one_device, tmp_path,
                                                                          capsys):
    from llama_jax.formats.checkpoint import save_params
    from train.eval import main

    config, _ = load_hf_params(checkpoint)
    save_params(tmp_path / "fitted", config, fit_the_facts(config, load_tokenizer(checkpoint)))
    assert main(["--checkpoint", str(tmp_path / "fitted"), "--tokenizer", str(checkpoint), "--tasks",
                 f"{CHOICE},{UNTIL}", "--output", str(tmp_path / "out.json")]) == 0
    printed = capsys.readouterr().out
    assert CHOICE in printed and "exact_match" in printed, printed  # lm-eval's table
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert results[CHOICE]["acc,none"] >= 0.9
    assert results[UNTIL]["exact_match,remove_whitespace"] >= 0.9
    assert one_device["results"][CHOICE]["acc,none"] <= 0.5  # random weights: about 1 in 4


def test_the_lm_eval_command_runs_a_local_task_yaml_with_its_own_flags(checkpoint, tmp_path):
    # A user's copy of a task: lm-eval's `json` loader over an absolute path (docs/evaluation.md).
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "docs_local.yaml").write_text(
        "task: llama_jax_test_docs_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {TASKS_DIR / 'tiny_docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}  # what `json` writes stays here
    out = subprocess.run([sys.executable, "-m", "train.lm_eval", "--model", "llama-jax", "--model_args",
                          f"checkpoint={checkpoint},layout=fsdp,dtype=float32", "--tasks",
                          "llama_jax_test_docs_local", "--include_path", str(tmp_path / "tasks"), "--limit", "2",
                          "--output_path", str(tmp_path / "results")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "bits_per_byte" in out.stdout and "batch_size: 16" in out.stdout, out.stdout
    [written] = (tmp_path / "results").rglob("results_*.json")
    assert json.loads(written.read_text())["results"]["llama_jax_test_docs_local"]["sample_len"] == 2


def test_log_likelihoods_equal_lm_evals_own_hugging_face_model(checkpoint):
    import transformers
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models

    # Token-level requests, as lm-eval hands them over after tokenizing: HFLM needs no text,
    # so a stub tokenizer serves.
    stub = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf = HFLM(pretrained=transformers.LlamaForCausalLM.from_pretrained(checkpoint).eval(), tokenizer=stub,
              batch_size=4, device="cpu")
    rng = np.random.default_rng(0)
    requests = [(None, [1] + rng.integers(3, 300, n).tolist(), rng.integers(3, 300, k).tolist())
                for n, k in ((3, 1), (20, 5), (40, 2), (9, 9), (1, 30))]
    ours = LlamaJaxLM(checkpoint, batch_size=4)._loglikelihood_tokens(requests, disable_tqdm=True)
    theirs = hf._loglikelihood_tokens(requests, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_an_unknown_task_is_one_line_and_exit_2(checkpoint, capsys):
    from train.eval import main

    out = subprocess.run([sys.executable, "-m", "train.lm_eval", "--model_args", f"checkpoint={checkpoint}",
                          "--tasks", "no_such_task"], cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1 and errors[0].startswith("train.lm_eval: error:") and "no_such_task" in errors[0]
    assert main(["--checkpoint", str(checkpoint), "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.eval: error: unknown task no_such_task") and "--include_path" in err
    assert "\n" not in err


def test_a_misspelt_model_arg_is_named_before_anything_loads():
    with pytest.raises(ValueError, match="model_args: chekpoint is not a llama-jax setting"):
        LlamaJaxLM.create_from_arg_string("chekpoint=runs/x,layout=fsdp", {"batch_size": 1})


def test_a_dataset_that_cannot_be_reached_names_the_offline_remedy(checkpoint, tmp_path, capsys):
    from train.eval import main

    (tmp_path / "hub_only.yaml").write_text(
        "task: llama_jax_test_hub_only\ndataset_path: llama-jax-tests/not-on-this-machine\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    code = main(["--checkpoint", str(checkpoint), "--tasks", "llama_jax_test_hub_only", "--include-path",
                 str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith("train.eval: error: a task's dataset could not be reached")
    assert "local task YAML" in err and "--include_path" in err


def tiny_run(checkpoint, run_dir, **eval_settings):
    """A two-step fine-tuning run of the checkpoint on the tiny documents, evaluating tasks at step 2."""
    from train.config import run_config_from_dict

    config, _ = load_hf_params(checkpoint)
    data = {"source": "text", "paths": [str(TASKS_DIR / "tiny_docs.jsonl")], "tokenizer": str(checkpoint),
            "seq_len": 32, "global_batch": 8, "shuffle": False}
    return run_config_from_dict({"model": config.to_dict(), "init_from": str(checkpoint), "layout": "fsdp",
                                 "data": data, "steps": 2, "log_every": 1, "checkpoint_every": 2,
                                 "run_dir": str(run_dir), "eval": {"every": 2, **eval_settings},
                                 "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0}})


def test_a_run_with_eval_tasks_logs_each_tasks_main_metric_of_its_live_parameters(checkpoint, tmp_path):
    from train.loop import train
    from train.tracking.metrics import scalar_tag

    train(tiny_run(checkpoint, tmp_path / "run", tasks=[CHOICE, ROLLING], task_limit=6), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    [row] = [row for row in rows if any(key.startswith("eval/") for key in row)]
    assert row["step"] == 2 and {key for key in row if key.startswith("eval/")} == {
        f"eval/{CHOICE}/acc", f"eval/{ROLLING}/word_perplexity"}
    assert scalar_tag(f"eval/{CHOICE}/acc") == f"eval/{CHOICE}/acc"  # TensorBoard's tag, as logged
    # The same figures as the in-process model reading step 2's checkpoint from disk.
    saved = evaluate(LlamaJaxLM(tmp_path / "run", tokenizer=checkpoint, max_length=32), [CHOICE, ROLLING], limit=6)
    assert row[f"eval/{CHOICE}/acc"] == saved["results"][CHOICE]["acc,none"]
    assert row[f"eval/{ROLLING}/word_perplexity"] == pytest.approx(
        saved["results"][ROLLING]["word_perplexity,none"], rel=1e-5)


def test_a_run_with_eval_tasks_fails_in_one_line_before_compiling(checkpoint, tmp_path, monkeypatch):
    from llama_jax.config import ConfigError
    from train.loop import train

    with pytest.raises(ValueError, match="unknown task no_such_task"):
        train(tiny_run(checkpoint, tmp_path / "typo", tasks=["no_such_task"]), progress=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the `eval` extra were not installed
    with pytest.raises(ConfigError) as err:
        train(tiny_run(checkpoint, tmp_path / "bare", tasks=[CHOICE]), progress=False)
    assert str(err.value).startswith("eval.tasks: lm-eval is not installed") and "llama-jax[eval]" in str(err.value)
    assert not (tmp_path / "typo").exists() and not (tmp_path / "bare").exists()
