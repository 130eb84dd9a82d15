"""How often each learning test passes: the test itself, run once per seed with LEARNING_TEST_SEED set.

    python -m benchmark.learning_tests --seeds 1-20 [--tests test_dqn test_ddpg] [--workers 2]

A learning test asserts a return the algorithm must earn, on one seed. Another CPU's float kernels give another
trajectory from that seed, so a test is only as good as its pass rate over seeds: each test's docstring states the
count this prints. The output is one line per run and a table of passes per test.
"""

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEARNING_TESTS = {  # test file: the learning test in it
    "test_dqn": "test_learning_cartpole",
    "test_double_dqn": "test_learning_cartpole",
    "test_dueling_dqn": "test_learning_cartpole",
    "test_per_dqn": "test_learning_cartpole",
    "test_dqfd": "test_learning_from_the_shipped_demonstrations",
    "test_ddpg": "test_learning_pendulum",
}


def seeds(text: str) -> list:
    """'1-20' or '3' -> the seeds."""
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def run_test(test: str, seed: int) -> tuple:
    """(passed, seconds, the test's last output line) for one seed."""
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             f"tests/{test}.py::{LEARNING_TESTS[test]}"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "LEARNING_TEST_SEED": str(seed)})
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    reason = next((line for line in lines if line.startswith("E ")), lines[-1] if lines else "")
    return result.returncode == 0, time.time() - started, reason.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seeds, default=seeds("1-20"), help="e.g. 1-20")
    parser.add_argument("--tests", nargs="+", default=list(LEARNING_TESTS), choices=list(LEARNING_TESTS))
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    jobs = [(test, seed) for test in args.tests for seed in args.seeds]
    passes = {test: [] for test in args.tests}
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(run_test, test, seed): (test, seed) for test, seed in jobs}
        for future in concurrent.futures.as_completed(futures):
            (test, seed), (passed, seconds, reason) = futures[future], future.result()
            passes[test].append((seed, passed))
            print(f"{test:18} seed {seed:3}  {'pass' if passed else 'FAIL'}  {seconds:5.0f} s  {'' if passed else reason}",
                  flush=True)
    print(f"\n| test | passed | seeds failed |\n|---|---|---|")
    for test, results in passes.items():
        failed = sorted(seed for seed, passed in results if not passed)
        print(f"| {test}.py::{LEARNING_TESTS[test]} | {len(results) - len(failed)}/{len(results)} | "
              f"{' '.join(map(str, failed)) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
