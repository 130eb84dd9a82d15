"""How fast per_dqn.py's prioritized replay is: the sum tree alone, and whole training runs.

1. A full 1,000,000-slot buffer: the time to sample a batch of 128 (stratified descent of the sum
   tree, importance weights, gathering the transitions) and to update their 128 priorities.
2. Training steps per second of per_dqn.py and double_dqn.py with the same flags, run alternately
   in one session so both see the same machine load; prints each run, the medians and their ratio.
   Each run is measured twice: the steps/s it prints (wall time of its training loop) and the CPU
   time of its process, less that of a start-up run (--total-timesteps 1001: imports, 1000 random
   steps, one evaluation episode), per training step. On a machine busy with other work the wall
   time swings with the load; the CPU time much less, so its ratio is the steadier one.

Run from the repo root:  python benchmark/per_speed.py [--runs 3] [--total-timesteps 10000]
"""

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import per_dqn  # noqa: E402


def time_tree(capacity: int, batch_size: int, repeats: int, seed: int = 0) -> tuple:
    """Median seconds to sample batch_size transitions from a full buffer, and to update their priorities."""
    rng = np.random.default_rng(seed)
    rb = per_dqn.ReplayBuffer(capacity, gym.spaces.Box(-1, 1, shape=(4,), dtype=np.float32), seed, alpha=0.6)
    rb.update_priorities(np.arange(capacity), rng.exponential(size=capacity) + 1e-6)  # fill every slot at once
    rb.size, rb.position = capacity, 0
    sample_times, update_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        *_, indices = rb.sample(batch_size, beta=0.4)
        middle = time.perf_counter()
        rb.update_priorities(indices, rng.exponential(size=batch_size) + 1e-6)
        end = time.perf_counter()
        sample_times.append(middle - start)
        update_times.append(end - middle)
    return float(np.median(sample_times)), float(np.median(update_times))


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_script(script: str, flags: list, seed: int) -> tuple:
    """Run SCRIPT in a scratch folder: (the training steps/s of its summary line, its process's CPU seconds)."""
    cpu_before = child_cpu_seconds()
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([sys.executable, str(ROOT / script), "--seed", str(seed), *flags],
                                cwd=scratch, capture_output=True, text=True)
    cpu_seconds = child_cpu_seconds() - cpu_before
    if result.returncode != 0:
        sys.exit(f"error: {script} failed: {result.stderr.strip().splitlines()[-1:]}")
    return int(re.search(r"\((\d+) steps/s in training\)", result.stdout).group(1)), cpu_seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs (seeds) of each script")
    parser.add_argument("--total-timesteps", type=int, default=10_000, help="training steps of each run")
    parser.add_argument("--capacity", type=int, default=1_000_000, help="slots of the buffer timed alone")
    parser.add_argument("--skip-training", action="store_true", help="time the tree only")
    cli = parser.parse_args()
    if cli.runs < 1 or cli.total_timesteps <= 1000 or cli.capacity < 128:
        sys.exit("error: --runs must be at least 1, --total-timesteps above 1000 and --capacity at least 128.")

    sample_s, update_s = time_tree(cli.capacity, 128, repeats=1000)
    print(f"sum tree, {cli.capacity:,} slots full, batch 128: sample {sample_s * 1e6:.0f} us, "
          f"update priorities {update_s * 1e6:.0f} us (median of 1000)")
    if cli.skip_training:
        sys.exit(0)

    flags = ["--total-timesteps", str(cli.total_timesteps), "--learning-starts", "1000", "--eval-episodes", "1"]
    scripts = ["double_dqn.py", "per_dqn.py"]
    startup_cpu = {script: run_script(script, ["--total-timesteps", "1001", *flags[2:]], 1)[1] for script in scripts}
    speeds, cpu_us = {script: [] for script in scripts}, {script: [] for script in scripts}
    for seed in range(1, cli.runs + 1):
        for script in scripts:  # alternate, so slow spells of a shared machine hit both scripts
            wall_rate, cpu_seconds = run_script(script, flags, seed)
            speeds[script].append(wall_rate)
            cpu_us[script].append((cpu_seconds - startup_cpu[script]) / (cli.total_timesteps - 1001) * 1e6)
            print(f"{script:14s} seed {seed}: {wall_rate} steps/s, {cpu_us[script][-1]:.0f} us of CPU per training step",
                  flush=True)
    wall = {script: float(np.median(values)) for script, values in speeds.items()}
    cpu = {script: float(np.median(values)) for script, values in cpu_us.items()}
    print(f"medians over {cli.runs} seeds ({' '.join(flags)}): double_dqn.py {wall['double_dqn.py']:.0f} steps/s, "
          f"{cpu['double_dqn.py']:.0f} us CPU/step; per_dqn.py {wall['per_dqn.py']:.0f} steps/s, {cpu['per_dqn.py']:.0f} us "
          f"CPU/step; speed ratio per/double: {wall['per_dqn.py'] / wall['double_dqn.py']:.2f} by steps/s, "
          f"{cpu['double_dqn.py'] / cpu['per_dqn.py']:.2f} by CPU time")
