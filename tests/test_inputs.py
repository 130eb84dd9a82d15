"""Bad flags, paths and signals, in all six scripts: one sentence on stderr and a non-zero exit, checked before
training, nothing the user had lost and nothing half-written left behind. The checks are shared code, so most
are run in-process on each script's own functions; a few run the scripts as a user would."""

import os
import signal
import subprocess
import sys

import gymnasium as gym
import pytest

import ddpg
import double_dqn
import dqfd
import dqn
import dueling_dqn
import per_dqn
from helpers import ROOT, assert_one_line_error, only_run_dir, read_scalars, run_ok, run_script

SCRIPTS = [dqn, double_dqn, dueling_dqn, per_dqn, dqfd, ddpg]
DQN_FAMILY = [dqn, double_dqn, dueling_dqn, per_dqn, dqfd]


def refused(script, **flags) -> str:
    """check_args' sentence for these flags, which must be refused."""
    error = script.check_args(script.Args(**flags))
    assert error is not None, flags
    assert "\n" not in error and error.endswith("."), error
    return error


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
def test_every_non_finite_float_is_refused(script):
    floats = [name for name, value in vars(script.Args()).items() if isinstance(value, float)]
    assert len(floats) >= 5  # learning rates, gamma, tau... (ddpg: noise; per_dqn: alpha, beta; dqfd: margin, lambdas, l2)
    for name in floats:
        for value in [float("inf"), float("-inf"), float("nan")]:
            assert f"--{name.replace('_', '-')} must be a finite number" in refused(script, **{name: value}), name
    assert script.check_args(script.Args()) is None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
def test_an_exp_name_that_is_not_a_plain_file_name_is_refused(script):
    for name in ["../up", "a/b", "/abs", "..", ".", "", "a b", "x\n"]:
        assert "--exp-name must be a plain file name" in refused(script, exp_name=name), name
    for name in ["dqn_v2.1", "lr=1e-3,tau=0.01", "a+b-c"]:
        assert script.check_args(script.Args(exp_name=name)) is None, name


def test_epsilon_decays_over_at_least_one_step():
    # --total-timesteps 3 with --exploration-fraction 0.12: int(0.36) = 0 steps of decay. It used to divide by 0;
    # now epsilon is start_e at step 0 and end_e from step 1 on.
    for script in DQN_FAMILY:
        assert script.linear_schedule(1.0, 0.05, 0, 0) == 1.0
        assert script.linear_schedule(1.0, 0.05, 0, 1) == pytest.approx(0.05)  # 1.0 + (0.05 - 1.0) / 1 * 1
        assert script.linear_schedule(1.0, 0.05, 0, 3) == 0.05  # past the decay: end_e itself


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
def test_sizes_that_cannot_fit_are_refused_before_allocating(script):
    env = gym.make("Pendulum-v1" if script is ddpg else "CartPole-v1")

    def memory_error(**flags):
        return script.check_memory(script.Args(**flags), env)

    assert memory_error() is None
    # 10^12 slots of at least two 16-byte observations: some 10^4 TiB, whatever the machine.
    message = memory_error(buffer_size=10**12)
    assert "--buffer-size 1000000000000" in message and "GiB" in message and "this machine's" in message
    # Hidden layers of 10^9 units: each 10^9 x 10^9 layer holds 10^18 weights, kept in 5 float32 copies of 4 bytes,
    # 20 * 10^18 / 2^30 = 18,626,451,492 GiB. DQN's MLP has one such layer; the dueling network two (one per stream),
    # DDPG two (the actor's and the critic's second layers): 37,252,902,985 GiB.
    huge = {"hidden_sizes": (10**9, 10**9)} if script is ddpg else {"hidden_size": 10**9}
    expected = "the networks would need 37,252,90" if script in (dueling_dqn, ddpg) else "the networks would need 18,626,451,"
    assert expected in memory_error(**huge)


def test_the_parameter_count_is_the_networks_own():
    """network_size counts from the layer sizes the numbers in the state_dicts of the networks built from them."""
    for script, env_id, flags in [(dqn, "CartPole-v1", {"hidden_size": 7}), (dqn, "Taxi-v4", {"hidden_size": 5}),
                                  (double_dqn, "Acrobot-v1", {}), (dueling_dqn, "CartPole-v1", {"hidden_size": 9}),
                                  (per_dqn, "CartPole-v1", {}), (dqfd, "Taxi-v4", {}), (ddpg, "Pendulum-v1", {"hidden_sizes": (6, 4)}),
                                  (ddpg, "MountainCarContinuous-v0", {})]:
        env, args = gym.make(env_id), script.Args(**flags)
        networks = ([ddpg.Actor(env.observation_space, env.action_space, args.hidden_sizes),
                     ddpg.Critic(env.observation_space, env.action_space, args.hidden_sizes)] if script is ddpg
                    else [script.QNetwork(env.observation_space, int(env.action_space.n), args.hidden_size)])
        built = sum(tensor.numel() for network in networks for tensor in network.state_dict().values())
        assert script.network_size(env.observation_space, env.action_space, args) == built, (script.__name__, env_id)
    # By hand: dqn.py's MLP on CartPole (4 inputs, 2 actions) with 7 hidden units: (4+1)*7 + (7+1)*7 + (7+1)*2 = 107
    assert dqn.network_size(gym.make("CartPole-v1").observation_space, gym.spaces.Discrete(2), dqn.Args(hidden_size=7)) == 107


def test_n_step_is_bounded():
    assert "--n-step must lie in [1, 1000]" in refused(dqfd, n_step=1_000_000_000)
    assert "--n-step" in refused(dqfd, n_step=0)
    assert dqfd.check_args(dqfd.Args(n_step=1000)) is None


def test_save_demos_path_is_checked_before_training_and_nothing_is_left(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(sys, "argv", ["dqn.py"])
    for path, words in [(tmp_path / "missing" / "demo.npy", "No such file or directory"),
                        (tmp_path / "a_file" / "demo.npy", "Not a directory"), ("", "No such file or directory"),
                        (tmp_path, "already exists"), ("/proc/demo.npy", "No such file or directory"),
                        (tmp_path / ("x" * 300), "File name too long")]:
        with pytest.raises(SystemExit) as stopped:
            dqn.checked_settings(dqn.Args(save_demos=str(path)))
        message = capsys.readouterr().err
        assert stopped.value.code == 2 and message.count("\n") == 1 and words in message, (path, message)
    args, agent = dqn.checked_settings(dqn.Args(save_demos=str(tmp_path / "demo.npy")))
    assert args.save_demos == str(tmp_path / "demo.npy") and agent is None
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # the probe removed what it created


def test_an_existing_model_path_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "run" / "dqn.pt").mkdir(parents=True)  # a folder where the model would go
    with pytest.raises(SystemExit) as stopped:
        dqn.open_outputs(dqn.Args(save_model=True), "run")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: runs/run/dqn.pt already exists; --save-model never overwrites it.\n"
    assert os.listdir(tmp_path / "runs" / "run" / "dqn.pt") == []


def test_a_model_save_that_fails_leaves_no_tmp_file(tmp_path):
    env = gym.make("CartPole-v1")
    (tmp_path / "dqn.pt").mkdir()  # appeared during training: the rename fails
    with pytest.raises(OSError):
        dqn.save_agent(str(tmp_path / "dqn.pt"), dqn.Args(), env, {"q_network": dqn.QNetwork(env.observation_space, 2, 8)})
    assert os.listdir(tmp_path) == ["dqn.pt"]


def test_bad_paths_as_a_user_meets_them(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    assert_one_line_error(run_script("dqn.py", cwd=tmp_path), "runs/", "Not a directory")
    assert (tmp_path / "runs").read_text() == "not a folder"
    (tmp_path / "runs").unlink()
    (tmp_path / "runs").symlink_to(tmp_path / "nowhere")  # a dangling link
    assert_one_line_error(run_script("ddpg.py", cwd=tmp_path), "runs/")
    assert_one_line_error(run_script("per_dqn.py", "--save-demos", "no/demo.npy", cwd=tmp_path), "--save-demos")
    assert_one_line_error(run_script("dqn.py", "--exp-name", "../escape", cwd=tmp_path), "--exp-name")
    assert not (tmp_path / "nowhere").exists() and sorted(os.listdir(tmp_path)) == ["runs"]


def test_missing_environment_packages_end_in_one_sentence(tmp_path):
    assert_one_line_error(run_script("dqn.py", "--env-id", "phys2d/CartPole-v1", cwd=tmp_path), "cannot make", "jax")
    # gymnasium's deprecation warning for Reacher-v2 is not printed besides the error
    assert_one_line_error(run_script("ddpg.py", "--env-id", "Reacher-v2", cwd=tmp_path), "cannot make", "gymnasium-robotics")
    assert_one_line_error(run_script("dqfd.py", "--env-id", "GymV26Environment-v0", cwd=tmp_path), "shimmy")
    assert not (tmp_path / "runs").exists()


def test_three_timesteps_run(tmp_path):
    result = run_ok("dqn.py", "--total-timesteps", "3", "--learning-starts", "1", "--batch-size", "1",
                    "--eval-episodes", "1", cwd=tmp_path)
    assert "eval:" in result.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_with_one_line_and_a_flushed_log(tmp_path, signum):
    script = "dqn.py" if signum == signal.SIGINT else "ddpg.py"
    process = subprocess.Popen([sys.executable, str(ROOT / script), "--total-timesteps", "5000", "--learning-starts",
                                "100", "--save-model"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "SDL_VIDEODRIVER": "dummy"})
    while not process.stdout.readline().startswith("step"):  # the first progress line: at 10% of training
        assert process.poll() is None, process.stderr.read()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum
    assert stderr.splitlines() == [f"stopped by {name}; the TensorBoard log keeps what was logged so far"]
    run_dir = only_run_dir(tmp_path)
    assert read_scalars(run_dir)["charts/episodic_return"]  # flushed and closed
    assert [path.name for path in run_dir.iterdir() if not path.name.startswith("events.out.tfevents")] == []
