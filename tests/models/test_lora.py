"""LoRA: adapters against torch + PEFT (exported, imported, merged), training-side behaviour, dropout."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from kdjax.models import lora
from kdjax.models.llama import weights

# GQA and an explicit head_dim != hidden / heads, so a wrong flattening of (heads, head_dim) cannot pass.
TINY_HF = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=12, max_position_embeddings=128, rms_norm_eps=1e-5,
               tie_word_embeddings=False, rope_theta=10_000.0)
ALL = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
IDS = np.random.RandomState(0).randint(0, TINY_HF["vocab_size"], (2, 10))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """A random torch Llama saved with `save_pretrained` (float32)."""
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF))
  directory = tmp_path_factory.mktemp("base")
  model.save_pretrained(directory)
  return directory


def _torch_base(base_dir):
  return transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32,
                                                       attn_implementation="eager").eval()


def _torch_logits(model, ids=IDS):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


@nnx.jit
def _forward(model, ids, dropout_key):
  return model.forward(ids, dropout_key=dropout_key).logits


def _logits(model, ids=IDS, dropout_key=None) -> np.ndarray:
  """Jitted logits: one compile per model structure instead of one per eager call."""
  return np.asarray(_forward(model, jnp.asarray(ids), dropout_key))


def _kdjax_model(base_dir):
  source = weights.open_source(base_dir)
  return weights.load_into_model(source, weights.config_from_source(source))


def _randomise_b(model, seed=1, std=0.2):
  """Non-zero B (a fresh adapter is a no-op, which would make every comparison vacuous)."""
  rng = np.random.RandomState(seed)  # numpy: eager jax.random would compile once per shape
  for name in lora.lora_targets(model):
    var = getattr(model.layers, f"{name}_lora_b")
    old = var[...]
    var.set_value(jax.device_put(jnp.asarray(std * rng.randn(*var.shape), old.dtype), old.sharding))


def _adapted(base_dir, targets, **cfg):
  model = _kdjax_model(base_dir)
  lora.add_lora(model, lora.LoraConfig(targets=targets, **cfg), seed=3)
  _randomise_b(model)
  return model


# ------------------------------------------------------------------------------------------ config

def test_config_defaults_are_the_papers():
  cfg = lora.LoraConfig()
  assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.targets) == (4, 8.0, 0.1, ("wq", "wk", "wv", "wo"))
  assert cfg.scale == 2.0


def test_config_accepts_hf_names_and_rejects_bad_values():
  assert lora.LoraConfig(targets=("q_proj", "down_proj")).targets == ("wq", "w_down")
  for bad in (dict(rank=0), dict(rank=2.5), dict(alpha=0), dict(dropout=1.0), dict(dropout=-0.1),
              dict(targets=()), dict(targets=("wq", "q_proj")), dict(targets=("lm_head",))):
    with pytest.raises(lora.LoraError):
      lora.LoraConfig(**bad)


# ------------------------------------------------------------------------------------------ structure

def test_add_lora_shapes_axes_and_init(base_dir):
  model = _kdjax_model(base_dir)
  lora.add_lora(model, lora.LoraConfig(rank=3, alpha=6, targets=ALL), seed=0)
  layers, d, h, g, k, f = 2, 32, 4, 2, 12, 48
  expect = {"wq": ((d,), (h, k)), "wk": ((d,), (g, k)), "wv": ((d,), (g, k)), "wo": ((h, k), (d,)),
            "w_gate": ((d,), (f,)), "w_up": ((d,), (f,)), "w_down": ((f,), (d,))}
  for name, (ins, outs) in expect.items():
    a, b = getattr(model.layers, f"{name}_lora_a"), getattr(model.layers, f"{name}_lora_b")
    assert a.shape == (layers,) + ins + (3,) and b.shape == (layers, 3) + outs
    assert isinstance(a, nnx.LoRAParam) and isinstance(b, nnx.LoRAParam)
    base_axes = getattr(model.layers, name).get_metadata()["logical_axes"]
    assert a.get_metadata()["logical_axes"] == base_axes[:1 + len(ins)] + ("lora_rank",)
    assert b.get_metadata()["logical_axes"] == ("layers", "lora_rank") + base_axes[1 + len(ins):]
    bound = 1 / np.sqrt(np.prod(ins))
    a_np = np.asarray(a[...])
    assert np.all(np.abs(a_np) <= bound) and a_np.std() > 0.4 * bound  # uniform(+-bound): std = bound/sqrt3
    assert not np.any(np.asarray(b[...]))
  assert model.lora_scale == 2.0 and model.lora_dropout == 0.1
  with pytest.raises(lora.LoraError):
    lora.add_lora(model, lora.LoraConfig(), seed=0)


def test_fresh_lora_leaves_logits_unchanged(base_dir):
  model = _kdjax_model(base_dir)
  before = _logits(model)
  lora.add_lora(model, lora.LoraConfig(targets=ALL), seed=0)
  np.testing.assert_array_equal(_logits(model), before)
  _randomise_b(model)  # guard: the adapters really are in the forward pass
  assert np.abs(_logits(model) - before).max() > 1e-2


def test_filters_select_lora_and_frozen(base_dir):
  model = _adapted(base_dir, ("wq", "w_up"))
  paths = lambda state: {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}
  lora_paths = paths(nnx.state(model, lora.LORA))
  assert lora_paths == {"layers.wq_lora_a", "layers.wq_lora_b", "layers.w_up_lora_a", "layers.w_up_lora_b"}
  assert paths(lora.lora_state(model)) == lora_paths
  frozen_paths = paths(nnx.state(model, lora.FROZEN))
  assert not frozen_paths & lora_paths and "layers.wq" in frozen_paths and "embed" in frozen_paths
  assert frozen_paths | lora_paths == paths(nnx.state(model, nnx.Param))
  graphdef, lora_part, rest = lora.split_lora(model)
  assert paths(lora_part) == lora_paths and paths(rest) == frozen_paths
  rebuilt = nnx.merge(graphdef, lora_part, rest)
  np.testing.assert_array_equal(_logits(rebuilt), _logits(model))


# ------------------------------------------------------------------------------------------ gradients

def test_lora_gradients_match_peft_and_skip_the_base(base_dir, tmp_path):
  """Gradients w.r.t. the LoRA factors only, equal to torch's through PEFT; the base gets none."""
  model = _adapted(base_dir, ("wq", "wv", "w_down"), dropout=0.0)
  lora.export_peft(model, tmp_path)
  weights_rng = np.random.RandomState(5).randn(*IDS.shape, TINY_HF["vocab_size"]).astype(np.float32)

  def loss_fn(m):
    return jnp.sum(m(jnp.asarray(IDS)) * weights_rng)

  grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, lora.LORA)))(model)
  grad_paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
  assert grad_paths == {f"layers.{n}_lora_{x}" for n in ("wq", "wv", "w_down") for x in "ab"}

  torch_model = peft.PeftModel.from_pretrained(_torch_base(base_dir), tmp_path, is_trainable=True)
  torch_model.eval()  # dropout 0 anyway; eval keeps it deterministic
  logits = torch_model(torch.tensor(IDS)).logits
  (logits * torch.tensor(weights_rng)).sum().backward()
  torch_grads = {n: p.grad for n, p in torch_model.named_parameters() if p.grad is not None}
  assert all("lora_" in n for n in torch_grads)  # PEFT freezes the base too
  hf = {"wq": "self_attn.q_proj", "wv": "self_attn.v_proj", "w_down": "mlp.down_proj"}
  for name, module in hf.items():
    g_a = np.asarray(getattr(grads.layers, f"{name}_lora_a")[...])
    g_b = np.asarray(getattr(grads.layers, f"{name}_lora_b")[...])
    for layer in range(TINY_HF["num_hidden_layers"]):
      prefix = f"base_model.model.model.layers.{layer}.{module}"
      ta = torch_grads[f"{prefix}.lora_A.default.weight"].numpy()   # [r, in]
      tb = torch_grads[f"{prefix}.lora_B.default.weight"].numpy()   # [out, r]
      np.testing.assert_allclose(g_a[layer].reshape(-1, 4).T, ta, atol=2e-4, rtol=1e-4)
      np.testing.assert_allclose(g_b[layer].reshape(4, -1).T, tb, atol=2e-4, rtol=1e-4)


def test_optimizer_step_moves_only_lora(base_dir):
  model = _adapted(base_dir, ("wq", "wo"), dropout=0.0)
  frozen_before = jax.tree.map(np.asarray, nnx.state(model, lora.FROZEN))
  lora_before = jax.tree.map(np.asarray, lora.lora_state(model))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=lora.LORA)
  # The momentum buffers exist for the LoRA factors only (the frozen base needs no optimizer memory).
  trace_paths = {".".join(map(str, p[-2:])) for p, _ in nnx.to_flat_state(nnx.state(optimizer, nnx.OptState))
                 if "trace" in p}
  assert trace_paths == {f"layers.{n}_lora_{x}" for n in ("wq", "wo") for x in "ab"}

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(jnp.asarray(IDS)) ** 2), argnums=nnx.DiffState(0, lora.LORA))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, lora.FROZEN)),
               frozen_before)
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), lora.lora_state(model), lora_before)
  assert min(jax.tree.leaves(moved)) > 0


# ------------------------------------------------------------------------------------------ dropout

def test_dropout_only_with_a_key_and_only_on_the_lora_path(base_dir):
  model = _adapted(base_dir, ("wk", "w_down"), dropout=0.5)
  no_key = _logits(model)
  with_key = _logits(model, dropout_key=jax.random.key(0))
  other_key = _logits(model, dropout_key=jax.random.key(1))
  assert np.abs(with_key - no_key).max() > 1e-3 and np.abs(with_key - other_key).max() > 1e-3
  model.lora_dropout = 0.0
  np.testing.assert_array_equal(no_key, _logits(model))
  # With B = 0 the LoRA path is zero, so dropout (which only touches the LoRA input) changes nothing.
  model.lora_dropout = 0.5
  for name in lora.lora_targets(model):
    var = getattr(model.layers, f"{name}_lora_b")
    var.set_value(jnp.zeros_like(var[...]))
  np.testing.assert_allclose(_logits(model, dropout_key=jax.random.key(0)), _logits(model), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ PEFT / HF

@pytest.mark.parametrize("targets", [("wq", "wk", "wv", "wo"), ALL], ids=["attention", "all"])
def test_peft_adapter_loads_onto_transformers_with_kdjax_logits(base_dir, tmp_path, targets):
  """Issue acceptance 4: the exported adapter, loaded with `peft`, gives kdjax's logits within 1e-4."""
  model = _adapted(base_dir, targets, rank=4, alpha=8)
  adapter_dir = lora.export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
  config = json.loads((adapter_dir / "adapter_config.json").read_text())
  hf_names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w_gate": "gate_proj",
              "w_up": "up_proj", "w_down": "down_proj"}
  assert config["target_modules"] == [hf_names[t] for t in targets]
  assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 4, 8, "CAUSAL_LM")
  keys = set(load_file(str(adapter_dir / "adapter_model.safetensors")))
  assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in keys
  assert len(keys) == 2 * len(targets) * TINY_HF["num_hidden_layers"]
  assert not list(adapter_dir.glob("*.tmp"))

  ours = _logits(model)
  base_logits = _torch_logits(_torch_base(base_dir))
  assert np.abs(ours - base_logits).max() > 1e-2  # the adapter matters, so a dropped adapter fails below
  peft_model = peft.PeftModel.from_pretrained(_torch_base(base_dir), adapter_dir).eval()
  np.testing.assert_allclose(ours, _torch_logits(peft_model), atol=1e-4, rtol=0)


def test_merged_export_loads_in_transformers(base_dir, tmp_path):
  model = _adapted(base_dir, ALL)
  ours = _logits(model)
  lora.export_merged_hf(model, tmp_path / "merged")
  assert lora.lora_targets(model) == ALL  # the adapted model itself is untouched
  np.testing.assert_array_equal(_logits(model), ours)
  merged_torch = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32,
                                                               attn_implementation="eager").eval()
  np.testing.assert_allclose(_torch_logits(merged_torch), ours, atol=1e-4, rtol=0)
  merged = lora.merge_lora(model)
  assert lora.lora_targets(merged) == () and merged.lora_scale == 0.0
  np.testing.assert_allclose(_logits(merged), ours, atol=1e-4, rtol=0)


def test_merge_refuses_int8_base(base_dir):
  model = _adapted(base_dir, ("wq",))
  model.layers.wq_scale = nnx.Variable(jnp.ones((2, 4, 12)))  # what int8 weight-only quantisation adds
  with pytest.raises(lora.LoraError, match="int8"):
    lora.merge_lora(model)
  with pytest.raises(lora.LoraError):
    lora.merge_lora(_kdjax_model(base_dir))  # nothing to merge


def test_import_peft_saved_by_peft(base_dir, tmp_path):
  """An adapter trained/saved by PEFT itself, imported into kdjax, gives PEFT's logits."""
  torch.manual_seed(7)
  peft_cfg = peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0, target_modules=["k_proj", "o_proj", "up_proj"],
                             task_type="CAUSAL_LM")
  peft_model = peft.get_peft_model(_torch_base(base_dir), peft_cfg)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.2)
  peft_model.save_pretrained(tmp_path / "from_peft")
  peft_model.eval()

  model = _kdjax_model(base_dir)
  lora.import_peft(model, tmp_path / "from_peft")
  assert lora.lora_targets(model) == ("wk", "wo", "w_up") and lora.lora_rank(model) == 3
  assert model.lora_scale == pytest.approx(5 / 3)
  np.testing.assert_allclose(_logits(model), _torch_logits(peft_model), atol=1e-4, rtol=0)


def test_export_import_round_trip(base_dir, tmp_path):
  model = _adapted(base_dir, ("wv", "w_gate"), rank=2, alpha=3, dropout=0.05)
  lora.export_peft(model, tmp_path)
  other = _kdjax_model(base_dir)
  lora.add_lora(other, lora.LoraConfig(), seed=9)  # replaced by the import
  lora.import_peft(other, tmp_path)
  assert lora.lora_targets(other) == ("wv", "w_gate")
  assert (other.lora_scale, other.lora_dropout) == (1.5, 0.05)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, lora.lora_state(other)),
               jax.tree.map(np.asarray, lora.lora_state(model)))


def test_import_rejects_bad_adapters(base_dir, tmp_path):
  model = _adapted(base_dir, ("wq",))
  lora.export_peft(model, tmp_path)
  target = _kdjax_model(base_dir)
  with pytest.raises(lora.LoraError, match="needs"):
    lora.import_peft(target, tmp_path / "missing")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 5}))
  with pytest.raises(lora.LoraError, match="expects"):
    lora.import_peft(target, tmp_path)
  assert lora.lora_targets(target) == ()  # a failed import leaves the model as it was
  (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["lm_head"]}))
  with pytest.raises(lora.LoraError, match="does not adapt"):
    lora.import_peft(target, tmp_path)


# ------------------------------------------------------------------------------------------ update norms

HF_PROJECTIONS = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                  "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                  "w_down": "mlp.down_proj"}


def _reference_ratio(model, name, layer, base_weight):
  """float64, from the raw factors: the full [in, out] product, formed explicitly (no Gram matrices)."""
  a = np.asarray(getattr(model.layers, f"{name}_lora_a")[...], np.float64)[layer]
  b = np.asarray(getattr(model.layers, f"{name}_lora_b")[...], np.float64)[layer]
  rank = a.shape[-1]
  delta = model.lora_scale * a.reshape(-1, rank) @ b.reshape(rank, -1)
  return np.linalg.norm(delta) / np.linalg.norm(np.asarray(base_weight, np.float64))


def test_relative_update_norms_match_float64_reference(base_dir):
  from kdjax.models import quantization
  model = _adapted(base_dir, ALL, rank=3, alpha=6)
  got = lora.relative_update_norms(model)
  assert set(got) == {f"{layer}.{name}" for layer in range(2) for name in ALL}
  hf = _torch_base(base_dir).state_dict()  # the base weights as transformers holds them: [out, in]
  for name in ALL:
    for layer in range(2):
      want = _reference_ratio(model, name, layer, hf[f"model.layers.{layer}.{HF_PROJECTIONS[name]}.weight"])
      assert got[f"{layer}.{name}"] == pytest.approx(want, rel=1e-5), (name, layer)
  assert min(got.values()) > 0
  # An int8 base counts dequantised: q * per-output-channel scale, from the raw arrays.
  quantization.quantize_model(model)
  got_int8 = lora.relative_update_norms(model)
  for name in ALL:
    q = np.asarray(getattr(model.layers, name)[...], np.float64)
    scale = np.asarray(getattr(model.layers, f"{name}_scale")[...], np.float64)
    n_in = quantization.num_in_dims(name)
    dequantised = q * scale.reshape(scale.shape[:1] + (1,) * n_in + scale.shape[1:])
    for layer in range(2):
      want = _reference_ratio(model, name, layer, dequantised[layer])
      assert got_int8[f"{layer}.{name}"] == pytest.approx(want, rel=1e-5), (name, layer)
  # A fresh adapter (B = 0) has moved nothing.
  fresh = lora.add_lora(_kdjax_model(base_dir), lora.LoraConfig(targets=("wq",)), seed=0)
  assert lora.relative_update_norms(fresh) == {"0.wq": 0.0, "1.wq": 0.0}


# ------------------------------------------------------------------------------------------ a fine-tuned teacher

def _peft_adapter(base_dir, directory, targets=("q_proj", "v_proj", "gate_proj", "down_proj"), r=3, alpha=7):
  """A PEFT LoRA adapter with non-zero B, saved by PEFT itself; returns PEFT's merged torch model."""
  torch.manual_seed(11)
  peft_model = peft.get_peft_model(_torch_base(base_dir), peft.LoraConfig(
      r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM"))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.2)
  peft_model.save_pretrained(directory)
  return peft_model.merge_and_unload().eval()


def test_convert_merges_an_adapter_as_peft_merge_and_unload_does(base_dir, tmp_path):
  """`convert --adapter` into float32 (the fine-tuned teacher of `teacher.adapter`) equals PEFT's own merge of that
  adapter; into int8 it keeps the adapter unmerged (tests/experiment/test_teacher_adapter.py: the logits)."""
  from kdjax.models import checkpoint
  from kdjax import convert
  from kdjax.experiment import provenance
  merged_torch = _peft_adapter(base_dir, tmp_path / "adapter")
  convert.convert(str(base_dir), str(tmp_path / "ckpt"), adapter=str(tmp_path / "adapter"))
  model, _ = checkpoint.load_model(tmp_path / "ckpt")
  assert lora.lora_targets(model) == ()  # merged into the weights, no factors left
  np.testing.assert_allclose(_logits(model), _torch_logits(merged_torch), atol=1e-4, rtol=0)
  base_logits = _torch_logits(_torch_base(base_dir))
  assert np.abs(_logits(model) - base_logits).max() > 1e-2  # the adapter did change the model
  # The merged weights themselves, against numpy float64 W + (alpha / r) B A from the adapter's file.
  tensors = load_file(tmp_path / "adapter" / lora.ADAPTER_WEIGHTS)
  base = load_file(next(base_dir.glob("*.safetensors")))
  prefix = "base_model.model.model.layers.1.self_attn.v_proj"
  expected = (base["model.layers.1.self_attn.v_proj.weight"].astype(np.float64) + 7 / 3 *
              tensors[f"{prefix}.lora_B.weight"].astype(np.float64) @ tensors[f"{prefix}.lora_A.weight"])
  ours = np.asarray(model.layers.wv[...])[1].reshape(TINY_HF["hidden_size"], -1).T  # [kv heads * head_dim, d]
  np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)
  # The adapter's bytes are in the conversion's record: another adapter is another teacher.
  record = provenance.read(tmp_path / "ckpt")
  assert record["settings"]["adapter"] == provenance.folder_content(tmp_path / "adapter")
  assert "adapter" not in convert.conversion_record(str(base_dir), dtype="float32", quantize=False)["settings"]
  # An int8 teacher: int8 weights cannot hold a small update, so the base is quantized as without an adapter (each
  # dequantized weight within half a quantization step of the float64 W) and the adapter is kept unmerged: the
  # loaded model's factors give the float64 update (alpha / r) B A of the file.
  convert.convert(str(base_dir), str(tmp_path / "int8"), quantize=True, adapter=str(tmp_path / "adapter"))
  assert provenance.read(tmp_path / "int8")["settings"]["adapter_unmerged"] is True
  quantized, _ = checkpoint.load_model(tmp_path / "int8")
  q, scale = np.asarray(quantized.layers.wv[...])[1], np.asarray(quantized.layers.wv_scale[...])[1]
  assert q.dtype == np.int8
  dequantized = (q.astype(np.float64) * scale[None]).reshape(TINY_HF["hidden_size"], -1).T
  base_weight = base["model.layers.1.self_attn.v_proj.weight"].astype(np.float64)
  step = np.broadcast_to(scale.reshape(-1)[:, None], expected.shape)
  assert np.all(np.abs(dequantized - base_weight) <= 0.5 * step + 1e-6)
  update = np.asarray(lora.lora_delta(quantized, "wv"))[1].reshape(TINY_HF["hidden_size"], -1).T
  np.testing.assert_allclose(update, expected - base_weight, atol=1e-6, rtol=0)


def test_convert_refuses_a_bad_adapter_in_one_line_before_reading_weights(base_dir, tmp_path, monkeypatch):
  from kdjax.models import checkpoint, quantization
  from kdjax import convert
  _peft_adapter(base_dir, tmp_path / "adapter", r=2, alpha=4)
  read = []
  monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: read.append(a) or pytest.fail("weights read"))

  def refused(adapter, match, source=base_dir):
    with pytest.raises(lora.LoraError, match=match) as info:
      convert.convert(str(source), str(tmp_path / "out"), adapter=str(adapter))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing claimed: a corrected adapter can use the folder

  refused(tmp_path / "missing", "needs adapter_config.json")
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  (tmp_path / "adapter" / "adapter_config.json").write_text("{not json")
  refused(tmp_path / "adapter", "not JSON")
  (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))  # rank mismatch
  refused(tmp_path / "adapter", "expects")
  (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["k_proj"]}))
  refused(tmp_path / "adapter", "k_proj.lora_A.weight is missing")  # target mismatch
  (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
  # An adapter made for another model (other widths).
  torch.manual_seed(0)
  other = tmp_path / "other_base"
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_HF, "hidden_size": 48})).save_pretrained(other)
  refused(tmp_path / "adapter", "expects", source=other)
  # An int8 kdjax checkpoint: the merge needs float weights.
  monkeypatch.undo()
  model = _kdjax_model(base_dir)
  quantization.quantize_model(model)
  checkpoint.save_model(model, tmp_path / "int8")
  monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("weights read"))
  refused(tmp_path / "adapter", "int8 checkpoint", source=tmp_path / "int8")
  assert read == []
