"""Plan for a pod from a laptop: compile the real train step for a TPU topology.

    python -m train.compile --config configs/runs/llama3_1_70b_v5p.yaml --topology v5p:8x8x8
    python -m train.compile --config RUN --topology v5p:8x8x8 --slices 2     # two slices over DCN
    python -m train.compile --config RUN --topology v5e:16x16 --decode       # also the decode step
    python -m train.compile --config RUN --prefill --prefill-chunk 8192       # a prompt of data.seq_len
    python -m train.compile --config RUN --topology v5e:2x4 --inference     # prefill and decode only
    python -m train.compile --config RUN --topology v5e:2x4 --decode-only model_overrides.quantize=int8 \\
        model_overrides.kv_cache_dtype=int8 --decode-batch 32 --cache-len 8192  # serving, quantised
    python -m train.compile --config RUN --topology v5e:2x4 --serve --max-batch 16 --max-seq-len 8192
                                                     # infer.serve's own programs: decode slots, prefill
    python -m train.compile --config RUN --topology v5e:2x4 --eval --decode-batch 64 --cache-len 4096
                                                     # the lm-eval model's scoring pass (train/lm_eval/)
    python -m train.compile --all                    # every shipped run on the slice it names
    python -m train.compile --config RUN --topology v5p:4x4x4 \\
        --sweep layout=fsdp,fsdp_tp remat=full,dots batch=256,512           # a table of combinations
    python -m train.compile --config RUN --sweep layout=fsdp,fsdp_tp --comms [--plot sweep.png]
                                                     # + bytes moved per step, estimated step time
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

With --serve, the programs are the HTTP server's own (infer.serve, as
infer.batcher jits them through llama_jax.decoding.slots): its decode call
(--steps-per-call steps of --max-batch slots of --max-seq-len positions,
each token with its logprobs) and its prefill of a group of --prefill-batch
prompts into the slots, with the flags and defaults of `python -m infer.serve`.

With --eval, the program is the lm-eval model's scoring forward pass
(train/lm_eval/scoring.py, as `python -m train.eval --tasks` runs it): one
batch of --decode-batch rows of --cache-len tokens, with the logits projected
256 positions at a time.

With --comms, the collectives of each compiled program are listed
(sharding/comms.py: kind, bytes per chip, mesh axes, loops multiplied out)
and the train step's time is estimated from them (train/compile/comms_report.py).

A compile that runs out of HBM (XLA's RESOURCE_EXHAUSTED) is the verdict
"does not fit", with the compiler's one-line reason. Bad input (a topology
libtpu does not know, a mesh that does not fit the chip count, a layout that
does not divide the model) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from llama_jax.cli import run_cli
from llama_jax.config import ConfigError
from llama_jax.config_files import shipped_configs
from sharding.layout import load_layout
from sharding.topology import slices_of, topology_devices
from train.compile.aot import SERVE_PROGRAMS, CompileResult, compile_run
from train.compile.comms_report import format_comms_table, plot_sweep
from train.config import load_run_config

# Short names for --sweep keys; any dotted run-config key works as well.
SWEEP_ALIASES = {"remat": "model_overrides.remat", "batch": "data.global_batch",
                 "seq_len": "data.seq_len", "attention": "model_overrides.attention"}


# --- reporting ---------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_result(r: CompileResult) -> str:
    """The text report of one compile."""
    mesh = " x ".join(f"{axis}={size}" for axis, size in r.mesh.items() if size > 1) or "1 device"
    what = (f"{r.batch} x {r.seq_len} tokens, grad_accum {r.grad_accum}" if r.program == "train"
            else f"{r.batch} prompts of {r.prompt_len} tokens, cache {r.seq_len}" if r.program == "prefill"
            else f"{r.batch} prompts of {r.prompt_len} tokens into {r.slots} slots of {r.seq_len}"
            if r.program == "serve_prefill"
            else f"{r.batch} slots of {r.seq_len}, {r.steps} steps per call with logprobs"
            if r.program == "serve_decode"
            else f"{r.batch} rows of {r.seq_len} tokens scored (lm-eval log-likelihoods)" if r.program == "eval"
            else f"{r.batch} sequences, cache {r.seq_len}")
    if r.images_per_row:
        what += f", {r.images_per_row} image(s) per row"
    lines = [f"{r.program} step on {r.topology}" + (f" x {r.slices} slices" if r.slices > 1 else "")
             + f" ({r.chips} {r.chip} chips): layout {r.layout} ({mesh}), {what}, remat {r.remat}, "
             f"{r.dtype} compute, {r.param_dtype} params"
             + (f" ({r.quantize} quantised)" if r.quantize else "")
             + (f", {r.kv_cache_dtype} KV cache" if r.kv_cache_dtype else "")]
    if r.weight_bytes is not None:
        lines.append(f"  per chip: weights {_gib(r.weight_bytes)}, KV cache {_gib(r.cache_bytes)} "
                     "(their shards among the arguments)")
    if r.memory is None:
        if "vmem" in r.reason.lower():
            lines.append("  verdict: does not fit: one fusion needs more on-chip vector memory (VMEM) "
                         f"than the chip has (compile stopped after {r.compile_s:.1f} s, before HBM "
                         "totals); try attention=splash, fewer rows per chip or another remat policy")
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
        lines.append(f"  causal (MaxText's count, attention halved): {r.model_flops_causal:.3e} FLOPs, "
                     f"{r.step_s_at_full_mfu_causal:.3f} s at 100% mfu_causal; a step time reads "
                     f"{r.model_flops_causal / r.model_flops:.3f} x its MFU as mfu_causal")
    if r.pipeline is not None:
        p = r.pipeline
        lines.append(f"  pipeline: {p['stages']} stages x {p['repeats']} repeat(s), {p['microbatches']} "
                     f"micro-batches, {p['ticks']} ticks; bubble {p['bubble']:.1%} = (stages - 1) / "
                     "(micro-batches x repeats + stages - 1) of each stage's time")
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
    """Exit code 0: every program fits; 1: one does not; 2: bad input (one line on stderr)."""
    return run_cli(_main, argv, prog="train.compile")


def _main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.compile",
        description="Compile the train (and decode) step ahead of time for a TPU topology and "
                    "report per-chip HBM, whether it fits, compile time and FLOPs. Needs libtpu "
                    "(pip install -e '.[tpu]'), no TPU.",
        epilog="Overrides are train's: layout=fsdp_tp mesh.tensor=4 data.global_batch=256 "
               "model_overrides.remat=full. --sweep keys: any such key, or the short names "
               f"{', '.join(f'{k} ({v})' for k, v in SWEEP_ALIASES.items())}; every combination "
               "is compiled and a table printed.")
    parser.add_argument("--config", help="run config: a YAML path or a name in configs/runs/")
    parser.add_argument("--all", action="store_true",
                        help="compile every shipped run config that names a topology, each for its "
                             "own slice and programs; one line per compile (exit 1 if any does not fit)")
    parser.add_argument("--topology", default=None,
                        help="TPU slice, e.g. v5p:8x8x8, v5e:16x16, v6e:16x16, v4:4x4x4 (default: the "
                             "run config's topology)")
    parser.add_argument("--slices", type=int, default=None,
                        help="slices joined over DCN (default: what the layout's DCN sizes say, "
                             "else 1); a layout without DCN sizes puts them on the data axis")
    parser.add_argument("--decode", action="store_true",
                        help="also compile the decode step (one token per sequence with a KV cache)")
    parser.add_argument("--inference", action="store_true",
                        help="compile the inference programs instead of the train step: the prefill "
                             "(with the images, for a Llama 3.2 Vision model) and the decode step")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="tokens per prompt in the prefill (default: the cache length)")
    parser.add_argument("--decode-only", action="store_true",
                        help="compile only the decode step (infer.generate's loop; like --inference and "
                             "--serve, it compiles quantised weights, e.g. model_overrides.quantize=fp8)")
    parser.add_argument("--decode-batch", type=int, default=None,
                        help="sequences decoded at once (default: data.global_batch)")
    parser.add_argument("--cache-len", type=int, default=None, help="KV cache length (default: data.seq_len)")
    parser.add_argument("--prefill", action="store_true",
                        help="also compile the prefill of --decode-batch prompts of --prompt-len tokens")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="tokens per prefill step (default: infer's, 8192)")
    parser.add_argument("--serve", action="store_true",
                        help="compile infer.serve's programs instead of the train step: its decode call over "
                             "the slots (with logprobs) and its prefill into them")
    parser.add_argument("--eval", action="store_true",
                        help="compile the lm-eval model's scoring forward pass instead of the train step: "
                             "--decode-batch rows of --cache-len tokens")
    parser.add_argument("--max-batch", type=int, default=None, metavar="N",
                        help="--serve: decode slots (default: infer.serve's)")
    parser.add_argument("--max-seq-len", type=int, default=None, metavar="L",
                        help="--serve: positions per slot, prompt plus answer (default: the model's context)")
    parser.add_argument("--steps-per-call", type=int, default=None, metavar="N",
                        help="--serve: decode steps per call (default: infer.serve's)")
    parser.add_argument("--prefill-batch", type=int, default=None, metavar="N",
                        help="--serve: prompts prefilled together (default: infer.serve's)")
    parser.add_argument("--sweep", nargs="+", default=[], metavar="key=v1,v2",
                        help="compile every combination, e.g. layout=fsdp,fsdp_tp remat=full,dots "
                             "(the train step; the decode step with --decode)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (with --sweep --comms: one JSON line per combination)")
    parser.add_argument("--comms", action="store_true",
                        help="also list what each program moves between chips (bytes per step by "
                             "collective kind and mesh axis) and estimate the train step's time")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="with --sweep --comms: write a PNG bar chart of the sweep to PATH")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)

    if args.all:
        return _all_runs(args)
    if not args.config:
        raise ConfigError("--config: name a run config (or use --all)")
    given = {item.partition("=")[0] for item in args.overrides}
    serving = _serving_programs(args)
    if serving:  # no training run: the run config's checks of what training needs do not apply
        if "programs" in given:
            raise ConfigError("programs: --inference, --decode-only, --serve and --eval set the programs; drop "
                              "the override or the flags")
        args.overrides = [*args.overrides, f"programs=[{','.join(serving)}]"]
    run = load_run_config(args.config, args.overrides)
    args.topology = args.topology or run.topology
    if not args.topology:
        raise ConfigError(f"--topology: {args.config} names no topology; give one, e.g. v5p:4x4x4")
    slices = args.slices or slices_of(load_layout(run.layout, **run.mesh))
    devices = topology_devices(args.topology, slices)
    combos = parse_sweep(args.sweep)
    for key in combos[0] if args.sweep else ():
        if key in given:
            raise ConfigError(f"{key}: given both as an override and in --sweep")
    if args.plot and not (args.sweep and args.comms):
        raise ConfigError("--plot: draws a sweep's communication; give --sweep and --comms")
    if args.sweep:
        return _sweep(args, combos, devices, slices)
    programs = serving or [p for p in ("train", "prefill", "decode", "serve", "eval") if p in run.programs
                           or (p == "decode" and args.decode) or (p == "prefill" and args.prefill)]
    results = [compile_run(run, devices, topology=args.topology, slices=slices, program=p,
                           **_shapes(args), comms=args.comms)
               for p in _compiles(programs)]
    if args.json:
        print(json.dumps({r.program: r.to_dict() for r in results}))
    else:
        print("\n\n".join(format_result(r) for r in results))
        if args.comms:
            print("\n" + format_comms_table([({"program": r.program}, r) for r in results]))
    return 0 if all(r.verdict != "does not fit" for r in results) else 1


def _serving_programs(args) -> list[str]:
    """The run's programs --inference (prefill and decode), --decode-only (decode), --serve
    (infer.serve's) and --eval (lm-eval's scoring) name; [] without them: the run config's own."""
    return ((["prefill", "decode"] if args.inference else ["decode"] if args.decode_only else [])
            + (["serve"] if args.serve else []) + (["eval"] if args.eval else []))


def _compiles(programs) -> list[str]:
    """compile_run's programs for program names (train.config.PROGRAMS): "serve" is the server's two."""
    return [p for name in programs for p in (SERVE_PROGRAMS if name == "serve" else (name,))]


def _shapes(args, prompts: bool = True) -> dict:
    """compile_run's shape arguments from the command line (a sweep compiles one decode program:
    no prompt shapes)."""
    shapes = dict(decode_batch=args.decode_batch, cache_len=args.cache_len, slots=args.max_batch,
                  context=args.max_seq_len, steps_per_call=args.steps_per_call, prefill_batch=args.prefill_batch)
    if prompts:
        shapes |= dict(prompt_len=args.prompt_len, prefill_chunk=args.prefill_chunk)
    return shapes


def _all_runs(args) -> int:
    """Compile every shipped run config that names a topology, for its slice and programs."""
    rows = []
    for name in shipped_configs("runs"):
        run = load_run_config(name)
        if run.topology is None:
            continue
        slices = slices_of(load_layout(run.layout, **run.mesh))
        devices = topology_devices(run.topology, slices)
        for program in _compiles(run.programs):
            result = compile_run(run, devices, topology=run.topology, slices=slices, program=program)
            rows.append(({"run": name, "program": program, "topology": run.topology}, result))
            if args.json:
                print(json.dumps({"run": name, **result.to_dict()}), flush=True)
            else:
                print(f"[{len(rows)}] {name} {program} on {run.topology}: {result.verdict}",
                      file=sys.stderr, flush=True)
    if not args.json:
        print(format_table(rows))
    return 0 if all(r.verdict != "does not fit" for _, r in rows) else 1


def _sweep(args, combos, devices, slices) -> int:
    rows = []
    for combo in combos:
        extra = [f"{k}={v}" for k, v in combo.items()]
        label = {k.rsplit(".", 1)[-1]: v for k, v in combo.items()}
        try:
            run = load_run_config(args.config, list(args.overrides) + extra)
            program = ("serve_decode" if args.serve else "decode" if args.decode or args.decode_only or args.inference
                       else "train")
            result = compile_run(run, devices, topology=args.topology, slices=slices, program=program,
                                 **_shapes(args, prompts=False), comms=args.comms)
        except ValueError as err:  # ConfigError, LayoutError: the combination is invalid
            result = str(err)
        rows.append((label, result))
        if args.json and args.comms:
            print(json.dumps({"values": label, **({"invalid": result} if isinstance(result, str)
                                                  else result.to_dict())}), flush=True)
        if not args.json:
            print(f"[{len(rows)}/{len(combos)}] {' '.join(extra)}: "
                  f"{result if isinstance(result, str) else result.verdict}", file=sys.stderr, flush=True)
    if args.comms:
        if not args.json:
            print(format_comms_table(rows))
        if args.plot:
            plot_sweep(rows, args.plot, title=f"{args.config} on {args.topology}")
    elif args.json:
        print(json.dumps({"topology": args.topology, "slices": slices, "rows": [
            {"values": values, **({"invalid": r} if isinstance(r, str) else r.to_dict())}
            for values, r in rows]}))
    else:
        print(format_table(rows))
    return 0

