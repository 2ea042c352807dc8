"""The TPU slices we compile for are wired as Cloud TPU provisions them.

The table below is written from Cloud TPU's pages, not from sharding/topology.py:
  - v5p (cloud.google.com/tpu/docs/v5p): "All 4x4x4 and larger slices (one cube) have
    full 3D torus"; two TensorCores per chip; 4-chip hosts (ct5p-hightpu-4t); the
    slice table's host counts (2x2x1: 1, 2x4x4: 8, 4x4x4: 16, 8x8x8: 128, 8x16x16: 512).
  - v5e (cloud.google.com/tpu/docs/v5e) and v6e (/v6e): one TensorCore per chip, 8 chips
    per host, a 2D torus of 256 chips (16x16); the v5e slice table's host counts
    (4x4: 2, 8x8: 8, 16x16: 32, 1x1: a share of one host).
  - v4 (cloud.google.com/tpu/docs/v4): two TensorCores per chip, 4-chip hosts, smaller
    than a cube is a mesh.
Every slice a shipped run config names must have a row here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("libtpu", reason="TPU topologies need libtpu: pip install -e '.[tpu]'")

from jax.experimental import topologies  # noqa: E402

from llama_jax.config_files import shipped_configs  # noqa: E402
from sharding.topology import topology_devices  # noqa: E402
from train.config import load_run_config  # noqa: E402

NO_WRAP, TORUS_2D, TORUS_3D = (False, False, False), (True, True, False), (True, True, True)

# slice -> (wrap-around links per dimension, chip config, chips, hosts)
DOCUMENTED = {
    "v5p:2x2x1": (NO_WRAP, "megacore", 4, 1),
    "v5p:2x2x2": (NO_WRAP, "megacore", 8, 2),    # v5p-16
    "v5p:4x4x2": (NO_WRAP, "megacore", 32, 8),
    "v5p:2x4x4": (NO_WRAP, "megacore", 32, 8),
    "v5p:4x4x4": (TORUS_3D, "megacore", 64, 16),
    "v5p:4x4x8": (TORUS_3D, "megacore", 128, 32),
    "v5p:4x8x8": (TORUS_3D, "megacore", 256, 64),
    "v5p:8x8x8": (TORUS_3D, "megacore", 512, 128),
    "v5p:8x16x16": (TORUS_3D, "megacore", 2048, 512),
    "v5e:1x1": (NO_WRAP, "default", 1, 1),
    "v5e:4x4": (NO_WRAP, "default", 16, 2),
    "v5e:8x8": (NO_WRAP, "default", 64, 8),
    "v5e:16x16": (TORUS_2D, "default", 256, 32),
    "v6e:16x16": (TORUS_2D, "default", 256, 32),
    "v4:2x2x2": (NO_WRAP, "megacore", 8, 2),
}


def _shipped_slices() -> set[str]:
    return {run.topology for run in map(load_run_config, shipped_configs("runs")) if run.topology}


def test_every_shipped_slice_has_a_documented_row():
    assert _shipped_slices() <= set(DOCUMENTED), _shipped_slices() - set(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_the_topology_handed_to_the_compiler_is_wired_as_documented(name, monkeypatch):
    """libtpu is asked for the documented wrap-around links and chip config, and the devices
    it returns are one per chip (megacore fuses v4's and v5p's two TensorCores) spread over
    the documented number of hosts."""
    wrap, chip_config, chips, hosts = DOCUMENTED[name]
    asked = []
    real = topologies.get_topology_desc

    def recording(**kwargs):
        asked.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(topologies, "get_topology_desc", recording)
    devices = topology_devices(name)
    (kwargs,) = asked
    assert (tuple(kwargs["wrap"]), kwargs["chip_config_name"]) == (wrap, chip_config)
    assert len(devices) == len({tuple(d.coords) for d in devices}) == chips
    assert len({d.process_index for d in devices}) == hosts
