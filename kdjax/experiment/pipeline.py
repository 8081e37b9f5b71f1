"""The stages of a kdjax experiment, each a function from (config, work folder) to files in that folder.

Work folder layout (`--config.workdir`):
  plan.json                       the plan stage's memory plan
  models/teacher, models/student  converted kdjax checkpoints (Orbax)
  stores/<strategy>/              teacher top-k stores, shared by every arm primed the same way
  arms/<arm>/train/               student checkpoints (Orbax), metrics.jsonl, TensorBoard events, train_data.json
  arms/<arm>/adapter/             the LoRA adapter in HF PEFT format
  arms/<arm>/eval/                samples.jsonl + summary.json on GSM8K test
  report/                         report.md, report.json, accuracy.png
  analysis/                       attention metrics and plots

  config.json                     the config of the last run that succeeded
  run_records/<time>-<pid>.json   every run's config and outcome ("running", "ok" or its error line)
  logs/<time>-<pid>.log           what libraries said during that run, and its error's traceback (kdjax/runlog.py)
  .kdjax-lock.json                the lease of the run working here now: one run at a time (kdjax/lease.py)

On several processes (a pod, `jax.distributed`) every process runs every stage. Each object has one writer:
convert and train write through Orbax (each array shard by the one process that holds it), generate and eval
split their questions over the processes (each writes its own shards or part, process 0 merges), analyze gathers
its per-question rows to process 0; process 0 alone writes the records, adapters, reports, plots and links. All
processes meet at the end of each stage, so none reads what another has not finished writing.

Stages talk to each other only through these files. Each output folder holds provenance.json, the record of what
produced it (kdjax/provenance.py): a stage skips finished work and resumes unfinished work only when the record
equals what this run would write, and otherwise refuses with one line before any work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Callable

import jax
import ml_collections

from kdjax.experiment import config as config_lib
from kdjax.infra import hostmem, lease, parallel, runlog, storage
from kdjax.experiment import provenance, settings
from kdjax.experiment.settings import ConfigError, validate


@dataclasses.dataclass(frozen=True)
class Workdir:
  root: pathlib.Path

  def model(self, role: str) -> pathlib.Path:
    return self.root / "models" / role

  def store(self, strategy: str) -> pathlib.Path:
    return self.root / "stores" / strategy

  def arm(self, arm: str) -> pathlib.Path:
    return self.root / "arms" / arm

  def name(self, path: pathlib.Path) -> str:
    """A folder as messages show it: relative to the work folder."""
    return os.path.relpath(path, self.root)


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[kdjax {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ shared loading

def make_mesh(c: ml_collections.ConfigDict, *, per_process: bool = False):
  """The mesh of every device, or with `per_process` (stages whose processes work on their own questions with a
  complete model each: generate unless teacher.spans_processes, eval, analyze) of this process's devices; the same
  on one process."""
  shape = settings.mesh_shape(c)
  try:
    return parallel.local_mesh(shape) if per_process else parallel.make_mesh(shape)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None


def load_role(c, wd: Workdir, role: str, mesh):
  """The converted model of `role` (teacher or student) and its tokenizer; a teacher with `teacher.adapter` comes
  with it (merged, or attached as LoRA: kdjax/convert.py) and computes in float32, whatever its weights' dtype: an
  update of ~3e-4 of the weights is below bfloat16's resolution of the activations (2^-8), where it is noise."""
  from kdjax.models import checkpoint
  path = wd.model(role)
  if not checkpoint.is_kdjax_checkpoint(path):
    raise ConfigError(f"{path} is not converted yet: run the convert stage first")
  dtype = "float32" if _adapter(c, role) else c[role].dtype
  model, _ = checkpoint.load_model(path, dtype=dtype, mesh=mesh,
                                   remat=bool(c.student.remat) if role == "student" else False)
  return model, checkpoint.load_tokenizer(path)


class Records:
  """The provenance record each output of this run should have, from the config and the sources (cached).

  What each stage's record holds (kdjax/provenance.py): convert <- the source's bytes, quantization, parameter
  dtype, the content hash of the teacher's adapter (`teacher.adapter`); generate <- the teacher's
  record, the teacher, data and seed settings, the train and validation questions; train <- the student's (and
  the store's) record, the student, train, data and seed settings, the distill settings and
  teacher.max_reference_overlap for kd arms (finetune does not read them), its questions where no store holds them;
  eval <- the student's and the adapter's records and the adapter's bytes, the eval settings and student dtype,
  every question of the evaluated split.
  """

  def __init__(self, c: ml_collections.ConfigDict, wd: Workdir):
    self.c, self.wd, self._cache = c, wd, {}

  def _cached(self, key: tuple, make: Callable[[], dict]) -> dict:
    if key not in self._cache:
      self._cache[key] = make()
    return self._cache[key]

  def model(self, role: str) -> dict:
    from kdjax.experiment import conversion as convert
    quantize, dtype = settings.convert_settings(self.c, role)
    return self._cached(("model", role), lambda: convert.conversion_record(
        self.c[role].source, dtype=dtype, quantize=quantize, output=self.wd.model(role),
        adapter=_adapter(self.c, role)))

  def store(self, strategy: str) -> dict:
    def make():
      train_q, val_q = settings.train_and_validation(self.c)
      return provenance.make_record(
          "generate", settings={"strategy": strategy, **provenance.settings(self.c, ["teacher", "data", "seed"])},
          questions={"train": train_q, "validation": val_q},
          inputs={"teacher": (self.wd.name(self.wd.model("teacher")), self.model("teacher"))})
    return self._cached(("store", strategy), make)

  def train(self, arm: str) -> dict:
    def make():
      spec = config_lib.ARMS[arm]
      kd_keys = ["distill", "teacher.max_reference_overlap"]  # how the store's responses are selected and learnt
      sections = ["student", "train", "data", "seed"] + (kd_keys if spec["mode"] == "kd" else [])
      inputs = {"student": (self.wd.name(self.wd.model("student")), self.model("student"))}
      questions_read = None
      if spec["mode"] == "kd":
        inputs["store"] = (self.wd.name(self.wd.store(spec["strategy"])), self.store(spec["strategy"]))
      else:
        train_q, val_q = settings.train_and_validation(self.c)
        questions_read = {"train": train_q, "validation": val_q}
      return provenance.make_record("train", settings={"mode": spec["mode"], **provenance.settings(self.c, sections)},
                                    inputs=inputs, questions=questions_read)
    return self._cached(("train", arm), make)

  def eval(self, arm: str) -> dict:
    """Needs the arm's adapter on disk: its bytes are part of the record."""
    inputs = {"student": (self.wd.name(self.wd.model("student")), self.model("student"))}
    adapter = self.wd.arm(arm) / "adapter"
    if config_lib.ARMS[arm]["mode"] != "none":
      inputs["adapter"] = (self.wd.name(adapter), self.train(arm))
    record = provenance.make_record(
        "eval", settings=provenance.settings(self.c, ["eval", "student.dtype"]), inputs=inputs,
        questions={self.c.eval.split: settings.questions(self.c, self.c.eval.split)})
    return provenance.with_content(record, "adapter", adapter) if "adapter" in inputs else record


def _adapter(c, role: str) -> str | None:
  """The PEFT adapter of `role` (`teacher.adapter`; the student has none), applied at conversion (convert.py)."""
  return (c.teacher.adapter or None) if role == "teacher" else None


def _source_line(c, role: str) -> str:
  """`role`'s source as the log shows it, with its adapter."""
  adapter = _adapter(c, role)
  return c[role].source + (f" + adapter {adapter}" if adapter else "")


def _writer() -> bool:
  return parallel.is_writer()


# ------------------------------------------------------------------------------------------ stages

def stage_plan(c, wd: Workdir, records: Records) -> None:
  """Always recomputed (it reads no stage output and is never reused), so plan.json needs no record."""
  from kdjax.plan import generate as plan_lib
  role = c.plan.model
  if role not in ("teacher", "student"):
    raise ConfigError(f"plan.model must be 'teacher' or 'student', got {role!r}")
  if role == "student":  # the student's LoRA train step, as the train stage will compile it
    settings.plan_student(c, wd.root / "plan.json")
    return
  mesh_shape = settings.mesh_shape(c)
  # The teacher's store workload on the engine: plan.batch_size slots, prompts of plan.max_len less the new tokens.
  result = plan_lib.make_plan(c.teacher.preset, quantization=c.teacher.quantization,
                              topology=c.plan.topology or None, mesh_shape=mesh_shape, slots=c.plan.batch_size,
                              max_len=c.plan.max_len, prompt_len=c.plan.max_len - c.teacher.max_new_tokens,
                              topk_logprobs=c.teacher.k, tail_temperatures=config_lib.tail_temperatures(c),
                              dtype=c.teacher.dtype, hbm_fraction=c.plan.hbm_fraction)
  plan_lib.print_table(result)
  plan_lib.write_plan_json(result, wd.root / "plan.json")
  plan_lib.check_fits(result)


def _roles(c) -> list[str]:
  kd = any(config_lib.ARMS[a]["mode"] == "kd" for a in config_lib.arm_names(c))
  return ["student"] + (["teacher"] if kd else [])


def stage_convert(c, wd: Workdir, records: Records) -> None:
  from kdjax.models import checkpoint
  from kdjax.experiment import conversion as convert
  for role in _roles(c):
    target, expected = wd.model(role), records.model(role)
    self_distillation = role == "teacher" and provenance.matches(expected, records.model("student"))
    parallel.sync(f"kdjax.convert:{role}:before-link")  # every process sees the folder before process 0 links
    linked = target.exists() or (isinstance(target, pathlib.Path) and target.is_symlink())
    parallel.sync(f"kdjax.convert:{role}:link-checked")
    if self_distillation and not linked:  # one conversion serves both roles (a link; a copy on gs://)
      if _writer():
        storage.link_dir(target, wd.model("student"))
      log(f"convert: teacher is the student's checkpoint ({wd.name(target)} -> {wd.model('student').name})")
      continue
    if provenance.claim(target, wd.name(target), expected, writer=_writer()) and \
        checkpoint.is_kdjax_checkpoint(target):
      log(f"convert: {wd.name(target)} already converted from {_source_line(c, role)}")
      continue
    quantize, dtype = settings.convert_settings(c, role)
    log(f"convert: {role} {_source_line(c, role)} -> {target}{' (int8)' if quantize else ''}")
    # On the mesh of every device: each array shard has one holder, and Orbax has only it write the shard.
    convert.convert(c[role].source, str(target), dtype=dtype, quantize=quantize, record=expected,
                    mesh=make_mesh(c), adapter=_adapter(c, role))


def _require_model(wd: Workdir, records: Records, role: str) -> None:
  provenance.require(wd.model(role), wd.name(wd.model(role)), records.model(role), "convert")


def stage_generate(c, wd: Workdir, records: Records) -> None:
  from kdjax.models import checkpoint
  from kdjax.teacher import jax_engine as teacher
  strategies = sorted({config_lib.ARMS[a]["strategy"] for a in config_lib.arm_names(c)
                       if config_lib.ARMS[a]["mode"] == "kd"})
  if not strategies:
    return
  _require_model(wd, records, "teacher")
  for claim in (False, True):  # every store is checked, then every record written, before the teacher loads
    for strategy in strategies:
      folder, expected = wd.store(strategy), records.store(strategy)
      if claim:
        provenance.claim(folder, wd.name(folder), expected, writer=_writer())
      else:
        provenance.check_claimable(folder, wd.name(folder), expected)
  train_q, val_q = settings.train_and_validation(c)
  # A complete teacher per process, each generating its own shards; or one teacher over every process's devices,
  # all of them generating every shard together (teacher.spans_processes; kdjax.teacher.jax_engine).
  mesh = make_mesh(c, per_process=not c.teacher.spans_processes)
  model, tokenizer = load_role(c, wd, "teacher", mesh)
  student_tokenizer = checkpoint.load_tokenizer(wd.model("student"))
  for strategy in strategies:
    log(f"generate: teacher store for {strategy!r} ({len(train_q)} train + {len(val_q)} validation questions)")
    summary = teacher.generate_store(
        model, tokenizer, train_q + val_q, strategy, wd.store(strategy), teacher_model_id=c.teacher.model_id,
        sampling=settings.teacher_sampling(c), student_tokenizer=student_tokenizer, k=c.teacher.k,
        placement=c.teacher.placement, shard_size=c.teacher.shard_size, batch_size=c.teacher.batch_size,
        tail_temperatures=config_lib.tail_temperatures(c), hint_seed=c.seed,
        questions_name=f"gsm8k-train-first{c.data.num_train_questions}+{c.data.num_validation}-seed{c.seed}")
    log(f"generate: {strategy}: {_store_line(summary)}")


def _store_line(summary: dict) -> str:
  """One line for a teacher store: what this run wrote, and the finished store's size and accuracy."""
  if not summary.get("finalized"):
    return f"wrote shards {summary.get('shards_written', [])}; not finished (other processes' shards missing)"
  done = "already complete, skipped" if summary.get("skipped") else (
      f"wrote {len(summary.get('shards_written', []))} shard(s), {summary.get('tokens_generated', 0)} tokens "
      f"in {summary.get('seconds', 0.0):.1f} s")
  hint = ""
  if summary.get("reference_overlap_mean") is not None:  # None only for a store without responses
    hint = (f"; {100 * summary['hint_mention_share']:.1f}% mention a provided solution or hint, ROUGE-L F1 with the "
            f"reference solution mean {summary['reference_overlap_mean']:.3f}, "
            f"{100 * summary['reference_overlap_high_share']:.1f}% above {summary['reference_overlap_high_threshold']}")
  return (f"{done}; {summary['num_examples']} responses, {summary['total_tokens']} tokens, "
          f"{summary['num_correct']} correct ({summary['correct_rule']} rule)" + hint)


def _eval_line(summary: dict) -> str:
  """One line for an arm's evaluation: the primary accuracy with its interval, and the reference NLL."""
  rule = summary["primary_rule"]
  low, high = summary["wilson_interval"][rule]
  nll = summary.get("ref_nll_mean")
  return (f"{summary['correct'][rule]}/{summary['n']} correct ({rule} rule), accuracy "
          f"{100 * summary['accuracy'][rule]:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
          + ("" if nll is None else f", reference NLL {nll:.4f} nats/token"))


TRAIN_DATA_FILE = "train_data.json"


def _train_examples(c, wd: Workdir, arm: str, tokenizer):
  """(train examples, validation examples, what was selected): a kd arm's store responses, less the wrong ones
  (distill.correct_only) and those too close to their reference solution (teacher.max_reference_overlap)."""
  from kdjax.gsm8k import reference_overlap
  from kdjax.teacher import store
  from kdjax.distill import batches
  spec = config_lib.ARMS[arm]
  train_q, val_q = settings.train_and_validation(c)
  if spec["mode"] == "finetune":
    return batches.gold_examples(train_q, tokenizer), batches.gold_examples(val_q, tokenizer), {"mode": "finetune"}
  reader = store.StoreReader(wd.store(spec["strategy"]))
  # Correct under eval's rule, read again from the text: also for a store whose flags used another (kdjax.teacher.store).
  records = reader.filter(correct_only=True, rule=store.CORRECT_RULE) if c.distill.correct_only else reader
  val_ids = {q["id"] for q in val_q}
  selected = {"mode": "kd", "store": wd.name(wd.store(spec["strategy"])), "store_responses": len(reader),
              "dropped_incorrect": len(reader) - len(records),
              "max_reference_overlap": float(c.teacher.max_reference_overlap)}
  split = {}
  for name, validation in (("train", False), ("validation", True)):
    kept, dropped = reference_overlap.select([r for r in records if (r.question_id in val_ids) == validation],
                                             train_q + val_q, float(c.teacher.max_reference_overlap))
    split[name] = kept
    selected[f"{name}_dropped_reference_overlap"] = dropped
    selected[f"{name}_examples"] = len(kept)
  tail = {"temperature": float(c.distill.temperature), "topk_mode": c.distill.topk_mode}
  return (batches.examples_from_records(split["train"], **tail),
          batches.examples_from_records(split["validation"], **tail), selected)


def _selection_line(selected: dict) -> str:
  """What a kd arm's data selection dropped, for the train log line ('' for finetune)."""
  if selected["mode"] != "kd":
    return ""
  return (f"; of {selected['store_responses']} store responses, {selected['dropped_incorrect']} dropped as wrong "
          f"(distill.correct_only), {selected['train_dropped_reference_overlap']} train + "
          f"{selected['validation_dropped_reference_overlap']} validation dropped above reference overlap "
          f"{selected['max_reference_overlap']:g} (teacher.max_reference_overlap)")


def _check_stores_serve_the_loss(c, wd: Workdir) -> None:
  """Before any training: every KD arm's store keeps the teacher's tail at the loss temperature (tail mode)."""
  from kdjax.teacher import store
  from kdjax.distill import batches
  for arm in config_lib.arm_names(c):
    if config_lib.ARMS[arm]["mode"] != "kd" or (wd.arm(arm) / "adapter" / "adapter_config.json").exists():
      continue
    path = wd.store(config_lib.ARMS[arm]["strategy"])
    spec = store.StoreReader(path).spec
    batches.require_tail_temperature(float(c.distill.temperature), spec.tail_temperatures, c.distill.topk_mode,
                                     f"the store {path}")


def stage_train(c, wd: Workdir, records: Records) -> None:
  from kdjax.models import lora
  from kdjax.distill import on_policy, run_files, train
  from kdjax.teacher import priming
  _check_stores_serve_the_loss(c, wd)
  mesh = make_mesh(c)
  for arm in config_lib.arm_names(c):
    spec = config_lib.ARMS[arm]
    if spec["mode"] == "none":
      continue
    _require_model(wd, records, "student")
    if spec["mode"] == "kd":
      store_dir = wd.store(spec["strategy"])
      provenance.require(store_dir, wd.name(store_dir), records.store(spec["strategy"]), "generate")
    adapter, train_dir, expected = wd.arm(arm) / "adapter", wd.arm(arm) / "train", records.train(arm)
    if provenance.check(adapter, wd.name(adapter), expected) and (adapter / "adapter_config.json").exists():
      log(f"train: {arm}: adapter already exported")
      continue
    # Both records are written before training (a later run under other settings refuses the partial output),
    # and only once both folders passed: a refused run leaves no record behind.
    provenance.check_claimable(adapter, wd.name(adapter), expected)
    provenance.check_claimable(train_dir, wd.name(train_dir), expected)
    provenance.claim(adapter, wd.name(adapter), expected, writer=_writer())
    provenance.claim(train_dir, wd.name(train_dir), expected, writer=_writer())
    model, tokenizer = load_role(c, wd, "student", mesh)
    lora.add_lora(model, settings.lora_config(c), seed=c.seed)
    train_data, val_data, selected = _train_examples(c, wd, arm, tokenizer)
    if _writer():  # beside metrics.jsonl; the report shows it
      provenance.write_json(train_dir / TRAIN_DATA_FILE, selected)
    log(f"train: {arm}: {len(train_data)} train / {len(val_data)} validation sequences ({spec['mode']})"
        + _selection_line(selected))
    scorer = None
    if spec["mode"] == "kd" and c.distill.on_policy_fraction > 0:  # the primed teacher, resident beside it
      _require_model(wd, records, "teacher")
      scorer = on_policy.OnPolicy.from_store(
          load_role(c, wd, "teacher", mesh)[0], wd.store(spec["strategy"]), settings.on_policy_settings(c),
          stop_ids=priming.stop_token_ids(tokenizer), pad_id=priming.pad_token_id(tokenizer))
    result = train.train(model, train_data, val_data or None, settings.train_config(c),
                         settings.loss_config(c, spec["mode"]),
                         train_dir, mesh=mesh, on_policy=scorer)
    result = run_files.select_adapter(model, result)  # best validation step, or the final one without validation
    lora.export_peft(model, adapter, base_model_name_or_path=c.student.model_id)  # process 0 writes
    log(f"train: {arm}: {result.summary()}; adapter -> {wd.name(adapter)}")


def _require_student_and_adapter(wd: Workdir, records: Records, arm: str) -> None:
  _require_model(wd, records, "student")
  adapter = wd.arm(arm) / "adapter"
  if config_lib.ARMS[arm]["mode"] != "none":
    if not (adapter / "adapter_config.json").exists():
      raise ConfigError(f"arm {arm}: no adapter at {wd.name(adapter)}: run the train stage first")
    provenance.require(adapter, wd.name(adapter), records.train(arm), "train")


def load_student_for_arm(c, wd: Workdir, records: Records, arm: str, mesh):
  """The student with the arm's adapter; both checked to be what this run's config makes."""
  from kdjax.models import lora
  _require_student_and_adapter(wd, records, arm)
  model, tokenizer = load_role(c, wd, "student", mesh)
  if config_lib.ARMS[arm]["mode"] != "none":
    lora.import_peft(model, wd.arm(arm) / "adapter")
  return model, tokenizer


def stage_eval(c, wd: Workdir, records: Records) -> None:
  from kdjax.evaluation import loop
  mesh = make_mesh(c, per_process=True)  # each process evaluates its share of the questions (loop.evaluate)
  test_q = settings.questions(c, c.eval.split)
  for arm in config_lib.arm_names(c):
    out = wd.arm(arm) / "eval"
    _require_student_and_adapter(wd, records, arm)
    provenance.claim(out, wd.name(out), records.eval(arm), writer=_writer())
    model, tokenizer = load_student_for_arm(c, wd, records, arm, mesh)
    summary = loop.evaluate(model, tokenizer, test_q, settings.eval_config(c), out, arm=arm,
                            progress=jax.process_index() == 0)
    log(f"eval: {arm}: {_eval_line(summary)}")


def report_arm_names(c, wd: Workdir) -> list[str]:
  """The arms the report shows: this run's (`report.arms` empty), the listed ones, or every evaluated one."""
  if c.report.arms == "all":
    return [p.parent.name for p in sorted((wd.root / "arms").glob("*/eval")) if (p / "samples.jsonl").exists()]
  if c.report.arms:
    return config_lib.arm_names(ml_collections.ConfigDict({"arms": c.report.arms}))
  return config_lib.arm_names(c)


def stage_report(c, wd: Workdir, records: Records) -> None:
  """Always rebuilt from the eval folders; this run's arms must hold this run's evaluations."""
  from kdjax.evaluation import paper_numbers, report
  names = report_arm_names(c, wd)
  unevaluated = [a for a in names if not (wd.arm(a) / "eval" / "samples.jsonl").exists()]
  if unevaluated or not names:
    raise ConfigError(f"arm(s) {', '.join(unevaluated) or '(none)'} not evaluated under {wd.root / 'arms'}: "
                      "run the eval stage first")
  this_run = set(config_lib.arm_names(c))
  for arm in names:  # arms of other runs (report.arms) carry their own records, listed in the report's
    if arm in this_run:
      provenance.require(wd.arm(arm) / "eval", wd.name(wd.arm(arm) / "eval"), records.eval(arm), "eval")
  evals = {a: wd.arm(a) / "eval" for a in names}
  if not _writer():  # the report is small and written once
    return
  provenance.write(wd.root / "report", provenance.make_record(
      "report", settings=provenance.settings(c, ["report"]),
      inputs={arm: (wd.name(path), provenance.read(path) or {}) for arm, path in evals.items()}))
  strategies = sorted({config_lib.ARMS[a]["strategy"] for a in names if config_lib.ARMS[a]["mode"] == "kd"})
  store_questions = None  # the stores' questions with their reference solutions, for the overlap columns
  if strategies:
    from kdjax.gsm8k import data
    try:
      store_questions = sum(settings.train_and_validation(c), [])
    except (data.DataError, OSError) as e:
      log(f"report: no reference overlap for the teacher stores: the questions cannot be read ({e})")
  report.build_report(evals, wd.root / "report", rule=c.report.rule,
                      paper_numbers=paper_numbers.PAPER_GSM8K_ACCURACY,
                      stores={s: wd.store(s) for s in strategies if (wd.store(s) / "manifest.json").exists()},
                      store_questions=store_questions,
                      update_norms={a: wd.arm(a) / "train" / "update_norms.json" for a in names},
                      train_metrics={a: wd.arm(a) / "train" / "metrics.jsonl" for a in names},
                      train_data={a: wd.arm(a) / "train" / TRAIN_DATA_FILE for a in names},
                      bootstrap_resamples=c.report.bootstrap_resamples, seed=c.seed)
  log(f"report: {wd.root / 'report' / 'report.md'}")
  print((wd.root / "report" / "report.md").read_text())


def stage_analyze(c, wd: Workdir, records: Records) -> None:
  """Always recomputed; its record names the models and adapters it read."""
  from kdjax.evaluation import attention as analysis
  mesh = make_mesh(c, per_process=True)  # each process runs its share of the questions (analysis.analyze)
  models, tokenizer, inputs = {}, None, {}
  for arm in config_lib.arm_names(c):
    models[arm], tokenizer = load_student_for_arm(c, wd, records, arm, mesh)
    if config_lib.ARMS[arm]["mode"] != "none":
      inputs[arm] = (wd.name(wd.arm(arm) / "adapter"), records.train(arm))
  if _writer():
    inputs["student"] = (wd.name(wd.model("student")), records.model("student"))
    provenance.write(wd.root / "analysis", provenance.make_record(
        "analyze", settings=provenance.settings(c, ["analyze", "eval.split", "student.dtype"]), inputs=inputs,
        questions={c.eval.split: settings.questions(c, c.eval.split)[:c.analyze.num_questions]}))
  result = analysis.analyze(models, tokenizer, settings.questions(c, c.eval.split), wd.root / "analysis",
                            num_questions=c.analyze.num_questions, threshold=c.analyze.threshold)
  log(f"analyze: {wd.root / 'analysis'} ({len(result)} entries)")


STAGE_FUNCTIONS: dict[str, Callable] = {
    "plan": stage_plan, "convert": stage_convert, "generate": stage_generate, "train": stage_train,
    "eval": stage_eval, "report": stage_report, "analyze": stage_analyze,
}


def preflight(c, wd: Workdir, records: Records) -> None:
  """Checks the folder of every output this run's stages will write before the first stage starts, so a refusal
  costs no work. (Each stage checks again, with its inputs, when it runs.)"""
  stages = set(config_lib.stage_names(c))
  arms = config_lib.arm_names(c)
  folders = []
  if "convert" in stages:
    folders += [(wd.model(role), records.model(role)) for role in _roles(c)]
  if "generate" in stages:
    strategies = {config_lib.ARMS[a]["strategy"] for a in arms if config_lib.ARMS[a]["mode"] == "kd"}
    folders += [(wd.store(s), records.store(s)) for s in sorted(strategies)]
  for arm in arms:
    trained = config_lib.ARMS[arm]["mode"] != "none"
    if "train" in stages and trained:
      folders += [(wd.arm(arm) / "adapter", records.train(arm)), (wd.arm(arm) / "train", records.train(arm))]
    # An eval folder's record holds its adapter's bytes; an adapter this run has yet to export is checked later.
    if "eval" in stages and (not trained or (wd.arm(arm) / "adapter" / "adapter_config.json").exists()):
      folders.append((wd.arm(arm) / "eval", records.eval(arm)))
  for folder, expected in folders:
    provenance.check_claimable(folder, wd.name(folder), expected)


def run(c: ml_collections.ConfigDict) -> None:
  """Checks the config, takes the work folder (kdjax.infra.lease: one run at a time), then runs the stages. Every run that
  gets the folder leaves run_records/<id>.json with its outcome and logs/<id>.log with what libraries said and how
  it ended (kdjax.infra.runlog); config.json is replaced only when a run succeeds, so it always shows the config of the
  last good run."""
  # Before validate: jax.distributed must start before anything touches a device (validate's settings objects do).
  parallel.initialize_distributed(c.distributed.coordinator or None, c.distributed.num_processes or None,
                                  None if c.distributed.process_id < 0 else c.distributed.process_id)
  validate(c)
  wd = Workdir(storage.makedirs(storage.path(c.workdir, absolute=True)))  # orbax needs absolute paths
  run_id, held = _take_workdir(wd)
  try:
    with runlog.capture(runlog.log_path(wd.root, run_id, jax.process_index())):
      _run_stages(c, wd, run_id, held)
  finally:
    if held is not None:
      held.release()


def _take_workdir(wd: Workdir):
  """(the run's id, process 0's lease on the work folder or None elsewhere): process 0 takes the lease and every
  process of the job shares it; while another run holds it, WorkdirBusyError (one line naming the holder) on every
  process, before any work."""
  run_id, held, told = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", None, None
  if _writer():
    try:
      held = lease.acquire(wd.root, run_id, processes=jax.process_count())
      told = {"run": run_id}
    except Exception as e:  # the other processes wait for process 0's answer: they get it, then all stop
      no_space = runlog.out_of_space_line(e, wd.root)
      parallel.broadcast_json("kdjax.infra.lease", {"error": no_space or str(e)})
      if no_space:
        raise runlog.OutOfSpaceError(no_space) from e
      raise
  told = parallel.broadcast_json("kdjax.infra.lease", told)
  if "error" in told:
    raise lease.WorkdirBusyError(told["error"])
  if held is not None and held.taken_over:
    log(held.taken_over)
  return told["run"], held


def _run_stages(c, wd: Workdir, run_id: str, held) -> None:
  config = json.loads(c.to_json_best_effort())
  now = lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z")
  run_record = {"status": "running", "started": now(), "config": config}
  record_path = wd.root / "run_records" / f"{run_id}.json"
  try:
    if _writer():
      provenance.write_json(record_path, run_record)
    records = Records(c, wd)
    preflight(c, wd, records)
    for stage in config_lib.stage_names(c):
      lost = parallel.broadcast_json(f"kdjax.infra.lease:{stage}", held.lost if held is not None else None)
      if lost:  # another run took the folder over (this one stalled past the lease's staleness): stop writing
        raise lease.LeaseLostError(f"{lost}; stopped before stage {stage}")
      start = time.time()
      log(f"stage {stage}: start")
      STAGE_FUNCTIONS[stage](c, wd, records)
      parallel.sync(f"kdjax.stage:{stage}:done")  # what process 0 wrote is complete before anyone reads it
      hostmem.release_freed_memory()  # on CPU the heap keeps freed pages (kdjax.infra.hostmem): not past a stage
      resident, peak = hostmem.resident_bytes()
      log(f"stage {stage}: done in {time.time() - start:.1f}s (resident {resident / 2**30:.1f} GiB, "
          f"peak {peak / 2**30:.1f} GiB)")
  except BaseException as e:
    no_space = runlog.out_of_space_line(e, wd.root)
    if no_space:
      no_space += f" (tracebacks in {wd.name(runlog.log_path(wd.root, run_id, jax.process_index()))})"
    if _writer():
      line = no_space or (str(e).strip().splitlines() or [type(e).__name__])[0]
      try:  # on a full disk this record may not fit either; the error line matters more
        provenance.write_json(record_path, {**run_record, "status": f"failed: {type(e).__name__}: {line}",
                                            "ended": now()})
      except OSError:
        pass
    if no_space:
      raise runlog.OutOfSpaceError(no_space) from e
    raise
  if _writer():
    provenance.write_json(record_path, {**run_record, "status": "ok", "ended": now()})
    provenance.write_json(wd.root / "config.json", config)
