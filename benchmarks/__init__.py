"""Benchmarks and measurements, each a module: `python -m benchmarks.<name>` from the repository root. Each prints
ratios against a reference measured in the same run; dated figures are in docs/benchmarks.md."""
