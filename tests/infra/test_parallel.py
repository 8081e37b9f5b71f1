"""Mesh placement: logical-axis rules, fallbacks, and an 8-device sharded load equal to one device."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers
from kdjax.infra import parallel

REPO = pathlib.Path(__file__).resolve().parents[2]


class FakeMesh:
  """Only `.shape` is read by the rules; real 64-device meshes are not needed to test them."""

  def __init__(self, **shape):
    self.shape = shape


def test_rules_shard_divisible_dimensions():
  mesh = FakeMesh(data=1, fsdp=4, tensor=16)
  wq = parallel.logical_to_spec(("layers", "embed", "q_heads", "head_dim"), (126, 16384, 128, 128), mesh)
  assert wq == P(None, "fsdp", "tensor", None)


def test_kv_heads_smaller_than_tensor_axis_fall_back_to_head_dim():
  # 405B: 8 KV heads cannot be split 16 ways, so head_dim (128) takes the tensor axis instead.
  mesh = FakeMesh(data=1, fsdp=4, tensor=16)
  wk = parallel.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (126, 16384, 8, 128), mesh)
  assert wk == P(None, "fsdp", None, "tensor")


def test_batch_uses_data_and_fsdp_jointly_or_falls_back():
  mesh = FakeMesh(data=2, fsdp=4, tensor=1)
  assert parallel.logical_to_spec(("batch", "seq"), (16, 128), mesh) == P(("data", "fsdp"), None)
  assert parallel.logical_to_spec(("batch", "seq"), (2, 128), mesh) == P("data", None)
  assert parallel.logical_to_spec(("batch", "seq"), (3, 128), mesh) == P(None, None)


def test_make_mesh_fills_minus_one():
  mesh = parallel.make_mesh({"fsdp": -1})
  assert mesh.shape["fsdp"] == len(jax.devices())
  with pytest.raises(ValueError, match="needs"):
    parallel.make_mesh({"fsdp": 3, "tensor": 5})


def test_host_slice_partitions_examples():
  shares = [parallel.host_slice(10, p, 3) for p in range(3)]
  assert sorted(np.concatenate(shares).tolist()) == list(range(10))


def test_interleave_shares_undoes_the_strided_split():
  items = [f"q{i}" for i in range(11)]
  for count in (1, 2, 3, 5, 11, 13):
    shares = [[items[i] for i in parallel.host_slice(len(items), p, count)] for p in range(count)]
    assert parallel.interleave_shares(shares) == items, count
  # Hand-made: 5 items over 2 processes are [0, 2, 4] and [1, 3].
  assert parallel.interleave_shares([["a", "c", "e"], ["b", "d"]]) == ["a", "b", "c", "d", "e"]
  with pytest.raises(ValueError, match="process 0 holds 2 items; its strided share of 5 is 3"):
    parallel.interleave_shares([["a", "c"], ["b", "d", "x"]])


def test_gather_rows_and_sync_on_one_process():
  rows = np.arange(6.0).reshape(3, 2)
  gathered = parallel.gather_rows(rows)
  assert len(gathered) == 1 and np.array_equal(gathered[0], rows)
  parallel.sync("kdjax.test:one-process")  # nothing to wait for
  assert parallel.is_writer()


SCRIPT = textwrap.dedent("""
    import os, sys, numpy as np, torch, transformers, jax, jax.numpy as jnp
    from models.test_weights import TINY_HF, _torch_model
    import kdjax
    from kdjax.infra import parallel
    from kdjax.models import checkpoint
    assert len(jax.devices()) == 8, jax.devices()
    root = {root!r}
    _torch_model().save_pretrained(root + "/hf", max_shard_size="60KB")
    ids = jnp.asarray(np.random.RandomState(0).randint(0, TINY_HF["vocab_size"], (4, 64)))
    single, _ = kdjax.load_model(root + "/hf")
    ref = np.asarray(single(ids))
    mesh = parallel.make_mesh({{"fsdp": 2, "tensor": 4}})
    sharded, _ = kdjax.load_model(root + "/hf", mesh=mesh)
    wq = sharded.layers.wq[...]
    assert len(wq.sharding.device_set) == 8 and wq.addressable_shards[0].data.size * 8 == wq.size, wq.sharding
    assert str(sharded.layers.wk[...].sharding.spec) == str(jax.sharding.PartitionSpec(None, "fsdp", None, "tensor"))
    out = np.asarray(jax.jit(lambda i: sharded(i))(ids))
    print("sharded max abs", np.abs(out - ref).max())
    np.testing.assert_allclose(out, ref, atol=1e-5)
    checkpoint.save_model(sharded, root + "/ckpt")
    restored, _ = kdjax.load_model(root + "/ckpt", mesh=mesh)
    assert restored.layers.wq[...].sharding.spec == wq.sharding.spec
    np.testing.assert_allclose(np.asarray(restored(ids)), ref, atol=1e-5)
    print("OK")
""")


def test_sharded_load_on_2x4_mesh_equals_single_device(tmp_path):
  script = SCRIPT.format(root=str(tmp_path))
  env = helpers.worker_env({**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                            "JAX_PLATFORMS": "cpu"})
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_shard_model_places_parameters_by_logical_axes():
  from kdjax.models.llama import config as config_lib, model as model_lib
  model = model_lib.init_model(config_lib.PRESETS["tiny"])
  mesh = parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  parallel.shard_model(model, mesh)
  assert model.layers.wq[...].sharding.mesh.shape == mesh.shape
