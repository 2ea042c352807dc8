"""Plan for a pod from a laptop: compile the real train step for a TPU topology.

    python -m train.compile --config configs/runs/llama3_1_70b_v5p.yaml --topology v5p:8x8x8
    python -m train.compile --config RUN --topology v5p:8x8x8 --slices 2     # two slices over DCN
    python -m train.compile --config RUN --topology v5e:16x16 --decode       # also the decode step
    python -m train.compile --config RUN --topology v5p:4x4x4 \\
        --sweep layout=fsdp,fsdp_tp remat=full,dots batch=256,512           # a table of combinations
    python -m train.compile ... [--json] [key=value ...]                     # train's run overrides

No TPU is needed, only libtpu (`pip install -e '.[tpu]'`): the topology's
devices are compile-only (sharding/topology.py), the mesh is the run's layout
over them (sharding/mesh.py's make_mesh, hybrid ICI x DCN for several
slices), and the program is the project's own `train_step` (train/step.py)
lowered from abstract, sharded inputs and compiled by XLA for that chip.

What is printed, per chip (the compiled program is one chip's share):
- HBM from `memory_analysis()`: arguments, outputs, aliased (donated state
  written in place), temporaries, the compiler's peak, and the total
  arguments + outputs - aliased + temporaries; the verdict compares the
  larger of peak and total with the chip's HBM (sharding.topology.CHIP_HBM_BYTES);
- compile time;
- FLOPs: model FLOPs per step (6N + 12LHKT per token, as MFU counts them)
  and the step time they take at 100% MFU, the floor on any real step time;
  and XLA's `cost_analysis()` count, which counts a loop body once, so with
  scanned layers (or gradient accumulation) it is far below the real work.

A compile that runs out of HBM (XLA's RESOURCE_EXHAUSTED) is the verdict
"does not fit", with the compiler's one-line reason. Bad input (a topology
libtpu does not know, a mesh that does not fit the chip count, a layout that
does not divide the model) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time

# Short names for --sweep keys; any dotted run-config key works as well.
SWEEP_ALIASES = {"remat": "model_overrides.remat", "batch": "data.global_batch",
                 "seq_len": "data.seq_len", "attention": "model_overrides.attention"}
VERDICTS = ("fits", "tight", "does not fit")


@dataclasses.dataclass
class CompileResult:
    """One compile's figures; bytes and FLOPs are per chip unless named otherwise."""

    program: str                  # "train" or "decode"
    topology: str
    slices: int
    chip: str
    chips: int
    layout: str
    mesh: dict[str, int]
    batch: int                    # global rows (decode: sequences)
    seq_len: int                  # decode: cache length
    grad_accum: int
    remat: str
    dtype: str
    param_dtype: str
    verdict: str                  # fits | tight | does not fit
    hbm_bytes: float              # the chip's published HBM (per device)
    compile_s: float
    memory: dict[str, int] | None = None   # arguments, outputs, aliased, temporaries, code, peak, total
    model_flops: float | None = None       # per chip per step (train only)
    xla_flops: float | None = None         # cost_analysis(), per chip (loop bodies counted once)
    step_s_at_full_mfu: float | None = None
    reason: str | None = None              # the compiler's message when it does not fit

    @property
    def used_bytes(self) -> int | None:
        return None if self.memory is None else max(self.memory["peak"], self.memory["total"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"used_bytes": self.used_bytes}


# --- building the programs -------------------------------------------------------------


def _abstract(tree, shardings):
    import jax
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def train_program(run, placement):
    """(jitted train_step, abstract sharded (state, batch)) exactly as `train.loop.train` builds it."""
    import jax
    import jax.numpy as jnp

    from train.optimizer import learning_rate_schedule, make_optimizer
    from train.step import BATCH_KEYS, abstract_state, jit_train_step, make_train_step

    optimizer = make_optimizer(run.optimizer, run.steps)
    schedule = learning_rate_schedule(run.optimizer, run.steps)
    state, shardings = abstract_state(placement, optimizer)
    rows = (run.data.global_batch, run.data.seq_len)
    batch_sharding = placement.sharding("batch", "length")
    batch = {key: jax.ShapeDtypeStruct(rows, jnp.float32 if key == "loss_weights" else jnp.int32,
                                       sharding=batch_sharding) for key in BATCH_KEYS}
    step = jit_train_step(make_train_step(run.model, optimizer, schedule, shardings.params, run.grad_accum,
                                          run.z_loss, run.loss_chunk), placement, shardings)
    return step, (state, batch)


def decode_program(config, placement, batch: int, cache_len: int):
    """(jitted one-token cached forward, abstract sharded (params, cache, tokens, positions)).

    The decode step of infer/: logits for one new token per sequence, the KV
    cache (sharded by the layout: batch on data/fsdp, kv_heads on tensor)
    donated and returned.
    """
    import jax
    import jax.numpy as jnp

    from llama_jax.model import CACHE_AXES, Llama, init_cache
    from llama_jax.params import abstract_params

    model = Llama(config)
    cache_shardings = placement.tree_shardings({"k": CACHE_AXES, "v": CACHE_AXES})
    token_sharding = placement.sharding("batch", "length")

    def decode_step(params, cache, tokens_b1, positions_b1):
        logits, cache = model.apply({"params": params}, tokens_b1, positions_b1, cache=cache)
        return logits[:, -1], cache

    step = jax.jit(decode_step, donate_argnums=1,
                   in_shardings=(placement.param_shardings(), cache_shardings, token_sharding,
                                 token_sharding),
                   out_shardings=(placement.sharding("batch", "vocab"), cache_shardings))
    params = _abstract(abstract_params(config), placement.param_shardings())
    cache = _abstract(jax.eval_shape(lambda: init_cache(config, batch, cache_len)), cache_shardings)
    token = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=token_sharding)
    return step, (params, cache, token, token)


# --- compiling ---------------------------------------------------------------------------


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
                decode_batch: int | None = None, cache_len: int | None = None) -> CompileResult:
    """Compile `run`'s train step (or decode step) for `devices` and judge whether it fits.

    `devices`: compile-only TPU devices (sharding.topology.topology_devices).
    LayoutError/ConfigError for input that cannot be placed; an out-of-memory
    compile is a result with verdict "does not fit", not an exception.
    """
    from sharding.layout import load_layout
    from sharding.place import Placement, validate
    from sharding.topology import chip_info, layout_for_slices
    from sharding.topology import CHIP_HBM_BYTES, CHIP_PEAK_FLOPS
    from train.metrics import flops_per_token

    info = chip_info(devices)
    layout = layout_for_slices(load_layout(run.layout, **run.mesh), slices)
    placement = Placement.create(run.model, layout, devices=devices)
    if program == "train":
        batch, seq_len = run.data.global_batch, run.data.seq_len
        validate(run.model, layout, placement.mesh, batch=batch // run.grad_accum, seq_len=seq_len)
        step, args = train_program(run, placement)
    else:
        batch = decode_batch or run.data.global_batch
        seq_len = cache_len or run.data.seq_len
        if seq_len > run.model.max_seq_len:
            from llama_jax.config import ConfigError
            raise ConfigError(f"cache length {seq_len} exceeds the model's max_seq_len "
                              f"{run.model.max_seq_len}")
        validate(run.model, layout, placement.mesh, batch=batch)
        step, args = decode_program(run.model, placement, batch, seq_len)
    hbm = CHIP_HBM_BYTES[info.chip] / info.devices_per_chip
    result = CompileResult(
        program=program, topology=topology, slices=slices, chip=info.chip, chips=info.n_chips,
        layout=layout.name, mesh=dict(placement.mesh.shape), batch=batch, seq_len=seq_len,
        grad_accum=run.grad_accum if program == "train" else 1, remat=run.model.remat,
        dtype=run.model.dtype, param_dtype=run.model.param_dtype, verdict="does not fit",
        hbm_bytes=hbm, compile_s=0.0)
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
        per_step = flops_per_token(run.model, seq_len) * batch * seq_len
        result.model_flops = per_step / len(devices)
        result.step_s_at_full_mfu = result.model_flops / (CHIP_PEAK_FLOPS[info.chip] / info.devices_per_chip)
    return result


# --- reporting ---------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_result(r: CompileResult) -> str:
    """The text report of one compile."""
    mesh = " x ".join(f"{axis}={size}" for axis, size in r.mesh.items() if size > 1) or "1 device"
    what = (f"{r.batch} x {r.seq_len} tokens, grad_accum {r.grad_accum}" if r.program == "train"
            else f"{r.batch} sequences, cache {r.seq_len}")
    lines = [f"{r.program} step on {r.topology}" + (f" x {r.slices} slices" if r.slices > 1 else "")
             + f" ({r.chips} {r.chip} chips): layout {r.layout} ({mesh}), {what}, remat {r.remat}, "
             f"{r.dtype} compute, {r.param_dtype} params"]
    if r.memory is None:
        if "vmem" in r.reason.lower():
            lines.append("  verdict: does not fit: one fusion needs more on-chip vector memory (VMEM) "
                         f"than the chip has (compile stopped after {r.compile_s:.1f} s, before HBM "
                         "totals); try attention=blocked, fewer rows per chip or another remat policy")
        else:
            lines.append(f"  verdict: does not fit in {_gib(r.hbm_bytes)} of HBM per chip "
                         f"(compile ran out of memory after {r.compile_s:.1f} s)")
        lines.append(f"  compiler: {r.reason}")
        return "\n".join(lines)
    m = r.memory
    lines += [
        f"  HBM per chip: arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])}, "
        f"aliased {_gib(m['aliased'])}, temporaries {_gib(m['temporaries'])}, code {_gib(m['code'])}",
        f"  peak {_gib(m['peak'])} (compiler), total {_gib(m['total'])} "
        f"(arguments + outputs - aliased + temporaries)",
    ]
    share = r.used_bytes / r.hbm_bytes
    if r.verdict == "fits":
        lines.append(f"  verdict: fits, {share:.0%} of {_gib(r.hbm_bytes)} HBM per chip")
    else:
        lines.append(f"  verdict: tight, {share:.0%} of the published {_gib(r.hbm_bytes)} per chip "
                     "(the compiler accepted it against the HBM libtpu reports; expect no headroom)")
    lines.append(f"  compile time: {r.compile_s:.1f} s")
    if r.model_flops is not None:
        lines.append(f"  model FLOPs per chip per step: {r.model_flops:.3e}; at 100% MFU a step takes "
                     f"{r.step_s_at_full_mfu:.3f} s ({r.batch * r.seq_len / r.step_s_at_full_mfu / r.chips:,.0f}"
                     " tokens/s/chip); at 50% MFU "
                     f"{2 * r.step_s_at_full_mfu:.3f} s")
    if r.xla_flops is not None:
        lines.append(f"  XLA cost_analysis FLOPs per chip: {r.xla_flops:.3e} (counts each loop body once: "
                     "scanned layers and accumulation steps are not multiplied out)")
    return "\n".join(lines)


def format_table(rows: list[tuple[dict[str, str], CompileResult | str]]) -> str:
    """One line per sweep combination: its values, peak HBM per chip, verdict."""
    keys = list(rows[0][0]) if rows else []
    header = [*keys, "mesh", "peak GiB", "HBM %", "verdict", "compile s"]
    table = [header]
    for values, result in rows:
        cells = [values[k] for k in keys]
        if isinstance(result, str):
            table.append(cells + ["-", "-", "-", f"invalid: {result}", "-"])
            continue
        mesh = "x".join(f"{a[0]}{s}" for a, s in result.mesh.items() if s > 1) or "-"
        used = result.used_bytes
        table.append(cells + [mesh, "-" if used is None else f"{used / 2**30:.1f}",
                              "-" if used is None else f"{used / result.hbm_bytes:.0%}",
                              result.verdict, f"{result.compile_s:.0f}"])
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


# --- command line ------------------------------------------------------------------------


def parse_sweep(items: list[str]) -> list[dict[str, str]]:
    """`["layout=fsdp,fsdp_tp", "remat=full,dots"]` -> every combination, as override dicts."""
    from llama_jax.config import ConfigError

    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--sweep {item!r}: expected key=value1,value2,...")
        axes.append([(SWEEP_ALIASES.get(key, key), value) for value in values.split(",")])
    keys = [axis[0][0] for axis in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--sweep: a key is given twice ({', '.join(keys)})")
    return [dict(combo) for combo in itertools.product(*axes)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.compile",
        description="Compile the train (and decode) step ahead of time for a TPU topology and "
                    "report per-chip HBM, whether it fits, compile time and FLOPs. Needs libtpu "
                    "(pip install -e '.[tpu]'), no TPU.",
        epilog="Overrides are train's: layout=fsdp_tp mesh.tensor=4 data.global_batch=256 "
               "model_overrides.remat=full. --sweep keys: any such key, or the short names "
               f"{', '.join(f'{k} ({v})' for k, v in SWEEP_ALIASES.items())}; every combination "
               "is compiled and a table printed.")
    parser.add_argument("--config", required=True, help="run config: a YAML path or a name in configs/runs/")
    parser.add_argument("--topology", required=True,
                        help="TPU slice, e.g. v5p:8x8x8, v5e:16x16, v6e:16x16, v4:4x4x4")
    parser.add_argument("--slices", type=int, default=None,
                        help="slices joined over DCN (default: what the layout's DCN sizes say, "
                             "else 1); a layout without DCN sizes puts them on the data axis")
    parser.add_argument("--decode", action="store_true",
                        help="also compile the decode step (one token per sequence with a KV cache)")
    parser.add_argument("--decode-batch", type=int, default=None,
                        help="sequences decoded at once (default: data.global_batch)")
    parser.add_argument("--cache-len", type=int, default=None, help="KV cache length (default: data.seq_len)")
    parser.add_argument("--sweep", nargs="+", default=[], metavar="key=v1,v2",
                        help="compile every combination, e.g. layout=fsdp,fsdp_tp remat=full,dots "
                             "(the train step; the decode step with --decode)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)

    from llama_jax.config import ConfigError
    from sharding.layout import LayoutError, load_layout
    from sharding.topology import slices_of, topology_devices
    from train.config import load_run_config

    def fail(err) -> int:
        print(f"train.compile: error: {err}", file=sys.stderr)
        return 2

    try:
        run = load_run_config(args.config, args.overrides)
        slices = args.slices or slices_of(load_layout(run.layout, **run.mesh))
        devices = topology_devices(args.topology, slices)
        combos = parse_sweep(args.sweep)
        given = {item.partition("=")[0] for item in args.overrides}
        for key in combos[0] if args.sweep else ():
            if key in given:
                raise ConfigError(f"{key}: given both as an override and in --sweep")
        if args.sweep:
            return _sweep(args, combos, devices, slices)
        programs = ["train"] + (["decode"] if args.decode else [])
        results = [compile_run(run, devices, topology=args.topology, slices=slices, program=p,
                               decode_batch=args.decode_batch, cache_len=args.cache_len)
                   for p in programs]
    except (ConfigError, LayoutError, ValueError, FileNotFoundError) as err:
        return fail(err)
    if args.json:
        print(json.dumps({r.program: r.to_dict() for r in results}))
    else:
        print("\n\n".join(format_result(r) for r in results))
    return 0 if all(r.verdict != "does not fit" for r in results) else 1


def _sweep(args, combos, devices, slices) -> int:
    from llama_jax.config import ConfigError
    from sharding.layout import LayoutError
    from train.config import load_run_config

    rows = []
    for combo in combos:
        extra = [f"{k}={v}" for k, v in combo.items()]
        label = {k.rsplit(".", 1)[-1]: v for k, v in combo.items()}
        try:
            run = load_run_config(args.config, list(args.overrides) + extra)
            result = compile_run(run, devices, topology=args.topology, slices=slices,
                                 program="decode" if args.decode else "train",
                                 decode_batch=args.decode_batch, cache_len=args.cache_len)
        except (ConfigError, LayoutError, ValueError) as err:
            result = str(err)
        rows.append((label, result))
        if not args.json:
            print(f"[{len(rows)}/{len(combos)}] {' '.join(extra)}: "
                  f"{result if isinstance(result, str) else result.verdict}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"topology": args.topology, "slices": slices, "rows": [
            {"values": values, **({"invalid": r} if isinstance(r, str) else r.to_dict())}
            for values, r in rows]}))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
