"""What the tests share: running a script as a user would, and reading back its TensorBoard log."""

import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent

# The DQN family's learning test (dqn, double_dqn, dueling_dqn, per_dqn): CartPole-v1 for 20k steps, epsilon decaying
# over the first 30%, every flag the family shares pinned (so tuning the defaults does not move the test), and a greedy
# evaluation of 5 episodes every 1000 steps. Each test adds its paper's own flags.
CARTPOLE_LEARNING = ["--total-timesteps", "20000", "--exploration-fraction", "0.3", "--start-e", "1.0", "--end-e", "0.01",
                     "--learning-starts", "1000", "--batch-size", "128", "--buffer-size", "50000", "--gamma", "0.99",
                     "--tau", "0.005", "--target-network-frequency", "1", "--train-frequency", "1", "--hidden-size", "128",
                     "--huber-delta", "1.0", "--eval-every", "1000", "--eval-every-episodes", "5"]


def run_script(script: str, *flags: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python SCRIPT FLAGS...` in `cwd`, as a user would start it; output captured as text."""
    return subprocess.run([sys.executable, str(ROOT / script), *flags], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "SDL_VIDEODRIVER": "dummy"})


def run_ok(script: str, *flags: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Like run_script, and fail the test with the script's own output when it exits non-zero."""
    result = run_script(script, *flags, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def only_run_dir(cwd: Path) -> Path:
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def read_scalars(run_dir: Path) -> dict:
    """{tag: [(step, value), ...]} from the TensorBoard event file(s) in run_dir."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """A user error: non-zero exit, no traceback, one line on stderr that mentions `words`."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def learning_seed(default: int) -> str:
    """A learning test's seed: its own, or LEARNING_TEST_SEED's (benchmark/learning_tests.py counts passes over seeds)."""
    return os.environ.get("LEARNING_TEST_SEED", str(default))


def best_greedy_return(run_dir: Path) -> float:
    """The best of a run's --eval-every greedy evaluations (each the mean return of its episodes)."""
    return max(value for _, value in read_scalars(run_dir)["eval/periodic_mean_return"])
