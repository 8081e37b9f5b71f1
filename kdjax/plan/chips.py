"""TPU chips and topologies as the plans see them: each chip kind's published figures, slice and topology names,
the compile-only devices libtpu gives for a topology, and each device's memory.

Planning needs no TPU: libtpu compiles ahead of time for a topology on any host (`topology_devices`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any, Sequence

import jax

from kdjax.infra import parallel

GiB = 1 << 30


class PlanError(ValueError):
  """A plan cannot be made: bad topology name, mesh, batch or lengths."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published figures of one TPU chip (Google Cloud TPU system-architecture pages for v2, v3, v4, v5e, v5p,
  v6e): HBM, TensorCores, peak dense bf16 FLOP/s and HBM bandwidth. v2 45 TFLOP/s, 600 GB/s; v3 123 TFLOP/s,
  900 GB/s; v4 275 TFLOP/s, 1200 GB/s; v5e 197 TFLOP/s, 819 GB/s; v5p 459 TFLOP/s, 2765 GB/s; v6e 918 TFLOP/s,
  1640 GB/s."""
  hbm_bytes: int
  cores: int
  bf16_flops: float
  hbm_bytes_per_s: float


_V5E = Chip(16 * GiB, 1, 197e12, 819e9)
_V5P = Chip(95 * GiB, 2, 459e12, 2765e9)
_V6E = Chip(32 * GiB, 1, 918e12, 1640e9)
# By `device_kind`, for compile-only devices that have no memory stats. A JAX device is a chip (v5p, megacore:
# `num_cores` 2) or one core (v2, v3, and v4 as libtpu describes it): it gets its cores' share of the chip.
CHIP_BY_KIND = {
    "TPU v2": Chip(16 * GiB, 2, 45e12, 600e9), "TPU v3": Chip(32 * GiB, 2, 123e12, 900e9),
    "TPU v4": Chip(32 * GiB, 2, 275e12, 1200e9), "TPU v5 lite": _V5E, "TPU v5e": _V5E, "TPU v5": _V5P,
    "TPU v5p": _V5P, "TPU v6 lite": _V6E, "TPU v6e": _V6E,
}
# "vX-N" slice names -> (libtpu generation name, TensorCores per chip counted in N, torus dimensions).
_SLICE_GENERATIONS = {
    "v2": ("v2", 2, 2), "v3": ("v3", 2, 2), "v4": ("v4", 2, 3), "v5p": ("v5p", 2, 3),
    "v5litepod": ("v5e", 1, 2), "v5e": ("v5e", 1, 2), "v6e": ("v6e", 1, 2),
}
_SLICE_NAME = re.compile(r"^(v\d+[a-z]*)-(\d+)$")
_TOPOLOGY_NAME = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)+)$")


def libtpu_available() -> bool:
  """Whether ahead-of-time TPU compilation is possible here (libtpu installed)."""
  return importlib.util.find_spec("libtpu") is not None


def resolve_topology(name: str) -> str:
  """A libtpu topology name: "v5p:4x4x4" passes through, slice names like "v2-8" or "v5litepod-4" map to one."""
  name = name.strip()
  if _TOPOLOGY_NAME.match(name):
    return name
  match = _SLICE_NAME.match(name)
  if not match or match.group(1) not in _SLICE_GENERATIONS:
    raise PlanError(f"unknown TPU topology {name!r}; use e.g. 'v5p:4x4x4', 'v5e:1x1' or 'v2-8'")
  generation, cores_per_chip, num_dims = _SLICE_GENERATIONS[match.group(1)]
  cores = int(match.group(2))
  chips = cores // cores_per_chip
  if cores % cores_per_chip or chips < 1 or chips & (chips - 1) or (num_dims == 3 and chips < 4):
    raise PlanError(f"cannot map TPU slice {name!r} to a topology; name it directly, e.g. '{generation}:2x2'")
  # Grow a torus by doubling its smallest dimension (the last such), from 2x2x1 for 3D chips: v4-8 -> 2x2x1,
  # v5p-128 -> 4x4x4, v2-8 -> 2x2, v5litepod-8 -> 2x4.
  dims = [2, 2, 1] if num_dims == 3 else [1, 1]
  while math.prod(dims) < chips:
    smallest = min(dims)
    last = max(i for i, d in enumerate(dims) if d == smallest)
    dims[last] *= 2
  if num_dims == 3:
    dims = sorted(dims[:2]) + dims[2:] if dims[2] == 1 else sorted(dims)
  return f"{generation}:{'x'.join(map(str, dims))}"


def _prepare_compile_only(topology: str) -> None:
  """Settings for libtpu when it only compiles, on a host that is not a TPU VM.

  Without them libtpu probes the GCE metadata server and logs errors, and takes a machine-wide lock that makes
  a second process (another test worker) fail. On a TPU VM the live backend already owns libtpu: leave it.
  """
  if jax.default_backend() == "tpu":
    return
  generation, dims = topology.split(":")
  chips = math.prod(int(d) for d in dims.split("x"))
  slice_name, cores_per_chip, _ = next((v for k, v in _SLICE_GENERATIONS.items() if v[0] == generation),
                                       (generation, 1, 2))
  slice_name = "v5litepod" if generation == "v5e" else slice_name
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{slice_name}-{chips * cores_per_chip}")


def host_count(devices: Sequence[Any]) -> int:
  """How many processes (TPU VM hosts) hold `devices`."""
  return len(parallel.processes_of(devices))


def topology_devices(topology: str) -> list[Any]:
  """The compile-only devices of a TPU slice (needs libtpu; works with JAX_PLATFORMS=cpu)."""
  if not libtpu_available():
    raise PlanError(f"planning for TPU topology {topology!r} needs libtpu (pip install 'jax[tpu]')")
  from jax.experimental import topologies
  name = resolve_topology(topology)
  _prepare_compile_only(name)
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except jax.errors.JaxRuntimeError as err:
    raise PlanError(f"libtpu rejected topology {name!r}: {str(err).splitlines()[0]}") from None


def chip_share(device: Any) -> float:
  """The fraction of its chip that one JAX device is: 1 for a chip, 1/2 for one core of a two-core chip."""
  chip = CHIP_BY_KIND[device.device_kind]
  return min(getattr(device, "num_cores", 1), chip.cores) / chip.cores


def device_hbm_bytes(device: Any) -> int:
  """Memory of one device: its memory stats when live, the table for TPU kinds, host RAM for CPUs."""
  try:
    stats = device.memory_stats()
  except Exception:  # compile-only devices raise: their stats are not available
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.device_kind in CHIP_BY_KIND:
    return int(CHIP_BY_KIND[device.device_kind].hbm_bytes * chip_share(device))
  if device.platform == "cpu":
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // max(1, len([d for d in jax.devices() if d.platform == "cpu"]))
  raise PlanError(f"unknown memory size of device kind {device.device_kind!r}")


