"""Training: memorisation under fsdp_tp, exact gradient accumulation, chunked loss, configs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import Llama, init_params
from llama_jax.config import ConfigError
from sharding.layout import load_layout
from sharding.place import Placement
from tiny import LLAMA3_LIKE
from train_runs import random_batch
from train.config import OptimizerConfig, load_run_config, run_config_from_dict
from train.objectives.cross_entropy import chunked_cross_entropy_sums, cross_entropy_sums
from train.optimizer import decay_mask, learning_rate_schedule
from train.step import init_state, jit_train_step, make_gradients, make_train_step
from train.tracking.metrics import mfu_flops_per_token


def test_tiny_model_memorises_under_fsdp_tp(tmp_path):
    """4 random documents, 80 steps on 8 devices: loss from ln(256) = 5.5 to below 0.5."""
    from train.loop import train
    run = load_run_config("tiny_cpu", [f"run_dir={tmp_path}", "data.synthetic_docs=4", "steps=80",
                                       "optimizer.learning_rate=0.01", "log_every=10",
                                       "checkpoint_every=1000"])
    assert run.layout == "fsdp_tp"
    summary = train(run, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 81, 10))
    assert rows[0]["loss"] > 2.0
    assert summary["metrics"]["loss"] < 0.5
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_s", "step_time_s", "mfu", "mfu_causal"):
        assert key in rows[-1]
    flops = mfu_flops_per_token(run.model, run.data.seq_len)
    assert rows[-1]["mfu_causal"] / rows[-1]["mfu"] == pytest.approx(flops["mfu_causal"] / flops["mfu"], rel=1e-12)
    params = summary["state"].params
    assert params["layers"]["attention"]["wq"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert any((tmp_path / "tensorboard").iterdir())


def test_mfu_in_both_conventions_matches_a_hand_count_for_llama3_1_8b():
    """Llama 3.1 8B at 8192 tokens. Parameters a token multiplies: 32 layers x (wq, wo 4096x4096,
    wk, wv 4096x1024, three 4096x14336 MLP matrices, two 4096 norms) = 32 x 218,112,000, plus
    the output head 128256 x 4096 = 525,336,576 and the final norm 4096: N = 7,504,924,672
    (the 8,030,261,248 of the model less the input table, a lookup). 6 N = 45,029,548,032.
    Attention 12 L H K T = 12 x 32 x 32 x 128 x 8192 = 12,884,901,888 (PaLM's, `mfu`);
    MaxText halves it for the causal mask: 6,442,450,944 (`mfu_causal`)."""
    from llama_jax.config import load_model_config

    flops = mfu_flops_per_token(load_model_config("llama3_1_8b"), 8192)
    assert flops == {"mfu": 45_029_548_032 + 12_884_901_888, "mfu_causal": 45_029_548_032 + 6_442_450_944}
    # One v5p chip (459e12 bf16 FLOP/s) at 4,000 tokens/s: 50.47% in PaLM's count, 44.86% in MaxText's.
    assert 4000 * flops["mfu"] / 459e12 == pytest.approx(0.504701, abs=1e-6)
    assert 4000 * flops["mfu_causal"] / 459e12 == pytest.approx(0.448558, abs=1e-6)


def _assert_close_f32(actual, desired):
    """Equal up to float32 summation order: 1e-5 relative, or 1e-6 of the leaf's largest entry."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-6 * float(np.abs(desired).max()))


@pytest.mark.parametrize("layout", ["fsdp", "dp"])
def test_gradient_accumulation_equals_one_big_batch(layout):
    _assert_accumulation_equals_one_big_batch(layout, 4)


def test_accumulation_within_data_parallel_replicas_equals_one_big_batch():
    """16 rows on 8 replicas in 2 micro-batches: each replica accumulates its own 2 rows and
    the replicas are summed once (train/accumulate.py; its bytes: tests/test_comms.py)."""
    _assert_accumulation_equals_one_big_batch("dp", 2)


def _assert_accumulation_equals_one_big_batch(layout: str, grad_accum: int):
    config = LLAMA3_LIKE
    placement = Placement.create(config, load_layout(layout))
    # An "optimizer" that keeps the gradient it is given as its state, so the
    # gradients themselves are compared (not parameter updates, whose rounding
    # at the parameters' magnitude would hide or fake differences).
    optimizer = optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))
    schedule = optax.constant_schedule(1.0)
    batch = placement.global_batch(random_batch(16, 32, config.vocab_size))
    results = {}
    for accum in (1, grad_accum):
        state, shardings = init_state(placement, optimizer, jax.random.key(0))
        step = jit_train_step(make_train_step(config, optimizer, schedule, shardings.params,
                                              grad_accum=accum),
                              placement, shardings)
        with placement.activate():
            state, metrics = step(state, batch)
        results[accum] = (jax.device_get(state.opt_state), jax.device_get(metrics))
    (g1, m1), (g4, m4) = results[1], results[grad_accum]
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        _assert_close_f32(a, b)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_gradients_and_accumulation_buffer_are_sharded_like_the_parameters(grad_accum):
    """Under fsdp on 8 devices, left to XLA, every gradient came out replicated."""
    placement = Placement.create(LLAMA3_LIKE, load_layout("fsdp"))
    params = placement.init_params(jax.random.key(0))
    batch = placement.global_batch(random_batch(16, 32, LLAMA3_LIKE.vocab_size))
    gradients = make_gradients(LLAMA3_LIKE, placement.param_shardings(), grad_accum=grad_accum)
    with placement.activate():
        grads, _ = jax.jit(gradients)(params, batch)
    for (path, grad), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree.leaves(placement.param_shardings())):
        assert grad.sharding.is_equivalent_to(want, grad.ndim), \
            f"{jax.tree_util.keystr(path)}: {grad.sharding.spec}, not {want.spec}"
    assert _shard_shape(grads["layers"]["attention"]["wq"]["kernel"]) == (2, 8, 8, 8)  # embed 64 / 8


def _shard_shape(array):
    return array.addressable_shards[0].data.shape


@pytest.mark.parametrize("chunk", [8, 13])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk):
    config = LLAMA3_LIKE
    params = init_params(config, jax.random.key(3))
    batch = {k: jnp.asarray(v) for k, v in random_batch(2, 40, config.vocab_size).items()}
    model = Llama(config)

    def loss(p, chunked):
        args = (batch["tokens"], batch["positions"])
        if chunked:
            hidden, _ = model.apply({"params": p}, *args, return_hidden=True)
            project = lambda h: model.apply({"params": p}, h, method=Llama.logits)  # noqa: E731
            sums = chunked_cross_entropy_sums(project, hidden, batch["targets"], batch["loss_weights"], chunk)
        else:
            logits, _ = model.apply({"params": p}, *args)
            sums = cross_entropy_sums(logits, batch["targets"], batch["loss_weights"])
        return sums[0] + 1e-2 * sums[1], sums

    (plain, plain_sums), plain_grads = jax.value_and_grad(loss, has_aux=True)(params, False)
    (chunked, chunked_sums), chunked_grads = jax.value_and_grad(loss, has_aux=True)(params, True)
    np.testing.assert_allclose(chunked, plain, rtol=1e-6)
    np.testing.assert_allclose(chunked_sums[2], plain_sums[2])  # same correct-prediction count
    for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(plain_grads)):
        _assert_close_f32(a, b)


def test_weight_decay_skips_norms():
    params = init_params(LLAMA3_LIKE, jax.random.key(0))
    mask = decay_mask(params)
    assert mask["layers"]["attention_norm"]["scale"] is False
    assert mask["norm"]["scale"] is False
    assert mask["layers"]["feed_forward"]["w1"]["kernel"] is True
    assert mask["embed"]["embedding"] is True


def test_schedule_warms_up_then_decays_to_floor():
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10,
                                                      min_lr_ratio=0.1), total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(110)), 0.1, rtol=1e-5)
    assert float(schedule(60)) < 1.0


@pytest.mark.parametrize("override, message", [
    ("optimizr.learning_rate=1", "optimizr: unknown run config key"),
    ("optimizer.lr=1", "optimizer.lr: unknown key (known: b1, b2, clip_norm, decay, eps, learning_rate, "
                       "min_lr_ratio, warmup_steps, weight_decay)"),
    ("stepz=3", "stepz: unknown run config key (closest: steps; "),  # not all 30-odd keys: a short line
    ("data.sourc=tokens", "data.sourc: unknown key (closest: source; "),
    ("steps=-3", "steps: must be a positive integer"),
    ("optimizer.learning_rate=nan", "optimizer.learning_rate: must be a positive finite number, got nan"),
    ("optimizer.learning_rate=inf", "optimizer.learning_rate: must be a positive finite number, got inf"),
    ("grad_accum=3", "grad_accum: 3 does not divide data.global_batch 16"),
    ("data.seq_len=100000", "data.seq_len: 100000 exceeds the model's max_seq_len"),
    ("chip=v9", "chip: 'v9' is not one of"),
    ("on_nonfinite=ignore", "on_nonfinite: 'ignore' is not one of stop, skip"),
    ("checkpoint_timeout=0", "checkpoint_timeout: must be a positive integer, got 0"),
    ("peer_timeout=-1", "peer_timeout: must be a whole number of seconds (0: never), got -1"),
    ("metrics.tensorboard=false", "metrics.tensorboard: unknown key (known: wandb)"),
    ("metrics.wandb.projekt=p", "metrics.wandb.projekt: unknown key (known: entity, mode, name, project)"),
    ("metrics.wandb={name: run-1}", "metrics.wandb.project: required: the W&B project to log to"),
    ("metrics.wandb={project: p, mode: cloud}", "metrics.wandb.mode: 'cloud' is not one of online, offline, disabled"),
    ("metrics=[wandb]", "metrics: expected a mapping, got list"),
    ("eval.tasks=[arc_easy]", "eval.tasks: set eval.every, the steps between two evaluations"),
    ("eval={every: 5, tasks: ['']}", "eval.tasks: must be lm-eval task names"),
    ("eval={every: 5, tasks: arc_easy, task_limit: 1.5}", "eval.task_limit: must be a document count or a fraction"),
    ("eval={every: 5, tasks: arc_easy}", "eval.tasks: lm-eval's tasks are text; set tokenizer (or data.tokenizer)"),
])
def test_bad_run_config_values_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config("tiny_cpu", [override])
    assert message in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 200


def test_an_unknown_run_config_name_gives_the_closest_names_and_where_to_look():
    from llama_jax.config_files import shipped_configs

    with pytest.raises(ConfigError) as err:
        load_run_config("tiny_cpuu")
    assert str(err.value) == (f"run config 'tiny_cpuu' not found (closest: tiny_cpu, llama4_tiny_cpu; "
                              f"{len(shipped_configs('runs'))} known, see configs/runs/)")


@pytest.mark.parametrize("text, kind", [("- model: tiny\n- steps: 3\n", "list"), ("42\n", "int"),
                                        ("just words\n", "str")])
def test_run_config_that_is_not_a_mapping_is_one_line_naming_the_file(tmp_path, text, kind):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(err.value) == f"{path}: the top level must be a mapping of keys, got a {kind}"


def test_key_given_twice_on_command_line_is_an_error():
    with pytest.raises(ConfigError, match="given twice"):
        load_run_config("tiny_cpu", ["steps=3", "steps=4"])


def test_every_shipped_run_config_loads():
    from llama_jax.config_files import shipped_configs
    names = shipped_configs("runs")
    assert "tiny_cpu" in names and "llama3_1_405b_v5p" in names
    for name in names:
        run = load_run_config(name)
        assert run.steps > 0, name


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    for args in (["--config", "tiny_cpu", "layout=nonexistent", f"run_dir={tmp_path}"],
                 ["--config", "no_such_run"],
                 ["--config", "tiny_cpu", "mesh.tensor=3", f"run_dir={tmp_path}"]):
        proc = subprocess.run([sys.executable, "-m", "train", *args, "--quiet"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
        assert len(errors) == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_model_config_inline_in_run_config():
    run = run_config_from_dict({"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                                          "ffn_dim": 64, "vocab_size": 128},
                                "data": {"seq_len": 16, "global_batch": 8, "vocab_size": 128}})
    assert run.model.dim == 32


def _train_cli_error(capsys, *args) -> str:
    """`python -m train` in process; its only stderr line (exit code 2 and no traceback asserted)."""
    from train.__main__ import main

    capsys.readouterr()
    code = main(["--config", "tiny_cpu", "--quiet", "steps=1", *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("run_dir", ["file", "file/run"])
def test_run_dir_with_a_file_in_the_way_is_one_line(tmp_path, capsys, run_dir):
    """It used to end in a 25-line traceback."""
    (tmp_path / "file").write_text("not a directory")
    assert _train_cli_error(capsys, f"run_dir={tmp_path / run_dir}") == (
        f"train: error: run_dir {tmp_path / run_dir}: {tmp_path / 'file'} is a file, not a directory; "
        "choose another run_dir")
    assert (tmp_path / "file").read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.parametrize("run_dir, problem", [("locked/run", "cannot create it (Permission denied)"),
                                              ("locked", "not writable (read-only or no permission)")])
def test_read_only_run_dir_is_one_line(tmp_path, capsys, run_dir, problem):
    (tmp_path / "locked").mkdir(mode=0o555)
    assert _train_cli_error(capsys, f"run_dir={tmp_path / run_dir}") == (
        f"train: error: run_dir {tmp_path / run_dir}: {problem}; choose another run_dir")
