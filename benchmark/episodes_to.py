"""The first episode at which the mean of the last 20 training returns reaches a threshold, read from
runs' TensorBoard logs: the measure dqfd.py prints, for the runs of scripts that do not print it.

    python -m benchmark.episodes_to 200 benchmark/results-lunarlander/runs/LunarLander-v3__dqn__*
"""

import argparse
from pathlib import Path
from typing import Optional

import numpy as np

from benchmark.sweep import read_scalars

WINDOW = 20  # the course's protocol: a 20-episode mean


def episodes_to(returns, threshold: float) -> Optional[int]:
    """The 1-based episode at which the mean of the last WINDOW returns first reaches threshold (None: never)."""
    returns = np.asarray(returns, dtype=float)
    if len(returns) < WINDOW:
        return None
    means = np.lib.stride_tricks.sliding_window_view(returns, WINDOW).mean(axis=1)  # means[i]: episodes i+1 .. i+WINDOW
    reached = np.flatnonzero(means >= threshold)
    return int(reached[0]) + WINDOW if len(reached) else None


def finite(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"the threshold must be a finite number, got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("threshold", type=finite)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    counts = []
    for run_dir in args.run_dirs:
        scalars = read_scalars(run_dir, {"charts/episodic_return"}) if run_dir.is_dir() else {}
        if "charts/episodic_return" not in scalars:
            raise SystemExit(f"{run_dir} holds no charts/episodic_return: not a run folder of these scripts.")
        returns = scalars["charts/episodic_return"][1]
        count = episodes_to(returns, args.threshold)
        counts.append(np.inf if count is None else count)
        print(f"{run_dir}: {count if count else 'not reached'} (of {len(returns)} episodes)")
    median = np.median(counts)
    print(f"median: {'not reached' if np.isinf(median) else f'{median:g}'} (not reached counted as last)")


if __name__ == "__main__":
    main()
