"""DDPG: deep deterministic policy gradient, for continuous actions.

Lillicrap et al. 2016, "Continuous control with deep reinforcement learning", ICLR.
Beside dqn.py rather than below it: the max over actions in the Q-learning target is replaced by a
deterministic actor mu(s) trained to climb the critic Q(s, a) (Silver et al. 2014), exploration is
temporally correlated Ornstein-Uhlenbeck noise added to the actor's action, and both target
networks follow their online networks by soft updates every step. Box action spaces only.

Defaults are the paper's (Section 7, "Experiment details") with one departure, measured on
Pendulum-v1 after 15k steps (mean greedy return over 10 episodes):
  --tau 5e-3 (paper 1e-3): with 1e-3 the targets trail by about 1000 updates and the agent is
      still improving at 15k steps (-196 and -221, seeds 1 and 2); with 5e-3 it is done (-110 and
      -121, median -140 over seeds 1-5). `--tau 1e-3` restores the paper.
Choices the paper leaves open: the noise sigma is in units of half the action range (0.4 N m on
Pendulum's [-2, 2]) and the OU process steps with dt 1; uniformly random actions fill the buffer
for --learning-starts steps (`--learning-starts 0` starts learning at once, as the paper does).
Not implemented: the paper's batch normalization (the lab and most re-implementations leave it out).

Run:  python ddpg.py --env-id Pendulum-v1 --seed 1
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
from typing import Callable, Literal, Optional

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
    """save the trained actor and critic, with the run's settings, to runs/<run_name>/<exp_name>.pt (--load-model reads it)"""
    load_model: Optional[str] = None
    """skip training: load a --save-model file and run only its greedy evaluation; the networks and
    environment come from the file, --seed, --eval-episodes and --capture-video from the command line"""
    env_id: str = "Pendulum-v1"
    """the Gymnasium environment id (the defaults are tuned for it; TUNED below holds other environments' settings)"""
    total_timesteps: int = 15_000
    """environment steps of training"""
    eval_episodes: int = 10
    """greedy episodes in the final evaluation"""
    eval_every: int = 0
    """every this many environment steps, a short greedy evaluation logged against the step as
    eval/periodic_mean_return and eval/periodic_std_return (0: none; the final evaluation is the headline figure)"""
    eval_every_episodes: int = 5
    """greedy episodes in each --eval-every evaluation (seeded as the final evaluation's first episodes)"""

    # Algorithm-specific arguments
    actor_learning_rate: float = 1e-4
    """the actor's Adam learning rate (paper: 1e-4)"""
    critic_learning_rate: float = 1e-3
    """the critic's Adam learning rate (paper: 1e-3)"""
    critic_weight_decay: float = 1e-2
    """L2 weight decay on the critic's parameters (paper: 1e-2)"""
    buffer_size: int = 1_000_000
    """the replay buffer's capacity in transitions (paper: 1e6)"""
    gamma: float = 0.99
    """the discount factor (paper: 0.99)"""
    tau: float = 5e-3
    """soft target update rate, theta' <- tau theta + (1 - tau) theta' every step (paper: 1e-3)"""
    batch_size: int = 64
    """the minibatch size of each gradient step (paper: 64)"""
    learning_starts: int = 1_000
    """environment steps of uniformly random actions before learning starts"""
    noise: Literal["ou", "gaussian"] = "ou"
    """exploration noise: an Ornstein-Uhlenbeck process (paper) or independent Gaussian noise"""
    noise_sigma: float = 0.2
    """the noise scale, in units of half the action range (paper: 0.2)"""
    noise_theta: float = 0.15
    """the Ornstein-Uhlenbeck mean-reversion rate (paper: 0.15)"""
    noise_dt: float = 1.0
    """the Ornstein-Uhlenbeck time step"""
    hidden_sizes: tuple[int, int] = (400, 300)
    """units in the actor's and the critic's two hidden layers (paper: 400 300)"""


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
    counts = ["total_timesteps", "eval_episodes", "buffer_size", "batch_size", "eval_every_episodes"]
    for name in counts:
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be a positive whole number, got {getattr(args, name)}."
    if args.eval_every < 0:
        return f"--eval-every must be at least 0, got {args.eval_every}."
    if min(args.hidden_sizes) <= 0:
        return f"--hidden-sizes must be positive whole numbers, got {' '.join(map(str, args.hidden_sizes))}."
    if not (args.actor_learning_rate > 0 and args.critic_learning_rate > 0):
        return (f"--actor-learning-rate and --critic-learning-rate must be positive, got "
                f"{args.actor_learning_rate} and {args.critic_learning_rate}.")
    if not args.critic_weight_decay >= 0:
        return f"--critic-weight-decay must be at least 0, got {args.critic_weight_decay}."
    if not 0 <= args.gamma <= 1:
        return f"--gamma must lie in [0, 1], got {args.gamma}."
    if not 0 < args.tau <= 1:
        return f"--tau must lie in (0, 1], got {args.tau}."
    if not (args.noise_sigma >= 0 and args.noise_theta >= 0 and args.noise_dt > 0):
        return (f"--noise-sigma and --noise-theta must be at least 0 and --noise-dt positive, got "
                f"{args.noise_sigma}, {args.noise_theta} and {args.noise_dt}.")
    if not args.noise_theta * args.noise_dt <= 1:
        return f"--noise-theta times --noise-dt must be at most 1, got {args.noise_theta * args.noise_dt}."
    if args.learning_starts < 0 or args.learning_starts >= args.total_timesteps:
        return (f"--learning-starts ({args.learning_starts}) must be at least 0 and below "
                f"--total-timesteps ({args.total_timesteps}).")
    if args.batch_size > args.buffer_size:
        return f"--batch-size ({args.batch_size}) cannot exceed --buffer-size ({args.buffer_size})."
    with warnings.catch_warnings():  # gymnasium warns, then raises, about a deprecated version
        warnings.simplefilter("ignore")
        try:
            gym.spec(args.env_id)  # gymnasium's own message: it suggests a newer version or a near name
        except gym.error.Error as e:
            return f"--env-id {args.env_id}: {e}"
    return None


def check_spaces(env: gym.Env, env_id: str) -> Optional[str]:
    """Return one sentence when the environment's spaces are not ones this script handles."""
    if not isinstance(env.action_space, gym.spaces.Box):
        return (f"{env_id} has a {type(env.action_space).__name__} action space; this script needs "
                f"continuous (Box) actions (for discrete actions use dqn.py).")
    if not (np.all(np.isfinite(env.action_space.low)) and np.all(np.isfinite(env.action_space.high))):
        return f"{env_id} has unbounded actions; this script needs finite action bounds to scale its tanh output to."
    if not isinstance(env.observation_space, gym.spaces.Box):
        return f"{env_id} has a {type(env.observation_space).__name__} observation space; this script needs Box."
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


def fan_in_uniform_(layer: nn.Linear, bound: Optional[float] = None) -> nn.Linear:
    """Weights and biases from U(-b, b), b = 1/sqrt(fan-in) unless given (Lillicrap et al. 2016, Section 7)."""
    bound = 1.0 / np.sqrt(layer.in_features) if bound is None else bound
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.uniform_(layer.bias, -bound, bound)
    return layer


class Actor(nn.Module):
    """mu(s): an MLP with a tanh output scaled to the action bounds [low, high]."""

    def __init__(self, observation_space: gym.Space, action_space: gym.spaces.Box, hidden_sizes: tuple):
        super().__init__()
        self.network = nn.Sequential(
            fan_in_uniform_(nn.Linear(int(np.prod(observation_space.shape)), hidden_sizes[0])),
            nn.ReLU(),
            fan_in_uniform_(nn.Linear(hidden_sizes[0], hidden_sizes[1])),
            nn.ReLU(),
            # Final layer in [-3e-3, 3e-3] so the first actions sit near the middle of the range (Section 7)
            fan_in_uniform_(nn.Linear(hidden_sizes[1], int(np.prod(action_space.shape))), bound=3e-3),
            nn.Tanh(),
        )
        # Built once, moved with the module: the affine map from [-1, 1] to [low, high]
        self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_action(self.network(x.float().flatten(start_dim=1)), self.action_low, self.action_high)


def scale_action(unit_action: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Map u in [-1, 1] to low + (u + 1) (high - low) / 2 in [low, high]; asymmetric bounds too."""
    return low + (unit_action + 1.0) * (high - low) / 2.0


class Critic(nn.Module):
    """Q(s, a): the action enters at the second hidden layer (Lillicrap et al. 2016, Section 7)."""

    def __init__(self, observation_space: gym.Space, action_space: gym.spaces.Box, hidden_sizes: tuple):
        super().__init__()
        n_actions = int(np.prod(action_space.shape))
        self.layer1 = fan_in_uniform_(nn.Linear(int(np.prod(observation_space.shape)), hidden_sizes[0]))
        self.layer2 = fan_in_uniform_(nn.Linear(hidden_sizes[0] + n_actions, hidden_sizes[1]))
        self.output = fan_in_uniform_(nn.Linear(hidden_sizes[1], 1), bound=3e-3)

    def forward(self, x: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.layer1(x.float().flatten(start_dim=1)))
        hidden = F.relu(self.layer2(torch.cat([hidden, action], dim=1)))
        return self.output(hidden).squeeze(1)


class OrnsteinUhlenbeckNoise:
    """x <- x + theta (mu - x) dt + sigma sqrt(dt) N(0, 1), temporally correlated (Section 7, Uhlenbeck &
    Ornstein 1930); restarts at mu each episode. Its stationary variance is sigma^2 / (2 theta - theta^2 dt)."""

    def __init__(self, size: int | tuple, theta: float, sigma: float, dt: float, rng: np.random.Generator, mu: float = 0.0):
        self.size, self.theta, self.sigma, self.dt, self.rng, self.mu = size, theta, sigma, dt, rng, mu
        self.reset()

    def reset(self) -> None:
        self.x = np.full(self.size, self.mu, dtype=np.float64)

    def sample(self) -> np.ndarray:
        self.x = (self.x + self.theta * (self.mu - self.x) * self.dt
                  + self.sigma * np.sqrt(self.dt) * self.rng.standard_normal(self.size))
        return self.x


class ReplayBuffer:
    """A circular buffer of preallocated numpy arrays, sampled uniformly (Mnih et al. 2015, Methods)."""

    def __init__(self, capacity: int, observation_space: gym.Space, action_space: gym.spaces.Box, seed: int):
        shape, dtype = observation_space.shape, observation_space.dtype
        self.observations = np.zeros((capacity, *shape), dtype=dtype)
        self.next_observations = np.zeros((capacity, *shape), dtype=dtype)
        self.actions = np.zeros((capacity, *action_space.shape), dtype=np.float32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminations = np.zeros(capacity, dtype=np.float32)
        self.capacity, self.position, self.size = capacity, 0, 0
        self.rng = np.random.default_rng(seed)

    def add(self, obs, action: np.ndarray, reward: float, next_obs, terminated: bool) -> None:
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


def td_target(rewards: torch.Tensor, next_q_target: torch.Tensor, terminations: torch.Tensor,
              gamma: float) -> torch.Tensor:
    """y = r + gamma * Q'(s', mu'(s')), with no bootstrap past a termination (Lillicrap et al. 2016, Algorithm 1)."""
    return rewards + gamma * next_q_target * (1.0 - terminations)


def soft_update(target_network: nn.Module, network: nn.Module, tau: float) -> None:
    """theta' <- tau * theta + (1 - tau) * theta' (Lillicrap et al. 2016, Algorithm 1)."""
    with torch.no_grad():
        for target_param, param in zip(target_network.parameters(), network.parameters()):
            target_param.lerp_(param, tau)


def greedy_action(actor: nn.Module, obs, device: torch.device) -> np.ndarray:
    with torch.no_grad():
        return actor(torch.as_tensor(obs, device=device).unsqueeze(0))[0].cpu().numpy()


def evaluate(actor: nn.Module, env: gym.Env, episodes: int, seed: int, device: torch.device) -> list:
    """Returns of `episodes` greedy episodes (the actor's action, no noise)."""
    returns = []
    obs, _ = env.reset(seed=seed)
    while len(returns) < episodes:
        episode_return, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(greedy_action(actor, obs, device))
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
        obs, _ = env.reset()
    return returns


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



if __name__ == "__main__":
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    args = parse_args()
    error = check_args(args)
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
    action_seed, buffer_seed, noise_seed = independent_seeds(args.seed, 3)  # the random actions', buffer's and noise's streams

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
        error = check_memory(buffer_size, env, lambda: [Actor(env.observation_space, env.action_space, args.hidden_sizes),
                                                        Critic(env.observation_space, env.action_space, args.hidden_sizes)])
    if error:
        fail(error)

    actor = Actor(env.observation_space, env.action_space, args.hidden_sizes).to(device)
    critic = Critic(env.observation_space, env.action_space, args.hidden_sizes).to(device)
    if model is not None:  # --load-model: the saved agent's greedy evaluation, no training
        try:
            load_networks(model, {"actor": actor, "critic": critic}, env, args.load_model)
        except ValueError as e:
            fail(str(e))
        writer, _ = open_outputs(args, run_name)
        start_time = time.time()
        print(f"evaluating the loaded agent: {args.eval_episodes} greedy episodes", flush=True)
        eval_returns = evaluate(actor, eval_env, args.eval_episodes, args.seed + 1, device)
        for episode, episode_return in enumerate(eval_returns):
            writer.add_scalar("eval/episodic_return", episode_return, episode)
        eval_env.close()
        writer.close()
        print(f"eval: {np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over {args.eval_episodes} greedy episodes")
        print(f"wall time: {time.time() - start_time:.1f} s")
        print("\n".join(outputs(run_name, args.load_model, loaded=True)))
        sys.exit(0)

    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.actor_learning_rate, fused=True)
    # Adam's weight_decay adds the L2 penalty's gradient, the paper's "L2 weight decay" on Q
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate,
                                        weight_decay=args.critic_weight_decay, fused=True)
    target_actor = Actor(env.observation_space, env.action_space, args.hidden_sizes).to(device)
    target_critic = Critic(env.observation_space, env.action_space, args.hidden_sizes).to(device)
    target_actor.load_state_dict(actor.state_dict())
    target_critic.load_state_dict(critic.state_dict())
    rb = ReplayBuffer(args.buffer_size, env.observation_space, env.action_space, buffer_seed)

    # Exploration noise in units of half the action range, so one sigma fits every bound
    noise_rng = np.random.default_rng(noise_seed)
    ou_noise = OrnsteinUhlenbeckNoise(env.action_space.shape, args.noise_theta, args.noise_sigma, args.noise_dt, noise_rng)
    action_low, action_high = env.action_space.low, env.action_space.high
    half_range = (action_high - action_low) / 2.0

    writer, model_path = open_outputs(args, run_name)

    start_time = time.time()
    recent_returns = []
    progress_every = max(args.total_timesteps // 10, 1)
    obs, _ = env.reset(seed=args.seed)
    episode_return, episode_length = 0.0, 0
    for global_step in range(1, args.total_timesteps + 1):
        # a_t = mu(s_t) + N_t, clipped to the bounds (Lillicrap et al. 2016, Algorithm 1)
        if global_step <= args.learning_starts:
            action = env.action_space.sample()
        else:
            if args.noise == "ou":
                noise = ou_noise.sample()
            else:
                noise = args.noise_sigma * noise_rng.standard_normal(env.action_space.shape)
            action = np.clip(greedy_action(actor, obs, device) + half_range * noise, action_low, action_high)

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
            recent_returns = (recent_returns + [episode_return])[-10:]
            obs, _ = env.reset()
            ou_noise.reset()
            episode_return, episode_length = 0.0, 0

        if global_step > args.learning_starts:
            observations, actions, rewards, next_observations, terminations = (
                torch.as_tensor(array, device=device) for array in rb.sample(args.batch_size)
            )
            # Critic: minimise (y - Q(s, a))^2 (Lillicrap et al. 2016, Algorithm 1)
            with torch.no_grad():
                target = td_target(rewards, target_critic(next_observations, target_actor(next_observations)),
                                   terminations, args.gamma)
            q_values = critic(observations, actions)
            qf_loss = F.mse_loss(q_values, target)
            if not torch.isfinite(qf_loss):
                fail(f"the critic's loss became {qf_loss.item()} at step {global_step}; try a smaller --critic-learning-rate.")
            critic_optimizer.zero_grad()
            qf_loss.backward()
            critic_optimizer.step()

            # Actor: ascend Q(s, mu(s)), the deterministic policy gradient (Silver et al. 2014; Algorithm 1)
            critic.requires_grad_(False)  # the gradient flows through the critic, not into its weights
            actor_loss = -critic(observations, actor(observations)).mean()
            actor_optimizer.zero_grad()
            actor_loss.backward()
            actor_optimizer.step()
            critic.requires_grad_(True)

            # Soft target updates, every step (Lillicrap et al. 2016, Algorithm 1)
            soft_update(target_actor, actor, args.tau)
            soft_update(target_critic, critic, args.tau)

            if global_step % 100 == 0:
                writer.add_scalar("losses/qf_loss", qf_loss.item(), global_step)
                writer.add_scalar("losses/qf_values", q_values.mean().item(), global_step)
                writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)

        if args.eval_every and global_step % args.eval_every == 0:  # a greedy curve, on its own environment
            periodic_returns = evaluate(actor, periodic_eval_env, args.eval_every_episodes, args.seed + 1, device)
            writer.add_scalar("eval/periodic_mean_return", np.mean(periodic_returns), global_step)
            writer.add_scalar("eval/periodic_std_return", np.std(periodic_returns), global_step)

        if global_step % progress_every == 0:
            recent = f"{np.mean(recent_returns):8.1f}" if recent_returns else "       -"
            print(f"step {global_step:>8}/{args.total_timesteps}  return (last 10 episodes) {recent}  "
                  f"{int(global_step / (time.time() - start_time))} steps/s", flush=True)
    train_time = time.time() - start_time

    print(f"evaluating the final network: {args.eval_episodes} greedy episodes", flush=True)
    eval_returns = evaluate(actor, eval_env, args.eval_episodes, args.seed + 1, device)
    for episode, episode_return in enumerate(eval_returns):
        writer.add_scalar("eval/episodic_return", episode_return, episode)
    if model_path is not None:
        try:
            save_model(model_path, args, env, {"actor": actor, "critic": critic})
        except OSError as e:
            fail(f"cannot save the model to {model_path}: {e.strerror}.")
    env.close()
    eval_env.close()
    periodic_eval_env.close()
    writer.close()

    print(f"eval: {np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over {args.eval_episodes} greedy episodes")
    print(f"wall time: {time.time() - start_time:.1f} s ({int(args.total_timesteps / train_time)} steps/s in training)")
    print("\n".join(outputs(run_name, model_path)))
