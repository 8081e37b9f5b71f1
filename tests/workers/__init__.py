"""Entry points and helpers that tests run as subprocesses: `python -m workers.<name>` (see helpers.worker_command)."""
