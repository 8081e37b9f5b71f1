"""The command line: bad input is one clear line and exit code 2, before any heavy work."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


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


# ------------------------------------------------------------------------------------------ a full disk


def test_out_of_space_line_names_the_path_the_bytes_wanted_and_free(tmp_path):
  import errno
  from kdjax.infra import runlog
  # tensorstore's words for a failed Orbax write, as a ValueError from the writer thread.
  text = (f'RESOURCE_EXHAUSTED: Error writing "embed.value/0.0" in OCDBT database at local file "{tmp_path}/ocdbt/": '
          f'Failed writing: "{tmp_path}/ocdbt/d/c58d": Failed to write 178839552 bytes to file 5: No space left on '
          "device [os_error_code='28']")
  line = runlog.out_of_space_line(ValueError(text), tmp_path)
  assert line.startswith(f"out of space writing {tmp_path}/ocdbt/d/c58d: 178839552 bytes (170.6 MiB) wanted, ")
  assert " MiB) free there; " in line and "\n" not in line
  # A Python write (the error's own file name), found behind the exception that ended the run.
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "shard.npz.tmp"))
    except OSError as e:
      raise RuntimeError("the stage failed") from e
  except RuntimeError as e:
    line = runlog.out_of_space_line(e, tmp_path)
  assert line.startswith(f"out of space writing {tmp_path / 'shard.npz.tmp'}: ") and "wanted" not in line
  assert runlog.out_of_space_line(ValueError("a bad value"), tmp_path) is None


def test_a_full_disk_is_one_line_and_a_rerun_with_space_resumes(tmp_path, smollm2_gguf):  # ~1 min
  """Issue 24: the demo's convert stage fills a 200 MB work folder (a tmpfs): one line on the console (the file, the
  bytes wanted and free), the writer threads' tracebacks in logs/<run>.log; with space, the same command finishes
  the conversion. Needs root to mount the tmpfs (skipped otherwise)."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(disk)], capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    workdir = disk / "run"
    command = ("--config=configs/demo.py", "--config.stages=convert", "--config.arms=nodistill",
               f"--config.workdir={workdir}")
    proc = _main(*command)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdjax: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    line = errors[0]
    assert line.startswith(f"kdjax: error: out of space writing {workdir}/models/student/"), line
    assert " wanted, " in line and " MiB) free there; " in line and "run again" in line, line
    # Beside the error line, only kdjax's own lines and the progress bar reached the console.
    others = [l for l in proc.stderr.replace("\r", "\n").splitlines() if l.strip() and l not in errors]
    assert all(l.startswith("convert:") for l in others), others
    log_name = line.rsplit("tracebacks in ", 1)[1].rstrip(")")
    log = (workdir / log_name).read_text()
    assert "Traceback" in log and "No space left on device" in log
    assert not (workdir / ".kdjax-lock.json").exists()  # released on the way out
    assert subprocess.run(["mount", "-o", "remount,size=900m", str(disk)]).returncode == 0
    proc = _main(*command)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = sorted(json.loads(p.read_text())["status"] for p in (workdir / "run_records").iterdir())
    assert statuses[0].startswith("failed: ValueError: out of space writing") and statuses[1] == "ok"
    assert "convert: student smollm2 -> " in proc.stdout  # converted again from the start, and finished
    from kdjax.models import checkpoint
    assert checkpoint.read_metadata(workdir / "models" / "student")["config"]["vocab_size"] == 49152
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)
