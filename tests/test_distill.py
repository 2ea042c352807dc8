"""Logit distillation: the loss against an unchunked numpy reference, finite differences,
a larger teacher under fsdp_tp, a student that learns its teacher's greedy answers (and
better than by cross-entropy alone), the distill_tiny config through the CLI, a teacher of
another vocabulary."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_runs import REPO, metrics, subprocess_env

from llama_jax import Llama, ModelConfig, init_params
from llama_jax.formats.checkpoint import save_params
from sharding.layout import load_layout
from sharding.place import Placement
from train.data.config import DataConfig
from train.data.pipeline import make_dataset
from train.objectives.distill import distill
from train.step import make_gradients

STUDENT = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=256,
                      rope_theta=10000.0, max_seq_len=64)
TEACHER = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256,
                      rope_theta=10000.0, max_seq_len=64)


def _packed_batch(rows=8, seq_len=40):
    """Packed synthetic rows: several documents a row, segment ids and restarting positions."""
    data = DataConfig(source="synthetic", vocab_size=256, synthetic_docs=200, seq_len=seq_len, global_batch=rows)
    batch = next(make_dataset(data, shard_index=0, shard_count=1))
    assert (batch["segment_ids"].max(axis=1) > 1).any(), "rows should hold several documents"
    return batch


def _numpy_distill(student_logits, teacher_logits, batch, alpha, tau):
    """(loss, kl, ce) sums from whole logits, in float64."""
    s, t = np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    w = batch["loss_weights"].astype(np.float64)
    log_p, log_q = log_softmax(t / tau), log_softmax(s / tau)
    kl = (w * (np.exp(log_p) * (log_p - log_q)).sum(-1)).sum() * tau ** 2
    ce = -(w * np.take_along_axis(log_softmax(s), batch["targets"][..., None], -1)[..., 0]).sum()
    return alpha * kl + (1 - alpha) * ce, kl, ce


def test_distillation_loss_chunked_over_the_vocabulary_equals_an_unchunked_numpy_reference():
    chunk = 16
    batch = _packed_batch()
    student, teacher = init_params(STUDENT, jax.random.key(0)), init_params(TEACHER, jax.random.key(1))
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    s = jax.jit(Llama(STUDENT).apply)({"params": student}, *args)[0]
    t = jax.jit(Llama(TEACHER).apply)({"params": teacher}, *args)[0]
    sums = jax.jit(distill(STUDENT, TEACHER, 0.7, 2.0, chunk).sums)(student, {}, teacher, batch)[1]
    loss, kl, ce = _numpy_distill(s, t, batch, 0.7, 2.0)
    for name, want in (("loss", loss), ("kl", kl), ("ce", ce)):
        np.testing.assert_allclose(float(sums[name]), want, rtol=1e-5, err_msg=name)
    assert float(sums["weight"]) == batch["loss_weights"].sum()

    same = jax.jit(distill(STUDENT, STUDENT, 0.7, 2.0, chunk).sums)(student, {}, student, batch)[1]
    assert abs(float(same["kl"])) <= 1e-6 * float(same["ce"]), "the KL term vanishes when student is teacher"


def test_distillation_gradients_match_finite_differences():
    batch = _packed_batch(rows=2, seq_len=24)
    student, teacher = init_params(STUDENT, jax.random.key(0)), init_params(TEACHER, jax.random.key(1))
    objective = distill(STUDENT, TEACHER, 0.5, 2.0, chunk=8)
    value = jax.jit(lambda p: objective.sums(p, {}, teacher, batch)[0])
    grads = jax.jit(jax.grad(lambda p: objective.sums(p, {}, teacher, batch)[0]))(student)
    leaves, tree = jax.tree.flatten(student)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    direction = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    norm = float(jnp.sqrt(sum(jnp.sum(d * d) for d in direction)))
    direction = jax.tree.unflatten(tree, [d / norm for d in direction])  # a unit step over all weights
    eps = 1e-2
    plus = value(jax.tree.map(lambda p, d: p + eps * d, student, direction))
    minus = value(jax.tree.map(lambda p, d: p - eps * d, student, direction))
    numeric = float(plus - minus) / (2 * eps)
    analytic = float(sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))))
    assert abs(numeric - analytic) <= 2e-3 * abs(analytic), (numeric, analytic)


def test_distillation_with_a_larger_teacher_under_fsdp_tp_equals_one_device():
    batch = _packed_batch()
    student, teacher = init_params(STUDENT, jax.random.key(0)), init_params(TEACHER, jax.random.key(1))
    one_device = Placement.create(STUDENT, load_layout("dp"), devices=jax.devices()[:1])
    want_grads, want = jax.device_get(jax.jit(make_gradients(
        STUDENT, one_device.param_shardings(), objective=distill(STUDENT, TEACHER, 0.5, 2.0)))(
            student, batch, None, teacher))

    placement = Placement.create(STUDENT, load_layout("fsdp_tp"))
    teacher_placement = Placement.create(TEACHER, load_layout("fsdp_tp"))
    shardings = placement.param_shardings()
    with placement.activate():
        gradients = jax.jit(make_gradients(STUDENT, shardings, grad_accum=2,
                                           objective=distill(STUDENT, TEACHER, 0.5, 2.0, chunk=16)))
        grads, sums = gradients(placement.put(student, shardings), placement.global_batch(batch), None,
                                teacher_placement.put(teacher, teacher_placement.param_shardings()))
    for name in want:
        np.testing.assert_allclose(float(sums[name]), float(want[name]), rtol=1e-5, err_msg=name)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        err = float(np.abs(np.asarray(g) - w).max() / np.abs(w).max())
        assert err <= 1e-5, f"{jax.tree_util.keystr(path)} differs by {err:.2e} (relative)"


def test_a_distilled_student_agrees_with_its_teachers_greedy_continuations_more_than_by_cross_entropy():
    """bench/distill_agreement.py's experiment at its own settings: a teacher that learned a
    noisy rule, and a student of half its width trained on the same corpus for the same 150
    steps from the same start, by distillation and by cross-entropy alone; agreement is the
    share of 512 held-out prompts whose 8-id greedy continuation is the teacher's."""
    sys.path.insert(0, str(REPO / "bench"))
    from distill_agreement import measure

    teacher, distilled, alone = measure()
    assert teacher["follows_rule"] >= 0.99, teacher  # the teacher learned the task
    assert distilled["objective"] == "distill" and alone["objective"] == "cross_entropy"
    assert distilled["agreement"] >= 0.9, distilled
    assert distilled["agreement"] > alone["agreement"], (distilled, alone)


def _teacher_checkpoint(path, config):
    """A random teacher whose output kernel is scaled up, so its predictions are far from
    uniform (a fresh model's are nearly uniform, and so nearly any student's)."""
    params = init_params(config, jax.random.key(7))
    params["output"]["kernel"] = params["output"]["kernel"] * 100.0
    save_params(path, config, params)
    return path


def test_distill_tiny_through_the_cli_brings_the_student_towards_its_teacher(tmp_path):
    from train.config import load_run_config

    run = load_run_config("distill_tiny")
    teacher = _teacher_checkpoint(tmp_path / "teacher", run.model.replace(n_layers=2, ffn_dim=128))
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "train", "--config", "distill_tiny", "--quiet",
                             f"run_dir={run_dir}", f"distill.teacher={teacher}", "chip=v4", "steps=20",
                             "log_every=5", "checkpoint_every=20"],
                            cwd=REPO, env=subprocess_env(8), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert rows[-1]["kl"] < 0.95 * rows[0]["kl"], [r["kl"] for r in rows]
    for row in rows:
        assert row["loss"] == pytest.approx(0.5 * row["kl"] + 0.5 * row["ce"], rel=1e-5)


def test_a_teacher_with_another_vocabulary_is_one_line(tmp_path, capsys):
    from train.__main__ import main

    teacher = _teacher_checkpoint(tmp_path / "teacher", TEACHER.replace(vocab_size=320))
    code = main(["--config", "distill_tiny", "--quiet", f"run_dir={tmp_path / 'run'}", f"distill.teacher={teacher}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "its vocab_size 320 differs from the student's 256" in err
    assert not (tmp_path / "run").exists()
