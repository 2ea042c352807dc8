"""TPU topologies without TPUs: compile-only devices for ahead-of-time compiles.

    devices = topology_devices("v5p:8x8x8", slices=2)   # 1024 abstract chips
    mesh = make_mesh(layout_for_slices(layout, 2), devices)

`jax.experimental.topologies.get_topology_desc` asks libtpu (the `tpu`
extra: `pip install -e '.[tpu]'`) for a description of a named slice; its
devices can be put in a mesh and compiled for, but not run on. With
`slices > 1` the devices carry a `slice_index`, so `make_mesh` builds the
same hybrid ICI x DCN mesh it builds on a real multi-slice pod.

libtpu's defaults describe an open mesh (no wrap-around links), v4 chips as
two devices and 2x2x1-chip hosts: not the machine Cloud TPU provisions. On
the open mesh XLA emits FSDP weight gathers as all-reduces of zero-filled
buffers, twice the traffic. So every slice is described as CHIP_WIRING says
the hardware is wired (`slice_wiring`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path

from llama_jax.cli import first_line
from sharding.layout import MESH_AXES, Layout, LayoutError

# Google Cloud's published per-chip figures (REFERENCE.md): peak dense bf16 FLOP/s, HBM bytes.
CHIP_PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
CHIP_HBM_BYTES = {"v4": 32 * 2**30, "v5e": 16 * 10**9, "v5p": 95 * 10**9, "v6e": 32 * 10**9}
# Interconnect, from the same Cloud TPU pages (cloud.google.com/tpu/docs/v5p, /v5e, /v6e):
# bidirectional ICI bytes/s per chip, ICI ports (links) per chip, torus dimensions, and DCN
# bytes/s per chip (v5p: 50 Gbps per chip; v5e: 2 x 100 Gbps NICs per 8-chip host). None
# where the page gives no figure: estimates that need it are left blank (sharding/comms.py).
CHIP_ICI_BYTES_PER_S = {"v4": None, "v5e": 400e9, "v5p": 1200e9, "v6e": 800e9}
CHIP_ICI_PORTS = {"v4": 6, "v5e": 4, "v5p": 6, "v6e": 4}
CHIP_TORUS_DIMS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
CHIP_DCN_BYTES_PER_S = {"v4": None, "v5e": 25e9 / 8, "v5p": 50e9 / 8, "v6e": None}



@dataclasses.dataclass(frozen=True)
class ChipWiring:
    """How Cloud TPU wires and hosts slices of one chip kind (`slice_wiring` applies it)."""

    chip_config: str        # "megacore": a chip's two TensorCores are one JAX device
    host_chips: tuple       # (x, y, z) chips on one host, for slices of at least a host
    wrap_at: int            # a slice dimension of this many chips or more has wrap-around links
    wrap_all_or_none: bool  # 3D tori: all three dimensions wrap once the slice is whole cubes
    source: str


# One row per chip kind, each with the page it is read from.
CHIP_WIRING = {
    # v4: two TensorCores per chip, used as one megacore device; 4 chips per host; slices of
    # whole 4x4x4 cubes are 3D tori (cloud.google.com/tpu/docs/v4, "3D mesh and 3D torus";
    # MaxText accelerator_to_spec_map: v4-128 and larger wrap on all three dimensions).
    "v4": ChipWiring("megacore", (2, 2, 1), 4, True,
                     "cloud.google.com/tpu/docs/v4; MaxText accelerator_to_spec_map.py"),
    # v5p: two TensorCores per chip (megacore), ct5p-hightpu-4t hosts of 4 chips, and "all
    # 4x4x4 and larger slices (one cube) have full 3D torus" (cloud.google.com/tpu/docs/v5p).
    "v5p": ChipWiring("megacore", (2, 2, 1), 4, True, "cloud.google.com/tpu/docs/v5p"),
    # v5e: one TensorCore per chip, 8 chips per host (the slice table: 4x4 is 2 hosts, 16x16
    # is 32), a 2D torus of 256 chips whose wrap-around links close a side of 16 chips: 16x16
    # wraps both ways, 8x16 its long side (cloud.google.com/tpu/docs/v5e; MaxText
    # accelerator_to_spec_map: v5e-128 wrap (False, True), v5e-256 (True, True)).
    "v5e": ChipWiring("default", (2, 4, 1), 16, False,
                      "cloud.google.com/tpu/docs/v5e; MaxText accelerator_to_spec_map.py"),
    # v6e: as v5e: one TensorCore, 8 chips per host, a 256-chip 2D torus
    # (cloud.google.com/tpu/docs/v6e; MaxText: v6e-128 wraps its 16 side, v6e-256 both).
    "v6e": ChipWiring("default", (2, 4, 1), 16, False,
                      "cloud.google.com/tpu/docs/v6e; MaxText accelerator_to_spec_map.py"),
}

# jax Device.device_kind -> the chip names of the tables above.
CHIP_OF_KIND = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
                "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}


def libtpu_available() -> bool:
    """True if libtpu (the compiler behind compile-only TPU devices) is installed."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _native_stderr_captured():
    """Capture what native code writes to file descriptor 2 (libtpu's start-up warnings).

    Without a TPU VM's metadata server libtpu prints several lines about
    unknown accelerator types and worker hostnames; they are harmless for
    compile-only devices. Yields a callable returning the captured text.
    """
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tpu_chips_attached(dev: str = "/dev") -> bool:
    """Whether this host has TPU chips: they appear as /dev/accel* (v4 and older) or as
    VFIO groups /dev/vfio/<n> (v5e, v5p, v6e). Public files, not a private JAX helper."""
    root = Path(dev)
    return any(root.glob("accel*")) or any(p.name.isdigit() for p in root.glob("vfio/*"))


def topology_devices(name: str, slices: int = 1) -> list:
    """Compile-only devices of `slices` copies of the TPU slice `name` (e.g. "v5e:16x16").

    LayoutError (one line) if libtpu is missing or does not know the name.
    """
    if not libtpu_available():
        raise LayoutError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise LayoutError(f"slices: must be a positive integer, got {slices!r}")
    from jax.experimental import topologies

    if not tpu_chips_attached():
        # libtpu's lockfile guards real chips; compile-only devices need none, and
        # without this a second compile (or test) waits on the first one's lock.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": slices} if slices > 1 else {}
    kwargs.update(slice_wiring(name))
    try:
        with _native_stderr_captured():
            topology = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
    except Exception as err:  # libtpu raises JaxRuntimeError(INVALID_ARGUMENT: ...)
        reason = first_line(err)
        reason = reason.removeprefix("INVALID_ARGUMENT: ")
        raise LayoutError(f"topology {name!r}: {reason} (names look like v5p:4x4x4, v5e:16x16, "
                          "v6e:8x8, v4:2x2x2)") from None
    return list(topology.devices)


def slice_wiring(name: str) -> dict:
    """The keyword arguments describing slice `name` ("v5p:4x4x4") to libtpu's
    get_topology_desc as CHIP_WIRING says Cloud TPU wires it: `wrap` (wrap-around links per
    dimension, z always False on 2D chips), `chip_config_name` and `chips_per_host_bounds`.

    Empty for a name it cannot read (libtpu then names the problem itself).
    """
    prefix, _, shape = name.partition(":")
    parts = shape.split("x")
    if prefix not in CHIP_WIRING or len(parts) != CHIP_TORUS_DIMS[prefix] or \
            not all(d.isdigit() for d in parts):
        return {}
    wiring, dims = CHIP_WIRING[prefix], [int(d) for d in parts]
    dims3 = (dims + [1, 1])[:3]
    if wiring.wrap_all_or_none:
        wrap = (min(dims3) >= wiring.wrap_at,) * 3
    else:
        wrap = tuple(d >= wiring.wrap_at for d in dims3[:2]) + (False,)
    # A slice smaller than a host (v5e:1x1, v5e:2x2) is one host holding just its own chips.
    host = tuple(min(h, d) for h, d in zip(wiring.host_chips, dims3))
    return {"wrap": wrap, "chip_config_name": wiring.chip_config, "chips_per_host_bounds": host}


@dataclasses.dataclass(frozen=True)
class ChipInfo:
    """The chip a list of devices runs on, and how many devices share one chip."""

    chip: str             # key of CHIP_PEAK_FLOPS / CHIP_HBM_BYTES
    n_chips: int
    devices_per_chip: int  # 1 with megacore (v4, v5p) and on one-TensorCore chips


def chip_info(devices) -> ChipInfo:
    """Which chip `devices` are (by device_kind) and how many chips they span."""
    kind = devices[0].device_kind
    if kind not in CHIP_OF_KIND:
        raise LayoutError(f"device kind {kind!r} has no chip figures (known: "
                          f"{', '.join(sorted(set(CHIP_OF_KIND.values())))})")
    chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}
    return ChipInfo(CHIP_OF_KIND[kind], len(chips), len(devices) // len(chips))


def slices_of(layout: Layout) -> int:
    """How many slices a layout's fixed DCN sizes span (1 for a single-slice layout)."""
    total = 1
    for axis in MESH_AXES:
        total *= max(layout.dcn[axis], 1)
    return total


def layout_for_slices(layout: Layout, slices: int) -> Layout:
    """The layout for `slices` slices joined over DCN.

    A layout that already names DCN sizes (e.g. multislice) must name exactly
    `slices` of them; one without any puts all slices on the data axis, the
    only traffic DESIGN.md lets cross the slow network.
    """
    dcn_total = slices_of(layout)
    if -1 in layout.dcn.values():
        if slices % dcn_total:
            raise LayoutError(f"layout {layout.name}: {slices} slices do not divide into its DCN sizes")
        return layout
    if dcn_total == slices:
        return layout
    if dcn_total == 1:
        return dataclasses.replace(layout, dcn={**layout.dcn, "data": slices})
    raise LayoutError(f"layout {layout.name}: its DCN axes span {dcn_total} slices but --slices is "
                      f"{slices} (use --slices {dcn_total} or a layout without DCN sizes)")


# XLA:TPU compile options for the train step, by chip. On v5p, without them, libtpu's
# reduce-scatter decomposer turns every reduce-scatter whose group spans more than one torus
# dimension into an all-reduce of the whole buffer and a slice (twice the bytes: the FSDP
# gradients of llama_jax/model/weight_grad.py and train/objectives/head.py); with the
# SparseCore reduce-scatter offload enabled they stay reduce-scatters. Found by compiling
# (docs/layouts.md); other chips are not yet checked, so they get none.
TRAIN_COMPILER_OPTIONS = {
    "v5p": {"xla_tpu_enable_sparse_core_reduce_scatter_v2": "true",
            "xla_tpu_enable_sparse_core_collective_offload_reduce_scatter": "true",
            "xla_tpu_enable_sparse_core_collective_offload_nd_reduce_scatter": "true"},
}


def train_compiler_options(devices) -> dict[str, str] | None:
    """The XLA options the train step is compiled with on these devices (None: the defaults)."""
    first = next(iter(devices))
    if first.platform != "tpu":
        return None
    return TRAIN_COMPILER_OPTIONS.get(CHIP_OF_KIND.get(first.device_kind, ""))
