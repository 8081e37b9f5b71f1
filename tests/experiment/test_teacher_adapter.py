"""A fine-tuned teacher keeps its fine-tuning (issue 24, part 3): `teacher.adapter` on a bfloat16 or int8 teacher.

The adapter is small, as a short fine-tune's is (`||scale B A|| / ||W|| = 3e-4` on every adapted weight); the
reference is PEFT's unmerged adapter on the float64 torch model. A merge into bfloat16 weights keeps little of
such an update, which is why the teacher keeps it unmerged there, and why a lossy merge is refused.
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers

from kdjax.models import checkpoint, quantization
from kdjax import convert
from kdjax.serving import generation
from kdjax.experiment import pipeline, provenance
from kdjax.models import lora
from test_provenance import tiny_config

# SmolLM2's vocabulary (the pipeline needs a real tokenizer), GQA and a head_dim != hidden / heads.
TINY_HF = dict(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=12, max_position_embeddings=256, rms_norm_eps=1e-5,
               tie_word_embeddings=False, rope_theta=10_000.0)
RELATIVE_UPDATE = 3e-4
IDS = np.random.RandomState(0).randint(0, TINY_HF["vocab_size"], (2, 12))
# (teacher.dtype, teacher.quantization): the float32 teacher merges the adapter, the others keep it unmerged.
TEACHERS = [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8")]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, smollm2_gguf):
  """A random float32 torch Llama with SmolLM2's tokenizer, as an HF directory."""
  torch.manual_seed(0)
  directory = tmp_path_factory.mktemp("base")
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF)).save_pretrained(directory)
  checkpoint.load_tokenizer(smollm2_gguf).save_pretrained(str(directory))
  return directory


def _torch_base(base_dir):
  return transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float64,
                                                       attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
  """A PEFT adapter saved by PEFT, each layer's B scaled so that scale * B A is 3e-4 of its weight (Frobenius)."""
  torch.manual_seed(11)
  model = peft.get_peft_model(_torch_base(base_dir), peft.LoraConfig(
      r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
      task_type="CAUSAL_LM"))
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, peft.tuners.lora.LoraLayer):
        module.lora_B["default"].weight.normal_()
        update = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        module.lora_B["default"].weight *= RELATIVE_UPDATE * module.base_layer.weight.norm() / update.norm()
  directory = tmp_path_factory.mktemp("adapter")
  model.save_pretrained(directory)
  return directory


@pytest.fixture(scope="module")
def reference(base_dir, adapter_dir):
  """float64 torch logits of IDS without and with the adapter (PEFT, unmerged)."""
  base = _torch_base(base_dir)
  with torch.no_grad():
    without = base(torch.tensor(IDS)).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with_adapter = adapted(torch.tensor(IDS)).logits.numpy()
  return without, with_adapter


def _torch_logprobs(base_dir, adapter_dir, sequence: list[int], first: int) -> tuple[np.ndarray, np.ndarray]:
  """float64 log-softmax of the positions from `first` on of `sequence`, without and with the adapter."""
  base = _torch_base(base_dir)
  ids = torch.tensor([sequence])
  with torch.no_grad():
    without = torch.log_softmax(base(ids).logits[0, first:], -1).numpy()
    adapted = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with_adapter = torch.log_softmax(adapted(ids).logits[0, first:], -1).numpy()
  return without, with_adapter


@pytest.fixture(scope="module")
def teachers(base_dir, adapter_dir, gsm8k_dir, tmp_path_factory):
  """Each TEACHERS kind converted by the convert stage with `teacher.adapter`, and loaded as the generate stage
  loads it (`pipeline.load_role`): {(dtype, quantization): (config, work folder)}."""
  out = {}
  sources = {"model": str(base_dir), "gsm8k": gsm8k_dir}
  for dtype, quantization in TEACHERS:
    work = tmp_path_factory.mktemp(f"{dtype}-{quantization}") / "work"
    c = tiny_config(work, sources, stages="convert", **{"teacher.adapter": str(adapter_dir), "teacher.dtype": dtype,
                                                        "teacher.quantization": quantization})
    pipeline.run(c)
    out[dtype, quantization] = c, work
  return out


def _load_teacher(teachers, kind):
  c, work = teachers[kind]
  return pipeline.load_role(c, pipeline.Workdir(work), "teacher", None)


def _logits(model) -> np.ndarray:
  return np.asarray(model(IDS), np.float64)


@pytest.mark.parametrize("kind", TEACHERS)
def test_a_converted_teacher_s_logits_change_as_the_float64_reference_s(teachers, reference, adapter_dir, kind):
  """Acceptance 3: through the convert stage and `load_role`, the adapter changes the teacher's logits as it changes
  the float64 reference's (cosine >= 0.99, same size within 5%): merged into float32 weights, kept unmerged on
  bfloat16 or int8 weights (the teacher then computes in float32)."""
  ref_without, ref_with = reference
  ref_change = ref_with - ref_without
  model, _ = _load_teacher(teachers, kind)
  teacher = provenance.read(teachers[kind][1] / "models/teacher")
  assert teacher["settings"]["adapter"] == provenance.folder_content(adapter_dir)
  if kind == ("float32", "none"):
    assert lora.lora_targets(model) == () and teacher["settings"].get("adapter_unmerged") is None
    change = _logits(model) - ref_without  # merged: the base is the float32 source itself
  else:
    assert lora.lora_targets(model) == ("wq", "wk", "wv", "wo", "w_down")
    assert teacher["settings"]["adapter_unmerged"] is True and model.dtype == np.float32
    for name in (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS):  # the checkpoint holds the adapter's own bytes
      assert (teachers[kind][1] / "models/teacher/adapter" / name).read_bytes() == (adapter_dir / name).read_bytes()
    assert quantization.is_quantized(model) == (kind[1] == "int8")
    with_adapter = _logits(model)
    change = with_adapter - _logits(lora.remove_lora(model))  # the same weights, the same compute, no adapter
  assert np.abs(ref_change).max() > 1e-4 * np.abs(ref_with).max()  # the adapter does change the logits
  cosine = _cosine(change, ref_change)
  print(f"measured: {kind} teacher: logit change cosine {cosine:.5f}, norm ratio "
        f"{np.linalg.norm(change) / np.linalg.norm(ref_change):.4f}")
  assert cosine >= 0.99
  assert np.linalg.norm(change) == pytest.approx(np.linalg.norm(ref_change), rel=0.05)
  if kind == ("bfloat16", "none"):
    # Why the teacher computes in float32: in bfloat16 activations (2^-8 apart) the same update is mostly noise.
    bf16, _ = checkpoint.load_model(teachers[kind][1] / "models/teacher", dtype="bfloat16")
    noisy = _logits(bf16) - _logits(lora.remove_lora(bf16))
    print(f"measured: the same teacher computing in bfloat16: cosine {_cosine(noisy, ref_change):.3f}")
    assert _cosine(noisy, ref_change) < 0.9


@pytest.mark.parametrize("kind", TEACHERS)
def test_the_engine_s_top_k_logprobs_change_as_the_float64_reference_s(teachers, base_dir, adapter_dir, kind):
  """The store's numbers: the engine's log-probs over the whole vocabulary (top-k = V) at every generated token,
  with the adapter minus without, against the float64 reference teacher-forced on the same tokens."""
  model, _ = _load_teacher(teachers, kind)
  prompt, vocab = [int(t) for t in IDS[0]], TINY_HF["vocab_size"]

  def run(model):
    [out] = generation.generate(model, [prompt], generation.SamplingConfig(temperature=0.0, max_new_tokens=4),
                                stop_ids=[], pad_id=0, topk_logprobs=vocab)
    logprobs = np.empty((len(out.tokens), vocab))
    np.put_along_axis(logprobs, out.topk_ids, out.topk_logprobs, axis=1)  # back to vocabulary order
    return out.tokens, logprobs

  tokens, with_adapter = run(model)
  ref_without, ref_with = _torch_logprobs(base_dir, adapter_dir, prompt + tokens[:-1], len(prompt) - 1)
  if kind == ("float32", "none"):  # merged: the base is the float32 source, scored by the reference
    change = with_adapter - ref_without
  else:
    tokens_without, without = run(lora.remove_lora(model))
    assert tokens_without == tokens  # a small update: the same greedy tokens, so the same contexts
    change = with_adapter - without
  cosine = _cosine(change, ref_with - ref_without)
  print(f"measured: {kind} teacher on the engine: log-prob change cosine {cosine:.5f}")
  assert cosine >= 0.99


# ------------------------------------------------------------------------------------------ lossy merges refused

def test_a_merge_into_bfloat16_weights_is_measured_and_refused_in_one_line(base_dir, adapter_dir):
  """`merge_lora` into bfloat16 weights: the survival it measures equals numpy's from the files (bfloat16 rounding
  by ml_dtypes, float64), it is far below 0.99, and the merge is refused in one line before the model changes."""
  import ml_dtypes
  from safetensors.numpy import load_file
  model, _ = checkpoint.load_model(base_dir, dtype="bfloat16")
  lora.import_peft(model, adapter_dir)
  before = {name: np.asarray(value) for name, value in model.layers.arrays().items()}
  survival = lora.update_survival(model)
  # numpy, in HF's layout: W [out, in] rounded to bfloat16, the update scale * B A from the adapter's file.
  hf_base, factors = load_file(base_dir / "model.safetensors"), load_file(adapter_dir / lora.ADAPTER_WEIGHTS)
  prefix = "base_model.model.model.layers.1.self_attn.q_proj"
  w = hf_base["model.layers.1.self_attn.q_proj.weight"].astype(ml_dtypes.bfloat16).astype(np.float64)
  update = 2.0 * factors[f"{prefix}.lora_B.weight"].astype(np.float64) @ factors[f"{prefix}.lora_A.weight"]
  merged = (w.astype(np.float32) + update.astype(np.float32)).astype(ml_dtypes.bfloat16).astype(np.float64)
  assert survival["1.wq"] == pytest.approx(_cosine(merged - w, update), abs=1e-6)
  print(f"measured: bfloat16 merge at a relative update of {RELATIVE_UPDATE}: {np.mean(merged == w):.0%} of layer 1 "
        f"wq unchanged; cosine per weight {min(survival.values()):.3f} to {max(survival.values()):.3f}")
  assert max(survival.values()) < 0.99
  assert lora.update_survival(model, np.float32)["1.wq"] > 0.9999  # the same merge in float32 keeps it

  with pytest.raises(lora.LoraError) as info:
    lora.merge_lora(model, inplace=True)
  message = str(info.value)
  assert "\n" not in message and message.startswith("a merge into bfloat16 weights keeps too little of the adapter's")
  assert message.endswith("merge into float32 weights, or keep the adapter unmerged (LoRA on the frozen base)")
  assert lora.lora_targets(model) == ("wq", "wk", "wv", "wo", "w_down")  # untouched
  assert all(np.array_equal(before[name], np.asarray(value)) for name, value in model.layers.arrays().items())


def test_a_lossy_merged_export_is_refused_before_writing_and_a_float32_one_keeps_the_update(base_dir, adapter_dir,
                                                                                            tmp_path):
  model, _ = checkpoint.load_model(base_dir, dtype="bfloat16")
  lora.import_peft(model, adapter_dir)
  with pytest.raises(lora.LoraError) as info:
    lora.export_merged_hf(model, tmp_path / "fp16", dtype=np.float16)
  assert "\n" not in str(info.value) and str(info.value).startswith("a merge into float16 weights keeps too little")
  assert str(info.value).endswith("export in float32 (the default), or keep the adapter unmerged (teacher.adapter "
                                  "loads it as LoRA on the teacher)")
  assert not (tmp_path / "fp16").exists()
  # The default: float32, whatever the base's dtype: exported minus the bfloat16 base is the update.
  lora.export_merged_hf(model, tmp_path / "fp32")
  from safetensors.numpy import load_file
  exported = load_file(tmp_path / "fp32" / "model.safetensors")["model.layers.0.self_attn.v_proj.weight"]
  base = np.asarray(model.layers.wv[...], np.float64)[0].reshape(TINY_HF["hidden_size"], -1).T
  factors = load_file(adapter_dir / lora.ADAPTER_WEIGHTS)
  prefix = "base_model.model.model.layers.0.self_attn.v_proj"
  update = 2.0 * factors[f"{prefix}.lora_B.weight"].astype(np.float64) @ factors[f"{prefix}.lora_A.weight"]
  assert _cosine(exported - base, update) > 0.999


def test_convert_keeps_the_adapter_unmerged_on_bfloat16_and_refuses_an_int8_merged_export(base_dir, adapter_dir,
                                                                                          tmp_path):
  """`convert --adapter` on bfloat16 weights (the CLI's path): the base as without an adapter, the adapter's bytes
  beside it, attached when loaded; an HF export of an int8 conversion with an adapter is refused before any
  output is written."""
  convert.convert(str(base_dir), str(tmp_path / "bf16"), dtype="bfloat16", adapter=str(adapter_dir))
  convert.convert(str(base_dir), str(tmp_path / "plain"), dtype="bfloat16")
  meta = json.loads((tmp_path / "bf16" / checkpoint.METADATA_FILE).read_text())
  assert meta["adapter"] == "adapter" and meta["param_dtype"] == "bfloat16"
  adapted, _ = checkpoint.load_model(tmp_path / "bf16")
  plain, _ = checkpoint.load_model(tmp_path / "plain")
  assert lora.lora_targets(plain) == () and lora.lora_targets(adapted) == ("wq", "wk", "wv", "wo", "w_down")
  for name, value in plain.layers.arrays().items():  # the very weights of a conversion without the adapter
    assert np.array_equal(np.asarray(value), np.asarray(getattr(adapted.layers, name)[...])), name
  assert provenance.read(tmp_path / "bf16")["settings"]["adapter_unmerged"] is True
  # Such a checkpoint is not a source to convert again (its adapter would be lost), but exports merged in float32.
  with pytest.raises(lora.LoraError, match="holds an unmerged adapter: convert its base source with --adapter"):
    convert.convert(str(tmp_path / "bf16"), str(tmp_path / "again"))
  assert not (tmp_path / "again").exists()
  convert.convert(str(tmp_path / "bf16"), None, export_hf=str(tmp_path / "hf_bf16"))
  exported, _ = checkpoint.load_model(tmp_path / "hf_bf16")
  np.testing.assert_allclose(np.asarray(exported(IDS)), np.asarray(adapted(IDS)), atol=1e-5, rtol=0)
  with pytest.raises(lora.LoraError, match="^--export_hf merges the adapter .* export without --quantize$"):
    convert.convert(str(base_dir), str(tmp_path / "int8"), export_hf=str(tmp_path / "hf"), quantize=True,
                    dtype="bfloat16", adapter=str(adapter_dir))
  assert not (tmp_path / "int8").exists() and not (tmp_path / "hf").exists()
