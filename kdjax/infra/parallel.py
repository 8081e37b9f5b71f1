"""Meshes, logical-axis rules and multi-host start-up.

Parameters name their dimensions with logical axes (`embed`, `q_heads`, `kv_heads`, ...). This module alone maps
those names to mesh axes. A rule applies to a dimension only if the mesh axis divides it and is not already used
by another dimension of the same array; otherwise the next rule for that logical axis is tried, and failing all,
the dimension is replicated. That is how a 16-way `tensor` axis meets 405B's 8 KV heads: `kv_heads` cannot take
it, so `head_dim` does (see `describe_layout`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axes) in priority order. A logical axis may appear several times: the first rule that
# fits wins. Mesh axes in a tuple shard one dimension jointly.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("batch", "data"),
    ("batch", "fsdp"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", "tensor"),
    ("layers", None),
    ("norm", None),
    ("seq", None),
    ("lora_rank", None),
)


def normalize_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
  """A device shard's index (as given to `make_array_from_callback`) with explicit start and stop."""
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes data / fsdp / tensor. One size may be -1 (the remaining devices); default all fsdp."""
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {"fsdp": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Iterable = DEFAULT_RULES) -> PartitionSpec:
  """Maps logical axis names of an array of `shape` to a PartitionSpec on `mesh`."""
  if logical_axes is None:
    return PartitionSpec()
  rules = list(rules)
  used: set[str] = set()
  spec: list[Any] = []
  for name, size in zip(logical_axes, shape):
    choice = None
    for logical, mesh_axes in rules:
      if logical != name or mesh_axes is None:
        continue
      axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
      if not axes or used & set(axes):
        continue
      if size % math.prod(mesh.shape[a] for a in axes) == 0:
        choice = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
    spec.append(choice)
  return PartitionSpec(*spec)


def named_sharding(logical_axes, shape, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
  """A NamedSharding for every variable of `state` (concrete or abstract), from its `logical_axes`."""
  def one(var):
    shape = var.get_raw_value().shape  # works for abstract (ShapeDtypeStruct) variables too
    return var.replace(named_sharding(var.get_metadata().get("logical_axes"), shape, mesh, rules))
  return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Places every parameter of `model` on `mesh` according to its logical axes (in place)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  placed = jax.tree.map(lambda v, s: v.replace(jax.device_put(v[...], s.get_raw_value())), state, shardings,
                        is_leaf=_is_variable)
  nnx.update(model, placed)
  return model


def describe_layout(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, str]:
  """Human-readable `path -> PartitionSpec` of a model's parameters (what a plan prints)."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    spec = logical_to_spec(var.get_metadata().get("logical_axes"), var.get_raw_value().shape, mesh, rules)
    out[".".join(map(str, path))] = str(spec)
  return out


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts `jax.distributed` when running on several hosts (TPU pods detect their peers themselves).

  On a single host with no coordinator given, it does nothing, so the same entry point runs everywhere.
  """
  coordinator_address = coordinator_address or os.environ.get("KDJAX_COORDINATOR")
  if num_processes is None and os.environ.get("KDJAX_NUM_PROCESSES"):
    num_processes = int(os.environ["KDJAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("KDJAX_PROCESS_ID"):
    process_id = int(os.environ["KDJAX_PROCESS_ID"])
  on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if coordinator_address is None and not on_tpu_pod:
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def host_slice(n: int, process_index: int | None = None, process_count: int | None = None) -> np.ndarray:
  """Indices `0..n-1` owned by this host: a strided share, so hosts finish at about the same time."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  return np.arange(process_index, n, process_count)


def is_writer() -> bool:
  """True on the one process that writes a run's shared files (process 0)."""
  return jax.process_index() == 0


_syncs: list[str] = []
SYNC_TIMEOUT_VARIABLE = "KDJAX_SYNC_TIMEOUT_S"


def sync(name: str) -> None:
  """Waits until every process has reached the point called `name` (nothing on one process).

  After a stage's writer commits a file, a sync makes it safe for the other processes to read it. It is a barrier
  of jax.distributed's coordination service, not a device collective: processes may arrive hours apart (one
  generates while another has finished its share; `KDJAX_SYNC_TIMEOUT_S`, default 24 h), where a collective's
  first use times out after 30 s. Every process calls the same syncs in the same order."""
  if jax.process_count() == 1:
    return
  client, barrier, timeout_ms = _coordination(name)
  if client is None:  # started some other way: fall back to a device collective
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(barrier)
    return
  client.wait_at_barrier(barrier, timeout_ms)


def _coordination(name: str) -> tuple[Any, str, int]:
  """(jax.distributed's coordination client or None, a key unique to this call of `name`, the wait in ms).

  Keys are unique per call because a name may come up again (a stage per arm); every process makes the same
  calls in the same order, so they agree on the keys."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  _syncs.append(name)
  timeout_ms = int(float(os.environ.get(SYNC_TIMEOUT_VARIABLE, 86400)) * 1000)
  return distributed.global_state.client, f"{name}#{len(_syncs)}", min(timeout_ms, 2**31 - 1)


def processes_of(devices: Iterable[Any]) -> set[int]:
  """The indices of the processes (hosts) that hold `devices` (compile-only devices without one: process 0)."""
  return {getattr(d, "process_index", 0) for d in devices}


def spans_processes(mesh: Mesh | None) -> bool:
  """True when `mesh` holds devices of more than one process: every process must then run the same programs on it
  in the same order (one SPMD program across hosts), and no process can read another's shards directly."""
  return mesh is not None and len(processes_of(mesh.devices.flat)) > 1


def covers_every_process(mesh: Mesh) -> bool:
  """True when every process of the run holds devices of `mesh`."""
  return processes_of(mesh.devices.flat) == set(range(jax.process_count()))


def broadcast_json(name: str, value: Any = None) -> Any:
  """Process 0's `value` (anything json can write) on every process; on one process `value` itself.

  Through jax.distributed's key-value store, not a device collective, so the others may wait as long as `sync`
  allows (process 0 may first read a store). Every process calls it with the same `name`, in the same order."""
  if jax.process_count() == 1:
    return value
  import json  # pylint: disable=import-outside-toplevel
  client, key, timeout_ms = _coordination(f"kdjax.broadcast:{name}")
  if client is None:
    raise RuntimeError("broadcast_json needs jax.distributed (kdjax.infra.parallel.initialize_distributed)")
  if jax.process_index() == 0:
    client.key_value_set(key, json.dumps(value))
    return value
  return json.loads(client.blocking_key_value_get(key, timeout_ms))


def local_mesh(shape: Mapping[str, int] | None = None) -> Mesh:
  """A mesh of this process's own devices: for stages where each process works on its own share of the
  questions with a complete model (eval, analyze, the teacher), so no step waits on another host."""
  return make_mesh(shape, devices=jax.local_devices())


def gather_rows(rows: np.ndarray) -> list[np.ndarray]:
  """Every process's `rows` ([n_p, ...], n_p may differ by process; the trailing shape may not), in process
  order; on one process just `[rows]`. A collective: every process must call it."""
  rows = np.asarray(rows)
  if jax.process_count() == 1:
    return [rows]
  from jax.experimental import multihost_utils
  sync("kdjax.gather_rows")  # all arrive together: a collective's first use waits only 30 s for the others
  counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(rows)], np.int64))).reshape(-1)
  padded = np.zeros((int(counts.max()),) + rows.shape[1:], rows.dtype)
  padded[:len(rows)] = rows
  stacked = np.asarray(multihost_utils.process_allgather(padded))
  return [stacked[p, :int(n)] for p, n in enumerate(counts)]


def interleave_shares(shares: Sequence[Sequence[Any]]) -> list[Any]:
  """Undoes `host_slice`: the items of every process's strided share back in their original order."""
  total = sum(len(s) for s in shares)
  out: list[Any] = [None] * total
  count = len(shares)
  for process, share in enumerate(shares):
    expected = len(range(process, total, count))
    if len(share) != expected:
      raise ValueError(f"process {process} holds {len(share)} items; its strided share of {total} is {expected}")
    out[process::count] = list(share)
  return out
