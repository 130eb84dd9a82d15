"""Imperfect demonstration files for dqfd.py, about 400 transitions each, in the course's layout.

    python -m benchmark.make_demos --out benchmark/demos --seeds 1 2 3

The shipped demo_traj_2.npy holds a perfect expert's 1000 transitions; DQfD at its easiest. These files
are what a user is more likely to have (the course had about 400 transitions):
  cut_400.npy          the shipped episodes cut to their first 200 steps each (an expert, but short)
  half_trained_S.npy   greedy episodes of dqn.py stopped early (--total-timesteps 8000, seed S): an
                       agent that balances for a while and then fails, cut to 400 transitions
  mixed_S.npy          a mix of good and poor play: 150 expert steps (the shipped file's first episode),
                       150 of a greedy episode of dqn.py after 8000 steps, then greedy episodes of
                       dqn.py after 600 steps (seed S), which barely balances, up to 400
Every file is made by running dqn.py itself (`--save-demos`), so a seed gives the same file on the same
machine; the files used in benchmark/ are committed, because float paths can differ between CPUs.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TRANSITIONS = 400
# dqn.py's training steps behind the poor play of mixed files (an agent of 2500 steps balanced for 100 steps and more)
POOR_STEPS = 600


def record(seed: int, steps: int, episodes: int, folder: Path) -> list:
    """Greedy episodes of dqn.py after `steps` training steps with `seed` (our own file: safe to unpickle)."""
    path = folder / f"dqn_{seed}_{steps}.npy"
    subprocess.run([sys.executable, str(ROOT / "dqn.py"), "--seed", str(seed), "--total-timesteps", str(steps),
                    "--learning-starts", str(min(1000, steps // 2)), "--eval-episodes", "1",
                    "--save-demos", str(path), "--demo-episodes", str(episodes)],
                   cwd=folder, check=True, capture_output=True, text=True)
    return [list(episode) for episode in np.load(path, allow_pickle=True)]


def first_transitions(episodes: list, n: int = TRANSITIONS) -> np.ndarray:
    """The episodes in order, the last one cut so the file holds exactly n transitions (a cut episode
    ends with done False: it bootstraps, like a time-limit truncation)."""
    kept, total = [], 0
    for episode in episodes:
        if total >= n:
            break
        kept.append(episode[: n - total])
        total += len(kept[-1])
    if total < n:
        raise SystemExit(f"error: the episodes hold only {total} transitions, fewer than {n}.")
    array = np.empty(len(kept), dtype=object)
    for i, episode in enumerate(kept):
        array[i] = episode
    return array


def save(path: Path, array: np.ndarray) -> None:
    with open(path, "xb") as file:  # never overwrite an existing file
        np.save(file, array, allow_pickle=True)
    lengths = [len(episode) for episode in array]
    returns = [sum(step[2] for step in episode) for episode in array]
    print(f"{path}: {len(array)} episodes of {lengths} steps, returns {returns}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    expert = [list(episode) for episode in np.load(ROOT / "demo_traj_2.npy", allow_pickle=True)]
    if not (args.out / "cut_400.npy").exists():
        save(args.out / "cut_400.npy", first_transitions([episode[:200] for episode in expert]))
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            half_trained = record(seed, 8000, 12, Path(folder))
            save(args.out / f"half_trained_{seed}.npy", first_transitions(half_trained))
            poor = record(seed, POOR_STEPS, 40, Path(folder))
            save(args.out / f"mixed_{seed}.npy", first_transitions([expert[0][:150], half_trained[0][:150], *poor]))


if __name__ == "__main__":
    main()
