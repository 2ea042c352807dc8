"""The communication table and chart of a `train.compile --sweep ... --comms`.

One row per compiled combination: its values, HBM per chip, verdict, the
bytes one chip moves per step by collective kind and mesh axes (ring
formulas, loops multiplied out: sharding/comms.py), a pipeline's bubble, and the ESTIMATED step
time and MFU bound of sharding.comms_estimate.estimate_step (compute at peak
FLOP/s, collectives at the published ICI/DCN bandwidths, full overlap).
"""

from __future__ import annotations

from train.compile.aot import CompileResult

SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
         "collective-permute": "CP"}


def traffic_columns(results: list[CompileResult]) -> list[tuple[str, tuple[str, ...], bool]]:
    """The (kind, axes, dcn) groups any result moves bytes in, in a stable order."""
    from sharding.comms import KINDS

    keys = {(row["kind"], tuple(row["axes"]), row["dcn"]) for r in results
            for row in r.to_dict()["collectives"] or []}
    return sorted(keys, key=lambda k: (KINDS.index(k[0]), k[1], k[2]))


def column_name(kind: str, axes: tuple[str, ...], dcn: bool) -> str:
    """'AR data (DCN)', 'AG fsdp', 'A2A fsdp+tensor'."""
    return f"{SHORT[kind]} {'+'.join(axes) or '-'}" + (" (DCN)" if dcn else "")


def traffic(result: CompileResult) -> dict[tuple[str, tuple[str, ...], bool], float]:
    """{(kind, axes, dcn): bytes per chip per step} of one compile."""
    return {(row["kind"], tuple(row["axes"]), row["dcn"]): row["bytes_per_step"]
            for row in result.to_dict()["collectives"] or []}


def _seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.3g}"


def format_comms_table(rows: list[tuple[dict[str, str], CompileResult | str]]) -> str:
    """The sweep's table: values, mesh, HBM per chip, verdict, GiB moved per chip per step by
    kind and axes, pipeline bubble, compute time, communication time, estimated step time, MFU bound."""
    results = [r for _, r in rows if not isinstance(r, str) and r.collectives is not None]
    columns = traffic_columns(results)
    largest = max((v for r in results for v in traffic(r).values()), default=0.0)
    unit, scale = ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20)
    keys = list(rows[0][0]) if rows else []
    header = [*keys, "mesh", "HBM GiB", "verdict", *(f"{column_name(*c)} {unit}" for c in columns),
              "bubble", "compute s", "comm s", "est. step s", "MFU bound"]
    table, invalid = [header], []
    for values, result in rows:
        cells = [values[k] for k in keys]
        if isinstance(result, str):
            table.append(cells + ["-", "-", "invalid"])
            invalid.append(f"invalid {' '.join(cells)}: {result}")
            continue
        mesh = "x".join(f"{a[0]}{s}" for a, s in result.mesh.items() if s > 1) or "-"
        used = result.used_bytes
        moved = traffic(result) if result.collectives is not None else {}
        est = result.estimate or {}
        table.append(cells + [mesh, "-" if used is None else f"{used / 2**30:.1f}", result.verdict,
                              *(f"{moved[c] / scale:.2f}" if c in moved
                                else "0" if result.collectives is not None else "-" for c in columns),
                              f"{est.get('bubble', 0.0):.1%}",
                              _seconds(est.get("compute_s")), _seconds(est.get("comm_s")),
                              _seconds(est.get("step_s")),
                              "-" if est.get("mfu_bound") is None else f"{est['mfu_bound']:.0%}"])
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(header))]
    note = ("estimate: compute = model FLOPs / peak / (1 - pipeline bubble); collectives = ring bytes / published ICI (DCN) "
            "bandwidth; step = max(compute, comm), i.e. full overlap (sharding/comms.py)")
    return "\n".join(["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                      for row in table] + invalid + [note])


def plot_sweep(rows: list[tuple[dict[str, str], CompileResult | str]], path: str, title: str = ""):
    """A PNG of the sweep: GiB moved per chip per step, stacked by kind and axes (left), and the
    estimated compute and communication seconds per step (right). Invalid rows are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [(values, r) for values, r in rows if not isinstance(r, str) and r.collectives is not None]
    if not kept:
        raise ValueError("no compiled combination to plot")
    labels = [" ".join(v for v in values.values()) or r.layout for values, r in kept]
    columns = traffic_columns([r for _, r in kept])
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(kept) + 5), 5.5))
    colours = plt.get_cmap("tab20").colors
    bottom = [0.0] * len(kept)
    for i, column in enumerate(columns):
        heights = [traffic(r).get(column, 0.0) / 2**30 for _, r in kept]
        left.bar(labels, heights, bottom=bottom, label=column_name(*column), color=colours[i % 20])
        bottom = [b + h for b, h in zip(bottom, heights)]
    left.set_ylabel("GiB moved per chip per step")
    left.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(0, -0.18), frameon=False)
    width = 0.4
    xs = range(len(kept))
    compute = [(r.estimate or {}).get("compute_s") or 0.0 for _, r in kept]
    comm = [(r.estimate or {}).get("comm_s") or 0.0 for _, r in kept]
    right.bar([x - width / 2 for x in xs], compute, width, label="compute at peak")
    right.bar([x + width / 2 for x in xs], comm, width, label="collectives at ICI/DCN bandwidth")
    right.set_xticks(list(xs), labels)
    right.set_ylabel("seconds per step (estimate)")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18), frameon=False)
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title or "layout sweep: communication per step (estimate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
