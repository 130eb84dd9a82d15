"""Benchmark and sweep tools for the scripts of this repo (not needed to run a script).

benchmark.sweep: the grid runner, `python -m benchmark.sweep SCRIPT --grid ... --seeds ... --out DIR`.
benchmark.bench: the multi-seed benchmark beside Stable-Baselines3, `python -m benchmark.bench --out DIR`.
Their extra dependencies are in benchmark/requirements.txt.
"""
