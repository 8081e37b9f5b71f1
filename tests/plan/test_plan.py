"""The plan stage: ahead-of-time compilation of prefill/decode and the per-device memory verdict."""

import json

import jax
import pytest
from jax.sharding import PartitionSpec as P

from kdjax.plan import generate as plan_lib
from kdjax.models.llama import config as config_lib

GiB = 1 << 30
needs_libtpu = pytest.mark.skipif(not plan_lib.libtpu_available(), reason="libtpu is not installed")


def _int8_param_bytes(c: config_lib.LlamaConfig) -> int:
  """By hand: int8 projections, float32 per-output-channel scales, bf16 embeddings / LM head / norms."""
  L, D, F, H, KV, hd, V = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
                           c.head_dim, c.vocab_size)
  projections = L * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F)
  scales = L * (H * hd + 2 * KV * hd + D + 2 * F + D)
  embeddings = V * D * (1 if c.tie_word_embeddings else 2)
  return projections + 4 * scales + 2 * (embeddings + 2 * L * D + D)


def _kv_cache_bytes(c: config_lib.LlamaConfig, batch: int, max_len: int) -> int:
  return 2 * c.num_layers * batch * max_len * c.num_kv_heads * c.head_dim * 2  # k and v, bf16


@pytest.mark.parametrize("name,expected", [
    ("v5p:4x4x4", "v5p:4x4x4"), ("v2-8", "v2:2x2"), ("v3-32", "v3:4x4"), ("v4-8", "v4:2x2x1"),
    ("v5p-128", "v5p:4x4x4"), ("v5p-16", "v5p:2x2x2"), ("v5litepod-8", "v5e:2x4"), ("v6e-1", "v6e:1x1"),
])
def test_slice_names_map_to_libtpu_topologies(name, expected):
  assert plan_lib.resolve_topology(name) == expected


@pytest.mark.parametrize("name", ["v9-8", "v5p", "v4-6", "tpu:2x2", "v2-3"])
def test_unknown_topologies_are_refused_with_one_line(name):
  with pytest.raises(plan_lib.PlanError) as err:
    plan_lib.resolve_topology(name)
  assert "\n" not in str(err.value)


class FakeMesh:
  """Layout rules read only `.shape`."""

  def __init__(self, **shape):
    self.shape = shape


def test_layout_notes_name_the_axes_that_fall_back():
  # SmolLM2 on an 8-way tensor axis: 9 query heads and 3 KV heads do not divide, so head_dim takes tensor.
  arrays = {"layers.wq": (("layers", "embed", "q_heads", "head_dim"), (30, 576, 9, 64)),
            "layers.wk": (("layers", "embed", "kv_heads", "head_dim"), (30, 576, 3, 64)),
            "layers.wv": (("layers", "embed", "kv_heads", "head_dim"), (30, 576, 3, 64)),
            "layers.w_up": (("layers", "embed", "mlp"), (30, 576, 1536))}
  notes = plan_lib.layout_notes(arrays, FakeMesh(data=1, fsdp=2, tensor=8))
  assert notes == ["q_heads=9 cannot be split 8-way on tensor: head_dim takes it (layers.wq)",
                   "kv_heads=3 cannot be split 8-way on tensor: head_dim takes it (layers.wk, layers.wv)"]
  # embed=576 on a 5-way fsdp axis: nothing else wants fsdp, so it stays unused.
  notes = plan_lib.layout_notes({"embed": (("vocab", "embed"), (49152, 576))}, FakeMesh(data=1, fsdp=5, tensor=1))
  assert notes == ["embed=576 cannot be split 5-way on fsdp: it stays unused (embed)"]


@pytest.fixture(scope="module")
def tiny_plan():
  return plan_lib.make_plan("tiny", slots=4, max_len=64)


def test_tiny_plan_on_live_cpu_devices(tiny_plan):
  config = config_lib.get_preset("tiny")
  plan = tiny_plan
  assert plan.topology == "live:cpu" and plan.num_devices == jax.device_count()
  assert plan.param_bytes == _int8_param_bytes(config)
  assert plan.per_device_cache_bytes >= _kv_cache_bytes(config, 4, 64) // plan.num_devices
  assert set(plan.steps) == {"prefill", "insert", "decode"}
  assert plan.prefill_chunk == 4 and plan.prompt_len == 32
  decode, insert, prefill = plan.steps["decode"], plan.steps["insert"], plan.steps["prefill"]
  # Decode: weights and the slots are arguments, the donated slots come back aliased. Insert: the slots are.
  assert decode.argument_bytes >= plan.per_device_param_bytes + plan.per_device_cache_bytes
  for step in (decode, insert):
    assert step.alias_bytes >= _kv_cache_bytes(config, 4, 64) // plan.num_devices
  # Prefill of a chunk of 4 x 32: weights are arguments; it returns the chunk's keys and values.
  assert prefill.argument_bytes >= plan.per_device_param_bytes
  assert prefill.output_bytes >= _kv_cache_bytes(config, 4, 32) // plan.num_devices
  for step in plan.steps.values():
    assert step.total_bytes == (step.argument_bytes + step.output_bytes - step.alias_bytes + step.temp_bytes
                                + step.code_bytes)
  # Prefill runs beside the resident slots, insert beside the resident weights.
  assert plan.phase_bytes == {"prefill": prefill.total_bytes + plan.per_device_cache_bytes,
                              "insert": insert.total_bytes + plan.per_device_param_bytes,
                              "decode": decode.total_bytes}
  assert plan.per_device_bytes == max(plan.phase_bytes.values())
  assert plan.fits and plan.per_device_bytes <= 0.8 * plan.device_hbm_bytes
  plan_lib.check_fits(plan)  # does not raise
  # No published peak for a CPU: costs, but no predicted times.
  assert plan.predicted["decode_tokens_per_s"] is None and plan.predicted["programs"]["decode"]["flops"] > 0


def test_bf16_plan_over_its_budget_is_refused_with_one_clear_line():
  config = config_lib.get_preset("tiny")
  plan = plan_lib.make_plan(config, quantization="none", slots=2, max_len=32, hbm_fraction=1e-9)
  assert plan.quantization == "none" and plan.param_bytes == 2 * config.num_params
  assert not plan.fits
  with pytest.raises(plan_lib.PlanDoesNotFit) as err:
    plan_lib.check_fits(plan)
  message = str(err.value)
  assert "\n" not in message and "tiny" in message and "live:cpu" in message and "2 slots" in message


def test_plan_json_is_written_atomically(tiny_plan, tmp_path):
  path = plan_lib.write_plan_json(tiny_plan, tmp_path / "run" / "plan.json")
  data = json.loads(path.read_text())
  for key in ("topology", "per_device_bytes", "device_hbm_bytes", "fits", "mesh", "layout", "steps",
              "slots", "phase_bytes", "predicted"):
    assert key in data
  assert data["per_device_bytes"] == tiny_plan.per_device_bytes and data["fits"] is True
  assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary file left behind
  assert "per device" in plan_lib.format_table(tiny_plan)


@pytest.mark.parametrize("bad", [dict(quantization="int4"), dict(slots=0), dict(prompt_len=64),
                                 dict(prefill_chunk=0), dict(hbm_fraction=1.5)])
def test_bad_plan_arguments_raise_plan_error(bad):
  with pytest.raises(plan_lib.PlanError):
    plan_lib.make_plan("tiny", **{"slots": 2, "max_len": 64, **bad})


def test_the_plan_prefills_in_the_engines_chunks():
  import inspect
  from kdjax.serving import engine
  assert plan_lib.ENGINE_PREFILL_CHUNK == inspect.signature(engine.run).parameters["prefill_chunk"].default


# ------------------------------------------------------------------------------ ahead-of-time TPU plans


@pytest.mark.tpu_compile
@needs_libtpu
@pytest.mark.parametrize("name,devices,kind", [("v5p:4x4x4", 64, "TPU v5"), ("v2-8", 8, "TPU v2"),
                                               ("v4-8", 8, "TPU v4"), ("v5e:1x1", 1, "TPU v5 lite")])
def test_topology_devices(name, devices, kind):
  # v2-8 and v4-8 are 4 chips of 2 TensorCores: libtpu's compile-only devices are the 8 cores (v5p's are chips).
  found = plan_lib.topology_devices(name)
  assert len(found) == devices and found[0].device_kind == kind


@pytest.mark.tpu_compile
@needs_libtpu
def test_meshes_that_split_physical_torus_axes_are_built():
  # 8 x 8 on a 4x4x4 torus: no mesh axis is a product of whole physical axes.
  mesh = plan_lib.build_mesh({"fsdp": 8, "tensor": 8}, plan_lib.topology_devices("v5p:4x4x4"))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 8}
  assert len(set(d.id for d in mesh.devices.flat)) == 64


@pytest.fixture(scope="module")
def plan_405b():
  return plan_lib.make_plan("llama3.1-405b", topology="v5p:4x4x4", slots=64, max_len=2048)


@pytest.mark.tpu_compile
@needs_libtpu
def test_405b_int8_fits_on_v5p_64_chips_at_batch_64(plan_405b):
  config = config_lib.get_preset("llama3.1-405b")
  plan = plan_405b
  assert plan.num_devices == 64 and plan.device_kind == "TPU v5" and plan.device_hbm_bytes == 95 * GiB
  assert plan.mesh == {"data": 1, "fsdp": 4, "tensor": 16}
  assert plan.param_bytes == _int8_param_bytes(config)
  # Weights are spread over all 64 chips (only norms and scales' replicated dims are repeated).
  assert plan.param_bytes / 64 <= plan.per_device_param_bytes <= 1.01 * plan.param_bytes / 64
  assert plan.per_device_cache_bytes >= _kv_cache_bytes(config, 64, 2048) / 64
  assert plan.fits and plan.per_device_bytes <= 0.8 * 95 * GiB
  assert plan.per_device_bytes >= plan.per_device_param_bytes + plan.per_device_cache_bytes
  # 8 KV heads cannot take the 16-way tensor axis: head_dim does, for wk/wv and the cache.
  assert plan.layout["layers.wk"] == str(P(None, "fsdp", None, "tensor"))
  assert plan.layout["kv_cache.k"] == str(P(None, "fsdp", None, None, "tensor"))
  assert any(note.startswith("kv_heads=8 cannot be split 16-way on tensor: head_dim takes it")
             and "kv_cache.k" in note for note in plan.layout_notes)
  # Decode of 64 slots reads at least each device's weights every step: the prediction is at most that roofline.
  p = plan.predicted
  assert p["programs"]["decode"]["bytes_accessed"] >= plan.per_device_param_bytes
  assert 0 < p["decode_tokens_per_s"] <= 64 / (plan.per_device_param_bytes / 2765e9)
  assert "predicted: decode" in plan_lib.format_table(plan)


@pytest.mark.tpu_compile
@needs_libtpu
@pytest.mark.parametrize("topology,batch", [("v5e:1x1", 4), ("v2-8", 32)])
def test_8b_int8_fits_on_colab_sized_slices(topology, batch):
  plan = plan_lib.make_plan("llama3.1-8b", topology=topology, slots=batch, max_len=2048)
  assert plan.fits, plan_lib.format_table(plan)
  assert plan.per_device_bytes <= 0.8 * plan.device_hbm_bytes
  assert plan.device_hbm_bytes == {"v5e:1x1": 16 * GiB, "v2-8": 8 * GiB}[topology]  # v2: 8 GiB per core
  assert plan.per_device_param_bytes * plan.num_devices >= _int8_param_bytes(config_lib.get_preset("llama3.1-8b"))


@pytest.mark.tpu_compile
@needs_libtpu
def test_405b_on_four_v5p_chips_is_refused_before_loading():
  plan = plan_lib.make_plan("llama3.1-405b", topology="v5p:2x2x1", slots=64, max_len=2048)
  assert not plan.fits
  # The int8 weights alone (~382 GiB) exceed four chips' 80% budget.
  assert plan.per_device_bytes >= _int8_param_bytes(config_lib.get_preset("llama3.1-405b")) / 4
  with pytest.raises(plan_lib.PlanDoesNotFit) as err:
    plan_lib.check_fits(plan)
  assert "\n" not in str(err.value) and "v5p:2x2x1" in str(err.value)


# ------------------------------------------------------------------------------ predictions


def _decode_step_flops(c: config_lib.LlamaConfig, slots: int, window: int) -> int:
  """By hand: one token per slot through every projection and the LM head (2 FLOPs per weight), and attention
  of each query head over the whole window (scores and the weighted values, 2 x 2 H hd W)."""
  projections = c.num_layers * (c.hidden_size * c.num_heads * c.head_dim * 2 + 2 * c.hidden_size * c.num_kv_heads
                                * c.head_dim + 3 * c.hidden_size * c.intermediate_size)
  return slots * (2 * projections + 2 * c.hidden_size * c.vocab_size
                  + 4 * c.num_layers * c.num_heads * c.head_dim * window)


@pytest.fixture(scope="module")
def tiny_v5e_plan():
  return plan_lib.make_plan("tiny", topology="v5e:1x1", slots=8, max_len=64, prompt_len=48, prefill_chunk=2)


@pytest.mark.tpu_compile
@needs_libtpu
def test_predicted_throughput_is_the_roofline_of_the_compiled_programs(tiny_v5e_plan):
  config, plan = config_lib.get_preset("tiny"), tiny_v5e_plan
  p, decode, prefill = tiny_v5e_plan.predicted, tiny_v5e_plan.predicted["programs"]["decode"], \
      tiny_v5e_plan.predicted["programs"]["prefill"]
  # The decode program is the engine's loop; one step of it counts every layer (the scan) once per layer.
  hand = _decode_step_flops(config, 8, 64)
  assert hand <= decode["flops"] <= 1.3 * hand
  # It reads every weight but the embedding table (one row per slot) and the whole window of keys and values.
  embed = config.vocab_size * config.hidden_size * 2
  assert decode["bytes_accessed"] >= plan.param_bytes - embed + _kv_cache_bytes(config, 8, 64)
  # The prefill of 2 prompts of 48 tokens: every projection and the LM head at 2 x 48 tokens at least.
  assert prefill["flops"] >= _decode_step_flops(config, 2 * 48, 0)
  # v5e: 197 TFLOP/s and 819 GB/s per chip; each program takes max(compute, memory).
  for program in (decode, prefill):
    compute_s, memory_s = program["flops"] / 197e12, program["bytes_accessed"] / 819e9
    assert program["step_s"] == pytest.approx(max(compute_s, memory_s), rel=1e-12)
    assert program["flop_utilisation"] == pytest.approx(compute_s / max(compute_s, memory_s))
    assert program["hbm_bandwidth_utilisation"] == pytest.approx(memory_s / max(compute_s, memory_s))
  assert p["decode_step_s"] == decode["step_s"]
  assert p["decode_tokens_per_s"] == pytest.approx(8 / decode["step_s"])
  assert p["prefill_tokens_per_s"] == pytest.approx(2 * 48 / prefill["step_s"])
  # Steady state: 8 slots x 16 new tokens take 16 decode steps and 8 / 2 prefills.
  assert p["generate_tokens_per_s"] == pytest.approx(8 * 16 / (16 * decode["step_s"] + 4 * prefill["step_s"]))
  assert p["decode_hbm_bandwidth_utilisation"] == decode["hbm_bandwidth_utilisation"]
  table = plan_lib.format_table(plan)
  assert f"decode {p['decode_tokens_per_s']:,.0f} tokens/s" in table and "prefill" in table


@pytest.mark.tpu_compile
@needs_libtpu
def test_more_slots_than_fit_are_refused(tiny_v5e_plan):
  # The same engine with a budget just under the compiled need, then just over it.
  need = tiny_v5e_plan.per_device_bytes
  fraction = need / tiny_v5e_plan.device_hbm_bytes
  refused = plan_lib.make_plan("tiny", topology="v5e:1x1", slots=8, max_len=64, prompt_len=48, prefill_chunk=2,
                               hbm_fraction=fraction * 0.999)
  assert not refused.fits and refused.per_device_bytes == need
  with pytest.raises(plan_lib.PlanDoesNotFit):
    plan_lib.check_fits(refused)
  assert plan_lib.make_plan("tiny", topology="v5e:1x1", slots=8, max_len=64, prompt_len=48, prefill_chunk=2,
                            hbm_fraction=fraction * 1.001).fits


@pytest.mark.tpu_compile
@needs_libtpu
def test_8b_int8_with_256_slots_on_v5e_8_fits_and_predicts_at_least_jetstreams_measurement():
  """Acceptance 3: JetStream serves Llama 3.1 8B int8 at 256 slots on v5e-8 at 10,873 tokens/s (1024 in, 1024
  out); a roofline bound cannot be below a measurement."""
  plan = plan_lib.make_plan("llama3.1-8b", topology="v5e:2x4", slots=256, max_len=2048, prompt_len=1024)
  assert plan.fits, plan_lib.format_table(plan)
  config = config_lib.get_preset("llama3.1-8b")
  assert plan.per_device_cache_bytes >= _kv_cache_bytes(config, 256, 2048) / 8
  assert plan.predicted["decode_tokens_per_s"] >= 10_873
  assert plan.predicted["generate_tokens_per_s"] >= 10_873
  # Decode is bound by HBM bandwidth: the weights and 256 x 2048 tokens of keys and values every step.
  assert plan.predicted["decode_hbm_bandwidth_utilisation"] == 1.0
