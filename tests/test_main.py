"""The command line: bad input is one clear line and exit code 2, before any heavy work."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "kdjax.main", *args], capture_output=True, text=True, cwd=cwd,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)


def _one_line_error(proc, needle):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert needle in lines[0], lines[0]


def test_unknown_config_key():
  _one_line_error(_main("--config=configs/gt.py", "--config.no_such_key=1"), "unknown config key 'no_such_key'")


def test_misspelt_nested_key_is_one_clean_line():
  proc = _main("--config=configs/gt.py", "--config.train.batch_sizee=3")
  _one_line_error(proc, "unknown config key 'train.batch_sizee' (did you mean 'train.batch_size'?)")
  assert "\\" not in proc.stderr and "Did you mean" not in proc.stderr


def test_bad_value_type():
  _one_line_error(_main("--config=configs/gt.py", "--config.train.batch_size=abc"), "batch_size")


def test_missing_config_file():
  _one_line_error(_main("--config=configs/nope.py"), "config file not found")


def test_missing_model_path(tmp_path):
  _one_line_error(_main("--config=configs/gt.py", f"--config.workdir={tmp_path}",
                        f"--config.student.source={tmp_path / 'no_model'}",
                        f"--config.teacher.source={tmp_path / 'no_model'}"), "model not found")
  assert not (tmp_path / "models").exists()  # nothing was started


def test_missing_data_path(tmp_path):
  _one_line_error(_main("--config=configs/demo.py", f"--config.workdir={tmp_path}",
                        f"--config.data.source={tmp_path / 'no_gsm8k'}"), "GSM8K not found")


def test_unknown_stage_and_arm(tmp_path):
  _one_line_error(_main("--config=configs/demo.py", "--config.stages=convert,fly"), "unknown stage")
  _one_line_error(_main("--config=configs/demo.py", "--config.arms=ground_truth,magic"), "unknown arm")



def _several_processes(*args, **env) -> bool:
  """kdjax.main's answer, in a child: importing kdjax.main tunes the importing process's malloc."""
  code = f"import sys; sys.argv = ['kdjax.main', *{list(args)!r}]; import kdjax.main as m; print(m._several_processes())"
  child_env = {k: v for k, v in os.environ.items() if k != "KDJAX_NUM_PROCESSES"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**child_env, "JAX_PLATFORMS": "cpu", **env}, timeout=120)
  return {"True": True, "False": False}[out.stdout.strip().splitlines()[-1]]


def test_freed_memory_is_kept_on_a_single_process_only():
  assert not _several_processes("--config=configs/demo.py")
  assert not _several_processes("--config.distributed.num_processes=1")
  assert _several_processes("--config.distributed.num_processes=2")
  assert _several_processes(KDJAX_NUM_PROCESSES="2")
