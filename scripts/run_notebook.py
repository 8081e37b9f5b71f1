"""Executes notebooks/colab_tpu_demo.ipynb on this machine (CI runs it on CPU in its quick mode).

  KDJAX_NOTEBOOK_QUICK=1 python scripts/run_notebook.py [--output=runs/colab_tpu_demo.executed.ipynb]
"""

import argparse
import os
import pathlib
import sys

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--notebook", default=str(REPO / "notebooks" / "colab_tpu_demo.ipynb"))
  parser.add_argument("--output", default=str(REPO / "runs" / "colab_tpu_demo.executed.ipynb"))
  parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  notebook = nbformat.read(args.notebook, as_version=4)
  workdir = REPO / "runs"
  workdir.mkdir(exist_ok=True)
  client = nbclient.NotebookClient(notebook, timeout=args.timeout, kernel_name="python3",
                                   resources={"metadata": {"path": str(workdir)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    print(f"run_notebook: a cell failed: {str(e).splitlines()[-1] if str(e) else e}", file=sys.stderr)
    nbformat.write(notebook, args.output)
    sys.exit(1)
  nbformat.write(notebook, args.output)
  images = sum(1 for cell in notebook.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {}))
  print(f"run_notebook: executed {len(notebook.cells)} cells, {images} plot(s); saved {args.output}")


if __name__ == "__main__":
  main()
