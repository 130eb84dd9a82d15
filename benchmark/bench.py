"""The benchmark: this repo's scripts over several seeds, beside Stable-Baselines3 run in the same grid
on the same machine, with the raw environment step rate as the speed ceiling and the course's
protocol for dqfd.py.

    python -m benchmark.bench --out benchmark/results

Every cell of CELLS below runs once per seed on benchmark.sweep's runner (same backends, same
resume: the same command again runs only what is missing). Writes OUT/results.csv (one row per run),
OUT/summary.md (the tables), OUT/curves_<env>_steps.png and OUT/curves_<env>_wall.png (mean and a
band of one standard deviation across seeds, against environment steps and against wall time) and
every run under OUT/runs/. A quick look at a few cells:

    python -m benchmark.bench --cells 'dqn/*' 'sb3-dqn/*' --seeds 1 2 --set total-timesteps=5000 --out /tmp/quick
"""

import argparse
import fnmatch
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from benchmark import sweep

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [1, 2, 3, 4, 5]


@dataclass
class Cell:
    name: str  # "<what>/<env>": what runs (a script, a script with other flags, the peer) on which env
    script: str  # relative to the repo root
    flags: dict
    seeds: Optional[list] = None  # None: SEEDS
    course_protocol: bool = False  # report the course's DQfD protocol for this cell
    notes: str = ""


# Step budgets are the RL Zoo's (CartPole 50k, LunarLander 100k, Pendulum 20k) for every cell of an env.
# "-sb3-hparams" cells are our scripts with SB3's RL Zoo hyperparameters where they map, so their speed
# is compared with SB3's on equal work (the same number of gradient steps of the same batch size).
# SB3 on CartPole runs its 128 gradient steps in a burst every 256 env steps and copies the target every 10 env
# steps between bursts, so each burst trains against a copy made just before it: one copy per 128 gradient steps.
# Spread out evenly (a gradient step every 2 env steps), that is a copy every 256 env steps; a copy every 10 env
# steps (5 gradient steps) at lr 2.3e-3 diverged here (greedy return 9 on 5 of 5 seeds).
SB3_DQN_CARTPOLE = {"learning-rate": 2.3e-3, "batch-size": 64, "buffer-size": 100_000, "learning-starts": 1_000,
                    "gamma": 0.99, "tau": 1.0, "target-network-frequency": 256, "start-e": 1.0, "end-e": 0.04,
                    "exploration-fraction": 0.16, "hidden-size": 256,
                    "train-frequency": 2}  # SB3: 128 gradient steps every 256 env steps = 1 every 2
SB3_DQN_LUNAR = {"learning-rate": 6.3e-4, "batch-size": 128, "buffer-size": 50_000, "learning-starts": 0,
                 "gamma": 0.99, "tau": 1.0, "target-network-frequency": 250, "start-e": 1.0, "end-e": 0.1,
                 "exploration-fraction": 0.12, "hidden-size": 256,
                 "train-frequency": 1}  # SB3: train_freq 4 with gradient_steps -1 = 1 gradient step per env step
SB3_DDPG_PENDULUM = {"gamma": 0.98, "buffer-size": 200_000, "learning-starts": 10_000, "noise": "gaussian",
                     "noise-sigma": 0.1, "actor-learning-rate": 1e-3, "critic-learning-rate": 1e-3,
                     "critic-weight-decay": 0.0, "batch-size": 256, "tau": 0.005,  # SB3's DDPG defaults
                     "hidden-sizes": "400 300"}

TEN, FIVE, THREE = list(range(1, 11)), list(range(1, 6)), [1, 2, 3]
# benchmark/make_demos.py's held-out files (the tuning files are under benchmark/tuning/dqfd-CartPole-v1/demos)
IMPERFECT_DEMOS = {"cut-400": "benchmark/dqfd-demos/cut_400.npy", "half-trained": "benchmark/dqfd-demos/half_trained_1.npy",
                   "mixed": "benchmark/dqfd-demos/mixed_1.npy"}

# A cell for every (script, environment) pair the targets of issues 15 and 16 name, on the seeds they name,
# with the RL Zoo peer beside it wherever the Zoo has settings for the environment.
CELLS = [
    # CartPole-v1, 50k steps (the scripts' defaults); target: >= 475 on 9 of seeds 1-10, each script
    Cell("dqn/CartPole-v1", "dqn.py", {"env-id": "CartPole-v1", "total-timesteps": 50_000}, seeds=TEN),
    Cell("double_dqn/CartPole-v1", "double_dqn.py", {"env-id": "CartPole-v1", "total-timesteps": 50_000}, seeds=TEN),
    Cell("dueling_dqn/CartPole-v1", "dueling_dqn.py", {"env-id": "CartPole-v1", "total-timesteps": 50_000}, seeds=TEN),
    Cell("per_dqn/CartPole-v1", "per_dqn.py", {"env-id": "CartPole-v1", "total-timesteps": 50_000}, seeds=TEN),
    Cell("dqn-sb3-hparams/CartPole-v1", "dqn.py", {"env-id": "CartPole-v1", "total-timesteps": 50_000, **SB3_DQN_CARTPOLE}),
    Cell("sb3-dqn/CartPole-v1", "benchmark/sb3_peer.py", {"env-id": "CartPole-v1", "total-timesteps": 50_000}, seeds=TEN),
    # LunarLander-v3, 200k steps (the peer runs); target: median >= 200 over seeds 1-5, each script
    Cell("dqn/LunarLander-v3", "dqn.py", {"env-id": "LunarLander-v3", "total-timesteps": 200_000}, seeds=FIVE),
    Cell("double_dqn/LunarLander-v3", "double_dqn.py", {"env-id": "LunarLander-v3", "total-timesteps": 200_000}, seeds=FIVE),
    Cell("dueling_dqn/LunarLander-v3", "dueling_dqn.py", {"env-id": "LunarLander-v3", "total-timesteps": 200_000},
         seeds=FIVE),
    Cell("per_dqn/LunarLander-v3", "per_dqn.py", {"env-id": "LunarLander-v3", "total-timesteps": 200_000}, seeds=FIVE),
    Cell("dqn-sb3-hparams/LunarLander-v3", "dqn.py", {"env-id": "LunarLander-v3", "total-timesteps": 200_000,
                                                       **SB3_DQN_LUNAR}, seeds=FIVE),
    Cell("sb3-dqn/LunarLander-v3", "benchmark/sb3_peer.py", {"env-id": "LunarLander-v3", "total-timesteps": 200_000},
         seeds=FIVE),
    # MountainCar-v0 (the lecture notes); target: median >= -110 over seeds 1-5
    *[Cell(f"{script}/MountainCar-v0", f"{script}.py", {"env-id": "MountainCar-v0", "total-timesteps": 120_000}, seeds=FIVE)
      for script in ("dqn", "double_dqn", "dueling_dqn", "per_dqn")],
    Cell("sb3-dqn/MountainCar-v0", "benchmark/sb3_peer.py", {"env-id": "MountainCar-v0"}, seeds=FIVE),
    # Taxi-v4 (the lecture notes, one-hot observations); target: median >= 7 over seeds 1-5; the Zoo has no Taxi
    Cell("dqn/Taxi-v4", "dqn.py", {"env-id": "Taxi-v4", "total-timesteps": 100_000}, seeds=FIVE),
    Cell("double_dqn/Taxi-v4", "double_dqn.py", {"env-id": "Taxi-v4", "total-timesteps": 100_000}, seeds=FIVE),
    Cell("dueling_dqn/Taxi-v4", "dueling_dqn.py", {"env-id": "Taxi-v4", "total-timesteps": 100_000}, seeds=FIVE),
    Cell("per_dqn/Taxi-v4", "per_dqn.py", {"env-id": "Taxi-v4", "total-timesteps": 100_000}, seeds=FIVE),
    # Pendulum-v1, 15k steps (ddpg.py's defaults); target: median >= -150 over seeds 1-10
    Cell("ddpg/Pendulum-v1", "ddpg.py", {"env-id": "Pendulum-v1", "total-timesteps": 15_000}, seeds=TEN),
    Cell("ddpg-sb3-hparams/Pendulum-v1", "ddpg.py", {"env-id": "Pendulum-v1", "total-timesteps": 20_000, **SB3_DDPG_PENDULUM}),
    Cell("sb3-ddpg/Pendulum-v1", "benchmark/sb3_peer.py", {"env-id": "Pendulum-v1", "total-timesteps": 20_000}, seeds=TEN),
    # MountainCarContinuous-v0; target: >= 90 on seeds 1-5
    Cell("ddpg/MountainCarContinuous-v0", "ddpg.py", {"env-id": "MountainCarContinuous-v0", "total-timesteps": 50_000},
         seeds=FIVE),
    Cell("sb3-ddpg/MountainCarContinuous-v0", "benchmark/sb3_peer.py", {"env-id": "MountainCarContinuous-v0"}, seeds=FIVE),
    # LunarLanderContinuous-v3, 300k steps; target: median >= 200 over seeds 1-3
    Cell("ddpg/LunarLanderContinuous-v3", "ddpg.py", {"env-id": "LunarLanderContinuous-v3", "total-timesteps": 300_000},
         seeds=THREE),
    Cell("sb3-ddpg/LunarLanderContinuous-v3", "benchmark/sb3_peer.py", {"env-id": "LunarLanderContinuous-v3"},
         seeds=THREE),
    # The course's protocol, seeds 1-10: DQfD with the shipped expert file (target: 20 on 10/10) and with
    # 400 imperfect transitions of each kind (target: every seed within 250 episodes, median <= 25)
    Cell("dqfd/CartPole-v1", "dqfd.py", {"env-id": "CartPole-v1", "demo-path": "demo_traj_2.npy"},
         seeds=TEN, course_protocol=True),
    *[Cell(f"dqfd-{kind}/CartPole-v1", "dqfd.py", {"env-id": "CartPole-v1", "demo-path": path}, seeds=TEN,
           course_protocol=True) for kind, path in IMPERFECT_DEMOS.items()],
    # LunarLander-v3 from 5 episodes of dqn.py's seed-101 agent; target: the 20-episode mean reaches 200 in fewer
    # episodes than dqn/LunarLander-v3's runs (python -m benchmark.episodes_to 200 RUN_DIRS counts those)
    Cell("dqfd/LunarLander-v3", "dqfd.py", {"env-id": "LunarLander-v3", "demo-path": "benchmark/dqfd-demos/lunarlander_101.npy"},
         seeds=FIVE),
]

# The course's DQfD (CONTEXT.md, document 1): at most 250 episodes; the score is the first episode at
# which the mean of the last 20 episode returns reaches 475.
COURSE_MAX_EPISODES = 250
COURSE_RESULT = ("averages of 63.4, 37.2 and 35.6 episodes over three batches of five seeds (best single "
                 "run 22), 9 to 15 minutes of wall time per seed")


def select_cells(patterns: list) -> list:
    """The cells whose names match any of the glob patterns ('dqn/*', '*/CartPole-v1')."""
    if not patterns:
        return list(CELLS)
    chosen = [cell for cell in CELLS if any(fnmatch.fnmatchcase(cell.name, p) for p in patterns)]
    if not chosen:
        raise sweep.GridError(f"no cell matches {' '.join(patterns)}; the cells are: {', '.join(c.name for c in CELLS)}.")
    return chosen


def parse_overrides(entries: list) -> dict:
    """["total-timesteps=5000"] -> {"total-timesteps": "5000"}."""
    overrides = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        if not sep or not sweep.flag_name(name) or not value.strip():
            raise sweep.GridError(f"--set entry '{entry}' is not NAME=VALUE.")
        overrides[sweep.flag_name(name)] = value.strip()
    return overrides


def make_runs(cells: list, seeds: Optional[list], overrides: dict) -> list:
    """The runs of the cells, each checked by its script's own Args and check_args. --set overrides a flag
    in each cell whose script has it; --seeds replaces every cell's seeds."""
    import typing

    runs = []
    for cell in cells:
        script = ROOT / cell.script
        module = sweep.load_script(script)
        fields = typing.get_type_hints(module.Args)
        flags = {name: str(value) for name, value in cell.flags.items()}
        flags.update({name: value for name, value in overrides.items() if name.replace("-", "_") in fields})
        for seed in seeds or cell.seeds or SEEDS:
            run = sweep.Run(script, flags, seed, setting=cell.name, group=flags.get("env-id", ""))
            runs.append(sweep.prepare(run, exp_name=cell.name.split("/")[0]))
    return runs


def raw_env_rate(env_id: str, seconds: float = 2.0) -> float:
    """Environment steps per second with random actions in this process: the ceiling of any agent's rate."""
    import gymnasium as gym

    env = gym.make(env_id)
    env.reset(seed=0)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(1000)]
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        steps += len(actions)
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def machine() -> str:
    """A line naming this machine: CPU model, cores, OS, Python, torch."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{model}, {os.cpu_count()} cores; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_bench_outputs(out: Path, runs: list, records: list, cells: list, rates: dict, command: str,
                        workers_line: str) -> None:
    """results.csv, summary.md and the two learning-curve PNGs of each environment."""
    sweep.write_results_csv(out / "results.csv", [{**r, "cell": r["setting"], "env": r["group"], "flags_given": " ".join(
        f"{k}={v}" for k, v in r["flags"].items() if k != "env-id")} for r in records], [],
        leading=("cell", "script", "env", "flags_given"))
    cell_by_name = {cell.name: cell for cell in cells}
    envs = list(dict.fromkeys(run.group for run in runs))
    lines = ["# Benchmark", "", f"`{command}`", "", f"Machine: {machine()}.", workers_line, "",
             "Each cell runs once per seed; numbers are the median and interquartile range [IQR] over seeds. "
             "eval: the mean return of the final greedy evaluation (10 episodes unless --eval-episodes says otherwise). steps/s: environment "
             "steps per second of training, measured while the other runs of the grid shared the machine; "
             "wall s: each run's whole process, start-up and evaluation included.", ""]
    for env in envs:
        env_runs = [run for run in runs if run.group == env]
        settings = list(dict.fromkeys(run.setting for run in env_runs))
        rows = sweep.summarize([r for r in records if r["group"] == env], settings)
        with_threshold = any(row["episodes_to_threshold"] for row in rows)
        lines += [f"## {env}", "", "| cell | script | steps | runs ok | eval, median [IQR] | solved |"
                  + (" episodes to threshold, median [IQR] |" if with_threshold else "")
                  + " steps/s, median [IQR] | wall s, median [IQR] |",
                  "|---|---|---|---|---|---|" + ("---|" if with_threshold else "") + "---|---|"]
        for row in rows:
            cell = cell_by_name[row["setting"]]
            steps = next(run.flags.get("total-timesteps", "default") for run in env_runs if run.setting == cell.name)
            line = (f"| {cell.name} | `{cell.script}` | {steps} | {row['ok']}/{row['finished']} "
                    f"| {sweep.fmt_quartiles(row['eval_mean'])} | {sweep.fmt_solved(row)} |")
            if with_threshold:
                line += f" {sweep.fmt_quartiles(row['episodes_to_threshold'], 0)} |"
            lines.append(line + f" {sweep.fmt_quartiles(row['sps'], 0)} | {sweep.fmt_quartiles(row['wall_s'], 0)} |")
        lines += ["", f"![{env}, against environment steps](curves_{env}_steps.png)",
                  f"![{env}, against wall time](curves_{env}_wall.png)", ""]
        env_records = [r for r in records if r["group"] == env]
        for x, label in (("step", "environment steps"), ("wall", "seconds since the run started")):
            sweep.plot_curves(out / f"curves_{env}_{'steps' if x == 'step' else 'wall'}.png",
                              sweep.learning_curves(out, env_records, x=x), f"{env}: mean ± std over seeds", label,
                              order=settings)
    lines += ["## Speed against the ceiling", "",
              "The raw rate is the environment alone stepped with random actions in one process (measured "
              "before the grid started, with nothing else of the benchmark running): no agent can step faster.", "",
              "| env | cell | steps/s, median | share of the raw rate |", "|---|---|---|---|"]
    for env in envs:
        lines.append(f"| {env} | raw environment, random actions | {rates[env]:,.0f} | 100% |")
        env_rows = sweep.summarize([r for r in records if r["group"] == env],
                                   list(dict.fromkeys(run.setting for run in runs if run.group == env)))
        for row in env_rows:
            if row["sps"]:
                lines.append(f"| {env} | {row['setting']} | {row['sps'][0]:,.0f} | {100 * row['sps'][0] / rates[env]:.1f}% |")
    lines.append("")
    for cell in cells:
        if cell.course_protocol:
            lines += course_protocol_section(cell, [r for r in records if r["setting"] == cell.name])
    failures = [r for r in records if r["status"] != sweep.OK]
    if failures:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- {r['setting']} seed {r['seed']}: {r['status']}: {r['error']}" for r in failures] + [""]
    (out / "summary.md").write_text("\n".join(lines))


def course_protocol_section(cell: Cell, records: list) -> list:
    """Per seed: the episode at which the mean of the last 20 returns first reached 475, and the wall time."""
    ok = sorted((r for r in records if r["status"] == sweep.OK), key=lambda r: r["seed"])
    episodes = [r["episodes_to_threshold"] for r in ok]
    reached = [e for e in episodes if e is not None and e <= COURSE_MAX_EPISODES]
    lines = [f"## The course's protocol: {cell.name}", "",
             f"Score: the first episode at which the mean of the last 20 episode returns reaches 475 "
             f"(CartPole-v1's threshold), within at most {COURSE_MAX_EPISODES} episodes. The course's DQfD: {COURSE_RESULT}.", "",
             "| seed | episodes to 475 | wall s |", "|---|---|---|"]
    for r in ok:
        e = r["episodes_to_threshold"]
        shown = ("not reached in the run" if e is None
                 else e if e <= COURSE_MAX_EPISODES else f"not within {COURSE_MAX_EPISODES}")
        lines.append(f"| {r['seed']} | {shown} | {r['wall_s']:.0f} |")
    if reached:
        import statistics

        walls = [r["wall_s"] for r in ok]
        lines += ["", f"Reached in {len(reached)} of {len(ok)} seeds: mean {statistics.mean(reached):.1f} episodes, "
                      f"median {statistics.median(reached):g}, best {min(reached)}; wall time per seed: median "
                      f"{statistics.median(walls):.0f} s, at most {max(walls):.0f} s.", ""]
    else:
        lines += ["", f"Reached in none of {len(ok)} seeds.", ""]
    return lines


def main(argv: Optional[list] = None) -> int:
    parser = sweep.OneLineParser(
        prog="python -m benchmark.bench",
        description="Run the benchmark's cells over their seeds and write the tables and plots to OUT; "
                    "the same command again runs only what is missing.")
    parser.add_argument("--out", type=Path, required=True, help="the folder of the results")
    parser.add_argument("--cells", nargs="+", default=[], metavar="PATTERN",
                        help="only the cells whose names match (globs: 'dqn/*', '*/CartPole-v1'); default: all")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="replace every cell's seeds")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                        help="override a flag in every selected cell whose script has it (e.g. total-timesteps=5000)")
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--workers", type=int, default=None, help="runs at once (default: the number of cores)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    os.chdir(ROOT)  # the cells' paths (scripts, demo files) are relative to the repo root
    made_by = "python -m benchmark.bench"
    signal.signal(signal.SIGINT, sweep.stop_like_ctrl_c)
    signal.signal(signal.SIGTERM, sweep.stop_like_ctrl_c)
    try:
        if args.workers is not None and args.workers < 1:
            raise sweep.GridError(f"--workers must be at least 1, got {args.workers}.")
        if args.ray_address and args.backend != "ray":
            raise sweep.GridError("--ray-address needs --backend ray.")
        if args.seeds and len(set(args.seeds)) != len(args.seeds):
            raise sweep.GridError(f"--seeds lists a seed twice: {' '.join(map(str, args.seeds))}.")
        if out.exists() and not out.is_dir():
            raise sweep.GridError(f"--out {args.out} is a file, not a folder.")
        cells = select_cells(args.cells)
        runs = make_runs(cells, args.seeds, parse_overrides(args.set))
        sweep.check_out(out, made_by)
        sweep.check_plotting()
        if args.backend == "ray":
            sweep.import_ray(args.ray_address)
        command = "python -m benchmark.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
        rates = {}
        for env in dict.fromkeys(run.group for run in runs):
            rates[env] = raw_env_rate(env)
            print(f"raw {env} step rate (random actions, one process): {rates[env]:,.0f} steps/s", flush=True)
    except sweep.GridError as e:
        sweep.fail(str(e))
    except KeyboardInterrupt:
        print("interrupted before any run started.", flush=True)
        return 130
    start = time.time()
    records, _, interrupted = sweep.execute(runs, out, made_by, args.backend, args.workers, args.ray_address)
    workers = args.workers or (os.cpu_count() if args.backend == "local" else None)
    workers_line = (f"Backend: {args.backend}" + (f", {workers} runs at once" if workers else "")
                    + f"; this invocation took {time.time() - start:.0f} s.")
    write_bench_outputs(out, runs, records, cells, rates, command, workers_line)
    bad = sum(record["status"] != sweep.OK for record in records)
    if interrupted:
        print(f"interrupted: {len(records)} of {len(runs)} runs finished and kept in {out}; the same command resumes.")
        return 130
    print(f"{len(records) - bad} ok, {bad} failed or lost; results in {out / 'summary.md'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
