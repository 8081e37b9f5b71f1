"""SmolLM2-135M-Instruct on GSM8K test, end to end on the CPU (issue acceptance 2), plus an optional second arm,
a cross-arm report with plots and the attention analysis.

  JAX_PLATFORMS=cpu python benchmarks/eval_smollm2.py --num_questions=50 --out_dir=/tmp/kdjax_eval
  JAX_PLATFORMS=cpu python benchmarks/eval_smollm2.py --compare=lora --compare_questions=20 --analysis

`--compare=lora` evaluates the base model against a copy with a random nonzero LoRA adapter (B drawn instead of
the usual zeros), `--compare=eight_shot` the zero-shot student prompt against Meta's 8-shot CoT prompt. Both arms
run on the first `--compare_questions` questions; the report (report.md, accuracy and length PNGs) goes to
`out_dir/report`. Every evaluation folder resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

_NUM_QUESTIONS = flags.DEFINE_integer("num_questions", 50, "GSM8K test questions for the main evaluation.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 512, "Generation limit per answer.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 25, "Questions generated together.")
_OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/kdjax_eval", "Root folder of the evaluation folders.")
_GSM8K = flags.DEFINE_string("gsm8k", "/work/shared/data/gsm8k", "GSM8K folder (test.jsonl) or openai/gsm8k.")
_MODEL = flags.DEFINE_string("model", None, "Model source (default: the cached SmolLM2-135M-Instruct GGUF).")
_COMPARE = flags.DEFINE_enum("compare", "none", ["none", "lora", "eight_shot"], "Second arm for the report.")
_COMPARE_QUESTIONS = flags.DEFINE_integer("compare_questions", 20, "Questions for each compared arm.")
_COMPARE_MAX_NEW_TOKENS = flags.DEFINE_integer("compare_max_new_tokens", 256, "Generation limit of compared arms.")
_SKIP_MAIN = flags.DEFINE_bool("skip_main", False, "Skip the main evaluation (only the comparison).")
_ANALYSIS = flags.DEFINE_bool("analysis", False, "Attention analysis of base vs LoRA-attached model.")
_ANALYSIS_QUESTIONS = flags.DEFINE_integer("analysis_questions", 16, "Questions for the attention analysis.")
_LORA_SCALE = flags.DEFINE_float("lora_init_std", 0.02, "Std of the random LoRA B factor (compare / analysis).")


def random_lora_copy(model, std: float, seed: int = 0):
  """A copy of `model` with rank-4 LoRA on the attention projections and a random nonzero B."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from kdjax.models import lora  # pylint: disable=import-outside-toplevel
  adapted = nnx.clone(model)
  lora.add_lora(adapted, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0), seed=seed)
  key = jax.random.PRNGKey(seed + 1)
  for index, name in enumerate(lora.lora_targets(adapted)):
    factor = getattr(adapted.layers, f"{name}_lora_b")
    factor[...] = std * jax.random.normal(jax.random.fold_in(key, index), factor[...].shape, jnp.float32)
  return adapted


def main(argv: list[str]) -> None:
  del argv
  import kdjax  # pylint: disable=import-outside-toplevel
  from kdjax.evaluation import attention as analysis  # pylint: disable=import-outside-toplevel
  from kdjax.gsm8k import data  # pylint: disable=import-outside-toplevel
  from kdjax.infra import fetch  # pylint: disable=import-outside-toplevel
  from kdjax.evaluation import loop  # pylint: disable=import-outside-toplevel
  from kdjax.evaluation import report  # pylint: disable=import-outside-toplevel

  out_root = pathlib.Path(_OUT_DIR.value)
  source = _MODEL.value or fetch.smollm2_gguf()
  start = time.perf_counter()
  model, _ = kdjax.load_model(source, dtype="float32")
  tokenizer = kdjax.load_tokenizer(source)
  questions = data.load_gsm8k(_GSM8K.value, "test")
  print(f"loaded {pathlib.Path(source).name} and {len(questions)} test questions in "
        f"{time.perf_counter() - start:.1f} s; jax devices {jax.devices()}", flush=True)

  if not _SKIP_MAIN.value:
    cfg = loop.EvalConfig(num_questions=_NUM_QUESTIONS.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                          batch_size=_BATCH_SIZE.value)
    start = time.perf_counter()
    summary = loop.evaluate(model, tokenizer, questions, cfg, out_root / "smollm2_zero_shot", arm="smollm2")
    wall = time.perf_counter() - start
    print(loop.format_summary(summary))
    low, high = summary["ci_primary"]
    print(f"RESULT accuracy={summary['accuracy_primary']:.4f} ({summary['primary_rule']} rule) "
          f"95% Wilson CI=[{low:.4f}, {high:.4f}] n={summary['n']} wall_s={wall:.1f} "
          f"generation_s={summary['seconds']:.1f} tokens_per_s={summary['tokens_per_second']:.2f}", flush=True)

  lora_model = None
  if _COMPARE.value != "none":
    base_cfg = loop.EvalConfig(num_questions=_COMPARE_QUESTIONS.value,
                               max_new_tokens=_COMPARE_MAX_NEW_TOKENS.value, batch_size=_BATCH_SIZE.value)
    arms = {"base": out_root / f"compare_{_COMPARE.value}" / "base"}
    loop.evaluate(model, tokenizer, questions, base_cfg, arms["base"], arm="base")
    if _COMPARE.value == "lora":
      lora_model = random_lora_copy(model, _LORA_SCALE.value)
      arms["lora_random"] = out_root / "compare_lora" / "lora_random"
      loop.evaluate(lora_model, tokenizer, questions, base_cfg, arms["lora_random"], arm="lora_random")
    else:
      shot_cfg = loop.EvalConfig(num_questions=_COMPARE_QUESTIONS.value, prompt_format="eight_shot_cot",
                                 max_new_tokens=_COMPARE_MAX_NEW_TOKENS.value, batch_size=_BATCH_SIZE.value)
      arms["eight_shot"] = out_root / "compare_eight_shot" / "eight_shot"
      loop.evaluate(model, tokenizer, questions, shot_cfg, arms["eight_shot"], arm="eight_shot")
    built = report.build_report(arms, out_root / f"compare_{_COMPARE.value}" / "report", controls=("base",))
    for name, arm in built["arms"].items():
      print(f"report {name}: accuracy {arm['accuracy']:.3f} [{arm['ci_low']:.3f}, {arm['ci_high']:.3f}] "
            f"mean tokens {arm['mean_output_tokens']:.1f}")
    for comparison in built["comparisons"]:
      print(f"McNemar {comparison['arm']} vs {comparison['control']}: p={comparison['p_value']:.3g}")

  if _ANALYSIS.value:
    if lora_model is None:
      lora_model = random_lora_copy(model, _LORA_SCALE.value)
    start = time.perf_counter()
    result = analysis.analyze({"base": model, "lora_random": lora_model}, tokenizer, questions,
                              out_root / "attention", num_questions=_ANALYSIS_QUESTIONS.value)
    print(f"attention analysis in {time.perf_counter() - start:.1f} s; top heads: "
          + json.dumps([(h["layer"], h["head"], round(h["score"], 4)) for h in result["located_heads"][:5]]))


if __name__ == "__main__":
  app.run(main)
