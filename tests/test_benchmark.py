"""benchmark/bench.py: the benchmark's runner on a tiny grid, our script beside the SB3 peer."""

import csv
import subprocess
import sys

import pytest

from benchmark import bench, sweep
from helpers import ROOT, assert_one_line_error, read_scalars


def run_bench(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark.bench", *arguments], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_every_cell_of_the_full_grid_passes_its_script_s_own_checks():
    runs = bench.make_runs(bench.CELLS, None, {})
    assert len(runs) == sum(len(cell.seeds or bench.SEEDS) for cell in bench.CELLS)
    assert len({run.key for run in runs}) == len(runs)  # no two runs are the same run
    for cell, demo_file in [("dqfd/CartPole-v1", "demo_traj_2.npy"), ("dqfd-cut-400/CartPole-v1", "cut_400.npy"),
                            ("dqfd-half-trained/CartPole-v1", "half_trained_1.npy"), ("dqfd-mixed/CartPole-v1", "mixed_1.npy")]:
        dqfd_runs = [run for run in runs if run.setting == cell]
        assert len(dqfd_runs) == 10  # the course's protocol on seeds 1-10
        assert all(any(path.endswith(demo_file) for path in run.inputs) for run in dqfd_runs)  # the demo file travels


def test_tiny_grid_our_script_beside_the_sb3_peer_gives_the_table_and_plots(tmp_path):
    pytest.importorskip("matplotlib", reason="the benchmark's plots need benchmark/requirements.txt")
    pytest.importorskip("stable_baselines3", reason="the SB3 peer needs benchmark/requirements.txt")
    out = tmp_path / "bench"
    # SB3's CartPole DQN starts learning at step 1000: 1200 steps make both learn a little.
    result = run_bench("--cells", "dqn/CartPole-v1", "sb3-dqn/CartPole-v1", "--seeds", "1", "2",
                       "--set", "total-timesteps=1200", "learning-starts=100", "eval-episodes=2", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert sorted((row["cell"], row["seed"]) for row in rows) == [
        ("dqn/CartPole-v1", "1"), ("dqn/CartPole-v1", "2"), ("sb3-dqn/CartPole-v1", "1"), ("sb3-dqn/CartPole-v1", "2")]
    for row in rows:
        assert row["status"] == "ok" and float(row["sps"]) > 0, row
        assert row["env_id"] == "CartPole-v1" and float(row["solved_at"]) == 475, row  # read from each run's first line
        scalars = read_scalars(out / row["run_dir"])
        assert len(scalars["eval/episodic_return"]) == 2 and scalars["charts/episodic_return"]
    summary = (out / "summary.md").read_text()
    for cell_row in ["| dqn/CartPole-v1 | `dqn.py` | 1200 | 2/2 |", "| sb3-dqn/CartPole-v1 | `benchmark/sb3_peer.py` | 1200 | 2/2 |"]:
        line = next(line for line in summary.splitlines() if line.startswith(cell_row))
        assert line.split(" | ")[5].endswith("/2"), line  # solved: both runs judged against CartPole's 475
    assert "| CartPole-v1 | raw environment, random actions |" in summary
    for plot in ["curves_CartPole-v1_steps.png", "curves_CartPole-v1_wall.png"]:
        assert (out / plot).read_bytes()[:4] == b"\x89PNG" and plot in summary


def test_the_summary_shows_a_dash_where_a_cell_never_measures_episodes_to_threshold(tmp_path):
    cells = [cell for cell in bench.CELLS if cell.name in ("dqn/CartPole-v1", "dqfd/CartPole-v1")]
    runs, records = [], []
    for cell, seed, episodes in [(cells[0], 1, None), (cells[0], 2, None),  # dqn.py never measures it
                                 (cells[1], 1, 20), (cells[1], 2, 30), (cells[1], 3, None)]:  # dqfd.py: seed 3 never reached it
        runs.append(sweep.Run(ROOT / cell.script, dict(cell.flags), seed, cell.name, group="CartPole-v1"))
        records.append({"key": f"{cell.name}{seed}", "script": cell.script, "flags": cell.flags, "seed": seed,
                        "setting": cell.name, "group": "CartPole-v1", "status": "ok", "eval_mean": 500.0,
                        "eval_std": 0.0, "measures_threshold": cell.script == "dqfd.py", "episodes_to_threshold": episodes,
                        "wall_s": 10.0, "sps": 100, "run_dir": None, "error": ""})
    bench.write_bench_outputs(tmp_path, runs, records, cells, {"CartPole-v1": 1000.0}, "the command", "workers")
    summary = (tmp_path / "summary.md").read_text().splitlines()
    # dqfd: 20, 30, inf at positions 0..2: median 30; 25th at 0.5 -> 20 + 0.5 * 10 = 25; 75th at 1.5,
    # between 30 and inf -> inf ("not reached"). dqn: never measured, "–".
    table = summary[summary.index("## CartPole-v1") + 2:][:4]
    assert table == [
        "| cell | script | steps | runs ok | eval, median [IQR] | solved | episodes to threshold, median [IQR] "
        "| steps/s, median [IQR] | wall s, median [IQR] |",
        "|---|---|---|---|---|---|---|---|---|",
        "| dqn/CartPole-v1 | `dqn.py` | 50000 | 2/2 | 500.0 [500.0, 500.0] | – | – | 100 [100, 100] | 10 [10, 10] |",
        "| dqfd/CartPole-v1 | `dqfd.py` | default | 3/3 | 500.0 [500.0, 500.0] | – | 30 [25, not reached] "
        "| 100 [100, 100] | 10 [10, 10] |",
    ]
    assert "| 3 | not reached in the run | 10 |" in summary  # the course's protocol, seed 3: the run ended first


def test_an_unknown_cell_ends_with_one_sentence(tmp_path):
    result = run_bench("--cells", "no-such-cell/*", "--out", str(tmp_path / "bench"))
    assert_one_line_error(result, "no-such-cell")
    assert not (tmp_path / "bench").exists()


def test_episodes_to_threshold_counts_the_first_20_episode_mean_that_reaches_it():
    from benchmark.episodes_to import episodes_to

    # by hand: 19 returns of 190 and one of 390 average (19 * 190 + 390) / 20 = 200 at episode 20
    assert episodes_to([190] * 19 + [390], 200) == 20
    assert episodes_to([190] * 19 + [389], 200) is None
    # 25 episodes of 100, then 300s: at episode k the window holds k - 25 of 300, a mean of 100 + 10 (k - 25),
    # first >= 200 at k = 35
    assert episodes_to([100] * 25 + [300] * 20, 200) == 35
    assert episodes_to([500] * 19, 200) is None  # fewer than 20 episodes: no 20-episode mean
