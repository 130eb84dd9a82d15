"""The grid runner: multi-seed ablation sweeps by flags, on this machine or on a Ray cluster.

    python -m benchmark.sweep dqfd.py --grid n-step=1,10 lambda-e=0,1 --seeds 1 2 3 4 5 --out sweeps/dqfd

A grid entry with one value is a fixed flag, one with several is swept; the runs are the cross product
of the values times the seeds. Each run is the script itself, started as a user starts it
(`python dqfd.py --n-step 1 --lambda-e 0 --seed 3`) in a fresh temporary folder on its worker: the
script's source and the input files its flags name (INPUT_FILE_FLAGS: --demo-path, --load-model)
travel with the run, and the run's TensorBoard files and summary numbers come back as its result, so
no shared filesystem is needed; a flag that writes a file elsewhere (--save-demos) is refused. The
driver writes every run under OUT/runs/ as a local run would, then OUT/results.csv (one row per run),
OUT/summary.md (median and interquartile range over seeds per setting, ranked) and OUT/curves.png.
Re-running the same command skips every run that already finished, so an interrupted sweep (Ctrl-C or
SIGTERM) resumes; OUT belongs to the sweeps of one script, and another script's sweep is refused there.

Backends: `local` (a pool of processes on this machine) and `ray` (one Ray task per run asking for
one CPU, re-run elsewhere by Ray when its worker or node dies). Ray tasks rather than Ray Tune: a run
is a black-box process with no trial scheduling, early stopping or search to drive, and plain tasks
bring the retries we need with nothing beyond the `ray` package. The multi-seed benchmark
(benchmark/bench.py) runs on this same runner.
"""

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import typing
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np

OK, FAILED, LOST = "ok", "failed", "lost"  # LOST: the backend could not finish it; a resume re-runs it
LEDGER = "finished.jsonl"  # one JSON line per finished run: what resume reads and the tables are made from
MAX_RETRIES = 3  # Ray re-runs a task whose worker or node died this many times
# Flags that name a file the run reads: the file travels with the run. Any other flag is passed as written.
INPUT_FILE_FLAGS = ["demo-path", "load-model"]
# Flags that name a file the run writes outside runs/: a sweep refuses them, as nothing would bring the file back
# and every run of the grid would write the same path.
OUTPUT_FILE_FLAGS = ["save-demos"]


class GridError(Exception):
    """A grid refused before any run starts; str() is one sentence."""


def fail(message: str) -> None:
    """End with one sentence on stderr and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@dataclasses.dataclass
class Run:
    """One run: a script, its flags as the grid names them, a seed, and what is sent to a worker."""

    script: Path  # the script on the driver's machine
    flags: dict  # {"n-step": "10", ...}: the grid's (or the benchmark cell's) flags, in order
    seed: int
    setting: str  # the run's setting in tables and plots: "n-step=10 lambda-e=0"
    group: str = ""  # the benchmark plots runs of one group (an environment) together
    argv: list = dataclasses.field(default_factory=list)  # the command line after the script's name
    inputs: dict = dataclasses.field(default_factory=dict)  # {path on the worker: path here}
    key: str = ""  # hash of the script's content, the flags' values, the seed and the input files


# ---------------------------------------------------------------------------------------------
# The grid, checked by the script's own Args and check_args before anything runs


def flag_name(name: str) -> str:
    """`--n_step`, `n_step` and `n-step` all name the flag `n-step`."""
    return name.strip().lstrip("-").replace("_", "-")


def parse_grid(entries: list) -> dict:
    """["n-step=1,10", "gamma=0.95"] -> {"n-step": ["1", "10"], "gamma": ["0.95"]}."""
    if not entries:
        raise GridError("the grid is empty: give at least one NAME=V1,V2 after --grid.")
    grid = {}
    for entry in entries:
        name, sep, values = entry.partition("=")
        name = flag_name(name)
        values = [value.strip() for value in values.split(",") if value.strip()]
        if not sep or not name:
            raise GridError(f"grid entry '{entry}' is not NAME=V1,V2,...")
        if not values:
            raise GridError(f"grid entry '{entry}' has no values; give NAME=V1,V2,...")
        if name in grid:
            raise GridError(f"the grid names --{name} twice; list all its values in one entry.")
        if name == "seed":
            raise GridError("give seeds with --seeds, not in the grid.")
        grid[name] = values
    return grid


def grid_settings(grid: dict) -> list:
    """The cross product of the grid's values: [{"n-step": "1", "gamma": "0.95"}, ...]."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def setting_label(flags: dict, swept: list, fallback: str) -> str:
    """The swept flags of a setting, "n-step=10 lambda-e=0"; `fallback` when nothing is swept."""
    return " ".join(f"{name}={flags[name]}" for name in swept) or fallback


_modules = {}


def load_script(path: Path):
    """Import a script as a module (its __main__ block does not run) to reuse its Args and check_args."""
    path = Path(path).resolve()
    if path in _modules:
        return _modules[path]
    if not path.is_file():
        raise GridError(f"there is no script at {path}.")
    name = f"_swept_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            spec.loader.exec_module(module)
    except BaseException as e:  # a script that exits or raises on import
        raise GridError(f"cannot import {path.name} to check its flags: {type(e).__name__}: {e}")
    if not (dataclasses.is_dataclass(getattr(module, "Args", None)) and callable(getattr(module, "check_args", None))):
        raise GridError(f"{path.name} has no Args dataclass and check_args function, which a sweep needs to check its flags.")
    _modules[path] = module
    return module


def _unwrap_optional(kind):
    if typing.get_origin(kind) is typing.Union:
        kinds = [k for k in typing.get_args(kind) if k is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return kind


def flag_argv(module, script_name: str, flags: dict) -> list:
    """The command line for `flags`: `--name value`; a bool as `--name` or `--no-name`; a list or tuple
    flag's value split on spaces (`hidden-sizes=400 300`)."""
    hints = typing.get_type_hints(module.Args)
    argv = []
    for name, value in flags.items():
        field = name.replace("-", "_")
        if field not in hints:
            raise GridError(f"{script_name} has no flag --{name} (python {script_name} --help lists them).")
        kind = _unwrap_optional(hints[field])
        value = str(value)
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise GridError(f"--{name} of {script_name} is true or false, got '{value}'.")
            argv.append(f"--{name}" if value.lower() in ("true", "1", "yes", "on") else f"--no-{name}")
        elif typing.get_origin(kind) in (list, tuple):
            argv += [f"--{name}", *value.split()]
        else:
            argv += [f"--{name}", value]
    return argv


def _tyro_message(text: str) -> str:
    """tyro's boxed error as one line: its message without the title, rules and help pointers."""
    lines = [line.strip(" │┃|─━-╭╮╰╯┌┐└┘") for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("For full helptext")]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else "tyro could not parse the flags")


def parse_script_args(module, script_name: str, argv: list):
    """The script's own Args from `argv`, checked by the script's own check_args; GridError if refused."""
    import tyro

    shown = " ".join(argv)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            # the script's own parse_args applies its settings tuned for --env-id; plain Args otherwise
            parse = getattr(module, "parse_args", None)
            args = parse(argv) if callable(parse) else tyro.cli(module.Args, args=argv)
    except SystemExit:
        raise GridError(f"{script_name} refuses '{shown}': {_tyro_message(captured.getvalue())}")
    error = module.check_args(args)
    if error:
        raise GridError(f"{script_name} refuses '{shown}': {error}")
    return args


def input_files(args, script_name: str) -> dict:
    """{flag: (path on the worker, path here)} for each flag of INPUT_FILE_FLAGS that `args` sets (or
    defaults) to a file. The worker finds it at the same relative path, or, for an absolute path or one
    going up, under inputs/NAME/ (the flag is then rewritten to match)."""
    inputs = {}
    for name in INPUT_FILE_FLAGS:
        value = getattr(args, name.replace("-", "_"), None)
        if value is None or str(value) == "":
            continue
        path = Path(value)
        if not path.is_file():
            raise GridError(f"--{name} {value} of {script_name} names no regular file here, so it cannot travel with the runs.")
        worker_path = f"inputs/{name}/{path.name}" if path.is_absolute() or ".." in path.parts else path.as_posix()
        inputs[name] = (worker_path, str(path.resolve()))
    return inputs


def run_key(script_source: bytes, values: dict, seed: int, inputs: dict) -> str:
    """What makes two runs the same run: the script's content, its flags' values, the seed, the input files."""
    digest = hashlib.sha256(script_source)
    digest.update(json.dumps({"flags": sorted(values.items()), "seed": seed}).encode())
    for worker_path in sorted(inputs):
        digest.update(worker_path.encode() + Path(inputs[worker_path]).read_bytes())
    return digest.hexdigest()[:20]


def _exp_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text)


def prepare(run: Run, exp_name: Optional[str] = None) -> Run:
    """Check a run with its script's own Args and check_args, and fill in its argv, inputs and key.

    `exp_name` is passed as --exp-name (unless the flags set it), so settings get their own run folders."""
    module = load_script(run.script)
    name = run.script.name
    flags = dict(run.flags)
    if exp_name and "exp-name" not in flags:
        flags["exp-name"] = _exp_name(exp_name)
    args = parse_script_args(module, name, flag_argv(module, name, flags) + ["--seed", str(run.seed)])
    for output in OUTPUT_FILE_FLAGS:
        if getattr(args, output.replace("-", "_"), None) not in (None, ""):
            raise GridError(f"a sweep cannot --{output}: every run would write the same file, on its worker "
                            "where nothing brings it back; record it with one run of the script.")
    inputs = input_files(args, name)
    for flag, (worker_path, _) in inputs.items():
        flags[flag] = worker_path  # the path the worker finds it at
    run.inputs = {worker_path: source for worker_path, source in inputs.values()}
    run.argv = flag_argv(module, name, flags) + ["--seed", str(run.seed)]
    values = {key: repr(getattr(args, key.replace("-", "_"))) for key in run.flags if key != "exp-name"}
    run.key = run_key(run.script.read_bytes(), values, run.seed, run.inputs)
    if not run.group:
        run.group = str(getattr(args, "env_id", ""))
    return run


# ---------------------------------------------------------------------------------------------
# One run, on a worker: this function travels to Ray workers by value, so it imports what it uses


def _die_with_parent() -> None:  # pragma: no cover (runs in the child between fork and exec)
    """Linux: the script dies with the worker that started it (a killed Ray worker leaves no orphan)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def execute_run(task: dict, started: Optional[Callable] = None, stop_asked: Optional[Callable] = None) -> dict:
    """Run `python SCRIPT ARGV...` in a fresh temporary folder and return its exit code, output tails,
    wall time and the files it wrote under runs/ and videos/ (as {relative path: bytes}). When
    stop_asked() turns true (asked every second), kill the run, delete the folder and raise InterruptedError."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="sweep-run-") as folder:
        work = Path(folder)
        (work / task["script_name"]).write_bytes(task["script_source"])
        for worker_path, data in task["inputs"].items():
            (work / worker_path).parent.mkdir(parents=True, exist_ok=True)
            (work / worker_path).write_bytes(data)
        start = time.time()
        preexec = task["die_with_parent"] and sys.platform.startswith("linux")
        process = subprocess.Popen(
            [sys.executable, task["script_name"], *task["argv"]], cwd=work, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, errors="replace", env={**os.environ, "SDL_VIDEODRIVER": "dummy"},
            start_new_session=True,  # Ctrl-C at the terminal reaches the driver only; it stops the runs itself
            preexec_fn=_die_with_parent if preexec else None,
        )
        if started is not None:
            started(process)
        try:
            while True:
                try:
                    stdout, stderr = process.communicate(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if stop_asked is not None and stop_asked():  # an error, not an interrupt: Ray does not retry it
                        raise InterruptedError("the sweep was stopped")
        except BaseException:  # a stopped task kills its run, and the with-block deletes its folder
            kill_run(process)
            process.wait()
            raise
        wall_s = time.time() - start
        files = {}
        for top in ("runs", "videos"):
            for path in sorted((work / top).rglob("*")):
                if path.is_file():
                    files[path.relative_to(work).as_posix()] = path.read_bytes()
    return {"returncode": process.returncode, "stdout": stdout[-20_000:], "stderr": stderr[-20_000:],
            "wall_s": wall_s, "files": files, "host": socket.gethostname()}


class StopFlag:
    """A Ray actor on the driver's node that the tasks ask every second whether the sweep was stopped.
    (Not ray.cancel: in Ray 2.60 a cancel that races the task's own end crashes the driver, "Tried to
    complete task that was not pending", seen about 1 time in 10, ray-project/ray#54527.)"""

    def __init__(self):
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def asked(self) -> bool:
        return self.stopped


def execute_ray_run(task: dict, flag) -> dict:
    """execute_run on a Ray worker, stopped when the driver sets `flag`."""
    import ray
    return execute_run(task, stop_asked=lambda: ray.get(flag.asked.remote()))


def make_task(run: Run, die_with_parent: bool) -> dict:
    """What travels to the worker: the script's source, its command line and its input files."""
    return {"script_name": run.script.name, "script_source": run.script.read_bytes(), "argv": run.argv,
            "inputs": {path: Path(source).read_bytes() for path, source in run.inputs.items()},
            "die_with_parent": die_with_parent}


# ---------------------------------------------------------------------------------------------
# Backends: each calls on_result(run, result) in the driver as runs finish


def kill_run(process) -> None:
    """Kill a run's script and anything it started (it leads its own process group: start_new_session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # it has already ended
        pass


def stop_like_ctrl_c(signum=None, frame=None) -> None:
    """Ctrl-C or SIGTERM: raise KeyboardInterrupt, so the sweep stops its runs, cleans their temporary
    folders and keeps every finished run; a second signal is ignored while it does so."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_local(items: list, workers: int, on_result: Callable, progress: "Progress") -> None:
    """A pool of `workers` processes on this machine (threads that each wait on one script process)."""
    live, lock, stopping = set(), threading.Lock(), threading.Event()

    def work(task):
        if stopping.is_set():
            return None

        def started(process):
            with lock:
                live.add(process)
                if stopping.is_set():
                    kill_run(process)
        try:
            return execute_run(task, started)
        finally:
            with lock:
                live.difference_update({p for p in live if p.poll() is not None})

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    futures = {pool.submit(work, task): run for run, task in items}
    try:
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                try:
                    result = future.result()
                except Exception as e:  # the runner itself failed (a full disk...): re-run on resume
                    result = {"lost": f"{type(e).__name__}: {e}"}
                on_result(futures[future], result)
            with lock:
                progress.running = len(live)
            progress.tick()
    except KeyboardInterrupt:
        stopping.set()
        for future in futures:
            future.cancel()
        with lock:
            for process in live:
                kill_run(process)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def is_loopback(address: Optional[str]) -> bool:
    host = (address or "").rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def import_ray(address: Optional[str]):
    """Import ray; a Ray instance this command starts, or one at a loopback address, stays on this machine."""
    if address is None or is_loopback(address):
        # Read by Ray at import: bind every Ray service to 127.0.0.1, as Ray does by default on macOS.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise GridError("--backend ray needs the ray package: pip install -r benchmark/requirements.txt")
    return ray


def run_ray(items: list, address: Optional[str], workers: Optional[int], on_result: Callable,
            progress: "Progress") -> None:
    """One Ray task per run, one CPU each, retried by Ray when its worker or node dies. With no address,
    a Ray instance on this machine with `workers` CPUs, stopped at the end."""
    ray = import_ray(address)
    if address is None:
        ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level="ERROR", log_to_driver=False)
        cap = None  # the instance's CPUs bound the runs in flight
    else:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        cap = workers  # None: as many runs in flight as the cluster has CPUs for
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)  # ray.init replaced it with a plain exit
    try:
        if execute_run.__module__ != "__main__":  # send execute_run by value: workers do not have this repo
            ray.cloudpickle.register_pickle_by_value(sys.modules[execute_run.__module__])
        remote_run = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(execute_ray_run)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        flag = ray.remote(num_cpus=0, scheduling_strategy=here)(StopFlag).remote()  # outlives a lost worker node
        queue, pending = list(items), {}
        try:
            while queue or pending:
                while queue and (cap is None or len(pending) < cap):
                    run, task = queue.pop(0)
                    pending[remote_run.remote(task, flag)] = run
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    run = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as e:  # retries used up (or the cluster is gone)
                        lines = [line for line in str(e).splitlines() if line.strip()]
                        result = {"lost": f"{type(e).__name__}: {lines[-1] if lines else ''}"}
                    on_result(run, result)
                progress.running = len(pending)
                progress.tick()
        except KeyboardInterrupt:
            ray.get(flag.stop.remote())  # within a second each task kills its run and deletes its folder
            _, late = ray.wait(list(pending), num_returns=len(pending), timeout=30)
            for ref in late:  # a task that did not stop within 30 s: its worker is killed
                ray.cancel(ref, force=True)
            raise
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Results: the ledger, run folders, results.csv, summary.md, curves


EVAL_LINE = re.compile(r"^eval: (\S+) ± (\S+)", re.M)
SPS_LINE = re.compile(r"^wall time: .*\((\d+) steps/s", re.M)
THRESHOLD_LINE = re.compile(r"^episodes to threshold: (\d+|not reached)", re.M)  # dqfd.py measures it
ENV_LINE = re.compile(r"^.*? on (\S+), seed -?\d+", re.M)  # the first line: "dqn on CartPole-v1, seed 1: ..."


def solved_at(env_id: Optional[str]) -> Optional[float]:
    """Gymnasium's reward_threshold of the environment (None when it has none or the id is unknown)."""
    if not env_id:
        return None
    import gymnasium as gym
    try:
        return gym.spec(env_id).reward_threshold
    except gym.error.Error:
        return None


def last_error_line(result: dict) -> str:
    for text in (result.get("stderr", ""), result.get("stdout", "")):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return f"exit code {result.get('returncode')}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def read_scalars(run_dir: Path, tags=None) -> dict:
    """{tag: (steps, values, seconds since the run started)} from the TensorBoard files in run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    try:
        start = accumulator.FirstEventTimestamp()
    except ValueError:
        return {}
    scalars = {}
    for tag in accumulator.Tags()["scalars"]:
        if tags is None or tag in tags:
            events = accumulator.Scalars(tag)
            scalars[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]),
                            np.array([e.wall_time - start for e in events]))
    return scalars


def write_files(out: Path, files: dict) -> Optional[str]:
    """Write a run's files under `out` (runs/NAME/... as the script wrote them); return its run folder."""
    run_dirs = sorted({"/".join(Path(path).parts[:2]) for path in files if Path(path).parts[0] == "runs"})
    renames = {}
    for run_dir in run_dirs:  # a folder of the same name (same run name, same second) is never overwritten
        target, n = run_dir, 1
        while (out / target).exists():
            n += 1
            target = f"{run_dir}-{n}"
        renames[run_dir] = target
    for path, data in files.items():
        parts = Path(path).parts
        if Path(path).is_absolute() or ".." in parts:
            continue
        head = "/".join(parts[:2])
        target = out / (renames[head] + path[len(head):] if head in renames else path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(data)
        os.replace(partial, target)
    return renames[run_dirs[0]] if run_dirs else None


def make_record(out: Path, run: Run, result: dict) -> dict:
    """Write a finished run's files and return its row: status, summary numbers, folder, error line."""
    record = {"key": run.key, "script": run.script.name, "flags": run.flags, "seed": run.seed,
              "setting": run.setting, "group": run.group, "status": LOST, "eval_mean": None,
              "eval_std": None, "env_id": None, "solved_at": None, "measures_threshold": False,
              "episodes_to_threshold": None, "wall_s": None, "sps": None, "run_dir": None, "error": "",
              "host": result.get("host", "")}
    if "lost" in result:
        record["error"] = result["lost"]
        return record
    record["status"] = OK if result["returncode"] == 0 else FAILED
    record["wall_s"] = round(result["wall_s"], 2)
    record["run_dir"] = write_files(out, result["files"])
    if result["returncode"] < 0:  # killed by a signal: its last output line is not why it ended
        record["error"] = f"killed by signal {signal_name(-result['returncode'])}"
    elif record["status"] == FAILED:
        record["error"] = last_error_line(result)
    match = EVAL_LINE.search(result["stdout"])
    if match:
        record["eval_mean"], record["eval_std"] = float(match.group(1)), float(match.group(2))
    match = SPS_LINE.search(result["stdout"])
    if match:
        record["sps"] = int(match.group(1))
    match = ENV_LINE.search(result["stdout"])
    if match:
        record["env_id"] = match.group(1)
        record["solved_at"] = solved_at(record["env_id"])
    record["measures_threshold"] = THRESHOLD_LINE.search(result["stdout"]) is not None
    if record["run_dir"]:
        scalars = read_scalars(out / record["run_dir"], {"charts/episodes_to_threshold", "charts/SPS"})
        if "charts/episodes_to_threshold" in scalars:
            record["episodes_to_threshold"] = int(scalars["charts/episodes_to_threshold"][1][-1])
            record["measures_threshold"] = True
        if record["sps"] is None and "charts/SPS" in scalars:
            record["sps"] = int(scalars["charts/SPS"][1][-1])
    return record


def read_ledger(out: Path) -> dict:
    """{key: record} of every run finished in `out` (the last record of a key wins)."""
    records = {}
    path = out / LEDGER
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                records[record["key"]] = record
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
    # A record from before records said whether the run measures episodes to threshold: it does when
    # another run of its script reached the threshold (only dqfd.py logs it, and only once reached).
    reaching = {r.get("script") for r in records.values() if r.get("episodes_to_threshold") is not None}
    for record in records.values():
        record.setdefault("measures_threshold", record.get("script") in reaching)
    return records


def check_out(out: Path, made_by: str) -> None:
    """Refuse an --out whose runs another command made (another script's sweep, or the benchmark): this
    command would replace its results.csv and summary.md. Runs recorded before runs named their command
    are not checked."""
    for record in read_ledger(out).values():
        if record.get("made_by", made_by) != made_by:
            raise GridError(f"--out {out} holds the runs of `{record['made_by']}`; give `{made_by}` a folder "
                            "of its own, so that neither replaces the other's results.csv.")


def append_ledger(out: Path, record: dict) -> None:
    with open(out / LEDGER, "a") as ledger:
        ledger.write(json.dumps(record) + "\n")
        ledger.flush()
        os.fsync(ledger.fileno())


RESULT_COLUMNS = ["seed", "status", "eval_mean", "eval_std", "env_id", "solved_at", "episodes_to_threshold", "wall_s",
                  "sps", "run_dir", "error"]


def write_results_csv(path: Path, records: list, flag_names: list, leading=("script",)) -> None:
    """One row per run: the leading columns, every grid flag, then RESULT_COLUMNS."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([*leading, *flag_names, *RESULT_COLUMNS])
        for record in records:
            writer.writerow([record.get(name) for name in leading]
                            + [record["flags"].get(name, "") for name in flag_names]
                            + ["" if record.get(name) is None else record.get(name) for name in RESULT_COLUMNS])
    os.replace(partial, path)


def quartiles(values: list) -> Optional[tuple]:
    """(median, 25th, 75th percentile) of the values, or None for no values."""
    values = sorted(float(value) for value in values if value is not None)
    if not values:
        return None

    def percentile(p):  # numpy's default (linear between the closest ranks), where inf stays inf
        position = p * (len(values) - 1)
        low, frac = int(position), position - int(position)
        if frac == 0:
            return values[low]
        high = values[low + 1]
        return math.inf if math.isinf(high) else values[low] + frac * (high - values[low])
    return percentile(0.5), percentile(0.25), percentile(0.75)


def _fmt(value: float, digits: int = 1) -> str:
    return "not reached" if math.isinf(value) else f"{value:.{digits}f}"


def fmt_quartiles(q: Optional[tuple], digits: int = 1) -> str:
    if q is None:
        return "–"
    median, low, high = q
    return f"{_fmt(median, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def fmt_solved(row: dict) -> str:
    """'8/10': the runs that reached the environment's reward_threshold, of those judged; '–' for none judged."""
    return f"{row['solved']}/{row['judged']}" if row["judged"] else "–"


def summarize(records: list, settings: list) -> list:
    """Per setting (in `settings` order): runs ok out of finished, and (median, q25, q75) of each number.

    Solved: the runs whose final evaluation reached gymnasium's reward_threshold of their environment,
    out of the runs ok in an environment that has one (judged).

    Episodes to threshold are over the runs that measure them: one that never reached the threshold
    counts as infinitely many episodes (so a median can read "not reached"); a setting none of whose
    runs measures them has None (shown as "–")."""
    rows = []
    for setting in settings:
        runs = [r for r in records if r["setting"] == setting]
        ok = [r for r in runs if r["status"] == OK]
        measured = [r for r in ok if r["measures_threshold"]]
        episodes = [r["episodes_to_threshold"] if r["episodes_to_threshold"] is not None else math.inf for r in measured]
        judged = [r for r in ok if r.get("solved_at") is not None and r["eval_mean"] is not None]
        rows.append({
            "setting": setting, "finished": len(runs), "ok": len(ok), "measured": len(measured),
            "judged": len(judged), "solved": sum(r["eval_mean"] >= r["solved_at"] for r in judged),
            "reached": sum(not math.isinf(e) for e in episodes),
            "eval_mean": quartiles([r["eval_mean"] for r in ok]),
            "episodes_to_threshold": quartiles(episodes),
            "wall_s": quartiles([r["wall_s"] for r in ok]), "sps": quartiles([r["sps"] for r in ok]),
        })
    return rows


def rank(rows: list) -> tuple:
    """Rows best first: by median episodes to threshold (fewer is better) when the script logs it, then
    by median evaluation return (higher is better); equal medians by the worse quartile (the 75th
    percentile of episodes, the 25th of returns). A setting whose median never reached the threshold so
    ranks below every one whose median did, and among those that never did, by return. Returns (rows,
    what they are ranked by)."""
    def by_return(row):
        return tuple(-v for v in (row["eval_mean"] or (-math.inf,) * 3)[:2])  # (median, q25)

    if any(row["episodes_to_threshold"] for row in rows):
        def by_episodes(row):
            return (*(row["episodes_to_threshold"] or (math.inf,) * 3)[::2], *by_return(row))  # (median, q75)
        return sorted(rows, key=by_episodes), ("the median number of episodes to reach the threshold (fewer is "
                                               "better; equal medians by the 75th percentile, then by return)")
    return sorted(rows, key=by_return), "the median greedy evaluation return (higher is better; equal medians by the 25th percentile)"


def summary_table(rows: list, first_column: str = "setting") -> list:
    """The markdown table of summarize()'s rows, as lines."""
    with_threshold = any(row["episodes_to_threshold"] for row in rows)
    header = f"| rank | {first_column} | runs ok | eval return, median [IQR] | solved |"
    header += " episodes to threshold, median [IQR] | reached |" if with_threshold else ""
    header += " wall s, median [IQR] | steps/s, median [IQR] |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for i, row in enumerate(rows, 1):
        line = (f"| {i} | {row['setting']} | {row['ok']}/{row['finished']} | {fmt_quartiles(row['eval_mean'])} "
                f"| {fmt_solved(row)} |")
        if with_threshold:
            reached = f"{row['reached']}/{row['measured']}" if row["measured"] else "–"
            line += f" {fmt_quartiles(row['episodes_to_threshold'], 0)} | {reached} |"
        line += f" {fmt_quartiles(row['wall_s'], 0)} | {fmt_quartiles(row['sps'], 0)} |"
        lines.append(line)
    return lines


def learning_curves(out: Path, records: list, x: str = "step", points: int = 200) -> dict:
    """{setting: (grid, mean, std)}: the return of the last 10 episodes per run, on a common grid of
    environment steps (x="step") or seconds since the run started (x="wall"), mean and std over seeds.
    A run's curve holds its last value to the grid's end: a run whose last episode ended early still
    counts there, so the mean at the right edge is over every seed, not only the ones still finishing an episode."""
    per_setting = {}
    for record in records:
        if record["status"] != OK or not record["run_dir"]:
            continue
        scalars = read_scalars(out / record["run_dir"], {"charts/episodic_return"})
        if "charts/episodic_return" not in scalars:
            continue
        steps, returns, seconds = scalars["charts/episodic_return"]
        smoothed = np.convolve(returns, np.ones(10), "full")[: len(returns)] / np.minimum(np.arange(1, len(returns) + 1), 10)
        per_setting.setdefault(record["setting"], []).append((steps if x == "step" else seconds, smoothed))
    curves = {}
    for setting, runs in per_setting.items():
        grid = np.linspace(0, max(xs[-1] for xs, _ in runs), points)
        ys = np.array([np.interp(grid, xs, run_ys, left=np.nan, right=run_ys[-1]) for xs, run_ys in runs])
        with warnings.catch_warnings():  # a grid point where no seed has data yet is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            curves[setting] = (grid, np.nanmean(ys, axis=0), np.nanstd(ys, axis=0))
    return curves


def check_plotting() -> None:
    """Raise GridError before any run when matplotlib, which draws the curves at the end, is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise GridError("the sweep draws its learning curves with matplotlib, which is not installed: "
                        "pip install -r benchmark/requirements.txt") from None


def plot_curves(path: Path, curves: dict, title: str, xlabel: str, order: Optional[list] = None) -> None:
    """One line (the mean over seeds) and band (± one standard deviation) per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for setting in order or list(curves):
        if setting not in curves:
            continue
        grid, mean, std = curves[setting]
        line, = axes.plot(grid, mean, label=setting, linewidth=1.5)
        axes.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("episodic return (mean of the last 10 episodes)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize=8)
    figure.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------
# Running a list of runs: skip the finished ones, record the rest as they finish


class Progress:
    """A line per finished run, and on a terminal a status line updated every second."""

    def __init__(self, total: int, skipped: int, stream=sys.stdout):
        self.total, self.done, self.failed, self.running = total, skipped, 0, 0
        self.stream, self.start = stream, time.time()
        self.tty = stream.isatty()

    def status(self) -> str:
        elapsed = int(time.time() - self.start)
        return (f"{self.done}/{self.total} done, {self.failed} failed, {self.running} running, "
                f"{elapsed // 60}m{elapsed % 60:02d}s")

    def finished(self, record: dict) -> None:
        self.done += 1
        self.failed += record["status"] != OK
        if record["status"] == OK:
            what = f"eval {record['eval_mean']} ± {record['eval_std']}" if record["eval_mean"] is not None else "ok"
            if record["episodes_to_threshold"] is not None:
                what += f", threshold at episode {record['episodes_to_threshold']}"
            elif record["measures_threshold"]:
                what += ", threshold not reached"
        else:
            what = record["error"]
        line = (f"[{self.done:>{len(str(self.total))}}/{self.total}] {record['status']:<6} {record['script']} "
                f"{record['setting']} seed={record['seed']}  {what}  ({record['wall_s'] or 0:.0f} s)")
        self.stream.write(("\r\033[K" if self.tty else "") + line + "\n")
        self.tick()

    def tick(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.status())
        self.stream.flush()


def execute(runs: list, out: Path, made_by: str, backend: str = "local", workers: Optional[int] = None,
            ray_address: Optional[str] = None) -> tuple:
    """Run every run not yet finished in `out` and record each as it finishes, as made by the command
    `made_by` (check_out refuses another command's --out).

    Returns (records of `runs` in order, finished before this call, interrupted by Ctrl-C or SIGTERM)."""
    out.mkdir(parents=True, exist_ok=True)
    finished = read_ledger(out)
    todo = [run for run in runs if run.key not in finished or finished[run.key]["status"] == LOST]
    skipped = len(runs) - len(todo)
    progress = Progress(len(runs), skipped)
    print(f"{len(runs)} runs: {skipped} already finished in {out}, {len(todo)} to run "
          f"({backend} backend{'' if backend == 'ray' and not workers else f', {workers or os.cpu_count()} workers'})",
          flush=True)

    def on_result(run: Run, result: dict) -> None:
        record = {**make_record(out, run, result), "made_by": made_by}
        append_ledger(out, record)
        finished[run.key] = record
        progress.finished(record)

    items = [(run, make_task(run, die_with_parent=backend == "ray")) for run in todo]
    interrupted = False
    try:
        if items and backend == "ray":
            run_ray(items, ray_address, workers, on_result, progress)
        elif items:
            run_local(items, workers or os.cpu_count() or 1, on_result, progress)
    except KeyboardInterrupt:
        interrupted = True
    if progress.tty:
        print("\r\033[K", end="")
    # A run finished by an earlier command keeps its numbers but takes this command's label and group
    records = [{**finished[run.key], "setting": run.setting, "group": run.group} for run in runs if run.key in finished]
    return records, skipped, interrupted


# ---------------------------------------------------------------------------------------------
# The command line


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one sentence (no usage block)."""

    def error(self, message: str) -> None:
        fail(f"{message} (python -m benchmark.sweep --help explains the command).")


def write_sweep_outputs(out: Path, runs: list, records: list, grid: dict, swept: list, command: str) -> None:
    """results.csv, summary.md and curves.png of a sweep."""
    settings = list(dict.fromkeys(run.setting for run in runs))
    write_results_csv(out / "results.csv", records, list(grid))
    rows, ranked_by = rank(summarize(records, settings))
    fixed = " ".join(f"{name}={values[0]}" for name, values in grid.items() if name not in swept)
    counts = {status: sum(r["status"] == status for r in records) for status in (OK, FAILED, LOST)}
    lines = [f"# Sweep of {runs[0].script.name}", "", f"`{command}`", "",
             f"Swept: {', '.join(swept) or 'nothing'}. Fixed: {fixed or 'nothing'}. "
             f"Seeds: {' '.join(str(s) for s in dict.fromkeys(run.seed for run in runs))}.",
             f"Runs: {len(runs)} ({counts[OK]} ok, {counts[FAILED]} failed, {counts[LOST]} lost, "
             f"{len(runs) - len(records)} not run).", "",
             f"Ranked by {ranked_by}; IQR is the interquartile range over seeds; wall s is each run's "
             "whole process, start-up included.", "", *summary_table(rows), "",
             "![learning curves](curves.png)", ""]
    failures = [r for r in records if r["status"] != OK]
    if failures:
        lines += ["Runs that did not finish:", ""]
        lines += [f"- {r['setting']} seed {r['seed']}: {r['status']}: {r['error']}" for r in failures] + [""]
    (out / "summary.md").write_text("\n".join(lines))
    plot_curves(out / "curves.png", learning_curves(out, records), f"{runs[0].script.name}: mean ± std over seeds",
                "environment steps", order=[row["setting"] for row in rows])


def main(argv: Optional[list] = None) -> int:
    parser = OneLineParser(
        prog="python -m benchmark.sweep",
        description="Run SCRIPT over the cross product of a grid of flags times seeds; write OUT/results.csv, "
                    "OUT/summary.md, OUT/curves.png and every run under OUT/runs/. The same command again "
                    "resumes: it skips the runs already finished.")
    parser.add_argument("script", type=Path, help="the script to sweep, e.g. dqfd.py")
    parser.add_argument("--grid", nargs="+", default=[], metavar="NAME=V1,V2",
                        help="a flag and its values (one value: fixed; several: swept)")
    parser.add_argument("--seeds", nargs="+", type=int, required=True, metavar="S", help="the seeds of every setting")
    parser.add_argument("--out", type=Path, required=True, help="the folder of the results")
    parser.add_argument("--backend", choices=["local", "ray"], default="local",
                        help="local: a pool of processes here; ray: one Ray task per run")
    parser.add_argument("--ray-address", default=None,
                        help="a Ray cluster to join (`auto`: the one `ray start` made here); none: start Ray here and stop it at the end")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs at once (local default: the number of cores; ray: the CPUs of the instance it starts, or a cap on a joined cluster)")
    args = parser.parse_args(argv)
    made_by = f"python -m benchmark.sweep {args.script.name}"
    signal.signal(signal.SIGINT, stop_like_ctrl_c)
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    try:
        if args.workers is not None and args.workers < 1:
            raise GridError(f"--workers must be at least 1, got {args.workers}.")
        if args.ray_address and args.backend != "ray":
            raise GridError("--ray-address needs --backend ray.")
        if len(set(args.seeds)) != len(args.seeds):
            raise GridError(f"--seeds lists a seed twice: {' '.join(map(str, args.seeds))}.")
        if args.out.exists() and not args.out.is_dir():
            raise GridError(f"--out {args.out} is a file, not a folder.")
        grid = parse_grid(args.grid)
        swept = [name for name, values in grid.items() if len(values) > 1]
        stem = args.script.stem
        runs = []
        for flags in grid_settings(grid):
            label = setting_label(flags, swept, stem)
            exp_name = f"{stem}__" + ",".join(f"{name}={flags[name]}" for name in swept) if swept else None
            for seed in args.seeds:
                runs.append(prepare(Run(args.script, flags, seed, label), exp_name))
        check_out(args.out, made_by)
        check_plotting()
        if args.backend == "ray":
            import_ray(args.ray_address)
    except GridError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted before any run started.", flush=True)
        return 130
    command = "python -m benchmark.sweep " + shlex.join(sys.argv[1:] if argv is None else argv)
    records, _, interrupted = execute(runs, args.out, made_by, args.backend, args.workers, args.ray_address)
    write_sweep_outputs(args.out, runs, records, grid, swept, command)
    bad = sum(record["status"] != OK for record in records)
    if interrupted:
        print(f"interrupted: {len(records)} of {len(runs)} runs finished and kept in {args.out}; "
              "the same command resumes.", flush=True)
        return 130
    print(f"{len(records) - bad} ok, {bad} failed or lost; results in {args.out / 'summary.md'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
