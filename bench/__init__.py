"""Benchmarks: each `python -m bench.NAME` measures a side-by-side ratio and writes its section of docs/BENCHMARKS.md."""
