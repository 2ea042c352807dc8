"""Ahead-of-time compiles for TPU topologies: memory follows the layout, OOM is a verdict.

These compile for compile-only TPU devices, so they need libtpu (the `tpu`
extra) but no TPU; without it the module is skipped.
"""

from __future__ import annotations

import functools
import json
import math

import pytest

pytest.importorskip("libtpu", reason="TPU compiles need libtpu: pip install -e '.[tpu]'")

import jax  # noqa: E402

from sharding.topology import topology_devices  # noqa: E402
from train.compile.aot import compile_run  # noqa: E402
from train.compile.cli import main, parse_sweep  # noqa: E402
from llama_jax.config import load_model_config  # noqa: E402
from train.config import run_config_from_dict  # noqa: E402

TOPOLOGY = "v5p:2x2x2"
# Every dimension split 8 ways is still a multiple of 128, so TPU tiling pads
# nothing that matters and argument bytes are the shards' bytes.
SHAPE = {"dim": 1024, "n_layers": 2, "n_heads": 8, "n_kv_heads": 8, "ffn_dim": 2048,
         "vocab_size": 1024, "max_seq_len": 256}


@functools.cache
def _devices():
    return topology_devices(TOPOLOGY)


def _run(layout="fsdp", mesh=None, global_batch=8, seq_len=128, model=None, programs=("train",)):
    return run_config_from_dict({
        "model": model or SHAPE, "layout": layout, "mesh": mesh or {}, "programs": programs,
        "data": {"source": "synthetic", "vocab_size": 256, "seq_len": seq_len,
                 "global_batch": global_batch}})


def _state_and_batch_shard_bytes(run) -> tuple[int, int]:
    """(state bytes, batch bytes) one chip holds, from the shardings the compile was given."""
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.compile.aot import train_program

    placement = Placement.create(run.model, load_layout(run.layout, **run.mesh), devices=_devices())
    _, (state, batch) = train_program(run, placement)

    def shard_bytes(tree):
        return sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape))
                   for x in jax.tree.leaves(tree))
    return shard_bytes(state), shard_bytes(batch)


def test_argument_bytes_are_the_layouts_shards_and_halve_when_fsdp_doubles():
    results, expected = {}, {}
    for fsdp, mesh in ((8, {}), (4, {"data": 2})):
        run = _run(mesh=mesh)
        results[fsdp] = compile_run(run, _devices(), topology=TOPOLOGY)
        expected[fsdp] = _state_and_batch_shard_bytes(run)
        assert results[fsdp].mesh["fsdp"] == fsdp
        assert results[fsdp].verdict == "fits"
        state, batch = expected[fsdp]
        arguments = results[fsdp].memory["arguments"]
        assert abs(arguments - (state + batch)) <= 0.01 * arguments, (fsdp, arguments, state, batch)
        # The state is donated: the updated state is written over it.
        assert results[fsdp].memory["aliased"] >= 0.99 * state
    state_8 = results[8].memory["arguments"] - expected[8][1]
    state_4 = results[4].memory["arguments"] - expected[4][1]
    assert state_4 == pytest.approx(2 * state_8, rel=0.01)


def test_compiled_state_is_what_the_plan_counts_for_bfloat16_parameters():
    """bfloat16 parameters with float32 Adam moments: the compiled step's state arguments
    are the plan's parameter and optimizer bytes (the step counts add a few bytes)."""
    from sharding.layout import load_layout
    from sharding.plan import plan

    run = _run(model={**SHAPE, "param_dtype": "bfloat16"})
    result = compile_run(run, _devices(), topology=TOPOLOGY)
    planned = plan(run.model, load_layout("fsdp"), 8, seq_len=128)["per_device_bytes"]
    _, batch = _state_and_batch_shard_bytes(run)
    state = result.memory["arguments"] - batch
    assert planned["optimizer"] == 4 * planned["parameters"]  # 2 x float32 per bfloat16 parameter
    assert abs(state - (planned["parameters"] + planned["optimizer"])) <= 0.001 * state


def test_oversized_batch_is_the_verdict_does_not_fit():
    run = _run(model={**SHAPE, "dim": 256, "ffn_dim": 512}, global_batch=2**20, seq_len=256)
    result = compile_run(run, _devices(), topology=TOPOLOGY)
    assert result.verdict == "does not fit"
    assert result.memory is None
    assert "memory" in result.reason.lower()


def test_cli_prints_one_json_object_with_train_and_decode(capsys):
    code = main(["--config", "tiny_cpu", "--topology", TOPOLOGY, "--decode", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert set(report) == {"train", "decode"}
    assert report["train"]["chips"] == 8 and report["train"]["chip"] == "v5p"
    assert report["train"]["verdict"] == "fits"
    assert report["decode"]["memory"]["peak"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v9:2x2"], "topology 'v9:2x2'"),
    (["--topology", TOPOLOGY, "mesh.tensor=16"], "8 devices"),
    (["--topology", TOPOLOGY, "--sweep", "remat"], "--sweep"),
    (["--topology", TOPOLOGY, "--comms", "--plot", "sweep.png"], "--plot: draws a sweep's communication"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(argv, message, capsys):
    code = main(["--config", "tiny_cpu", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err


def test_sweep_compiles_every_combination_and_marks_invalid_ones(capsys):
    assert parse_sweep(["layout=fsdp,fsdp_tp", "remat=full"]) == [
        {"layout": "fsdp", "model_overrides.remat": "full"},
        {"layout": "fsdp_tp", "model_overrides.remat": "full"}]
    code = main(["--config", "tiny_cpu", "--topology", TOPOLOGY, "--sweep", "mesh.tensor=2,16"])
    table = capsys.readouterr().out.splitlines()
    assert code == 0
    assert len(table) == 3 and "fits" in table[1] and "invalid" in table[2], table


def test_sweep_comms_lists_traffic_per_row_and_estimates_it_by_the_stated_model(capsys, tmp_path):
    """On TPU devices (v5p:2x2x2: every 8-device group spans the 3 torus dimensions) the data
    parallel row's time is its all-reduce bytes over 3 links of 200 GB/s, its compute the model
    FLOPs at 459 TFLOP/s; the layer all-reduces run once per layer (the TPU program's loops have
    no known trip count: it is read from the loop condition)."""
    plot = tmp_path / "sweep.png"
    code = main(["--config", "tiny_cpu", "--topology", TOPOLOGY, "--sweep", "layout=dp,fsdp", "--comms",
                 "--json", "--plot", str(plot)])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["values"] for row in rows] == [{"layout": "dp"}, {"layout": "fsdp"}]
    dp = rows[0]
    assert {(c["kind"], tuple(c["axes"])) for c in dp["collectives"]} == {("all-reduce", ("data",))}
    moved = sum(c["bytes_per_step"] for c in dp["collectives"])
    est = dp["estimate"]
    assert est["comm_s"] == pytest.approx(moved / (3 * 1200e9 / 6), rel=1e-9)
    assert est["compute_s"] == pytest.approx(dp["model_flops"] / 459e12, rel=1e-9)
    assert est["step_s"] == pytest.approx(max(est["compute_s"], est["comm_s"]), rel=1e-12)
    # tiny: D 64, 4 heads and 2 kv heads of 16, FFN 128, vocab 256, 2 layers, float32 parameters;
    # the loss's four float32 scalar sums ride along with the gradient.
    layer = 2 * 64 * 4 * 16 + 2 * 64 * 2 * 16 + 3 * 64 * 128 + 2 * 64
    params = 2 * layer + 2 * 256 * 64 + 64
    assert moved == pytest.approx(2 * 7 / 8 * (4 * params + 4 * 4), rel=1e-12)
    assert {tuple(c["axes"]) for c in rows[1]["collectives"]} == {("fsdp",)}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- TPU code paths: the splash kernel, the plain SwiGLU backward, prefill, every shipped run ----

def _primitives(jaxpr) -> set[str]:
    from jax.extend.core import jaxprs_in_params

    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def _training_primitives(placement) -> set[str]:
    """Primitives of the model's loss and gradients, traced under `placement` (or no mesh)."""
    import jax.numpy as jnp

    from llama_jax import Llama
    from llama_jax.params import abstract_params
    from sharding.place import abstract_arrays

    params, tokens = abstract_params(TINY_SPLASH), jax.ShapeDtypeStruct((8, 256), jnp.int32)
    if placement is not None:
        params = abstract_arrays(params, placement.param_shardings())
        tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype,
                                      sharding=placement.sharding("batch", "length"))

    def loss(params, tokens):
        return Llama(TINY_SPLASH).apply({"params": params}, tokens)[0].sum()

    trace = lambda: jax.make_jaxpr(jax.grad(loss))(params, tokens)  # noqa: E731
    if placement is None:
        return _primitives(trace().jaxpr)
    with placement.activate():
        return _primitives(trace().jaxpr)


TINY_SPLASH = load_model_config("tiny")


def test_auto_picks_splash_and_plain_swiglu_on_tpu_and_neither_on_cpu():
    from sharding.layout import load_layout
    from sharding.place import Placement

    assert TINY_SPLASH.attention == "auto" and TINY_SPLASH.swiglu_backward == "auto"
    on_tpu = _training_primitives(Placement.create(TINY_SPLASH, load_layout("fsdp"), devices=_devices()))
    assert "pallas_call" in on_tpu and "optimization_barrier" not in on_tpu
    on_cpu = _training_primitives(None)
    assert "pallas_call" not in on_cpu and "optimization_barrier" in on_cpu


def test_splash_train_step_and_chunked_prefill_compile_for_tpu(capsys):
    """The kernel lowers through libtpu: a train step under fsdp_sp (context parallelism
    over 2 of the 8 chips, 128 tokens each) and a prefill of 512 tokens in 2 chunks."""
    code = main(["--config", "tiny_cpu", "--topology", TOPOLOGY, "--prefill", "--prefill-chunk", "256",
                 "--decode-batch", "4", "--cache-len", "512", "--json", "layout=fsdp_sp",
                 "model_overrides.attention=splash", "model_overrides.max_seq_len=512", "data.seq_len=256",
                 "data.global_batch=4"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(report) == {"train", "prefill"}
    assert report["train"]["mesh"]["sequence"] == 2 and report["train"]["verdict"] == "fits"
    assert report["prefill"]["seq_len"] == 512 and report["prefill"]["memory"]["peak"] > 0


def test_every_shipped_tpu_run_names_a_slice_its_layout_places_on():
    """What `python -m train.compile --all` compiles (minutes): here only the cheap part,
    every run's layout validated against its slice's chip count and its batch."""
    from llama_jax.config_files import shipped_configs
    from sharding.layout import load_layout
    from sharding.mesh import make_mesh
    from sharding.place import validate
    from sharding.topology import slices_of
    from train.config import load_run_config

    for name in shipped_configs("runs"):
        run = load_run_config(name)
        if run.chip == "cpu":
            assert run.topology is None, name
            continue
        assert run.topology and run.topology.startswith(run.chip + ":"), f"{name}: {run.topology}"
        layout = load_layout(run.layout, **run.mesh)
        devices = topology_devices(run.topology, slices_of(layout))
        mesh = make_mesh(layout, devices)
        batch = run.data.global_batch // run.grad_accum
        seq = run.data.seq_len if "train" in run.programs else None
        validate(run.model, layout, mesh, batch=batch, seq_len=seq)
def test_a_vision_models_train_step_prefill_and_decode_compile(tmp_path, capsys):
    """A Llama 3.2 Vision model's prefill (encoder, projector, image keys and values) and decode
    step compile for the slice, and so does its train step (image adapters trained, a batch of
    chat rows with one image slot each)."""
    import yaml

    from tiny import VISION_LIKE

    run = tmp_path / "vision.yaml"
    run.write_text(yaml.safe_dump({
        "model": json.loads(json.dumps(VISION_LIKE.to_dict())), "layout": "fsdp_tp", "init_from": "ckpt/mllama",
        "data": {"source": "chat", "paths": ["chat.jsonl"], "packing": False, "seq_len": 128,
                 "global_batch": 8}}))
    code = main(["--config", str(run), "--topology", TOPOLOGY, "--inference", "--prompt-len", "64", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and set(report) == {"prefill", "decode"}
    assert report["prefill"]["verdict"] == report["decode"]["verdict"] == "fits"
    assert (report["prefill"]["prompt_len"], report["prefill"]["images_per_row"]) == (64, 1)
    assert main(["--config", str(run), "--topology", TOPOLOGY, "--json"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert (train["verdict"], train["batch"], train["seq_len"]) == ("fits", 8, 128)


def test_decode_with_int8_weights_and_cache_compiles_with_about_half_the_bytes_per_chip():
    results = {}
    for name, overrides in (("bf16", {}), ("int8", {"quantize": "int8", "kv_cache_dtype": "int8"})):
        run = _run(layout="tp", model={**SHAPE, "dtype": "bfloat16", "param_dtype": "bfloat16", **overrides},
                   programs=["decode"])  # a run of quantised weights trains nothing (train/config.py)
        results[name] = compile_run(run, _devices(), topology=TOPOLOGY, program="decode", decode_batch=8,
                                    cache_len=256)
        r = results[name]
        assert r.verdict == "fits" and r.quantize == overrides.get("quantize")
        arguments = r.memory["arguments"]
        assert abs(arguments - (r.weight_bytes + r.cache_bytes)) <= 0.01 * arguments
        assert r.memory["aliased"] >= r.cache_bytes  # the cache is updated in place
    # Projections halve; the embedding and the output head (1/11 of the weights here) stay bfloat16.
    assert 0.5 < results["int8"].weight_bytes / results["bf16"].weight_bytes < 0.6
    assert 0.5 < results["int8"].cache_bytes / results["bf16"].cache_bytes < 0.55  # + a scale per 128 values


def test_quantised_models_compile_only_the_decode_step(capsys):
    code = main(["--config", "tiny_cpu", "--topology", TOPOLOGY, "model_overrides.quantize=int8"])
    assert code == 2
    assert "quantised weights stay frozen; add a lora section" in \
        capsys.readouterr().err
    assert main(["--config", "tiny_cpu", "--topology", TOPOLOGY, "--decode-only", "--json",
                 "model_overrides.quantize=int8"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"decode"}


def test_dpo_and_distillation_steps_hold_their_reference_and_teacher(tmp_path):
    """train.compile compiles the run's own objective: a distillation step's arguments hold the
    teacher's shards (twice the student's depth), a DPO step's state a second copy of the
    parameters' shards (its frozen reference); a DPO run on precomputed log-probabilities
    holds none, only their per-row values in the batch."""
    from llama_jax.formats.hf import config_to_hf
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.compile.aot import train_program
    from train.objectives.run import teacher_placement

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(config_to_hf(_run(model={**SHAPE, "n_layers": 4}).model)))
    preference = {"source": "preference", "paths": ["pairs.jsonl"], "seq_len": 128, "global_batch": 8}
    synthetic = {"source": "synthetic", "vocab_size": 256, "seq_len": 128, "global_batch": 8}
    runs = {"distill": {"data": synthetic, "distill": {"teacher": str(teacher)}},
            "dpo": {"data": preference, "dpo": {}},
            "dpo on precomputed log-probs": {"data": {**preference, "reference_log_probs": "ref.json"}, "dpo": {}}}

    def shard_bytes(tree):
        return sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(tree))

    held = {}
    for name, sections in runs.items():
        run = run_config_from_dict({"model": SHAPE, "layout": "fsdp", **sections})
        layout = load_layout(run.layout)
        placement = Placement.create(run.model, layout, devices=_devices())
        _, (state, batch) = train_program(run, placement, teacher_placement(run, layout, devices=_devices()))
        held[name] = shard_bytes(state.reference) / shard_bytes(state.params)
        if name == "distill":  # what the compiled step takes is that state and batch
            arguments = compile_run(run, _devices(), topology=TOPOLOGY).memory["arguments"]
            assert arguments == pytest.approx(shard_bytes(state) + shard_bytes(batch), rel=0.01)
        if name == "dpo on precomputed log-probs":
            assert set(batch) > {"reference_chosen", "reference_rejected"}
    assert held == {"distill": pytest.approx(1.9, rel=0.05), "dpo": 1.0, "dpo on precomputed log-probs": 0.0}


def test_serve_compiles_the_servers_decode_slots_and_prefill_into_them(capsys):
    """--serve judges infer.serve's own programs (tests/test_serve_program.py proves they are the
    batcher's): the decode call over --max-batch slots of --max-seq-len positions, with logprobs,
    and the prefill of the largest group of the longest prompts into the slots."""
    code = main(["--config", "tiny_cpu", "--topology", TOPOLOGY, "--serve", "--max-batch", "16",
                 "--max-seq-len", "100", "--steps-per-call", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and set(report) == {"serve_prefill", "serve_decode"}
    decode, prefill = report["serve_decode"], report["serve_prefill"]
    assert decode["verdict"] == prefill["verdict"] == "fits"
    assert (decode["batch"], decode["slots"], decode["seq_len"], decode["steps"]) == (16, 16, 128, 2)
    assert (prefill["batch"], prefill["slots"], prefill["prompt_len"]) == (8, 16, 128)  # --prefill-batch 8
    assert decode["memory"]["aliased"] >= decode["cache_bytes"] > 0  # the slots' cache is updated in place
    assert main(["--config", "tiny_cpu", "--topology", TOPOLOGY, "--serve", "--max-batch", "6"]) == 2
    assert "slots must be a positive multiple of the layout's batch shards (4)" in capsys.readouterr().err


def test_eval_compiles_the_lm_eval_scorers_pass_and_needs_no_lm_eval(capsys):
    """--eval judges the in-process lm-eval model's scoring pass (train/lm_eval/scoring.py) for
    --decode-batch rows of --cache-len tokens; train.compile never imports lm-eval itself."""
    import subprocess
    import sys

    code = main(["--config", "tiny_cpu", "--topology", TOPOLOGY, "--eval", "--decode-batch", "16", "--cache-len",
                 "64", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and set(report) == {"eval"}
    assert (report["eval"]["batch"], report["eval"]["seq_len"], report["eval"]["verdict"]) == (16, 64, "fits")
    check = "import sys, train.compile.cli; assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_pipeline_compile_reports_its_bubble_and_stretches_the_estimate_by_it(capsys):
    """The `pipeline` layout over two v5p:2x2x2 slices (a stage a slice, fsdp 8 inside): 2 stages,
    8 micro-batches, 1 repeat make 9 ticks, one idle: bubble (S - 1) / (M R + S - 1) = 1/9. The
    stages hand activations to each other over DCN (collective-permutes over `stage`)."""
    code = main(["--config", "tiny_cpu", "--topology", TOPOLOGY, "--comms", "--json", "layout=pipeline",
                 "data.global_batch=64"])
    assert code == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert train["mesh"]["stage"] == 2 and train["slices"] == 2
    assert train["pipeline"] == {"stages": 2, "repeats": 1, "microbatches": 8, "ticks": 9,
                                 "bubble": pytest.approx((2 - 1) / (8 * 1 + 2 - 1))}
    est = train["estimate"]
    assert est["bubble"] == pytest.approx(1 / 9)
    assert est["compute_s"] == pytest.approx(train["model_flops"] / 459e12 / (1 - 1 / 9), rel=1e-9)
    assert any(c["kind"] == "collective-permute" and c["axes"] == ["stage"] and c["dcn"]
               for c in train["collectives"]), train["collectives"]
