"""Do two revisions of the scripts compute the same numbers? For a refactoring that must change nothing a run measures.

    python -m benchmark.same_numbers REV_A REV_B [--steps 3000] [--scripts dqn.py ddpg.py]

A revision is anything git names (HEAD~3, a commit, a branch), or "." for the files as they are in the working tree.

Each script is taken from each git revision (with the demonstration file of that revision, for dqfd.py) into a
temporary folder and run there as a user runs it, one seed, a short run; then every TensorBoard scalar the two runs
logged (all but charts/SPS, which is a speed) and the final evaluation's returns are compared value for value. Both
revisions run on this machine with these packages, so any difference comes from the code.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmark.sweep import read_scalars

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["dqn.py", "double_dqn.py", "dueling_dqn.py", "per_dqn.py", "dqfd.py", "ddpg.py"]
TIMED_TAGS = {"charts/SPS"}  # steps per second: differs between any two runs


def short_run_flags(script: str, steps: int) -> list:
    """A short run that still trains: learning starts early enough to leave most of the steps to gradient steps."""
    flags = ["--seed", "1", "--total-timesteps", str(steps), "--eval-episodes", "3", "--eval-every", str(steps // 2)]
    if script == "dqfd.py":
        return flags + ["--pretrain-steps", "200", "--demo-path", "demo_traj_2.npy"]
    return flags + ["--learning-starts", str(steps // 5)]


def run_at(revision: str, script: str, steps: int, folder: Path) -> dict:
    """{tag: [(step, value), ...]} of SCRIPT as it was at REVISION, run in FOLDER."""
    folder.mkdir(parents=True)
    for name in [script] + (["demo_traj_2.npy"] if script == "dqfd.py" else []):
        (folder / name).write_bytes((ROOT / name).read_bytes() if revision == "." else subprocess.run(
            ["git", "show", f"{revision}:{name}"], cwd=ROOT, check=True, capture_output=True).stdout)
    result = subprocess.run([sys.executable, script, *short_run_flags(script, steps)], cwd=folder, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {script} at {revision} failed: {result.stderr.strip().splitlines()[-1:]}")
    run_dir = next((folder / "runs").iterdir())
    return {tag: list(zip(steps_.tolist(), values.tolist()))
            for tag, (steps_, values, _) in read_scalars(run_dir).items() if tag not in TIMED_TAGS}


def compare(a: dict, b: dict) -> str:
    """'same (N scalars)' or the first difference."""
    if a.keys() != b.keys():
        return f"DIFFERENT tags: only in A {sorted(a.keys() - b.keys())}, only in B {sorted(b.keys() - a.keys())}"
    for tag in sorted(a):
        if a[tag] != b[tag]:
            first = next((i for i, (x, y) in enumerate(zip(a[tag], b[tag])) if x != y), min(len(a[tag]), len(b[tag])))
            return f"DIFFERENT {tag}: at entry {first} of {len(a[tag])} vs {len(b[tag])}"
    return f"same ({sum(map(len, a.values()))} scalars in {len(a)} tags; eval {[v for _, v in a['eval/episodic_return']]})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument("--steps", type=int, default=3000, help="environment steps of each run")
    parser.add_argument("--scripts", nargs="+", default=SCRIPTS)
    args = parser.parse_args()
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        for script in args.scripts:
            runs = [run_at(revision, script, args.steps, Path(tmp) / label / script)
                    for label, revision in [("a", args.rev_a), ("b", args.rev_b)]]
            verdict = compare(*runs)
            differ += verdict.startswith("DIFFERENT")
            print(f"{script:15} {verdict}", flush=True)
    print(f"{len(args.scripts) - differ} of {len(args.scripts)} scripts give the same numbers at {args.rev_a} and {args.rev_b}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
