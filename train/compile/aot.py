"""Ahead-of-time compiles of the real train and decode programs, and their verdicts.

`compile_run(run, devices)` builds the project's own programs for the run's
layout over `devices` (usually compile-only TPU devices from
sharding.topology), compiles them from abstract sharded inputs and judges
the per-chip HBM. The command that prints the results is train/compile/cli.py.

Programs: "train" (train.step), "prefill" and "decode" (infer.generate's
llama_jax.decoding.programs), and the HTTP server's own two (`SERVE_PROGRAMS`):
"serve_decode", several decode steps of every slot with each token's
logprobs, and "serve_prefill", a group of prompts prefilled into their slots,
jitted by the same `llama_jax.decoding.slots.jit_slot_programs` that
infer.batcher serves them with. And "eval": the lm-eval model's scoring
forward pass (train/lm_eval/scoring.py's `score_batch`, jitted by its `Scorer`),
one batch of rows of log-likelihood requests.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.config import ConfigError
from llama_jax.decoding import programs
from llama_jax.decoding.buckets import prompt_shape
from llama_jax.decoding.programs import PREFILL_CHUNK
from llama_jax.decoding.sampling import RowSampling, Sampling, bitmask_words
from llama_jax.decoding.slots import (PREFILL_BATCH, SLOTS, STEPS_PER_CALL, empty_slots, jit_slot_programs,
                                      slot_shape)
from llama_jax.params import abstract_params, model_for
from llama_jax.vision.image import image_shapes
from sharding.comms import parse_collectives
from sharding.comms_estimate import estimate_step, summary
from sharding.layout import load_layout
from sharding.place import Placement, abstract_arrays, validate
from sharding.topology import CHIP_HBM_BYTES, CHIP_PEAK_FLOPS, chip_info, layout_for_slices
from train.lm_eval.scoring import Scorer  # not lm-eval itself: scoring is plain JAX
from train.objectives.run import teacher_placement
from train.program import build_train_step, step_shape
from train.tracking.metrics import mfu_flops_per_token

SERVE_PROGRAMS = ("serve_prefill", "serve_decode")  # infer.serve's programs (the run config's "serve")


@dataclasses.dataclass
class CompileResult:
    """One compile's figures; bytes and FLOPs are per chip unless named otherwise."""
    program: str                  # "train", "prefill", "decode", "eval" or one of SERVE_PROGRAMS
    topology: str
    slices: int
    chip: str
    chips: int
    layout: str
    mesh: dict[str, int]
    batch: int                    # global rows (decode, prefill: sequences; serve_decode: slots; eval: rows)
    seq_len: int                  # decode, prefill: cache length (serve programs: per slot; eval: row length)
    grad_accum: int
    remat: str
    dtype: str
    param_dtype: str
    verdict: str                  # fits | tight | does not fit
    hbm_bytes: float              # the chip's published HBM (per device)
    compile_s: float
    memory: dict[str, int] | None = None   # arguments, outputs, aliased, temporaries, code, peak, total
    model_flops: float | None = None       # per chip per step (train only), full attention (`mfu`)
    model_flops_causal: float | None = None  # the same, attention halved as MaxText counts (`mfu_causal`)
    xla_flops: float | None = None         # cost_analysis(), per chip (loop bodies counted once)
    step_s_at_full_mfu: float | None = None         # model_flops / peak
    step_s_at_full_mfu_causal: float | None = None  # model_flops_causal / peak
    reason: str | None = None              # the compiler's message when it does not fit
    prompt_len: int | None = None          # prefill, serve_prefill: tokens per prompt
    slots: int | None = None               # serve programs: the server's decode slots
    steps: int | None = None               # serve_decode: decode steps per call
    images_per_row: int = 0                # prefill and decode of a vision model
    quantize: str | None = None            # int8 / fp8 weights (llama_jax/model/quantize.py)
    kv_cache_dtype: str | None = None      # int8 / fp8 KV cache (decode)
    weight_bytes: int | None = None        # one chip's share of the parameters, as compiled
    cache_bytes: int | None = None         # one chip's share of the KV cache (decode and serve programs)
    collectives: list | None = None        # sharding.comms.Collective list (compile_run(comms=True))
    estimate: dict | None = None           # sharding.comms_estimate.StepEstimate as a dict (train, comms=True)
    pipeline: dict | None = None           # train under stages: stages, repeats, microbatches, ticks, bubble

    @property
    def used_bytes(self) -> int | None:
        return None if self.memory is None else max(self.memory["peak"], self.memory["total"])

    def to_dict(self) -> dict:
        """JSON-ready; the collectives grouped by kind and mesh axes (sharding.comms_estimate.summary)."""

        collectives = None if self.collectives is None else summary(self.collectives)
        return (dataclasses.asdict(dataclasses.replace(self, collectives=None))
                | {"used_bytes": self.used_bytes, "collectives": collectives})


# --- building the programs -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bound:
    """A jitted function with its keyword arguments fixed: `lower(*args)` lowers it as jit's own."""

    jitted: Callable
    kwargs: dict

    def lower(self, *args):
        return self.jitted.lower(*args, **self.kwargs)


def train_program(run, placement, teacher=None):
    """(jitted train_step, abstract sharded (state, batch)): the step `train.loop.train` runs,
    from the same builder (`train.program.build_train_step`): the run's objective
    (cross-entropy, DPO or distillation), its state holding DPO's frozen reference or the
    distillation teacher (`teacher`: train.objectives.run.teacher_placement's, on the same
    devices), its batch the per-row reference log-probabilities a DPO run's data holds."""
    program = build_train_step(run, placement, teacher)
    return program.step, (program.state, program.batch)


def decode_program(config, placement, batch: int, cache_len: int):
    """(jitted decode loop, abstract sharded (params, state, stops)): offline decoding's loop
    (`infer.generate`; the HTTP server's programs are `serve_program`'s).

    The program is `llama_jax.decoding.programs.decode` (one step of its loop, greedy),
    jitted by `programs.jit_programs` as infer's Engine jits it: the state donated and
    sharded by the layout (batch on data/fsdp, the KV cache's kv_heads on tensor).
    A vision model's state also holds its images' cached keys and values
    (`vision.max_images` per row), which every step reads.
    """
    config = config.replace(remat="none")  # nothing is differentiated
    with_images = config.vision is not None
    replicated = _replicated(placement)
    state_shardings = placement.tree_shardings(programs.state_axes(config, with_images))
    _, decode = programs.jit_programs(model_for(config), state_shardings, replicated)
    step = Bound(decode, {"sampling": Sampling(), "steps": 1})
    state = abstract_arrays(jax.eval_shape(lambda: programs.empty_state(config, batch, cache_len, with_images)),
                            state_shardings)
    stops = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated)
    return step, (_abstract_params(config, placement), state, stops)


def prefill_program(config, placement, batch: int, prompt_len: int, cache_len: int,
                    chunk: int | None = None):
    """(jitted prefill, abstract sharded inputs): what infer's Engine compiles for `batch` prompts of
    `prompt_len` tokens (a multiple of `chunk`, prefilled `chunk` tokens per step; None: all at
    once) into a cache of `cache_len`, with `vision.max_images` full-size images per row for a
    vision model (encoder, projector and every cross-attention layer's keys and values, made
    once here)."""
    config = config.replace(remat="none")
    replicated = _replicated(placement)
    state_shardings = placement.tree_shardings(programs.state_axes(config, config.vision is not None))
    prefill, _ = programs.jit_programs(model_for(config), state_shardings, replicated)
    images = _abstract_images(placement, batch) if config.vision is not None else None
    step = Bound(prefill, {"sampling": Sampling(), "cache_len": cache_len, "chunk": chunk, "images": images})
    row = placement.sharding("batch")
    inputs = (jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=placement.sharding("batch", "length")),
              jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=row),
              jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=row),
              jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
              jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated))
    return step, (_abstract_params(config, placement), *inputs)


def serve_program(config, placement, program: str, *, slots: int | None = None, context: int | None = None,
                  steps_per_call: int | None = None, prefill_batch: int | None = None,
                  prompt_len: int | None = None, prefill_chunk: int | None = None):
    """(jitted program, abstract sharded inputs, SlotShape, prompt length): one of infer.serve's
    programs exactly as infer.batcher compiles it (`llama_jax.decoding.slots.jit_slot_programs`,
    no compiler options, as on TPU) with the arguments it passes (one stop id).

    Shaped as `python -m infer.serve` with --max-batch `slots`, --max-seq-len `context`,
    --steps-per-call and --prefill-batch runs (None: the server's defaults, the model's context):
    program "serve_decode" runs the steps of every slot, with logprobs; "serve_prefill"
    prefills the largest group of prompts of `prompt_len` tokens, padded to the server's bucket
    (None: the longest prompt a request may have), into the slots. Layers are scanned, as infer's
    Engine runs them on TPU. ConfigError or ValueError (one line) for shapes the server refuses.
    """
    context = context or config.max_seq_len
    if not 2 <= context <= config.max_seq_len:
        raise ConfigError(f"--max-seq-len must be in [2, {config.max_seq_len}] (the model's context), got {context}")
    length_shards, chunk = placement.shards_along("length"), prefill_chunk or PREFILL_CHUNK
    shape = slot_shape(slots or SLOTS, context, steps_per_call or STEPS_PER_CALL, prefill_batch or PREFILL_BATCH,
                       batch_shards=placement.shards_along("batch"), length_shards=length_shards,
                       max_seq_len=config.max_seq_len, prefill_chunk=chunk)
    # A request's prompt leaves at least one position of the context for its answer.
    prompt_len = prompt_shape(prompt_len or context - 1, config.max_seq_len, length_shards, chunk)[0]
    if prompt_len > shape.cache_len:
        raise ConfigError(f"prompt length {prompt_len} exceeds the {shape.cache_len} positions of a slot")

    config = config.replace(remat="none")  # nothing is differentiated
    replicated, row = _replicated(placement), placement.sharding("batch")
    # A vision model's slots hold their images' keys and values (the prefill judged is a text group's).
    state_shardings = placement.tree_shardings(programs.state_axes(config, config.vision is not None))
    jitted = jit_slot_programs(model_for(config), shape, state_shardings, row, replicated)
    state = abstract_arrays(jax.eval_shape(lambda: empty_slots(config, shape)), state_shardings)

    def rows(n: int, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((n,), dtype, sharding=row)

    def sampling(n: int):
        return RowSampling(rows(n, jnp.float32), rows(n), rows(n, jnp.float32))

    params, stops = _abstract_params(config, placement), jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated)
    if program == "serve_decode":
        args = (params, state, sampling(shape.slots), stops, rows(shape.slots, jnp.bool_))
        return jitted.decode, args, shape, prompt_len
    group = shape.prefill_rows[-1]
    prompts = jax.ShapeDtypeStruct((group, prompt_len), jnp.int32, sharding=placement.sharding("batch", "length"))
    # No images (a text group); every row's first-token mask (all bits set for rows without a grammar).
    masks = jax.ShapeDtypeStruct((group, bitmask_words(config.vocab_size)), jnp.int32, sharding=row)
    args = (params, state, sampling(shape.slots), prompts, rows(group), rows(group), rows(group), stops,
            sampling(group), rows(group), None, masks)
    return jitted.prefill, args, shape, prompt_len


def eval_program(config, placement, rows: int, length: int):
    """(the lm-eval model's jitted scoring pass, its abstract sharded arguments) for `rows` rows of
    `length` tokens: `Scorer.program` as `LlamaJaxLM` builds it (no remat, logits in chunks)."""
    scorer = Scorer(model_for(config.replace(remat="none")), placement, rows, length)
    tokens = jax.ShapeDtypeStruct((scorer.rows, length), jnp.int32, sharding=placement.sharding("batch", "length"))
    weights = jax.ShapeDtypeStruct((scorer.rows, length), jnp.float32, sharding=placement.sharding("batch", "length"))
    return scorer.program, (_abstract_params(config, placement), tokens, tokens, weights)


def _abstract_images(placement, rows: int):
    """A vision model's `images` for `rows` rows as sharded `jax.ShapeDtypeStruct`s (split on batch)."""
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=placement.sharding("batch"))
            for name, (shape, dtype) in image_shapes(placement.config.vision, rows).items()}


def _replicated(placement):
    return NamedSharding(placement.mesh, PartitionSpec())


def _abstract_params(config, placement):
    return abstract_arrays(abstract_params(config), placement.param_shardings(config))


# --- compiling ---------------------------------------------------------------------------


def _chip_bytes(tree, device) -> int:
    """Bytes of `device`'s shards of a tree of abstract sharded arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        if device in leaf.sharding.device_set:
            total += math.prod(shard) * leaf.dtype.itemsize
    return total


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    memory = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
              "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
              "code": stats.generated_code_size_in_bytes,
              "peak": getattr(stats, "peak_memory_in_bytes", 0)}
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                       + memory["temporaries"])
    return memory


def _out_of_memory_reason(err: Exception) -> str | None:
    """The compiler's one-line reason if `err` is an out-of-HBM compile failure, else None."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    lines = [line.strip() for line in text[text.index("RESOURCE_EXHAUSTED"):].splitlines()]
    reason = " ".join(line for line in lines[:4] if line).removeprefix("RESOURCE_EXHAUSTED: ")
    return reason[:400]


def compile_run(run, devices, *, topology: str = "", slices: int = 1, program: str = "train",
                decode_batch: int | None = None, cache_len: int | None = None,
                prompt_len: int | None = None, prefill_chunk: int | None = None,
                slots: int | None = None, context: int | None = None, steps_per_call: int | None = None,
                prefill_batch: int | None = None, comms: bool = False) -> CompileResult:
    """Compile `run`'s train step (or prefill, or decode step, or a server program) for `devices`;
    judge whether it fits.

    program: "train", "prefill" (batch x prompt_len tokens, `prefill_chunk`
    at a time, default programs.PREFILL_CHUNK, with images for a vision
    model), "decode" or "eval" (decode_batch rows of cache_len tokens scored);
    decode_batch, cache_len and prompt_len default to the run's global batch
    and sequence length. Or one of SERVE_PROGRAMS, shaped
    as `python -m infer.serve` with --max-batch `slots`, --max-seq-len `context`,
    --steps-per-call and --prefill-batch would run it (defaults: the server's,
    and the model's context); serve_prefill's prompts are `prompt_len` tokens
    padded to the server's bucket (default: the longest prompt a slot takes).

    comms: also list the compiled program's collectives (sharding.comms) and, for the train
    step, estimate its step time from them.

    `devices`: compile-only TPU devices (sharding.topology.topology_devices).
    LayoutError/ConfigError for input that cannot be placed; an out-of-memory
    compile is a result with verdict "does not fit", not an exception.
    """
    info = chip_info(devices)
    layout = layout_for_slices(load_layout(run.layout, **run.mesh), slices)
    placement = Placement.create(run.model, layout, devices=devices)
    if program in SERVE_PROGRAMS:
        step, args, shape, prompt_len = serve_program(
            run.model, placement, program, slots=slots, context=context, steps_per_call=steps_per_call,
            prefill_batch=prefill_batch, prompt_len=prompt_len, prefill_chunk=prefill_chunk)
        batch = shape.slots if program == "serve_decode" else shape.prefill_rows[-1]
        seq_len = shape.cache_len
    elif program == "train":
        batch, seq_len, passes = step_shape(run)  # a GRPO run: its rollouts, one pass an update
        validate(run.model, layout, placement.mesh, batch=batch // run.grad_accum, seq_len=seq_len)
        step, args = train_program(run, placement, teacher_placement(run, layout, devices=devices))
    else:

        batch = decode_batch or run.data.global_batch
        seq_len = cache_len or run.data.seq_len
        if seq_len > run.model.max_seq_len:
            raise ConfigError(f"cache length {seq_len} exceeds the model's max_seq_len "
                              f"{run.model.max_seq_len}")
        validate(run.model, layout, placement.mesh, batch=batch)
        if program == "decode":
            step, args = decode_program(run.model, placement, batch, seq_len)
        elif program == "eval":
            validate(run.model, layout, placement.mesh, seq_len=seq_len)
            step, args = eval_program(run.model, placement, batch, seq_len)
        else:

            prompt_len = prompt_len or seq_len
            if prompt_len > seq_len:
                raise ConfigError(f"prompt length {prompt_len} exceeds the cache length {seq_len}")
            chunk = min(prefill_chunk or PREFILL_CHUNK, prompt_len)
            if prompt_len % chunk:
                raise ConfigError(f"prompt length {prompt_len} is not a multiple of the prefill "
                                  f"chunk {chunk}")
            validate(run.model, layout, placement.mesh, seq_len=chunk)
            step, args = prefill_program(run.model, placement, batch, prompt_len, seq_len, chunk)
    hbm = CHIP_HBM_BYTES[info.chip] / info.devices_per_chip
    result = CompileResult(
        program=program, topology=topology, slices=slices, chip=info.chip, chips=info.n_chips,
        layout=layout.name, mesh=dict(placement.mesh.shape), batch=batch, seq_len=seq_len,
        grad_accum=run.grad_accum if program == "train" else 1,
        remat="none" if program == "eval" else run.model.remat,  # the scorer recomputes nothing
        dtype=run.model.dtype, param_dtype=run.model.param_dtype, verdict="does not fit",
        hbm_bytes=hbm, compile_s=0.0,
        prompt_len=prompt_len if program in ("prefill", "serve_prefill") else None,
        images_per_row=run.model.vision.max_images if run.model.vision and program in ("prefill", "decode") else 0,
        quantize=run.model.quantize, kv_cache_dtype=run.model.kv_cache_dtype)
    if program in SERVE_PROGRAMS:
        result.slots = shape.slots
        result.steps = shape.steps if program == "serve_decode" else None
    if program in ("decode", *SERVE_PROGRAMS):  # arguments (params, state, ...)
        result.weight_bytes = _chip_bytes(args[0], devices[0])
        result.cache_bytes = _chip_bytes(args[1]["cache"], devices[0])
    start = time.perf_counter()
    try:
        with placement.activate():
            compiled = step.lower(*args).compile()
    except Exception as err:  # XLA reports running out of HBM as JaxRuntimeError
        result.reason = _out_of_memory_reason(err)
        if result.reason is None:
            raise
        result.compile_s = time.perf_counter() - start
        return result
    result.compile_s = time.perf_counter() - start
    result.memory = _memory(compiled)
    result.verdict = "fits" if result.used_bytes <= hbm else "tight"
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    result.xla_flops = float(costs.get("flops", 0.0)) if costs else None
    if program == "train":
        device_peak = CHIP_PEAK_FLOPS[info.chip] / info.devices_per_chip
        flops = mfu_flops_per_token(run.model, seq_len)
        result.model_flops = flops["mfu"] * batch * seq_len * passes / len(devices)
        result.model_flops_causal = flops["mfu_causal"] * batch * seq_len * passes / len(devices)
        result.step_s_at_full_mfu = result.model_flops / device_peak
        result.step_s_at_full_mfu_causal = result.model_flops_causal / device_peak
        schedule = placement.pipeline_schedule()
        if schedule is not None:
            result.pipeline = {**dataclasses.asdict(schedule), "ticks": schedule.ticks, "bubble": schedule.bubble}
    if comms:

        result.collectives = parse_collectives(compiled.as_text(), placement.mesh)
        if program == "train":
            result.estimate = estimate_step(result.collectives, info.chip, result.model_flops * info.devices_per_chip,
                                            bubble=result.pipeline["bubble"] if result.pipeline else 0.0).to_dict()
    return result


