"""The cost of a compiled program with its loops counted, and the roofline time it implies on a TPU chip.

XLA's cost analysis counts a while loop's body once, whatever its trip count (jax's layer scans, the loss's
chunk scan, the gradient-accumulation scan and the engine's decode loop are while loops), so `loop_aware_cost`
analyses each loop body of the compiled HLO again and multiplies it by its trip count. `roofline` turns FLOPs
and bytes accessed per device into a time, max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth), with the chip
figures of `chips.CHIP_BY_KIND`. Used by `kdjax.plan.generate` (the generation engine's programs) and `kdjax.plan.train_step`
(the student's train step).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any

import jax

from kdjax.plan import chips

# Compiled HLO heads computations "%name (params) -> result {"; jax's unoptimised HLO text, "name {".
_COMPUTATION = re.compile(r"^(ENTRY )?%?([^\s({]+) [({]", re.M)
_WHILE = re.compile(r" while\(.*?condition=%?([^\s,]+), body=%?([^\s,]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_LOOP_BOUND = re.compile(r"= s32\[\]\S* constant\((\d+)\)")
_CALLS = re.compile(r"(?:calls|to_apply|branch_computations|called_computations)=\{?([^\s,}]+(?:, [^\s,}]+)*)")


def _computations(hlo: str) -> tuple[dict[str, str], str]:
  """HLO module text -> ({computation name: its text}, entry name)."""
  heads = list(_COMPUTATION.finditer(hlo))
  bodies, entry = {}, ""
  for head, following in zip(heads, heads[1:] + [None]):
    bodies[head.group(2)] = hlo[head.start():following.start() if following else len(hlo)]
    if head.group(1):
      entry = head.group(2)
  return bodies, entry


def _trip_count(while_line: str, condition: str) -> int | None:
  """A jax loop's trip count: XLA's `known_trip_count`, else the condition's bound (jax loops count 0, 1, ...)."""
  known = _TRIP_COUNT.search(while_line)
  if known:
    return int(known.group(1))
  bounds = _LOOP_BOUND.findall(condition)
  return int(bounds[0]) if len(bounds) == 1 and " direction=LT" in condition else None


def _loops_added(hlo: str) -> tuple[dict[str, float], dict[str, float], list[dict[str, Any]], list[str], dict]:
  """For an HLO module's text: (analysis of its entry, what counting every loop fully adds, loops, unknown loops,
  one iteration of each unknown loop: its body with its own loops counted fully).

  Each loop body is analysed as a module of its own (the body made the entry) by XLA's HloCostAnalysis on the
  live backend (compile-only TPU clients cannot analyse), and cost(C) = analysis(C) + sum over the loops W
  reached from C of trips(W) x cost(body(W)) - analysis(body(W)).
  """
  from jax._src.lib import xla_client
  from jaxlib import _hlo
  bodies, entry = _computations(hlo)
  client = jax.devices()[0].client
  analysed: dict[str, dict[str, float]] = {}

  def analysis(name: str) -> dict[str, float]:
    if name not in analysed:
      text = re.sub(r"^ENTRY ", "", hlo, count=1, flags=re.M)
      text = re.sub(r"^(%?)" + re.escape(name) + r" ([({])", lambda m: f"ENTRY {m.group(1)}{name} {m.group(2)}",
                    text, count=1, flags=re.M)
      cost = xla_client._xla.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(text))
      analysed[name] = {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0))}
    return analysed[name]

  def loops_reached(name: str, seen: set[str]) -> list[tuple[str, int | None]]:
    """The while loops in `name` and in the non-loop computations it calls: (body, trip count)."""
    found = []
    for line in bodies.get(name, "").splitlines():
      match = _WHILE.search(line)
      if match:
        condition, body = match.groups()
        found.append((body, _trip_count(line, bodies.get(condition, ""))))
        continue
      for group in _CALLS.findall(line):
        for callee in (name.lstrip("%") for name in group.split(", ")):
          if callee in bodies and callee not in seen:
            seen.add(callee)
            found += loops_reached(callee, seen)
    return found

  loops: list[dict[str, Any]] = []
  unknown: list[str] = []
  per_iteration: dict[str, dict[str, float]] = {}
  totals: dict[str, dict[str, float]] = {}

  def extra(name: str) -> dict[str, float]:
    """What counting every loop of `name` as often as it runs adds to an analysis that counts it once."""
    if name not in totals:
      added = {"flops": 0.0, "bytes": 0.0}
      for body, trips in loops_reached(name, {name}):
        once, inner = analysis(body), extra(body)
        if trips is None:  # counted once, the loops inside it fully (one decode step of the engine's loop)
          unknown.append(body)
          per_iteration[body] = {key: once[key] + inner[key] for key in once}
          trips = 1
        else:
          loops.append({"body": body, "trips": trips})
        for key in added:
          added[key] += (trips - 1) * once[key] + trips * inner[key]
      totals[name] = added
    return totals[name]

  added = extra(entry)
  return analysis(entry), added, loops, unknown, per_iteration


@contextlib.contextmanager
def _native_stderr_silenced():
  """Sends file descriptor 2 (where native libraries log) to /dev/null for the duration."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def loop_aware_cost(compiled, lowered=None) -> dict[str, Any]:
  """XLA's cost analysis of `compiled` with every while loop's body counted as often as the loop runs.

  XLA's own `cost_analysis()` (`raw_flops`, `raw_bytes_accessed`) analyses a loop body once, whatever its trip
  count. The loops and their trip counts are read from the compiled HLO, and what they add is added
  (`_loops_added`). When the compiled HLO cannot be read back (libtpu's async collectives on some topologies
  fail jaxlib's HLO parser), `lowered` -- the same step before optimisation, unpartitioned -- supplies the loop
  structure instead: both compiled figures are scaled by the factor by which counting its loops fully raises its
  FLOPs (`method` says which). Checked where both work (Llama 3.2 1B, v5e:2x4): FLOPs within 0.1%, bytes within
  11% of the compiled HLO's. A loop whose trip count cannot be read (the engine's decode loop, which runs until
  slots finish) is counted once, the loops in its body as often as they run, and listed in `unknown_loops`;
  `unknown_loop_iteration` gives one iteration of each such loop alone, without the program around it (from the
  compiled HLO only).
  """
  raw = compiled.cost_analysis()
  raw = raw[0] if isinstance(raw, (list, tuple)) else raw
  raw_flops, raw_bytes = float(raw.get("flops", 0.0)), float(raw.get("bytes accessed", 0.0))
  out = {"raw_flops": raw_flops, "raw_bytes_accessed": raw_bytes}
  try:
    with _native_stderr_silenced():  # XLA logs a C++ stack trace before raising; the failure is handled here
      hlo = compiled.as_text()
  except jax.errors.JaxRuntimeError:
    if lowered is None:
      raise
    hlo = None
  if hlo is not None:
    _, added, loops, unknown, per_iteration = _loops_added(hlo)
    return out | {"flops": raw_flops + added["flops"], "bytes_accessed": raw_bytes + added["bytes"],
                  "method": "compiled HLO", "loops": loops, "unknown_loops": unknown,
                  "unknown_loop_iteration": {body: {"flops": c["flops"], "bytes_accessed": c["bytes"]}
                                             for body, c in per_iteration.items()}}
  once, added, loops, unknown, _ = _loops_added(lowered.as_text(dialect="hlo"))
  # Not its own bytes factor: unfused, every elementwise op reads and writes memory (2x off on SmolLM2).
  scale = (once["flops"] + added["flops"]) / once["flops"] if once["flops"] else 1.0
  return out | {"flops": raw_flops * scale, "bytes_accessed": raw_bytes * scale,
                "method": "compiled figures x the loop factor of the unoptimised HLO's FLOPs", "loops": loops,
                "unknown_loops": unknown, "unknown_loop_iteration": {}}


def roofline(flops: float, bytes_accessed: float, device) -> dict[str, float] | None:
  """The time of a program of `flops` and `bytes_accessed` per device on `device`: max(compute, memory).

  compute_s = FLOPs / peak bf16 FLOP/s, memory_s = bytes / HBM bandwidth (the device's share of its chip);
  `flop_utilisation` and `hbm_bandwidth_utilisation` are the shares of peak each assumes (one of them is 1). It
  ignores collectives, host time and imperfect overlap: a lower bound on the time. None for a device kind
  without published figures (CPUs, GPUs).
  """
  chip = chips.CHIP_BY_KIND.get(device.device_kind)
  if chip is None:
    return None
  share = chips.chip_share(device)
  peak, bandwidth = chip.bf16_flops * share, chip.hbm_bytes_per_s * share
  compute_s, memory_s = flops / peak, bytes_accessed / bandwidth
  step_s = max(compute_s, memory_s)
  return {"peak_flops_per_s": peak, "hbm_bytes_per_s": bandwidth, "compute_s": compute_s, "memory_s": memory_s,
          "step_s": step_s, "flop_utilisation": compute_s / step_s if step_s else 0.0,
          "hbm_bandwidth_utilisation": memory_s / step_s if step_s else 0.0}
