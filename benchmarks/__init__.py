"""Benchmark and tooling scripts, run from the repository root: ``python -m benchmarks.NAME`` or
``python benchmarks/NAME.py``. Not part of the installed package."""
