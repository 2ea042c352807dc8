"""What a compiled step moves between chips, read from its HLO, and what that may cost.

    collectives = parse_collectives(compiled.as_text(), mesh)
    traffic = bytes_by_kind_and_axes(collectives)      # {("all-gather", ("fsdp",)): bytes, ...}
    estimate = estimate_step(collectives, "v5p", model_flops_per_chip)

Every all-gather, reduce-scatter, all-reduce, all-to-all and
collective-permute of the optimised per-device program (including their
asynchronous `-start` forms; a `-done` only ends one) becomes a `Collective`:
its buffer bytes on one device, the group it runs in, the mesh axes that
group spans, and how many times a step runs it. Device ids in replica
groups are the program's logical ids, i.e. positions in the mesh's
row-major device array, so a group maps back to mesh coordinates; the
axes whose coordinate varies inside a group are its axes. Replica groups
come in three spellings (explicit `{{0,1},{2,3}}`, iota
`[2,4]<=[4,2]T(1,0)`, and the mesh form `mesh['a'=2,'b'=4] {'b'}`) and all
three are read. A collective inside a while loop runs once per iteration:
the trip count comes from the loop's `known_trip_count` backend config, or
else from its condition (`i < N` with `i` starting at its initial constant).
Both branches of a conditional are counted (an upper bound). On multi-slice
TPU programs XLA hands collectives across slices to the DCN runtime as
host-transfer `send`s ("xla_megascale_runtime"): a send with a reduce
operation is read as an all-reduce over the slices of the bytes it sends.

Bytes per device per execution (ring algorithms; V the buffer bytes as
defined per kind below, n the group size):

    all-gather        (n-1)/n * V    V = the gathered output
    reduce-scatter    (n-1)/n * V    V = the full input (n x the output)
    all-reduce      2 (n-1)/n * V    V = the reduced array (reduce-scatter + all-gather)
    all-to-all        (n-1)/n * V    V = the exchanged array
    collective-permute        V      V = the array sent to one peer

The time model (`estimate_step`) is an ESTIMATE, not a measurement:
- compute time = model FLOPs per chip / the chip's peak bf16 FLOP/s (remat's
  recomputation is not model FLOPs, so it is not counted);
- a ring collective's time = its bytes / W, where W = (torus dimensions its
  group spans) x (one link's bidirectional bandwidth): a bidirectional ring
  per dimension, wrap-around links assumed; a permute uses one link one way;
  a group whose members sit in different slices moves at the DCN bandwidth
  per chip instead; latency and congestion between concurrent collectives
  are ignored;
- overlap: the step takes max(compute, communication) if every collective
  hides behind compute (the optimistic estimate) and their sum if none
  does; the MFU bound is compute / max(compute, communication).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np


KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16}

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled step, as one device sees it.

    buffer_bytes: V of the module docstring's table (per device, per execution);
    group_size: devices in its replica group (2 for a permute's pairs);
    axes: mesh axes its group spans, in mesh order (() if it spans none);
    count: executions per step (enclosing loops multiplied out);
    torus_dims: physical torus dimensions the group spans (1 when devices carry no coordinates);
    dcn: whether the group spans devices of different slices.
    """

    kind: str
    name: str
    buffer_bytes: int
    group_size: int
    axes: tuple[str, ...]
    count: int
    torus_dims: int = 1
    dcn: bool = False

    @property
    def bytes_per_run(self) -> float:
        """Bytes one device sends (= receives) per execution, by the ring formulas."""
        n, v = self.group_size, self.buffer_bytes
        if self.kind == "collective-permute":
            return float(v)
        share = (n - 1) / n
        return 2 * share * v if self.kind == "all-reduce" else share * v

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_per_run * self.count


# --- reading HLO text --------------------------------------------------------------------


def _split_top(text: str) -> list[str]:
    """'a, (b, c), d' -> ['a', '(b, c)', 'd'] (commas at bracket depth 0)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape: an array `bf16[8,128]{1,0:T(8,128)}` or a tuple of them (layouts and
    tiling ignored: the logical size)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _split_instruction(line: str) -> tuple[str, str, str, str] | None:
    """(name, shape, opcode, rest after the opcode's '(') of one instruction line, or None."""
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):  # a tuple shape: up to its matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:]
    else:
        shape, _, rest = rest.partition(" ")
    opcode, paren, rest = rest.strip().partition("(")
    return (match.group(1), shape, opcode, rest) if paren else None


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines}, and the entry computation's name."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            current = head.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.rstrip() == "}":  # not "}}, metadata=...": attributes may span lines
            current = None
        elif current is not None:
            comps[current].append(line)
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    return comps, entry


def _trip_count(line: str, caller: list[str], comps: dict[str, list[str]]) -> int:
    """Iterations of the while loop on `line` (in computation `caller`)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", line).group(1)
    constants, tuple_index, compare = {}, {}, None
    for inst in comps[cond]:
        parts = _split_instruction(inst)
        if parts is None:
            continue
        name, _, opcode, rest = parts
        if opcode == "constant" and re.fullmatch(r"-?\d+", rest.split(")")[0]):
            constants[name] = int(rest.split(")")[0])
        elif opcode == "get-tuple-element":
            tuple_index[name] = int(re.search(r"index=(\d+)", rest).group(1))
        elif opcode == "compare":
            compare = (rest.split(")")[0], re.search(r"direction=(\w+)", rest).group(1))
    if compare is None:
        raise ValueError(f"while loop without a known trip count or a compare in its condition: {cond}")
    lhs, rhs = [op.strip().lstrip("%") for op in compare[0].split(",")]
    direction = compare[1]
    if rhs in constants and direction == "LT":
        bound, counter = constants[rhs], lhs
    elif lhs in constants and direction == "GT":
        bound, counter = constants[lhs], rhs
    else:
        raise ValueError(f"while loop condition {cond} is not `i < constant`")
    index = tuple_index.get(counter)
    start = 0  # the counter's initial value: a constant in the loop's input tuple, else 0
    operand = line.split(" while(", 1)[1].split(")")[0].strip().lstrip("%")
    for inst in caller:
        parts = _split_instruction(inst)
        if parts and parts[0] == operand and parts[2] == "tuple" and index is not None:
            init = _split_top(parts[3].rsplit(")", 1)[0])[index].lstrip("%")
            for other in caller:
                p = _split_instruction(other)
                if p and p[0] == init and p[2] == "constant" and re.fullmatch(r"-?\d+", p[3].split(")")[0]):
                    start = int(p[3].split(")")[0])
    return max(bound - start, 0)


def _multipliers(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times a step runs each computation (while bodies x their trip counts)."""
    calls = collections.defaultdict(list)  # callee -> [(caller, factor)]
    for caller, lines in comps.items():
        for line in lines:
            for attr, callee in _CALLS.findall(line):
                factor = _trip_count(line, lines, comps) if attr == "body" else 1
                calls[callee].append((caller, factor))
            for group in _CALL_LISTS.findall(line):
                for callee in re.findall(r"%([\w.\-]+)", group):
                    calls[callee].append((caller, 1))
    memo = {entry: 1}

    def times(name: str, path=()) -> int:
        if name not in memo:
            memo[name] = sum(times(c, path + (name,)) * f for c, f in calls.get(name, [])
                             if c not in path)
        return memo[name]

    return {name: times(name) for name in comps}


def _iota_groups(text: str) -> np.ndarray:
    """`[G,S]<=[d0,d1,...]T(p...)` -> a (G, S) array of device ids."""
    match = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
    if not match:
        raise ValueError(f"unreadable iota replica groups: {text}")
    shape = [int(x) for x in match.group(1).split(",")]
    dims = [int(x) for x in match.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if match.group(3):
        ids = ids.transpose([int(x) for x in match.group(3).split(",")])
    return ids.reshape(shape[0], -1)


def _mesh_groups(text: str) -> np.ndarray:
    """`mesh['a'=2,'b'=4(, device_ids=(...))] {'b','a:(1)2'}` -> a (groups, size) array of ids."""
    match = re.fullmatch(r"mesh\[(.*?)(?:,\s*device_ids=\((.*)\))?\]\s*\{(.*)\}", text.strip())
    if not match:
        raise ValueError(f"unreadable mesh replica groups: {text}")
    names, sizes = [], []
    for item in _split_top(match.group(1)):
        name, _, size = item.rpartition("=")
        names.append(name.strip("'\""))
        sizes.append(int(size))
    n = math.prod(sizes)
    ids_text = match.group(2)
    if ids_text is None:
        ids = np.arange(n)
    elif "<=" in ids_text:
        ids = _iota_groups(ids_text).reshape(-1)
    else:
        ids = np.array([int(x) for x in re.findall(r"\d+", ids_text)])
    # split each axis into the sub-axes the groups name: a:(pre)size is the middle factor of pre x size x rest
    dims, grouped = [], []
    for name, size in zip(names, sizes):
        subs = [a for a in _split_top(match.group(3).replace("'", "").replace('"', ""))
                if a.split(":")[0] == name]
        if not subs:
            dims.append(size)
            continue
        if len(subs) > 1:
            raise ValueError(f"replica groups split axis {name} twice: {text}")
        sub = re.fullmatch(r"[^:]+(?::\((\d+)\)(\d+))?", subs[0])
        if sub.group(1) is None:
            grouped.append(len(dims))
            dims.append(size)
        else:
            pre, part = int(sub.group(1)), int(sub.group(2))
            dims += [pre, part, size // (pre * part)]
            grouped.append(len(dims) - 2)
    ids = ids.reshape(dims)
    rest = [d for d in range(len(dims)) if d not in grouped]
    size = math.prod(dims[d] for d in grouped)
    return ids.transpose(rest + grouped).reshape(-1, size)


def replica_groups(line: str, n_devices: int) -> np.ndarray:
    """The replica groups of one collective instruction, as a (groups, size) array of device ids;
    a collective-permute's source-target pairs as (pairs, 2)."""
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    if pairs:
        return np.array([[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)", pairs.group(0))])
    match = re.search(r"replica_groups=(mesh\[.*?\]\s*\{[^}]*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?|\{)",
                      line)
    if not match:
        return np.arange(n_devices).reshape(1, -1)
    text = match.group(1)
    if text.startswith("mesh"):
        return _mesh_groups(text)
    if text.startswith("["):
        return _iota_groups(text)
    start = match.end() - 1  # explicit: {{0,1},{2,3}} or {} (all devices)
    depth = 0
    for i in range(start, len(line)):
        depth += line[i] == "{"
        depth -= line[i] == "}"
        if depth == 0:
            break
    groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", line[start + 1:i])]
    groups = [g for g in groups if g]
    return np.array(groups) if groups else np.arange(n_devices).reshape(1, -1)


def _buffer_bytes(kind: str, opcode: str, shape: str, group_size: int) -> int:
    """V of the module docstring's table, from the instruction's output shape."""
    if opcode.endswith("-start") and shape.startswith("(") and kind in ("all-gather", "collective-permute"):
        shape = _split_top(shape[1:-1])[1]  # (operands, outputs[, contexts]): the outputs
    size = _shape_bytes(shape)
    return size * group_size if kind == "reduce-scatter" else size


def parse_collectives(hlo: str, mesh) -> list[Collective]:
    """Every collective of an optimised HLO module (`compiled.as_text()`) compiled over `mesh`
    (a jax.sharding.Mesh whose row-major device array gives the logical device ids).

    One `Collective` per instruction, with its count per step; ValueError on HLO it cannot read.
    """
    comps, entry = _computations(hlo)
    runs = _multipliers(comps, entry)
    devices = np.asarray(mesh.devices)
    coords = np.stack(np.unravel_index(np.arange(devices.size), devices.shape), axis=1)
    flat = devices.reshape(-1)
    physical = [getattr(d, "coords", None) for d in flat]
    slices = np.array([getattr(d, "slice_index", 0) or 0 for d in flat])
    found = []
    for comp, lines in comps.items():
        if not runs[comp]:
            continue
        for line in lines:
            parts = _split_instruction(line)
            if parts is None:
                continue
            name, shape, opcode, _ = parts
            if opcode == "send" and "xla_megascale_runtime" in line:
                found.append(_megascale(name, shape, line, runs[comp], mesh, slices))
                continue
            kind = opcode.removesuffix("-start")
            if kind not in KINDS or opcode.endswith("-done"):
                continue
            groups = replica_groups(line, flat.size)
            axes = tuple(axis for i, axis in enumerate(mesh.axis_names)
                         if any(len(set(coords[g, i])) > 1 for g in groups))
            torus = 1
            if all(p is not None for p in physical):
                torus = max(1, max(sum(len({tuple(physical[d])[k] for d in g}) > 1
                                       for k in range(len(physical[0]))) for g in groups))
            size = 2 if kind == "collective-permute" else groups.shape[1]
            found.append(Collective(
                kind=kind, name=name, buffer_bytes=_buffer_bytes(kind, opcode, shape, size),
                group_size=size, axes=axes, count=runs[comp], torus_dims=torus,
                dcn=any(len(set(slices[g])) > 1 for g in groups)))
    return found


def _megascale(name: str, shape: str, line: str, count: int, mesh, slices: np.ndarray) -> Collective:
    """A collective across slices: on multi-slice TPU programs XLA hands it to the DCN runtime
    ("megascale") as a host-transfer `send` of this device's share; one with a reduce operation
    is an all-reduce over the slices, any other a transfer of its bytes (priced as a permute).
    Its axes are the mesh axes along which the slice changes."""
    per_slice = slices.reshape(np.asarray(mesh.devices).shape)
    axes = tuple(axis for i, axis in enumerate(mesh.axis_names)
                 if (per_slice != np.take(per_slice, [0], axis=i)).any())
    reduce = "_xla_megascale_reduce_operation" in line
    return Collective(kind="all-reduce" if reduce else "collective-permute", name=name,
                      buffer_bytes=_shape_bytes(_split_top(shape[1:-1])[0]),
                      group_size=len(set(slices.tolist())), axes=axes, count=count, dcn=True)
