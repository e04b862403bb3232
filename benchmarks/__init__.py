"""Benchmarks of the RCIG outer step: `python -m benchmarks.NAME` (step, limit, scaling, gpu_all).

They import only `rcig/` (never Ray or gcsfs), so they run unchanged on a bare GPU machine
with JAX, flax, optax and numpy. Each prints a table and writes JSON to
`benchmarks/results/<name>.json` (or `--out`). See BENCHMARKS.md for the figures.
"""
