"""benchmark/sweep.py: grids of flags times seeds, locally and on a Ray cluster that loses a node."""

import csv
import os
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
                "wall_s": 10.0, "episodes_to_threshold": episodes}
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


def test_settings_without_a_threshold_rank_by_return_then_by_the_lower_quartile():
    def record(setting, eval_mean):
        return {"setting": setting, "seed": 1, "status": "ok", "eval_mean": eval_mean, "sps": 100, "wall_s": 10.0,
                "episodes_to_threshold": None}
    records = [record("shaky", 500.0), record("shaky", 500.0), record("shaky", 100.0),  # median 500, q25 300
               record("solid", 500.0), record("solid", 500.0), record("solid", 500.0),  # median 500, q25 500
               record("weak", 300.0), record("weak", 300.0), record("weak", 300.0)]
    rows, ranked_by = sweep.rank(sweep.summarize(records, ["weak", "shaky", "solid"]))
    assert "return" in ranked_by
    assert [row["setting"] for row in rows] == ["solid", "shaky", "weak"]
    assert rows[1]["eval_mean"] == pytest.approx((500.0, 300.0, 500.0))


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
