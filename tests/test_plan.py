"""The plan stage: ahead-of-time compilation of prefill/decode and the per-device memory verdict."""

import json

import jax
import pytest
from jax.sharding import PartitionSpec as P

from kdjax import plan as plan_lib
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
  return plan_lib.make_plan("tiny", batch_size=4, max_len=64)


def test_tiny_plan_on_live_cpu_devices(tiny_plan):
  config = config_lib.get_preset("tiny")
  plan = tiny_plan
  assert plan.topology == "live:cpu" and plan.num_devices == jax.device_count()
  assert plan.param_bytes == _int8_param_bytes(config)
  assert plan.per_device_cache_bytes >= _kv_cache_bytes(config, 4, 64) // plan.num_devices
  assert set(plan.steps) == {"prefill", "decode"}
  for step in plan.steps.values():
    # Weights and the cache are arguments of both steps; the donated cache comes back aliased.
    assert step.argument_bytes >= plan.per_device_param_bytes + plan.per_device_cache_bytes
    assert step.alias_bytes >= _kv_cache_bytes(config, 4, 64) // plan.num_devices
    assert step.total_bytes == (step.argument_bytes + step.output_bytes - step.alias_bytes + step.temp_bytes
                                + step.code_bytes)
  assert plan.per_device_bytes == max(s.total_bytes for s in plan.steps.values())
  assert plan.fits and plan.per_device_bytes <= 0.8 * plan.device_hbm_bytes
  plan_lib.check_fits(plan)  # does not raise


def test_bf16_plan_over_its_budget_is_refused_with_one_clear_line():
  config = config_lib.get_preset("tiny")
  plan = plan_lib.make_plan(config, quantization="none", batch_size=2, max_len=32, hbm_fraction=1e-9)
  assert plan.quantization == "none" and plan.param_bytes == 2 * config.num_params
  assert not plan.fits
  with pytest.raises(plan_lib.PlanDoesNotFit) as err:
    plan_lib.check_fits(plan)
  message = str(err.value)
  assert "\n" not in message and "tiny" in message and "live:cpu" in message


def test_plan_json_is_written_atomically(tiny_plan, tmp_path):
  path = plan_lib.write_plan_json(tiny_plan, tmp_path / "run" / "plan.json")
  data = json.loads(path.read_text())
  for key in ("topology", "per_device_bytes", "device_hbm_bytes", "fits", "mesh", "layout", "steps"):
    assert key in data
  assert data["per_device_bytes"] == tiny_plan.per_device_bytes and data["fits"] is True
  assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary file left behind
  assert "per device" in plan_lib.format_table(tiny_plan)


@pytest.mark.parametrize("bad", [dict(quantization="int4"), dict(batch_size=0), dict(prompt_len=64),
                                 dict(hbm_fraction=1.5)])
def test_bad_plan_arguments_raise_plan_error(bad):
  with pytest.raises(plan_lib.PlanError):
    plan_lib.make_plan("tiny", **{"batch_size": 2, "max_len": 64, **bad})


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
  return plan_lib.make_plan("llama3.1-405b", topology="v5p:4x4x4", batch_size=64, max_len=2048)


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


@pytest.mark.tpu_compile
@needs_libtpu
@pytest.mark.parametrize("topology,batch", [("v5e:1x1", 4), ("v2-8", 32)])
def test_8b_int8_fits_on_colab_sized_slices(topology, batch):
  plan = plan_lib.make_plan("llama3.1-8b", topology=topology, batch_size=batch, max_len=2048)
  assert plan.fits, plan_lib.format_table(plan)
  assert plan.per_device_bytes <= 0.8 * plan.device_hbm_bytes
  assert plan.device_hbm_bytes == {"v5e:1x1": 16 * GiB, "v2-8": 8 * GiB}[topology]  # v2: 8 GiB per core
  assert plan.per_device_param_bytes * plan.num_devices >= _int8_param_bytes(config_lib.get_preset("llama3.1-8b"))


@pytest.mark.tpu_compile
@needs_libtpu
def test_405b_on_four_v5p_chips_is_refused_before_loading():
  plan = plan_lib.make_plan("llama3.1-405b", topology="v5p:2x2x1", batch_size=64, max_len=2048)
  assert not plan.fits
  # The int8 weights alone (~382 GiB) exceed four chips' 80% budget.
  assert plan.per_device_bytes >= _int8_param_bytes(config_lib.get_preset("llama3.1-405b")) / 4
  with pytest.raises(plan_lib.PlanDoesNotFit) as err:
    plan_lib.check_fits(plan)
  assert "\n" not in str(err.value) and "v5p:2x2x1" in str(err.value)
