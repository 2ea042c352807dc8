"""What a step's collectives (sharding/comms.py) add up to: bytes by kind and mesh axes,
and the stated time model, an ESTIMATE: each collective's time from its bytes over the
ICI (or DCN) bandwidth of the chip and the torus dimensions its group spans, compute
at the chip's peak, stretched by a pipeline's bubble (a stage idles that fraction of
the step: llama_jax/model/pipeline.py), full overlap (step = max of the two)."""

from __future__ import annotations

import collections
import dataclasses

from sharding.comms import Collective
from sharding.topology import (CHIP_DCN_BYTES_PER_S, CHIP_ICI_BYTES_PER_S, CHIP_ICI_PORTS,
                               CHIP_PEAK_FLOPS, CHIP_TORUS_DIMS)


def bytes_by_kind_and_axes(collectives: list[Collective]) -> dict[tuple[str, tuple[str, ...]], float]:
    """{(kind, axes): bytes one device moves per step} (ring formulas, loops multiplied out)."""
    totals = collections.defaultdict(float)
    for c in collectives:
        totals[(c.kind, c.axes)] += c.bytes_per_step
    return dict(totals)


def collective_seconds(c: Collective, chip: str) -> float | None:
    """Estimated seconds per step of one collective on `chip` (None: no bandwidth figure)."""
    if c.dcn:
        bandwidth = CHIP_DCN_BYTES_PER_S.get(chip)
    else:
        per_link = CHIP_ICI_BYTES_PER_S.get(chip)
        per_link = None if per_link is None else per_link / CHIP_ICI_PORTS[chip]  # bidirectional
        if per_link is None:
            bandwidth = None
        elif c.kind == "collective-permute":
            bandwidth = per_link / 2
        else:
            bandwidth = per_link * min(c.torus_dims, CHIP_TORUS_DIMS[chip])
    return None if bandwidth is None else c.bytes_per_step / bandwidth


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """An estimate (see the module docstring), per chip per step; None where a figure is missing."""

    compute_s: float              # model FLOPs at peak, stretched by the bubble: busy / (1 - bubble)
    comm_s: float | None
    comm_s_by_kind: dict[str, float]
    step_s: float | None          # max(compute, comm): every collective hidden behind compute
    serial_step_s: float | None   # compute + comm: nothing overlapped
    mfu_bound: float | None       # model FLOPs at peak / step_s
    bubble: float = 0.0           # the pipeline's idle fraction of each stage (0 without stages)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def estimate_step(collectives: list[Collective], chip: str, model_flops_per_chip: float,
                  bubble: float = 0.0) -> StepEstimate:
    """Estimated step time on `chip` from model FLOPs per chip and the collectives' bytes; a
    pipeline's `bubble` (idle fraction of a stage) stretches the compute time by 1 / (1 - bubble)."""
    busy = model_flops_per_chip / CHIP_PEAK_FLOPS[chip]
    compute = busy / (1.0 - bubble)
    by_kind, missing = collections.defaultdict(float), False
    for c in collectives:
        seconds = collective_seconds(c, chip)
        if seconds is None:
            missing = True
        else:
            by_kind[c.kind] += seconds
    if missing:
        return StepEstimate(compute, None, dict(by_kind), None, None, None, bubble)
    comm = sum(by_kind.values())
    step = max(compute, comm)
    return StepEstimate(compute, comm, dict(by_kind), step, compute + comm,
                        busy / step if step else None, bubble)


def summary(collectives: list[Collective]) -> list[dict]:
    """JSON-ready rows: kind, axes, executions and bytes per device per step, grouped."""
    rows = collections.defaultdict(lambda: {"count": 0, "bytes_per_step": 0.0})
    for c in collectives:
        row = rows[(c.kind, c.axes, c.dcn)]
        row["count"] += c.count
        row["bytes_per_step"] += c.bytes_per_step
    return [{"kind": k, "axes": list(a), "dcn": d, **v} for (k, a, d), v in sorted(rows.items())]
