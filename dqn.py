"""DQN: deep Q-learning with experience replay and a target network.

Mnih et al. 2015, "Human-level control through deep reinforcement learning", Nature 518.
The root of the family: an online Q-network trained on minibatches drawn uniformly from a replay
buffer, towards targets computed by a periodically updated copy of itself (the target network).
Every sibling script is this file plus one paper's change.

Departures from the paper's Atari agent, for small control tasks on a CPU (the siblings keep them):
a two-layer MLP; Adam (paper: RMSProp); a soft target update, tau 0.005 every step (the paper's hard
copy is `--tau 1 --target-network-frequency N`; with N 500 an earlier version of this script solved
1 of CartPole seeds 1-5); a gradient step every environment step on batches of 128 (paper: every 4,
batch 32); epsilon from 1 to 0.01 over the first 12% of the run. Flags for what the paper does not
have, off by default and measured on CartPole tuning seeds 101-110 (benchmark/tuning/dqn-CartPole-v1/):
--anneal-lr (8 of 10 solved, as without it), --max-grad-norm (0: no clipping), --huber-delta other
than the paper's 1 (10: 8 of 10, as 1).

Run:  python dqn.py --env-id CartPole-v1 --seed 1
"""

import atexit
import dataclasses
import glob
import math
import os
import pickletools
import random
import re
import signal
import stat
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the run name)"""
    seed: int = 1
    """seed of Python, numpy, torch and the environment"""
    torch_deterministic: bool = True
    """make torch use deterministic algorithms (same seed, same machine: same returns)"""
    cuda: bool = False
    """train on the GPU when one is available"""
    capture_video: bool = False
    """record the first greedy evaluation episode to videos/<run_name>/"""
    save_model: bool = False
    """save the trained network, with the run's settings, to runs/<run_name>/<exp_name>.pt (--load-model reads it)"""
    load_model: Optional[str] = None
    """skip training: load a --save-model file and run only its greedy evaluation (and --save-demos); the
    network and environment come from the file, --seed, --eval-episodes and --capture-video from the command line"""
    save_demos: Optional[str] = None
    """after training, record greedy episodes of the agent to this .npy file (for dqfd.py)"""
    demo_episodes: int = 2
    """how many episodes --save-demos records"""
    env_id: str = "CartPole-v1"
    """the Gymnasium environment id (the defaults are tuned for it; TUNED below holds other environments' settings)"""
    total_timesteps: int = 50_000
    """environment steps of training"""
    eval_episodes: int = 10
    """greedy episodes in the final evaluation"""
    eval_every: int = 0
    """every this many environment steps, a short greedy evaluation logged against the step as
    eval/periodic_mean_return and eval/periodic_std_return (0: none; the final evaluation is the headline figure)"""
    eval_every_episodes: int = 5
    """greedy episodes in each --eval-every evaluation (seeded as the final evaluation's first episodes)"""

    # Algorithm-specific arguments
    learning_rate: float = 5e-4
    """the Adam learning rate"""
    buffer_size: int = 50_000
    """the replay buffer's capacity in transitions"""
    gamma: float = 0.99
    """the discount factor"""
    tau: float = 0.005
    """target network update rate (1.0: the paper's hard copy every target_network_frequency steps)"""
    target_network_frequency: int = 1
    """environment steps between target network updates"""
    batch_size: int = 128
    """the minibatch size of each gradient step"""
    start_e: float = 1.0
    """the starting epsilon of epsilon-greedy exploration"""
    end_e: float = 0.01
    """the final epsilon"""
    exploration_fraction: float = 0.12
    """the fraction of total_timesteps over which epsilon decays linearly from start_e to end_e"""
    learning_starts: int = 1_000
    """environment steps before the first gradient step (the agent acts epsilon-greedily from the first step)"""
    train_frequency: int = 1
    """environment steps between gradient steps"""
    hidden_size: int = 128
    """units in each of the network's two hidden layers"""
    huber_delta: float = 1.0
    """TD errors beyond this count linearly in the Huber loss (Mnih et al. 2015 clip the error term to [-1, 1]: 1)"""
    max_grad_norm: float = 0.0
    """clip the gradient's global norm to this before each step (0: no clipping, as in the paper)"""
    anneal_lr: bool = False
    """decay the learning rate linearly to 0 over training (off: constant, as in the paper)"""


# Settings tuned per environment: `--env-id ENV` starts from Args' defaults with TUNED[ENV] on top, and
# flags given on the command line override both. The evidence for each value is the sweep committed in
# benchmark/tuning/<script>-<env>/.
TUNED = {
}


def parse_args(argv: Optional[list] = None) -> Args:
    """Args from the command line, on top of the settings tuned for its --env-id (explicit flags win)."""
    description = (f"{__doc__}\nSettings tuned per environment: {Args.env_id} (the defaults)"
                   + "".join(f", {env_id}" for env_id in TUNED) + "; flags given on the command line override them.")
    env_id = tyro.cli(Args, args=argv, description=description).env_id
    return tyro.cli(Args, args=argv, description=description, default=Args(**TUNED.get(env_id, {})))


def settings_line(args: Args) -> str:
    """The first line a run prints: whose settings it uses, and the flags that changed them."""
    tuned = TUNED.get(args.env_id, {})
    if args.env_id == Args.env_id or tuned:
        source = f"the settings tuned for {args.env_id}"
    else:
        source = f"the defaults (tuned for {Args.env_id}; none are tuned for {args.env_id})"
    if tuned:
        source += " (" + " ".join(f"--{name.replace('_', '-')} {value}" for name, value in tuned.items()) + ")"
    defaults = Args(**tuned)
    changed = [f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items()
               if value != getattr(defaults, name) and name not in ("env_id", "seed")]
    return (f"{args.exp_name} on {args.env_id}, seed {args.seed}: {source}"
            + (f"; changed by {' '.join(changed)}" if changed else ""))


def fail(message: str) -> None:
    """End the run with one sentence on stderr and a non-zero exit."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever a message quotes
    sys.exit(2)


def stop(signum: int, frame) -> None:
    """Ctrl-C (SIGINT) and SIGTERM end the run with one line and exit code 128 + signum. The exit runs every cleanup:
    atexit closes (so flushes) the TensorBoard log, and a save in progress removes its half-written file."""
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, signal.SIG_IGN)  # a second Ctrl-C does not interrupt the cleanup
    print(f"stopped by {signal.Signals(signum).name}; the TensorBoard log keeps what was logged so far", file=sys.stderr)
    sys.exit(128 + signum)


def check_args(args: Args) -> Optional[str]:
    """Return one sentence describing the first bad flag, or None when the flags are usable."""
    for name, value in vars(args).items():  # inf passes `> 0` and nan fails every comparison: refuse both first
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{name.replace('_', '-')} must be a finite number, got {value}."
    if not re.fullmatch(r"[\w.+=,-]+", args.exp_name) or set(args.exp_name) == {"."}:
        return (f"--exp-name must be a plain file name (letters, digits and . _ - + = ,), got {args.exp_name!r}; "
                f"it names the run's folder in runs/.")
    if not 0 <= args.seed <= 2**32 - 3:  # numpy and gymnasium take 32-bit seeds; evaluation uses seed + 1 and + 2
        return f"--seed must lie in [0, {2**32 - 3}], got {args.seed}."
    counts = ["total_timesteps", "eval_episodes", "buffer_size", "target_network_frequency",
              "batch_size", "train_frequency", "hidden_size", "demo_episodes", "eval_every_episodes"]
    for name in counts:
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be a positive whole number, got {getattr(args, name)}."
    if args.eval_every < 0:
        return f"--eval-every must be at least 0, got {args.eval_every}."
    if not args.learning_rate > 0:
        return f"--learning-rate must be positive, got {args.learning_rate}."
    if not 0 <= args.gamma <= 1:
        return f"--gamma must lie in [0, 1], got {args.gamma}."
    if not 0 < args.tau <= 1:
        return f"--tau must lie in (0, 1], got {args.tau}."
    if not (0 <= args.end_e <= 1 and 0 <= args.start_e <= 1):
        return f"--start-e and --end-e must lie in [0, 1], got {args.start_e} and {args.end_e}."
    if not 0 < args.exploration_fraction <= 1:
        return f"--exploration-fraction must lie in (0, 1], got {args.exploration_fraction}."
    if args.learning_starts < 0 or args.learning_starts >= args.total_timesteps:
        return (f"--learning-starts ({args.learning_starts}) must be at least 0 and below "
                f"--total-timesteps ({args.total_timesteps}).")
    if args.batch_size > args.buffer_size:
        return f"--batch-size ({args.batch_size}) cannot exceed --buffer-size ({args.buffer_size})."
    if not args.max_grad_norm >= 0:
        return f"--max-grad-norm must be at least 0, got {args.max_grad_norm}."
    if not args.huber_delta > 0:
        return f"--huber-delta must be positive, got {args.huber_delta}."
    if args.save_demos is not None and os.path.exists(args.save_demos):
        return f"--save-demos {args.save_demos} already exists; choose a new path, it is never overwritten."
    with warnings.catch_warnings():  # gymnasium warns, then raises, about a deprecated version
        warnings.simplefilter("ignore")
        try:
            gym.spec(args.env_id)  # gymnasium's own message: it suggests a newer version or a near name
        except gym.error.Error as e:
            return f"--env-id {args.env_id}: {e}"
    return None


def check_spaces(env: gym.Env, env_id: str) -> Optional[str]:
    """Return one sentence when the environment's spaces are not ones this script handles."""
    if not isinstance(env.action_space, gym.spaces.Discrete):
        return (f"{env_id} has a {type(env.action_space).__name__} action space; this script needs "
                f"discrete actions (for continuous actions use ddpg.py).")
    if not isinstance(env.observation_space, (gym.spaces.Box, gym.spaces.Discrete)):
        return f"{env_id} has a {type(env.observation_space).__name__} observation space; this script needs Box or Discrete."
    return None


def check_memory(buffer_size: int, env: gym.Env, build_networks: Callable[[], list]) -> Optional[str]:
    """One sentence when a replay buffer of buffer_size slots and the networks would need more memory than this machine has.

    The networks are built on the meta device, which gives their sizes and allocates nothing. Counted per buffer
    slot: two observations, an action and at most 80 bytes of reward, flags and priority trees; per parameter:
    five float32 copies (the network, its target, the gradient and Adam's two moments).
    """
    try:
        with torch.device("meta"):
            parameters = sum(parameter.numel() for network in build_networks() for parameter in network.parameters())
    except (RuntimeError, TypeError):  # torch counts in 64 bits
        return "the networks' layers are too large to build: they would hold more than 2^63 numbers."
    spaces = (env.observation_space, env.observation_space, env.action_space)
    slot_bytes = sum(space.dtype.itemsize * int(np.prod(space.shape)) for space in spaces) + 80
    buffer_gib, networks_gib = buffer_size * slot_bytes / 2**30, 5 * 4 * parameters / 2**30
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return None
    if buffer_gib + networks_gib > memory_gib:
        return (f"the networks would need {networks_gib:,.1f} GiB and the replay buffer (--buffer-size {buffer_size}) "
                f"{buffer_gib:,.1f} GiB of memory, more than this machine's {memory_gib:,.1f} GiB.")
    return None


def check_demo_path(args: Args) -> Optional[str]:
    """One sentence when --save-demos names a path that cannot be written, found before training by creating the
    file (which must not exist) and removing it again."""
    if args.save_demos is None:
        return None
    try:
        open(args.save_demos, "xb").close()
        os.remove(args.save_demos)
    except OSError as e:
        return f"cannot write --save-demos '{args.save_demos}': {e.strerror}."
    return None


def independent_seeds(seed: int, n: int) -> list:
    """n seeds of independent random streams, spawned from `seed` by numpy's SeedSequence.

    Seeding every source of randomness with `seed` itself would hand them one stream:
    np.random.default_rng(seed), env.reset(seed=seed) and env.action_space.seed(seed) start the same PCG64 state.
    """
    return [int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(n)]


def make_env(env_id: str, seed: int, capture_video: bool = False, run_name: str = "") -> gym.Env:
    env = gym.make(env_id, render_mode="rgb_array" if capture_video else None)
    if capture_video:
        env = gym.wrappers.RecordVideo(env, f"videos/{run_name}", episode_trigger=lambda episode: episode == 0)
    env.action_space.seed(seed)
    return env


class QNetwork(nn.Module):
    """An MLP from an observation to one Q-value per action; Discrete observations are one-hot."""

    def __init__(self, observation_space: gym.Space, n_actions: int, hidden_size: int):
        super().__init__()
        discrete = isinstance(observation_space, gym.spaces.Discrete)
        self.n_states = int(observation_space.n) if discrete else None
        in_features = self.n_states if discrete else int(np.prod(observation_space.shape))
        self.network = nn.Sequential(
            nn.Linear(in_features, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, n_actions),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(encode_observations(x, self.n_states))


def encode_observations(x: torch.Tensor, n_states: Optional[int]) -> torch.Tensor:
    """Box observations flattened to floats; Discrete ones (state indices) one-hot encoded."""
    if n_states is not None:
        return F.one_hot(x.long(), n_states).float()
    return x.float().flatten(start_dim=1)


class ReplayBuffer:
    """A circular buffer of preallocated numpy arrays, sampled uniformly (Mnih et al. 2015, Methods)."""

    def __init__(self, capacity: int, observation_space: gym.Space, seed: int):
        shape, dtype = observation_space.shape, observation_space.dtype
        self.observations = np.zeros((capacity, *shape), dtype=dtype)
        self.next_observations = np.zeros((capacity, *shape), dtype=dtype)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminations = np.zeros(capacity, dtype=np.float32)
        self.capacity, self.position, self.size = capacity, 0, 0
        self.rng = np.random.default_rng(seed)

    def add(self, obs, action: int, reward: float, next_obs, terminated: bool) -> None:
        self.observations[self.position] = obs
        self.next_observations[self.position] = next_obs
        self.actions[self.position] = action
        self.rewards[self.position] = reward
        self.terminations[self.position] = terminated
        self.position = (self.position + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int):
        idx = self.rng.integers(0, self.size, size=batch_size)
        return (self.observations[idx], self.actions[idx], self.rewards[idx],
                self.next_observations[idx], self.terminations[idx])


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    """Epsilon decays linearly from start_e to end_e over `duration` steps (at least 1), then stays at end_e."""
    slope = (end_e - start_e) / max(duration, 1)
    return max(slope * t + start_e, end_e) if end_e <= start_e else min(slope * t + start_e, end_e)


def td_target(rewards: torch.Tensor, next_q_target: torch.Tensor, terminations: torch.Tensor,
              gamma: float) -> torch.Tensor:
    """y = r + gamma * max_a' Q_target(s', a'), with no bootstrap past a termination (Mnih et al. 2015, eq. 3)."""
    return rewards + gamma * next_q_target.max(dim=1).values * (1.0 - terminations)


def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    """theta_target <- tau * theta + (1 - tau) * theta_target; tau 1 is the paper's hard copy."""
    with torch.no_grad():
        for target_param, param in zip(target_network.parameters(), q_network.parameters()):
            target_param.lerp_(param, tau)


def greedy_action(q_network: nn.Module, obs, device: torch.device) -> int:
    with torch.no_grad():
        return int(q_network(torch.as_tensor(obs, device=device).unsqueeze(0)).argmax(dim=1).item())


def evaluate(q_network: nn.Module, env: gym.Env, episodes: int, seed: int, device: torch.device) -> list:
    """Returns of `episodes` greedy episodes (epsilon 0)."""
    returns = []
    obs, _ = env.reset(seed=seed)
    while len(returns) < episodes:
        episode_return, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(greedy_action(q_network, obs, device))
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
        obs, _ = env.reset()
    return returns


def record_demos(q_network: nn.Module, env: gym.Env, episodes: int, seed: int, device: torch.device) -> np.ndarray:
    """Greedy episodes as an object array of episodes, each a list of [state, action, reward, next_state, done].

    `done` is gymnasium's `terminated` (the bootstrap mask); an episode cut by a time limit ends its
    list with done False.
    """
    demos = np.empty(episodes, dtype=object)
    obs, _ = env.reset(seed=seed)
    for episode in range(episodes):
        steps, done = [], False
        while not done:
            action = greedy_action(q_network, obs, device)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            steps.append([np.array(obs), action, float(reward), np.array(next_obs), bool(terminated)])
            obs, done = next_obs, terminated or truncated
        demos[episode] = steps
        obs, _ = env.reset()
    return demos


# What a --save-model file's pickle may name: the three things torch.save needs for a dict of state_dicts
MODEL_PICKLE_NAMES = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}
# The flags --load-model takes from the command line; every other setting comes from the file
EVALUATION_FLAGS = ["exp_name", "seed", "torch_deterministic", "cuda", "capture_video", "save_model", "save_demos",
                    "demo_episodes", "eval_episodes", "load_model"]


def space_record(space: gym.Space) -> dict:
    """A space as plain values, which a saved agent's environment must match: its kind, shape and (Discrete) size."""
    n = int(space.n) if isinstance(space, gym.spaces.Discrete) else None
    return {"kind": type(space).__name__, "shape": tuple(space.shape), "n": n}


def save_model(path: str, args: Args, env: gym.Env, networks: dict) -> None:
    """The networks' weights with all that rebuilding them takes, as plain values: torch.load(path, weights_only=True)
    reads it. Written to path.tmp and renamed, so an interrupted save never leaves half a file."""
    model = {"script": os.path.basename(__file__), "env_id": args.env_id, "args": dataclasses.asdict(args),
             "observation_space": space_record(env.observation_space), "action_space": space_record(env.action_space),
             "networks": {name: network.state_dict() for name, network in networks.items()}}
    try:
        torch.save(model, path + ".tmp")
        os.replace(path + ".tmp", path)
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


def pickle_names(data: bytes) -> set:
    """The names ("module.name") a pickle would import, read from its opcodes without unpickling it."""
    return {str(argument or opcode.name).replace(" ", ".") for opcode, argument, _ in pickletools.genops(data)
            if opcode.name in ("GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4")}


def read_model(path: str) -> dict:
    """A --save-model file, read without running code from it and without allocating what it claims.

    torch.load(weights_only=True) runs no code, but a crafted file could still make it build a huge
    bytearray or inflate a compressed record. So the file must first look as torch.save writes it: a
    regular file holding an uncompressed zip, whose small pickle names nothing but MODEL_PICKLE_NAMES;
    its tensors are then mapped from the file (mmap) rather than copied. Raises ValueError with one sentence.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:  # missing, a symlink loop, a name too long, a path through a file...
        raise ValueError(f"cannot read --load-model {path}: {e.strerror}.")
    if not stat.S_ISREG(mode):  # a directory, FIFO, socket or device is never opened
        raise ValueError(f"--load-model {path} is not a regular file; it takes a .pt file written by --save-model.")
    names, model = set(), None
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            pickles = [record for record in records if record.filename.endswith("/data.pkl")]
            if (len(pickles) == 1 and pickles[0].file_size <= 2**20
                    and sum(record.file_size for record in records) <= os.path.getsize(path)
                    and all(record.compress_type == zipfile.ZIP_STORED for record in records)):
                names = pickle_names(archive.read(pickles[0]))
                if names <= MODEL_PICKLE_NAMES:
                    model = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip, truncated, corrupt: model stays None
        pass
    if names - MODEL_PICKLE_NAMES:
        raise ValueError(f"--load-model {path} was refused: its pickle asks for {min(names - MODEL_PICKLE_NAMES)[:100]}, "
                         f"which a saved model never needs.")
    kinds = {"script": str, "env_id": str, "args": dict, "observation_space": dict, "action_space": dict, "networks": dict}
    if not (isinstance(model, dict) and all(isinstance(model.get(key), kind) for key, kind in kinds.items())):
        raise ValueError(f"--load-model {path} is not an agent saved by --save-model (it is empty, truncated, "
                         f"corrupt or another kind of file).")
    if model["script"] != os.path.basename(__file__):
        raise ValueError(f"--load-model {path} holds an agent saved by {model['script'][:100]}, not by "
                         f"{os.path.basename(__file__)}; load it with that script.")
    return model


def kind(value) -> tuple:
    """A value's type, with its items' types for a tuple (as --hidden-sizes)."""
    return (type(value), *map(type, value)) if isinstance(value, tuple) else (type(value),)


def settings_from_model(args: Args, model: dict, env_id_given: bool) -> Args:
    """--load-model: the saved run's settings and environment, with the EVALUATION_FLAGS from the command line.
    Raises ValueError when --env-id was given and names another environment, or a saved setting has the wrong type."""
    if env_id_given and model["env_id"] != args.env_id:
        raise ValueError(f"--load-model {args.load_model} holds an agent for {model['env_id'][:100]}, not for --env-id "
                         f"{args.env_id}; leave --env-id out to evaluate it on its own environment.")
    settings = {name: value for name, value in model["args"].items() if name in vars(args) and name not in EVALUATION_FLAGS}
    for name, value in settings.items():
        if kind(value) != kind(getattr(args, name)):
            raise ValueError(f"--load-model {args.load_model} holds a {name} that is not a "
                             f"{type(getattr(args, name)).__name__}.")
    return dataclasses.replace(args, **settings)


def load_networks(model: dict, networks: dict, env: gym.Env, path: str) -> None:
    """Copy a saved agent's weights into `networks`, built from its settings, after checking that it was trained on
    this environment's spaces and holds exactly the networks' tensors. Raises ValueError with one sentence."""
    if (model["observation_space"] != space_record(env.observation_space)
            or model["action_space"] != space_record(env.action_space)):
        raise ValueError(f"--load-model {path} holds an agent for other observation or action spaces than "
                         f"{model['env_id']} has here.")
    for name, network in networks.items():
        saved, expected = model["networks"].get(name), network.state_dict()
        if not (isinstance(saved, dict) and saved.keys() == expected.keys()
                and all(isinstance(saved[key], torch.Tensor) and saved[key].shape == tensor.shape
                        and saved[key].dtype == tensor.dtype for key, tensor in expected.items())):
            raise ValueError(f"--load-model {path}: its {name} does not have the tensors its own settings build.")
        network.load_state_dict(saved)


def open_outputs(args: Args, run_name: str) -> tuple:
    """The run's TensorBoard log in runs/<run_name>, opened with a table of the run's settings and closed at exit
    whatever happens, and the path --save-model will write (None without it); both checked before training."""
    try:
        writer = SummaryWriter(f"runs/{run_name}")
    except OSError as e:  # runs is a file or a dangling link, cannot be written, the name is too long...
        fail(f"cannot write the run's log to runs/{run_name}: {e.strerror}.")
    atexit.register(writer.close)
    model_path = f"runs/{run_name}/{args.exp_name}.pt" if args.save_model else None
    if model_path is not None and (os.path.lexists(model_path) or os.path.lexists(model_path + ".tmp")):
        fail(f"{model_path} already exists; --save-model never overwrites it.")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
    )
    print(f"logging to runs/{run_name}")
    return writer, model_path


def outputs(run_name: str, model_path: Optional[str], loaded: bool = False) -> list:
    """The summary's last lines: where the run's log, the model and the video are, and how to look at them."""
    lines = [f"run: runs/{run_name}  (see it: tensorboard --logdir runs)"]
    if model_path is None:
        lines.append("model: not saved (add --save-model)")
    elif loaded:
        lines.append(f"model: {model_path} (loaded)")
    else:
        lines.append(f"model: {model_path}  (replay it: python {sys.argv[0]} --load-model {model_path} --capture-video)")
    lines += [f"video: {video}" for video in sorted(glob.glob(f"videos/{glob.escape(run_name)}/*.mp4"))]
    return lines


def save_demos(q_network: nn.Module, args: Args, device: torch.device) -> None:
    """--save-demos: record args.demo_episodes greedy episodes (from seed + 2) into a new .npy file, for dqfd.py."""
    demos = record_demos(q_network, make_env(args.env_id, args.seed + 2), args.demo_episodes, args.seed + 2, device)
    try:
        demo_file = open(args.save_demos, "xb")  # "x": never overwrite an existing file
    except FileExistsError:
        fail(f"--save-demos {args.save_demos} appeared during training; it was left untouched.")
    try:
        with demo_file:
            np.save(demo_file, demos, allow_pickle=True)
    except BaseException:
        os.remove(args.save_demos)  # an interrupted write leaves no half-written file
        raise
    for episode, steps in enumerate(demos):
        print(f"demo episode {episode}: return {sum(step[2] for step in steps):.1f}, {len(steps)} steps")


if __name__ == "__main__":
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    args = parse_args()
    error = check_args(args) or check_demo_path(args)
    if error:
        fail(error)
    model = None
    if args.load_model is not None:  # the saved run's settings and environment; the evaluation's flags from the command line
        try:
            model = read_model(args.load_model)
            env_id_given = any(token.split("=")[0] in ("--env-id", "--env_id") for token in sys.argv[1:])
            args = settings_from_model(args, model, env_id_given)
        except ValueError as e:
            fail(str(e))
        error = check_args(args)
        if error:
            fail(f"--load-model {args.load_model} holds settings this script refuses: {error}")
        print(f"{args.load_model}: a {model['script']} agent for {args.env_id}, trained for {args.total_timesteps} steps; "
              f"evaluating it, no training", flush=True)
    else:
        print(settings_line(args), flush=True)
    if args.capture_video:
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # render headless
        try:
            import moviepy  # noqa: F401  (gymnasium's RecordVideo writes mp4 files with it)
        except ImportError:
            fail("--capture-video needs moviepy to write videos: pip install moviepy")
    # A replay of a saved agent is named as one, so TensorBoard tells it from a training run
    run_name = f"{args.env_id}__{args.exp_name}{'' if model is None else '-replay'}__{args.seed}__{int(time.time())}"

    # Seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.cuda and args.torch_deterministic:  # deterministic cuBLAS needs a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.use_deterministic_algorithms(args.torch_deterministic)
    torch.set_num_threads(1)  # a small network on a CPU runs fastest on one thread
    torch.set_flush_denormal(True)  # denormal floats are slow on CPUs (DDPG on MountainCarContinuous: 7x)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cuda and device.type == "cpu":
        print("--cuda: torch finds no GPU on this machine, so the run uses the CPU", flush=True)
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    action_seed, buffer_seed = independent_seeds(args.seed, 2)  # the random actions' and the buffer's streams

    # Environments: one for training, stepped directly, one for the final evaluation and one for --eval-every's
    with warnings.catch_warnings(record=True) as notices:  # gymnasium's warnings, shown unless the error says it all
        try:
            env = make_env(args.env_id, action_seed)
            eval_env = make_env(args.env_id, args.seed + 1, args.capture_video, run_name)
            periodic_eval_env = make_env(args.env_id, args.seed + 1)
        except (gym.error.Error, ImportError, OSError) as e:  # ImportError: the environment's package is missing
            fail(f"cannot make {args.env_id}: {e}")
    for notice in notices:
        warnings.showwarning(notice.message, notice.category, notice.filename, notice.lineno)
    error = check_spaces(env, args.env_id)
    if not error:
        buffer_size = 0 if model is not None else args.buffer_size  # --load-model builds no replay buffer
        error = check_memory(buffer_size, env,
                             lambda: [QNetwork(env.observation_space, int(env.action_space.n), args.hidden_size)])
    if error:
        fail(error)

    q_network = QNetwork(env.observation_space, int(env.action_space.n), args.hidden_size).to(device)
    if model is not None:  # --load-model: the saved agent's greedy evaluation, no training
        try:
            load_networks(model, {"q_network": q_network}, env, args.load_model)
        except ValueError as e:
            fail(str(e))
        writer, _ = open_outputs(args, run_name)
        start_time = time.time()
        print(f"evaluating the loaded agent: {args.eval_episodes} greedy episodes", flush=True)
        eval_returns = evaluate(q_network, eval_env, args.eval_episodes, args.seed + 1, device)
        for episode, episode_return in enumerate(eval_returns):
            writer.add_scalar("eval/episodic_return", episode_return, episode)
        if args.save_demos is not None:
            save_demos(q_network, args, device)
        eval_env.close()
        writer.close()
        print(f"eval: {np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over {args.eval_episodes} greedy episodes")
        print(f"wall time: {time.time() - start_time:.1f} s")
        print("\n".join(outputs(run_name, args.load_model, loaded=True)))
        if args.save_demos is not None:
            print(f"demos: {args.save_demos}")
        sys.exit(0)

    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)  # fused: one kernel per step
    target_network = QNetwork(env.observation_space, int(env.action_space.n), args.hidden_size).to(device)
    target_network.load_state_dict(q_network.state_dict())
    rb = ReplayBuffer(args.buffer_size, env.observation_space, buffer_seed)

    writer, model_path = open_outputs(args, run_name)

    start_time = time.time()
    recent_returns = []
    progress_every = max(args.total_timesteps // 10, 1)
    obs, _ = env.reset(seed=args.seed)
    episode_return, episode_length = 0.0, 0
    for global_step in range(1, args.total_timesteps + 1):
        # Epsilon-greedy action (Mnih et al. 2015, Algorithm 1)
        epsilon = linear_schedule(args.start_e, args.end_e, int(args.exploration_fraction * args.total_timesteps), global_step)
        if random.random() < epsilon:
            action = int(env.action_space.sample())
        else:
            action = greedy_action(q_network, obs, device)

        next_obs, reward, terminated, truncated, _ = env.step(action)
        # Store the true next observation and `terminated` as the bootstrap mask, so a time-limit
        # truncation still bootstraps from the state it stopped in.
        rb.add(obs, action, reward, next_obs, terminated)
        obs = next_obs
        episode_return += float(reward)
        episode_length += 1
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", episode_return, global_step)
            writer.add_scalar("charts/episodic_length", episode_length, global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            recent_returns = (recent_returns + [episode_return])[-10:]
            obs, _ = env.reset()
            episode_return, episode_length = 0.0, 0

        if global_step > args.learning_starts:
            if global_step % args.train_frequency == 0:
                if args.anneal_lr:  # not in the paper: the step size falls linearly to 0 by the end of training
                    optimizer.param_groups[0]["lr"] = args.learning_rate * (1 - global_step / args.total_timesteps)
                observations, actions, rewards, next_observations, terminations = (
                    torch.as_tensor(array, device=device) for array in rb.sample(args.batch_size)
                )
                with torch.no_grad():
                    target = td_target(rewards, target_network(next_observations), terminations, args.gamma)
                q_values = q_network(observations).gather(1, actions.unsqueeze(1)).squeeze(1)
                # Huber loss: the gradient of an error beyond delta is clipped (Mnih et al. 2015, Methods: delta 1)
                loss = F.huber_loss(q_values, target, delta=args.huber_delta)
                if not torch.isfinite(loss):
                    fail(f"the loss became {loss.item()} at step {global_step}; try a smaller --learning-rate.")
                optimizer.zero_grad()
                loss.backward()
                if args.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)
                optimizer.step()

                if global_step % 100 == 0:
                    writer.add_scalar("losses/td_loss", loss.item(), global_step)
                    writer.add_scalar("losses/q_values", q_values.mean().item(), global_step)
                    writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)

            if global_step % args.target_network_frequency == 0:
                update_target(target_network, q_network, args.tau)

        if args.eval_every and global_step % args.eval_every == 0:  # a greedy curve, on its own environment
            periodic_returns = evaluate(q_network, periodic_eval_env, args.eval_every_episodes, args.seed + 1, device)
            writer.add_scalar("eval/periodic_mean_return", np.mean(periodic_returns), global_step)
            writer.add_scalar("eval/periodic_std_return", np.std(periodic_returns), global_step)

        if global_step % progress_every == 0:
            recent = f"{np.mean(recent_returns):8.1f}" if recent_returns else "       -"
            print(f"step {global_step:>8}/{args.total_timesteps}  return (last 10 episodes) {recent}  "
                  f"epsilon {epsilon:.3f}  {int(global_step / (time.time() - start_time))} steps/s", flush=True)
    train_time = time.time() - start_time

    print(f"evaluating the final network: {args.eval_episodes} greedy episodes", flush=True)
    eval_returns = evaluate(q_network, eval_env, args.eval_episodes, args.seed + 1, device)
    for episode, episode_return in enumerate(eval_returns):
        writer.add_scalar("eval/episodic_return", episode_return, episode)
    if model_path is not None:
        try:
            save_model(model_path, args, env, {"q_network": q_network})
        except OSError as e:
            fail(f"cannot save the model to {model_path}: {e.strerror}.")
    if args.save_demos is not None:
        save_demos(q_network, args, device)
    env.close()
    eval_env.close()
    periodic_eval_env.close()
    writer.close()

    print(f"eval: {np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over {args.eval_episodes} greedy episodes")
    print(f"wall time: {time.time() - start_time:.1f} s ({int(args.total_timesteps / train_time)} steps/s in training)")
    print("\n".join(outputs(run_name, model_path)))
    if args.save_demos is not None:
        print(f"demos: {args.save_demos}")
