"""The one place that builds a device mesh from a layout.

Mesh axes are always `stage, data, fsdp, sequence, tensor` (size 1 costs nothing).
Each axis's size is its DCN size (across slices, outer) times its ICI size
(within a slice, inner), so only DCN-sized factors cross the slow network.

Axis types are Auto on purpose: the model names logical axes and lets
XLA's sharding propagation (GSPMD) place everything between the constraints.
Explicit axes would make every intermediate's sharding part of its type,
which Flax Linen's logical partitioning does not express.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from sharding.layout import MESH_AXES, Layout, LayoutError


def resolve_sizes(layout: Layout, n_devices: int) -> tuple[dict[str, int], dict[str, int]]:
    """ICI and DCN sizes with -1 filled in; LayoutError if they do not fit `n_devices`."""
    ici, dcn = dict(layout.ici), dict(layout.dcn)
    known = math.prod(s for s in (*ici.values(), *dcn.values()) if s != -1)
    if -1 in ici.values() or -1 in dcn.values():
        if n_devices % known:
            raise LayoutError(f"layout {layout.name}: {n_devices} devices do not divide into the fixed "
                              f"mesh sizes (product {known})")
        sizes = ici if -1 in ici.values() else dcn
        axis = next(a for a, s in sizes.items() if s == -1)
        sizes[axis] = n_devices // known
    total = math.prod(ici.values()) * math.prod(dcn.values())
    if total != n_devices:
        shape = " x ".join(f"{a}={dcn[a] * ici[a]}" for a in MESH_AXES)
        raise LayoutError(f"layout {layout.name}: mesh {shape} needs {total} devices but "
                          f"{n_devices} are available")
    return ici, dcn


def mesh_shape(layout: Layout, n_devices: int) -> dict[str, int]:
    """Total size of each mesh axis (DCN x ICI) for `n_devices` devices."""
    ici, dcn = resolve_sizes(layout, n_devices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def default_devices(layout: Layout) -> list:
    """The devices a layout's mesh takes when none are named: all of them, or, in a
    single process, the first N when the layout fixes every size to a smaller N
    (e.g. `layout=dp mesh.data=1` to compare with one device on an 8-device host)."""
    devices = jax.devices()
    ici, dcn = layout.ici, layout.dcn
    if -1 in ici.values() or -1 in dcn.values() or jax.process_count() > 1:
        return devices
    needed = math.prod(ici.values()) * math.prod(dcn.values())
    if needed < len(devices):
        logging.getLogger(__name__).warning(
            "layout %s: the mesh uses %d of the %d devices", layout.name, needed, len(devices))
        return devices[:needed]
    return devices


def make_mesh(layout: Layout, devices=None) -> Mesh:
    """A Mesh with axes (stage, data, fsdp, sequence, tensor) laid out for `devices`
    (default: `default_devices(layout)`).

    With DCN sizes > 1, devices are grouped by slice: real TPU slices by
    their `slice_index`, and elsewhere (CPU tests) consecutive groups of
    devices stand in for slices.
    """
    devices = list(devices if devices is not None else default_devices(layout))
    ici, dcn = resolve_sizes(layout, len(devices))
    ici_shape = [ici[a] for a in MESH_AXES]
    dcn_shape = [dcn[a] for a in MESH_AXES]
    if math.prod(dcn_shape) == 1:
        grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    elif hasattr(devices[0], "slice_index"):
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                    allow_split_physical_axes=True)
    else:
        grid = _emulated_hybrid_grid(devices, ici_shape, dcn_shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _emulated_hybrid_grid(devices, ici_shape, dcn_shape) -> np.ndarray:
    """Consecutive device groups as slices: axis i = dcn_i (outer) x ici_i (inner)."""
    n_axes = len(ici_shape)
    grid = np.asarray(devices, dtype=object).reshape(*dcn_shape, *ici_shape)
    interleaved = [ax for i in range(n_axes) for ax in (i, n_axes + i)]
    grid = grid.transpose(interleaved)
    return grid.reshape([d * i for d, i in zip(dcn_shape, ici_shape)])
