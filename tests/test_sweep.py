"""benchmark/sweep.py: grids of flags times seeds, locally and on a Ray cluster that loses a node."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmark import sweep
from helpers import ROOT, assert_one_line_error, read_scalars

TINY = ["total-timesteps=300", "learning-starts=100", "eval-episodes=2"]


def run_sweep(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m benchmark.sweep ARGUMENTS...` from the repo root, as the README starts it."""
    return subprocess.run([sys.executable, "-m", "benchmark.sweep", *arguments], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def read_rows(out: Path) -> list:
    with open(out / "results.csv") as file:
        return list(csv.DictReader(file))


def assert_run_folder(out: Path, row: dict) -> None:
    """The run's TensorBoard file came back whole: its greedy evaluation episodes are all in it."""
    run_dir = out / row["run_dir"]
    assert list(run_dir.glob("events.out.tfevents.*")), run_dir
    assert len(read_scalars(run_dir)["eval/episodic_return"]) == 2


# --- pieces, against numbers worked out by hand -------------------------------------------------

def test_grid_parsing_and_cross_product():
    grid = sweep.parse_grid(["--n_step=1,10", "lambda-e=0, 1", "gamma=0.95"])
    assert grid == {"n-step": ["1", "10"], "lambda-e": ["0", "1"], "gamma": ["0.95"]}
    settings = sweep.grid_settings(grid)
    assert len(settings) == 4  # 2 x 2 x 1
    assert settings[0] == {"n-step": "1", "lambda-e": "0", "gamma": "0.95"}
    assert settings[3] == {"n-step": "10", "lambda-e": "1", "gamma": "0.95"}
    for bad in [[], ["n-step"], ["n-step="], ["seed=1,2"], ["gamma=0.9", "gamma=0.95"]]:
        with pytest.raises(sweep.GridError):
            sweep.parse_grid(bad)


def test_flags_become_the_command_a_user_types():
    import dqn
    argv = sweep.flag_argv(dqn, "dqn.py", {"learning-rate": "1e-3", "capture-video": "true", "save-model": "off"})
    assert argv == ["--learning-rate", "1e-3", "--capture-video", "--no-save-model"]


def test_median_and_interquartile_range_by_hand():
    # Sorted 1, 2, 4, 10 at positions 0..3; percentile p sits at position 3p (linear interpolation):
    # median at 1.5 -> (2 + 4) / 2 = 3; 25th at 0.75 -> 1 + 0.75 * 1 = 1.75; 75th at 2.25 -> 4 + 0.25 * 6 = 5.5.
    assert sweep.quartiles([10, 1, None, 4, 2]) == pytest.approx((3.0, 1.75, 5.5))
    assert sweep.quartiles([None]) is None


def test_learning_curves_average_every_seed_up_to_the_right_edge(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for run_dir, episodes in [("a", [(100, 10.0), (200, 20.0)]), ("b", [(100, 30.0), (400, 30.0)])]:
        with SummaryWriter(tmp_path / run_dir) as writer:
            for step, episode_return in episodes:
                writer.add_scalar("charts/episodic_return", episode_return, step)
    records = [{"setting": "s", "status": "ok", "run_dir": run_dir} for run_dir in ("a", "b")]
    grid, mean, std = sweep.learning_curves(tmp_path, records, points=5)["s"]
    # Grid 0, 100, 200, 300, 400. Run a's smoothed curve is 10 then (10 + 20) / 2 = 15, held after its
    # last episode at 200; run b's is 30 throughout. Before the first episode there is no data.
    assert grid.tolist() == [0, 100, 200, 300, 400]
    assert mean[1:].tolist() == pytest.approx([20.0, 22.5, 22.5, 22.5])
    assert std[1:].tolist() == pytest.approx([10.0, 7.5, 7.5, 7.5])
    assert np.isnan(mean[0])


def test_summary_ranks_settings_and_counts_unreached_thresholds():
    def record(setting, seed, episodes, status="ok"):
        return {"setting": setting, "seed": seed, "status": status, "eval_mean": 500.0, "sps": 100,
                "wall_s": 10.0, "measures_threshold": True, "episodes_to_threshold": episodes}
    records = [record("slow", 1, 60), record("slow", 2, 80), record("slow", 3, 70),
               record("fast", 1, 30), record("fast", 2, None), record("fast", 3, 20),  # seed 2: never reached
               record("steady", 1, 30), record("steady", 2, 30), record("steady", 3, 30),
               record("broken", 1, None, status="failed")]
    rows, ranked_by = sweep.rank(sweep.summarize(records, ["slow", "fast", "broken", "steady"]))
    assert "episodes" in ranked_by
    # fast: 20, 30, inf -> median 30, 75th percentile inf; steady: 30, 30, 30 -> median 30, 75th 30, so
    # steady ranks above fast; slow: 60, 70, 80 -> median 70; broken: no run ok -> last
    assert [row["setting"] for row in rows] == ["steady", "fast", "slow", "broken"]
    rows = rows[1:]
    assert rows[0]["episodes_to_threshold"][0] == 30 and rows[0]["reached"] == 2 and rows[0]["ok"] == 3
    assert rows[1]["episodes_to_threshold"] == pytest.approx((70, 65, 75))
    assert rows[2]["ok"] == 0 and rows[2]["finished"] == 1


def test_settings_that_never_reached_the_threshold_rank_below_those_that_did_then_by_return():
    """The DQfD ablation a user ran: lambda-n=0 never reached the threshold (eval 471.4); the full DQfD did not reach
    it either on these seeds but evaluated at 500; n-step=1 reached it on every seed though it evaluated lower."""
    def record(setting, eval_mean, episodes):
        return {"setting": setting, "seed": 1, "status": "ok", "eval_mean": eval_mean, "sps": 100, "wall_s": 10.0,
                "measures_threshold": True, "episodes_to_threshold": episodes}
    records = [record("lambda-n=0", 471.4, None), record("lambda-n=0", 471.4, None),
               record("full", 500.0, None), record("full", 500.0, None),
               record("n-step=1", 300.0, 40), record("n-step=1", 300.0, 50)]
    rows, ranked_by = sweep.rank(sweep.summarize(records, ["lambda-n=0", "full", "n-step=1"]))
    assert [row["setting"] for row in rows] == ["n-step=1", "full", "lambda-n=0"]
    assert "then by return" in ranked_by


def test_a_sweep_without_matplotlib_is_refused_before_any_run(tmp_path, fake_script):
    """matplotlib draws the curves after the last run: without it, the sweep says so before the first."""
    (tmp_path / "no_matplotlib").mkdir()
    (tmp_path / "no_matplotlib" / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    result = subprocess.run([sys.executable, "-m", "benchmark.sweep", str(fake_script), "--grid", "seconds=0",
                             "--seeds", "1", "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "no_matplotlib")}, timeout=60)
    assert_one_line_error(result, "matplotlib", "benchmark/requirements.txt")
    assert not (tmp_path / "out" / "runs").exists()


def test_settings_without_a_threshold_rank_by_return_then_by_the_lower_quartile():
    def record(setting, eval_mean):
        return {"setting": setting, "seed": 1, "status": "ok", "eval_mean": eval_mean, "sps": 100, "wall_s": 10.0,
                "measures_threshold": False, "episodes_to_threshold": None}
    records = [record("shaky", 500.0), record("shaky", 500.0), record("shaky", 100.0),  # median 500, q25 300
               record("solid", 500.0), record("solid", 500.0), record("solid", 500.0),  # median 500, q25 500
               record("weak", 300.0), record("weak", 300.0), record("weak", 300.0)]
    rows, ranked_by = sweep.rank(sweep.summarize(records, ["weak", "shaky", "solid"]))
    assert "return" in ranked_by
    assert [row["setting"] for row in rows] == ["solid", "shaky", "weak"]
    assert rows[1]["eval_mean"] == pytest.approx((500.0, 300.0, 500.0))


def test_the_table_shows_a_dash_for_a_metric_never_measured_and_not_reached_for_one_never_reached():
    def record(setting, episodes, measures=True):
        return {"setting": setting, "status": "ok", "eval_mean": 500.0, "sps": 100, "wall_s": 10.0,
                "measures_threshold": measures, "episodes_to_threshold": episodes}
    records = [record("n-step=1", 20), record("n-step=1", 30), record("n-step=1", None),  # never reached
               record("n-step=10", 40), record("n-step=10", 60),
               record("n-step=100", None), record("n-step=100", None),
               record("no-threshold", None, measures=False), record("no-threshold", None, measures=False)]
    rows, _ = sweep.rank(sweep.summarize(records, ["n-step=100", "no-threshold", "n-step=10", "n-step=1"]))
    # n-step=1: 20, 30, inf at positions 0..2: median 30; 25th at 0.5 -> 20 + 0.5 * 10 = 25; 75th at 1.5,
    # between 30 and inf -> inf. n-step=10: 40, 60: median at 0.5 -> 50; 25th at 0.25 -> 45; 75th -> 55.
    # n-step=100: inf, inf. no-threshold: no run measures it. Ranked by (median, 75th): 30, 50, then the
    # two at (inf, inf) in the order given.
    assert sweep.summary_table(rows) == [
        "| rank | setting | runs ok | eval return, median [IQR] | solved | episodes to threshold, median [IQR] | reached "
        "| wall s, median [IQR] | steps/s, median [IQR] |",
        "|---|---|---|---|---|---|---|---|---|",
        "| 1 | n-step=1 | 3/3 | 500.0 [500.0, 500.0] | – | 30 [25, not reached] | 2/3 | 10 [10, 10] | 100 [100, 100] |",
        "| 2 | n-step=10 | 2/2 | 500.0 [500.0, 500.0] | – | 50 [45, 55] | 2/2 | 10 [10, 10] | 100 [100, 100] |",
        "| 3 | n-step=100 | 2/2 | 500.0 [500.0, 500.0] | – | not reached [not reached, not reached] | 0/2 | 10 [10, 10] "
        "| 100 [100, 100] |",
        "| 4 | no-threshold | 2/2 | 500.0 [500.0, 500.0] | – | – | – | 10 [10, 10] | 100 [100, 100] |",
    ]


def test_solved_counts_the_runs_at_or_above_their_environment_s_reward_threshold():
    def record(setting, eval_mean, solved_at, status="ok"):
        return {"setting": setting, "status": status, "eval_mean": eval_mean, "sps": 100, "wall_s": 10.0,
                "measures_threshold": False, "episodes_to_threshold": None, "solved_at": solved_at}
    # CartPole-v1 is solved at 475: 500 and 475.0 count, 474.9 does not, a failed run is not judged;
    # Pendulum-v1 has no threshold: nothing is judged and the table shows a dash
    records = [record("cartpole", 500.0, 475.0), record("cartpole", 474.9, 475.0), record("cartpole", 475.0, 475.0),
               record("cartpole", None, 475.0, status="failed"), record("pendulum", -150.0, None)]
    rows, _ = sweep.rank(sweep.summarize(records, ["cartpole", "pendulum"]))
    assert [(row["solved"], row["judged"]) for row in rows] == [(2, 3), (0, 0)]
    assert [line.split(" | ")[4] for line in sweep.summary_table(rows)[2:]] == ["2/3", "–"]


@pytest.mark.parametrize("first_line, env_id, threshold", [
    ("dqn on CartPole-v1, seed 1: the settings tuned for CartPole-v1", "CartPole-v1", 475.0),
    ("SB3 DQN on LunarLander-v3, seed 41: logging to runs/x", "LunarLander-v3", 200.0),
    ("ddpg on Pendulum-v1, seed 3: the script's defaults", "Pendulum-v1", None),
    ("dqn on MountainCar-v0, seed 2: the settings tuned for MountainCar-v0", "MountainCar-v0", -110.0),
])
def test_the_environment_and_its_threshold_come_from_the_first_printed_line(first_line, env_id, threshold):
    match = sweep.ENV_LINE.search(first_line + "\ndevice: cpu\neval: 1.0 ± 0.0 over 10 greedy episodes\n")
    assert match.group(1) == env_id and sweep.solved_at(env_id) == threshold


@pytest.mark.parametrize("stdout, measures", [
    ("episodes to threshold: 23 (the mean of episodes 4-23 reached 475)\n", True),
    ("episodes to threshold: not reached in 41 episodes (the mean of 20 episode returns never reached 475)\n", True),
    ("episodes to threshold: MountainCarContinuous-v0 has no reward threshold\n", False),
    ("eval: 500.0 ± 0.0 over 10 greedy episodes\n", False),  # a script that never measures it
])
def test_a_run_measures_episodes_to_threshold_when_it_prints_a_number_or_not_reached(tmp_path, stdout, measures):
    run = sweep.Run(ROOT / "dqfd.py", {}, 1, "s")
    result = {"returncode": 0, "stdout": stdout, "stderr": "", "wall_s": 1.0, "files": {}}
    assert sweep.make_record(tmp_path, run, result)["measures_threshold"] is measures


def test_records_from_an_older_ledger_measure_the_threshold_when_a_run_of_their_script_reached_it(tmp_path):
    lines = [{"key": "a", "script": "dqfd.py", "episodes_to_threshold": 23},
             {"key": "b", "script": "dqfd.py", "episodes_to_threshold": None},
             {"key": "c", "script": "dqn.py", "episodes_to_threshold": None}]
    (tmp_path / sweep.LEDGER).write_text("".join(json.dumps(line) + "\n" for line in lines))
    ledger = sweep.read_ledger(tmp_path)
    assert [ledger[key]["measures_threshold"] for key in "abc"] == [True, True, False]


# --- the command, as a user runs it ---------------------------------------------------------------

def test_local_2x2_grid_then_the_same_command_resumes_without_starting_a_run(tmp_path):
    out = tmp_path / "sweep"
    command = ["dqn.py", "--grid", "learning-rate=5e-4,1e-3", *TINY, "--seeds", "1", "2", "--out", str(out), "--workers", "2"]
    result = run_sweep(*command)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_rows(out)
    assert sorted((row["learning-rate"], row["seed"]) for row in rows) == [("1e-3", "1"), ("1e-3", "2"), ("5e-4", "1"), ("5e-4", "2")]
    for row in rows:
        assert row["status"] == "ok" and row["script"] == "dqn.py" and row["total-timesteps"] == "300", row
        assert float(row["eval_mean"]) > 0 and float(row["sps"]) > 0 and float(row["wall_s"]) > 0
        assert_run_folder(out, row)
    summary = (out / "summary.md").read_text()
    assert "| learning-rate=5e-4 | 2/2 |" in summary and "| learning-rate=1e-3 | 2/2 |" in summary
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"

    runs_before = sorted(path.name for path in (out / "runs").iterdir())
    ledger_before = (out / sweep.LEDGER).read_text()
    again = run_sweep(*command)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "4 already finished" in again.stdout and "0 to run" in again.stdout
    assert sorted(path.name for path in (out / "runs").iterdir()) == runs_before  # no new run folder
    assert (out / sweep.LEDGER).read_text() == ledger_before  # no run recorded
    assert read_rows(out) == rows


def test_a_failing_setting_gives_a_failed_row_and_the_rest_finish(tmp_path):
    out = tmp_path / "sweep"
    # Pendulum-v1 passes dqn.py's check_args (it is a registered env) but the script refuses its Box actions.
    result = run_sweep("dqn.py", "--grid", "env-id=Pendulum-v1,CartPole-v1", *TINY, "--seeds", "1", "--out", str(out))
    assert result.returncode == 1, result.stdout + result.stderr
    rows = {row["env-id"]: row for row in read_rows(out)}
    assert rows["Pendulum-v1"]["status"] == "failed" and "ddpg.py" in rows["Pendulum-v1"]["error"]
    assert rows["CartPole-v1"]["status"] == "ok"
    assert_run_folder(out, rows["CartPole-v1"])


def test_values_are_checked_by_the_script_s_own_args_and_check_args():
    import dqn
    with pytest.raises(sweep.GridError, match="--batch-size .512. cannot exceed --buffer-size"):  # dqn.check_args
        sweep.parse_script_args(dqn, "dqn.py", ["--batch-size", "512", "--buffer-size", "100"])
    with pytest.raises(sweep.GridError, match="--learning-rate"):  # tyro cannot parse it as a float
        sweep.parse_script_args(dqn, "dqn.py", ["--learning-rate", "abc"])
    assert sweep.parse_script_args(dqn, "dqn.py", ["--learning-rate", "1e-3"]).learning_rate == 0.001


@pytest.mark.parametrize("grid, words", [
    (["no-such-flag=1,2"], ["--no-such-flag"]),                        # an unknown flag name
    (["batch-size=64,512", "buffer-size=100"], ["--batch-size"]),       # a value the script's check_args refuses
    (["learning-rate="], ["no values"]),                                # an empty grid entry
    ([], ["empty"]),                                                    # no grid at all
])
def test_a_bad_grid_ends_with_one_sentence_before_any_run(tmp_path, grid, words):
    out = tmp_path / "sweep"
    result = run_sweep("dqn.py", *(["--grid", *grid] if grid else []), "--seeds", "1", "--out", str(out))
    assert_one_line_error(result, *words)
    assert not out.exists()


# --- the runner's edges: signals, files that flags name, a shared --out --------------------------

# A script a sweep can run, fast: it sleeps --seconds (and then first writes its pid and working folder
# to --report); --die makes it print a warning and kill itself with SIGKILL.
FAKE_SCRIPT = '''
import dataclasses, json, os, signal, sys, time
import tyro

@dataclasses.dataclass
class Args:
    seed: int = 1
    """the seed"""
    seconds: float = 0.0
    """how long the run sleeps"""
    report: str = ""
    """a file to write the run's pid and working folder to"""
    die: bool = False
    """print a warning, then kill itself with SIGKILL"""
    exp_name: str = "fake"
    """the run's name"""

def check_args(args):
    return None

if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.seconds and args.report:
        with open(args.report + ".partial", "w") as file:
            json.dump({"pid": os.getpid(), "cwd": os.getcwd()}, file)
        os.replace(args.report + ".partial", args.report)
    if args.die:
        print("UserWarning: a warning that is not why the run ended", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(args.seconds)
    print("eval: 1.0 ± 0.0 over 1 greedy episodes")
'''


@pytest.fixture
def fake_script(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(FAKE_SCRIPT)
    return path


@pytest.mark.parametrize("backend, stop", [("local", signal.SIGTERM), ("local", signal.SIGINT), ("ray", signal.SIGTERM)])
def test_sigterm_stops_like_ctrl_c_keeping_finished_runs_and_no_temporary_folder(tmp_path, fake_script, request,
                                                                                   backend, stop):
    out, report = tmp_path / "sweep", tmp_path / "report.json"
    ray_flags = ["--backend", "ray", "--ray-address", request.getfixturevalue("ray_cluster").address] if backend == "ray" else []
    # One worker: seconds=0 finishes first, then seconds=120 starts and is stopped while it sleeps.
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmark.sweep", str(fake_script), "--grid", "seconds=0,120", f"report={report}",
         "--seeds", "1", "--out", str(out), "--workers", "1", *ray_flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (report.exists() and (out / sweep.LEDGER).exists()):
            assert process.poll() is None and time.time() < deadline, process.communicate()
            time.sleep(0.1)
        run = json.loads(report.read_text())
        assert Path(run["cwd"]).is_dir() and Path(f"/proc/{run['pid']}").exists()  # the second run is sleeping
        process.send_signal(stop)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stdout + stderr
    assert stderr == "", stderr
    assert stdout.strip().splitlines()[-1] == (f"interrupted: 1 of 2 runs finished and kept in {out}; "
                                               "the same command resumes.")
    # The stopped run is not left running, nor its temporary folder. A Ray task sees the stop within a second, kills
    # its run and deletes its folder, and the sweep waits for it; allow seconds for the worker to get there.
    deadline = time.time() + 30
    while (Path(f"/proc/{run['pid']}").exists() or Path(run["cwd"]).exists()) and time.time() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{run['pid']}").exists() and not Path(run["cwd"]).exists()
    rows = read_rows(out)
    assert [(row["seconds"], row["status"]) for row in rows] == [("0", "ok")]
    assert len((out / sweep.LEDGER).read_text().splitlines()) == 1


def test_a_run_killed_by_a_signal_shows_the_signal_not_its_last_warning(tmp_path, fake_script):
    out = tmp_path / "sweep"
    result = run_sweep(str(fake_script), "--grid", "die=true", "--seeds", "1", "--out", str(out))
    assert result.returncode == 1, result.stdout + result.stderr
    [row] = read_rows(out)
    assert row["status"] == "failed" and row["error"] == "killed by signal SIGKILL", row
    assert "killed by signal SIGKILL" in result.stdout


@pytest.mark.parametrize("script", ["dqn.py", "dqfd.py"])
def test_a_grid_that_would_save_demonstrations_is_refused_before_any_run(tmp_path, script):
    out = tmp_path / "sweep"
    result = run_sweep(script, "--grid", "save-demos=demos.npy", *TINY, "--seeds", "1", "--out", str(out))
    assert_one_line_error(result, "--save-demos", "one run of the script")
    assert not out.exists() and not (ROOT / "demos.npy").exists()


def test_only_input_file_flags_travel_and_a_value_naming_a_file_stays_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-run").write_text("a file whose name is also the run's name")
    demos = tmp_path / "elsewhere" / "demos.npy"
    demos.parent.mkdir()
    demos.write_bytes((ROOT / "demo_traj_2.npy").read_bytes())
    # --exp-name is a string flag that names a file here: it is passed as written, nothing travels
    run = sweep.prepare(sweep.Run(ROOT / "dqn.py", {"exp-name": "my-run", **dict(f.split("=") for f in TINY)}, 1, "s"))
    assert run.argv[:2] == ["--exp-name", "my-run"] and run.inputs == {}
    # --demo-path names an input file: it travels to inputs/demo-path/ on the worker, and the flag follows it
    run = sweep.prepare(sweep.Run(ROOT / "dqfd.py", {"demo-path": str(demos), "exp-name": str(demos.name)}, 1, "s"))
    assert run.argv[:4] == ["--demo-path", "inputs/demo-path/demos.npy", "--exp-name", "demos.npy"]
    assert run.inputs == {"inputs/demo-path/demos.npy": str(demos)}
    # a relative path travels to the same relative path
    run = sweep.prepare(sweep.Run(ROOT / "dqfd.py", {"demo-path": "elsewhere/demos.npy"}, 1, "s"))
    assert run.argv[:2] == ["--demo-path", "elsewhere/demos.npy"] and run.inputs == {"elsewhere/demos.npy": str(demos)}


def test_an_out_holding_another_script_s_sweep_is_refused_and_its_results_kept(tmp_path, fake_script):
    out = tmp_path / "sweep"
    first = run_sweep(str(fake_script), "--grid", "seconds=0", "--seeds", "1", "--out", str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    results, ledger = (out / "results.csv").read_text(), (out / sweep.LEDGER).read_text()
    other = tmp_path / "other.py"
    other.write_text(FAKE_SCRIPT)
    second = run_sweep(str(other), "--grid", "seconds=0", "--seeds", "1", "--out", str(out))
    assert_one_line_error(second, "python -m benchmark.sweep fake.py", "a folder of its own")
    assert (out / "results.csv").read_text() == results and (out / sweep.LEDGER).read_text() == ledger
    bench_run = subprocess.run([sys.executable, "-m", "benchmark.bench", "--cells", "dqn/CartPole-v1", "--out", str(out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_one_line_error(bench_run, "python -m benchmark.sweep fake.py")
    assert (out / "results.csv").read_text() == results
    # the same script again resumes in its own folder
    again = run_sweep(str(fake_script), "--grid", "seconds=0", "--seeds", "1", "--out", str(out))
    assert again.returncode == 0 and "1 already finished" in again.stdout, again.stdout + again.stderr


# --- the Ray backend on a two-node cluster on this machine, one node removed mid-sweep -----------

def children(pid: int) -> list:
    """Every live descendant of `pid` (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def listening_addresses(pids: list) -> set:
    """The local addresses of the TCP sockets that `pids` listen on (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.add(fields[1].rsplit(":", 1)[0])
    return addresses


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::1, ::ffff:127.0.0.1


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head node with one CPU on 127.0.0.1, shut down at the end of the module."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read at import: Ray stays on the loopback interface
    pytest.importorskip("ray", reason="the Ray backend needs benchmark/requirements.txt")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                             "include_dashboard": False})
    try:
        yield cluster
    finally:
        cluster.shutdown()


def run_folder_of(pid: int) -> str:
    """The run folder a script process has created in its working folder, or ""."""
    try:
        names = [path.name for path in Path(f"/proc/{pid}/cwd/runs").iterdir()]
    except OSError:
        return ""
    return names[0] if names else ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches processes through /proc")
def test_ray_cluster_losing_a_node_mid_sweep_loses_and_duplicates_no_run(tmp_path, ray_cluster):
    worker_node = ray_cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    worker_raylet = worker_node.all_processes["raylet"][0].process.pid
    out = tmp_path / "sweep"
    sweep_process = subprocess.Popen(
        [sys.executable, "-m", "benchmark.sweep", "dqn.py", "--grid", "learning-rate=5e-4,1e-3",
         "total-timesteps=1000", "learning-starts=100", "eval-episodes=2", "--seeds", "1", "2", "--out", str(out),
         "--backend", "ray", "--ray-address", ray_cluster.address],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Wait until a run on the worker node has started training (its run folder exists), then remove the node.
        deadline, killed_pid, killed_run = time.time() + 120, None, ""
        while not killed_run:
            assert sweep_process.poll() is None and time.time() < deadline, "no run reached the worker node"
            time.sleep(0.1)
            for pid in children(worker_raylet):
                if "dqn.py" in cmdline(pid) and run_folder_of(pid):
                    killed_pid, killed_run = pid, run_folder_of(pid)
        assert listening_addresses(children(os.getpid())) <= LOOPBACK  # every Ray process listens on 127.0.0.1 only
        ray_cluster.remove_node(worker_node)
        output, _ = sweep_process.communicate(timeout=240)
    finally:
        if sweep_process.poll() is None:
            sweep_process.kill()
    assert sweep_process.returncode == 0, output
    assert not Path(f"/proc/{killed_pid}").exists()  # the script died with its node: no orphan goes on running
    rows = read_rows(out)
    # Every run exactly once, each ok with its event file
    assert sorted((row["learning-rate"], row["seed"]) for row in rows) == [("1e-3", "1"), ("1e-3", "2"), ("5e-4", "1"), ("5e-4", "2")]
    for row in rows:
        assert row["status"] == "ok", row
        assert_run_folder(out, row)
    run_folders = sorted(path.name for path in (out / "runs").iterdir())
    assert len(run_folders) == 4 and len((out / sweep.LEDGER).read_text().splitlines()) == 4
    # The run killed with its node was re-run elsewhere: its setting and seed are there once, from a later start.
    same_run = [name for name in run_folders if name.rsplit("__", 1)[0] == killed_run.rsplit("__", 1)[0]]
    assert len(same_run) == 1 and same_run[0] != killed_run, (killed_run, run_folders)
