"""--save-model and --load-model, whose code the six scripts share letter for letter: tested on dqn.py, in-process
for the refusals (each one sentence, fast), and as a user runs it for the end-to-end ones. Each script's own test
file saves an agent, loads it in a new process and checks that the evaluation repeats exactly.

The loader is torch.load(weights_only=True), which runs no code. The crafted files below that get past its guard and
do harm are what read_agent refuses before it: a pickle that builds a 4 GiB bytearray, a compressed record that
inflates to 40 MB from a 100 kB file, and a file of 10^5 empty records. The rest torch refuses, or check_agent and the
strict load_state_dict do."""

import collections
import io
import os
import pickle
import signal
import socket
import time
import zipfile

import gymnasium as gym
import pytest
import torch

import ddpg
import dqn
from helpers import assert_one_line_error, run_script


def saved_agent(path, env_id: str = "CartPole-v1", **flags) -> str:
    """An untrained dqn.py agent saved with --save-model's own function (no training run needed)."""
    env = gym.make(env_id)
    args = dqn.Args(env_id=env_id, **flags)
    q_network = dqn.QNetwork(env.observation_space, int(env.action_space.n), args.hidden_size)
    dqn.save_agent(str(path), args, env, {"q_network": q_network})
    return str(path)


def give_up(signum, frame):
    raise TimeoutError("the call hung")


def refusal(function, *arguments) -> str:
    """The one sentence a ValueError from `function` carries, within 10 seconds (a FIFO must not hang)."""
    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(10)
    try:
        with pytest.raises(ValueError) as error:
            function(*arguments)
    finally:
        signal.alarm(0)
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    return message


def rewrite_zip(source: str, target, replace: dict = None, compression: int = zipfile.ZIP_STORED) -> str:
    """A copy of the zip `source` with some records' bytes replaced (by name suffix) and its compression chosen."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", compression) as copy:
        for record in original.infolist():
            data = original.read(record)
            for suffix, new_data in (replace or {}).items():
                if record.filename.endswith(suffix):
                    data = new_data
            copy.writestr(record.filename, data)
    return str(target)


def test_the_saved_file_holds_the_weights_and_what_rebuilding_them_takes(tmp_path):
    path = saved_agent(tmp_path / "agent.pt", hidden_size=16)
    model = torch.load(path, weights_only=True)  # plain torch.load reads it
    assert model["script"] == "dqn.py" and model["env_id"] == "CartPole-v1"
    assert model["args"]["hidden_size"] == 16 and model["args"]["learning_rate"] == dqn.Args.learning_rate
    assert model["observation_space"] == {"kind": "Box", "shape": (4,), "n": None}
    assert model["action_space"] == {"kind": "Discrete", "shape": (), "n": 2}
    assert model["networks"]["q_network"]["network.0.weight"].shape == (16, 4)
    assert os.listdir(tmp_path) == ["agent.pt"]  # no .tmp left


def test_an_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    def save_half_then_stop(obj, path):
        with open(path, "wb") as file:
            file.write(b"PK half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        saved_agent(tmp_path / "agent.pt")
    assert os.listdir(tmp_path) == []


def test_settings_come_from_the_file_and_the_evaluation_flags_from_the_command_line(tmp_path):
    agent = dqn.read_agent(saved_agent(tmp_path / "agent.pt", hidden_size=16, seed=5, learning_rate=1e-3))
    command_line = dqn.Args(hidden_size=64, seed=9, eval_episodes=3, load_model="agent.pt")
    args = dqn.agent_settings(command_line, agent, env_id_given=False)
    assert (args.hidden_size, args.learning_rate) == (16, 1e-3)  # from the file
    assert (args.seed, args.eval_episodes, args.load_model) == (9, 3, "agent.pt")  # from the command line
    env = gym.make("CartPole-v1")
    assert dqn.check_agent(agent, env, args) is None
    q_network = dqn.QNetwork(env.observation_space, 2, args.hidden_size)
    dqn.load_weights(agent, {"q_network": q_network}, "agent.pt")
    torch.testing.assert_close(q_network.state_dict(), agent["networks"]["q_network"])


def test_another_environment_or_script_is_refused(tmp_path):
    agent = dqn.read_agent(saved_agent(tmp_path / "agent.pt"))
    message = refusal(dqn.agent_settings, dqn.Args(env_id="Acrobot-v1", load_model="agent.pt"), agent, True)
    assert "CartPole-v1" in message and "Acrobot-v1" in message
    # The spaces are checked too: a CartPole agent on Acrobot's 6 observations
    assert "spaces" in dqn.check_agent(agent, gym.make("Acrobot-v1"), dqn.Args(load_model="agent.pt"))
    message = refusal(ddpg.read_agent, str(tmp_path / "agent.pt"))
    assert "saved by dqn.py, not by ddpg.py" in message


def test_tensors_that_do_not_fit_the_settings_are_refused_before_a_network_is_built(tmp_path):
    env = gym.make("CartPole-v1")
    agent = dqn.read_agent(saved_agent(tmp_path / "agent.pt", hidden_size=16))
    assert "tensors" in dqn.check_agent(agent, env, dqn.Args(hidden_size=32, load_model="a.pt"))
    # A hidden size of 30,000 claimed over 16 units' tensors: refused by counting, before 3.7 GiB of network is built.
    agent["args"]["hidden_size"] = 30_000
    torch.save(agent, tmp_path / "claims_30000.pt")
    started = time.time()
    agent = dqn.read_agent(str(tmp_path / "claims_30000.pt"))
    args = dqn.agent_settings(dqn.Args(load_model="claims_30000.pt"), agent, env_id_given=False)
    assert args.hidden_size == 30_000 and "tensors" in dqn.check_agent(agent, env, args)
    assert time.time() - started < 5
    # A view of one float that claims 10^12 of them (a zero stride) costs nothing to load and is refused by its count.
    agent = dqn.read_agent(saved_agent(tmp_path / "view.pt", hidden_size=16))
    agent["networks"]["q_network"]["network.0.weight"] = torch.zeros(1).expand(10**6, 10**6)
    torch.save(agent, tmp_path / "huge_view.pt")
    agent = dqn.read_agent(str(tmp_path / "huge_view.pt"))
    assert "tensors" in dqn.check_agent(agent, env, dqn.Args(hidden_size=16, load_model="huge_view.pt"))


def one_line_exit(function, *arguments, capsys) -> str:
    """The one line on stderr with which `function` ends the run (exit code 2)."""
    with pytest.raises(SystemExit) as stopped:
        function(*arguments)
    message = capsys.readouterr().err
    assert stopped.value.code == 2 and message.count("\n") == 1 and message.startswith("error: "), message
    return message


def test_a_state_dict_of_the_right_count_but_not_the_network_s_tensors_ends_in_one_line(tmp_path, capsys):
    env, args = gym.make("CartPole-v1"), dqn.Args(hidden_size=16, load_model="a.pt")
    agent = dqn.read_agent(saved_agent(tmp_path / "agent.pt", hidden_size=16))
    weights = agent["networks"]["q_network"]
    weights["renamed.weight"] = weights.pop("network.0.weight")  # the same numbers under another name
    assert dqn.check_agent(agent, env, args) is None
    q_network = dqn.QNetwork(env.observation_space, 2, 16)
    assert "q_network" in one_line_exit(dqn.load_weights, agent, {"q_network": q_network}, "a.pt", capsys=capsys)
    # A state_dict whose _metadata is an int, not the dict torch writes: load_state_dict raises deep inside.
    agent = dqn.read_agent(saved_agent(tmp_path / "agent2.pt", hidden_size=16))
    agent["networks"]["q_network"]._metadata = 5
    torch.save(agent, tmp_path / "metadata.pt")
    agent = dqn.read_agent(str(tmp_path / "metadata.pt"))
    assert dqn.check_agent(agent, env, args) is None
    assert "q_network" in one_line_exit(dqn.load_weights, agent, {"q_network": q_network}, "a.pt", capsys=capsys)


def test_settings_of_the_wrong_type_are_refused(tmp_path):
    agent = dqn.read_agent(saved_agent(tmp_path / "agent.pt"))
    agent["args"]["hidden_size"] = "128"
    assert "hidden_size" in refusal(dqn.agent_settings, dqn.Args(load_model="a.pt"), agent, False)
    agent["args"]["hidden_size"] = 128
    agent["args"]["gamma"] = [0.99]
    assert "gamma" in refusal(dqn.agent_settings, dqn.Args(load_model="a.pt"), agent, False)


def test_files_that_are_no_saved_agent_are_refused(tmp_path):
    good = saved_agent(tmp_path / "agent.pt")
    whole = open(good, "rb").read()
    for cut in [len(whole) - 10, len(whole) // 2, 100, 4, 0]:  # truncated down to empty
        (tmp_path / "cut.pt").write_bytes(whole[:cut])
        assert "not an agent saved by --save-model" in refusal(dqn.read_agent, str(tmp_path / "cut.pt"))
    (tmp_path / "text.pt").write_text("hello")
    torch.save(collections.OrderedDict(weight=torch.zeros(2)), tmp_path / "state_dict.pt")  # the old, bare format
    torch.save([[[]]], tmp_path / "list.pt")
    # A weight record cut to 8 bytes inside a whole zip: torch.load with mmap would read past its end into the next
    # record (weights up to 1e38); read as a copy, torch refuses the record's size.
    with zipfile.ZipFile(good) as archive:
        first_weights = next(name for name in archive.namelist() if name.endswith("/data/0"))
        rewrite_zip(good, tmp_path / "cut_record.pt", {first_weights: archive.read(first_weights)[:8]})
    for name in ["text.pt", "state_dict.pt", "list.pt", "cut_record.pt"]:
        assert "not an agent saved by --save-model" in refusal(dqn.read_agent, str(tmp_path / name)), name


def test_records_larger_in_all_than_the_file_are_refused_before_torch_reads_them(tmp_path):
    """torch.save never compresses and writes each record once, so its records never hold more bytes than the file.
    A compressed record can: 40 MB of weights in 100 kB, which torch.load would inflate. And 10^5 empty records cost
    a zip reader time and memory for nothing a saved agent holds."""
    good = saved_agent(tmp_path / "agent.pt")
    agent = torch.load(good, weights_only=True)
    agent["networks"]["q_network"]["network.0.weight"] = torch.zeros(10**7)
    torch.save(agent, tmp_path / "big.pt")
    bomb = rewrite_zip(str(tmp_path / "big.pt"), tmp_path / "bomb.pt", compression=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(bomb) < 2 * 10**5  # 40 MB of weights in about 100 kB
    assert "more or larger records" in refusal(dqn.read_agent, bomb)
    with zipfile.ZipFile(good) as original, zipfile.ZipFile(tmp_path / "many.pt", "w") as copy:
        for record in original.infolist():
            copy.writestr(record.filename, original.read(record))
        prefix = original.namelist()[0].split("/")[0]
        for i in range(10**5):
            copy.writestr(f"{prefix}/extra/{i}", b"")
    started = time.time()
    assert "more or larger records" in refusal(dqn.read_agent, str(tmp_path / "many.pt"))
    assert time.time() - started < 5


def test_special_paths_are_refused_without_opening_them(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # opening it would wait for a writer forever
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    (tmp_path / "file").write_text("")
    unix_socket = socket.socket(socket.AF_UNIX)
    unix_socket.bind(str(tmp_path / "socket"))
    for path, words in [(tmp_path / "fifo", "not a regular file"), (tmp_path / "socket", "not a regular file"),
                        (tmp_path, "not a regular file"), ("/dev/zero", "not a regular file"),
                        (tmp_path / "loop_a", "Too many levels of symbolic links"),
                        (tmp_path / ("x" * 300), "File name too long"), (tmp_path / "file" / "agent.pt", "Not a directory"),
                        (tmp_path / "nowhere.pt", "No such file or directory"), ("/proc/self/mem", "not an agent")]:
        assert words in refusal(dqn.read_agent, str(path)), path
    unix_socket.close()


class RunsCode:
    """Unpickling this calls os.system, which here would create a canary file."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


class HugeBytearray:
    """Unpickling this builds a 4 GB bytearray; torch's weights_only unpickler allows bytearray."""

    def __reduce__(self):
        return bytearray, (4 * 2**30,)


def test_a_pickle_naming_anything_else_is_refused_before_it_is_read(tmp_path):
    good = saved_agent(tmp_path / "agent.pt")
    canary = tmp_path / "the_code_ran"
    for payload, name in [(RunsCode(canary), "system"), (HugeBytearray(), "bytearray")]:
        path = rewrite_zip(good, tmp_path / "crafted.pt", {"/data.pkl": pickle.dumps(payload, protocol=2)})
        message = refusal(dqn.read_agent, path)
        assert "refused" in message and name in message, message
    assert not canary.exists()


class Claim:
    """A storage whose pickle claims `numel` bytes over a record that holds 48."""

    def __init__(self, numel):
        self.numel = numel


class ClaimingPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", obj.numel) if isinstance(obj, Claim) else None


class ClaimedTensor:
    def __init__(self, numel):
        self.storage, self.numel = Claim(numel), numel

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.numel,), (1,), False, collections.OrderedDict())


def test_a_tensor_claiming_more_than_its_record_holds_is_refused_without_allocating_it(tmp_path):
    data = io.BytesIO()
    ClaimingPickler(data, protocol=2).dump({"script": "dqn.py", "tensor": ClaimedTensor(10**12)})  # 4 TB of floats
    path = rewrite_zip(saved_agent(tmp_path / "agent.pt"), tmp_path / "claims.pt", {"/data.pkl": data.getvalue()})
    assert "not an agent saved by --save-model" in refusal(dqn.read_agent, path)


def test_deeply_nested_pickles_are_refused(tmp_path):
    depth = 100_000  # EMPTY_LIST 100,000 times, then APPEND each list into the one before it
    nested = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    path = rewrite_zip(saved_agent(tmp_path / "agent.pt"), tmp_path / "nested.pt", {"/data.pkl": nested})
    assert "not an agent saved by --save-model" in refusal(dqn.read_agent, path)


def test_refusals_as_a_user_meets_them(tmp_path):
    path = saved_agent(tmp_path / "agent.pt")
    assert_one_line_error(run_script("ddpg.py", "--load-model", path, cwd=tmp_path), "saved by dqn.py")
    assert_one_line_error(run_script("dqn.py", "--load-model", path, "--env-id", "Taxi-v4", cwd=tmp_path), "Taxi-v4")
    (tmp_path / "cut.pt").write_bytes(open(path, "rb").read()[:500])
    assert_one_line_error(run_script("dqn.py", "--load-model", "cut.pt", cwd=tmp_path), "cut.pt", "truncated")
    assert not (tmp_path / "runs").exists()  # refused before anything ran
