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
import copy
import dataclasses
import glob
import importlib.util
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
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment (used in the run name)
    seed: int = 1  # seed of Python, numpy, torch and the environment
    torch_deterministic: bool = True  # make torch use deterministic algorithms (same seed, same machine: same returns)
    cuda: bool = False  # train on the GPU when one is available
    capture_video: bool = False  # record the first greedy evaluation episode to videos/<run_name>/
    save_model: bool = False
    """save the trained actor and critic, with the run's settings, to runs/<run_name>/<exp_name>.pt (--load-model reads it)"""
    load_model: Optional[str] = None
    """skip training: load a --save-model file and run only its greedy evaluation; the networks and
    environment come from the file, --seed, --eval-episodes and --capture-video from the command line"""
    env_id: str = "Pendulum-v1"
    """the Gymnasium environment id (the defaults are tuned for it; TUNED below holds other environments' settings)"""
    total_timesteps: int = 15_000  # environment steps of training
    eval_episodes: int = 10  # greedy episodes in the final evaluation
    eval_every: int = 0
    """every this many environment steps, a short greedy evaluation logged against the step as
    eval/periodic_mean_return and eval/periodic_std_return (0: none; the final evaluation is the headline figure)"""
    eval_every_episodes: int = 5  # greedy episodes in each --eval-every evaluation (seeded as the final evaluation's first)

    # Algorithm-specific arguments
    actor_learning_rate: float = 1e-4  # the actor's Adam learning rate (paper: 1e-4)
    critic_learning_rate: float = 1e-3  # the critic's Adam learning rate (paper: 1e-3)
    critic_weight_decay: float = 1e-2  # L2 weight decay on the critic's parameters (paper: 1e-2)
    buffer_size: int = 1_000_000  # the replay buffer's capacity in transitions (paper: 1e6)
    gamma: float = 0.99  # the discount factor (paper: 0.99)
    tau: float = 5e-3  # soft target update rate, theta' <- tau theta + (1 - tau) theta' every step (paper: 1e-3)
    batch_size: int = 64  # the minibatch size of each gradient step (paper: 64)
    learning_starts: int = 1_000  # environment steps of uniformly random actions before learning starts
    noise: Literal["ou", "gaussian"] = "ou"
    """exploration noise: an Ornstein-Uhlenbeck process (paper) or independent Gaussian noise"""
    noise_sigma: float = 0.2  # the noise scale, in units of half the action range (paper: 0.2)
    noise_theta: float = 0.15  # the Ornstein-Uhlenbeck mean-reversion rate (paper: 0.15)
    noise_dt: float = 1.0  # the Ornstein-Uhlenbeck time step
    hidden_sizes: tuple[int, int] = (400, 300)  # units in the actor's and the critic's two hidden layers (paper: 400 300)


# Settings tuned per environment: `--env-id ENV` starts from Args' defaults with TUNED[ENV] on top, and
# flags given on the command line override both. The evidence for each value is the sweep committed in
# benchmark/tuning/<script>-<env>/.
TUNED = {
    # benchmark/tuning/ddpg-MountainCarContinuous-v0: 50k steps with the paper's settings reach the goal on 2 of 3
    # tuning seeds (90.2, -99.9, 91.7); the RL Zoo's OU sigma 0.5, with dt 1 or SB3's 0.01, and no weight decay did no better
    "MountainCarContinuous-v0": dict(total_timesteps=50_000),
    # not tuned: the RL Zoo's DDPG settings, mapped (SB3's batch 256 and no weight decay); its results are in
    # benchmark/results-lunarlandercontinuous
    "LunarLanderContinuous-v3": dict(total_timesteps=300_000, gamma=0.98, buffer_size=200_000, learning_starts=10_000,
                                     actor_learning_rate=1e-3, critic_learning_rate=1e-3, critic_weight_decay=0.0,
                                     batch_size=256, noise="gaussian", noise_sigma=0.1),
}


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


def network_size(observation_space: gym.Space, action_space: gym.Space, args: Args) -> int:
    """The numbers in the actor's and the critic's state_dicts, counted from their layer sizes: weights, biases (the
    action joins the critic's second layer) and the actor's action bounds."""
    inputs, actions, (first, second) = math.prod(observation_space.shape), math.prod(action_space.shape), args.hidden_sizes
    actor = (inputs + 1) * first + (first + 1) * second + (second + 1) * actions + 2 * actions
    return actor + (inputs + 1) * first + (first + actions + 1) * second + (second + 1)


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


# ---------------------------------------------------------------------------------------------------------------------
# Tooling, the same letter for letter in every script: flags, agent files, outputs. A refusal is one sentence, exit 2.

# Flag rules, checked before anything runs, once every float flag is finite and every whole number positive (those of
# MAY_BE_ZERO at least 0): (what must hold, the sentence when it does not), the first broken rule refused.
MAY_BE_ZERO = ["seed", "learning_starts", "eval_every", "pretrain_steps"]
RULES = [
    (lambda a: re.fullmatch(r"[\w.+=,-]+", a.exp_name) and a.exp_name.strip("."),
     "--exp-name must be a plain file name (letters, digits and . _ - + = ,), got {a.exp_name!r}; it names the run's folder"),
    (lambda a: a.seed <= 2**32 - 3, "--seed must lie in [0, 4294967293] (32 bits, less 2 for the evaluations), got {a.seed}"),
    (lambda a: a.learning_starts < a.total_timesteps,
     "--learning-starts ({a.learning_starts}) must be below --total-timesteps ({a.total_timesteps})"),
    (lambda a: a.batch_size <= a.buffer_size, "--batch-size ({a.batch_size}) cannot exceed --buffer-size ({a.buffer_size})"),
    (lambda a: not os.path.lexists(getattr(a, "save_demos", None) or ""),
     "--save-demos {a.save_demos} already exists; choose a new path, it is never overwritten"),
    (lambda a: 0 <= a.gamma <= 1, "--gamma must lie in [0, 1], got {a.gamma}"),
    (lambda a: 0 < a.tau <= 1, "--tau must lie in (0, 1], got {a.tau}"),
]
RULES += [  # this script's own
    (lambda a: min(a.hidden_sizes) > 0, "--hidden-sizes must be positive, got {a.hidden_sizes}"),
    (lambda a: a.actor_learning_rate > 0 and a.critic_learning_rate > 0,
     "--actor-learning-rate and --critic-learning-rate must be positive, got {a.actor_learning_rate} and {a.critic_learning_rate}"),
    (lambda a: a.critic_weight_decay >= 0, "--critic-weight-decay must be at least 0, got {a.critic_weight_decay}"),
    (lambda a: a.noise_sigma >= 0 and a.noise_theta >= 0 and a.noise_dt > 0,
     "--noise-sigma and --noise-theta must be at least 0 and --noise-dt positive, got {a.noise_sigma}, {a.noise_theta} "
     "and {a.noise_dt}"),
    (lambda a: a.noise_theta * a.noise_dt <= 1, "--noise-theta times --noise-dt must be at most 1, got {a.noise_theta} and {a.noise_dt}"),
]


def check_spaces(env: gym.Env) -> Optional[str]:
    if not isinstance(env.action_space, gym.spaces.Box):
        return f"{env.spec.id} has a {type(env.action_space).__name__} action space; this script needs Box actions (dqn.py takes Discrete)."
    if not (np.isfinite(env.action_space.low).all() and np.isfinite(env.action_space.high).all()):
        return f"{env.spec.id} has unbounded actions; this script needs finite action bounds to scale its tanh output to."
    if not isinstance(env.observation_space, gym.spaces.Box):
        return f"{env.spec.id} has a {type(env.observation_space).__name__} observation space; this script needs Box."
    return None


def check_args(args: Args) -> Optional[str]:
    """The sentence of the first flag that breaks a rule, or None."""
    for name, value in vars(args).items():  # inf passes `> 0` and nan fails every comparison: refuse both first
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{name.replace('_', '-')} must be a finite number, got {value}."
        if type(value) is int and value < (name not in MAY_BE_ZERO):
            return f"--{name.replace('_', '-')} must be {'at least 0' if name in MAY_BE_ZERO else 'positive'}, got {value}."
    for rule, sentence in RULES:
        if not rule(args):
            return sentence.format(a=args) + "."
    with warnings.catch_warnings():  # gymnasium warns, then raises, about a deprecated version
        warnings.simplefilter("ignore")
        try:
            gym.spec(args.env_id)
        except gym.error.Error as e:  # gymnasium's own message names a newer version or a near name
            return f"--env-id {args.env_id}: {e}"
    return None


def parse_args(argv: Optional[list] = None) -> Args:
    """Args from the command line, on top of the settings tuned for its --env-id (explicit flags win)."""
    description = (f"{__doc__}\nSettings tuned per environment: {Args.env_id} (the defaults)"
                   + "".join(f", {env_id}" for env_id in TUNED) + "; flags given on the command line override them.")
    env_id = tyro.cli(Args, args=argv, description=description).env_id
    return tyro.cli(Args, args=argv, description=description, default=Args(**TUNED.get(env_id, {})))


def settings_line(args: Args) -> str:
    """The first line a run prints: whose settings it uses, and the flags that changed them."""
    tuned = TUNED.get(args.env_id, {})
    source = (f"the settings tuned for {args.env_id}" if args.env_id == Args.env_id or tuned
              else f"the defaults (tuned for {Args.env_id}; none are tuned for {args.env_id})")
    source += (" (" + " ".join(f"--{name.replace('_', '-')} {value}" for name, value in tuned.items()) + ")") * bool(tuned)
    changed = [f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items()
               if value != getattr(Args(**tuned), name) and name not in ("env_id", "seed")]
    return f"{args.exp_name} on {args.env_id}, seed {args.seed}: {source}" + ("; changed by " + " ".join(changed)) * bool(changed)


def fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever a message quotes
    sys.exit(2)


def stop(signum: int, frame) -> None:
    """Ctrl-C and SIGTERM: one line and exit code 128 + signum; the exit closes (flushes) the TensorBoard log."""
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, signal.SIG_IGN)  # a second Ctrl-C does not interrupt the cleanup
    print(f"stopped by {signal.Signals(signum).name}; the TensorBoard log keeps what was logged so far", file=sys.stderr)
    sys.exit(128 + signum)


def checked_settings(args: Args) -> tuple:
    """The flags checked, or --load-model's agent with its run's settings; then the run's first line."""
    agent, error = None, check_args(args)
    try:
        if not error and args.load_model:
            agent = read_agent(args.load_model)
            args = agent_settings(args, agent, any(word.split("=")[0] in ("--env-id", "--env_id") for word in sys.argv))
            error = check_args(args) and f"--load-model {args.load_model} holds settings this script refuses: {check_args(args)}"
        if not error and getattr(args, "save_demos", None) is not None:  # written after training: can it be?
            open(args.save_demos, "xb").close()
            os.remove(args.save_demos)
    except ValueError as e:
        error = str(e)
    except OSError as e:
        error = f"cannot write --save-demos '{args.save_demos}': {e.strerror}."
    if not error and args.capture_video and not importlib.util.find_spec("moviepy"):
        error = "--capture-video needs moviepy to write videos: pip install moviepy"
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # render headless, for --capture-video
    if error:
        fail(error)
    print(f"{args.load_model}: a {agent['script']} agent for {args.env_id}, trained for {args.total_timesteps} steps; "
          f"evaluating it, no training" if agent else settings_line(args), flush=True)
    return args, agent


def make_envs(args: Args, seed: int, run_name: str, agent: Optional[dict]) -> list:
    """The training environment (its random actions from `seed`), the final evaluation's and --eval-every's; checked
    that this script handles their spaces, that the buffer and the networks fit in memory, and that the agent fits."""
    with warnings.catch_warnings(record=True) as notices:  # gymnasium's warnings, shown unless the error says it all
        try:
            envs = [make_env(args.env_id, seed), make_env(args.env_id, args.seed + 1, args.capture_video, run_name),
                    make_env(args.env_id, args.seed + 1)]
        except (gym.error.Error, ImportError, OSError) as e:  # ImportError: the environment's package is missing
            fail(f"cannot make {args.env_id}: {e}")
    for notice in notices:
        warnings.showwarning(notice.message, notice.category, notice.filename, notice.lineno)
    error = check_spaces(envs[0]) or check_memory(args, envs[0]) or check_agent(agent, envs[0], args)
    if error:
        fail(error)
    return envs


def check_memory(args: Args, env: gym.Env) -> Optional[str]:
    """Counted per buffer slot: two observations, an action and at most 80 bytes more; per network parameter five
    float32 (the network, its target, the gradient and Adam's two moments). --load-model fills no buffer."""
    slot = sum(space.dtype.itemsize * math.prod(space.shape) for space in [env.observation_space] * 2 + [env.action_space])
    buffer_gib = (0 if args.load_model else args.buffer_size) * (slot + 80) / 2**30
    networks_gib = 20 * network_size(env.observation_space, env.action_space, args) / 2**30
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else math.inf
    if buffer_gib + networks_gib > memory_gib:
        return (f"the networks would need {networks_gib:,.1f} GiB and the replay buffer (--buffer-size {args.buffer_size}) "
                f"{buffer_gib:,.1f} GiB of memory, more than this machine's {memory_gib:,.1f} GiB.")
    return None


# An agent file is what torch.save writes of a dict: the networks' state_dicts, the run's settings and its spaces
AGENT_PICKLE_NAMES = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"}
AGENT_KINDS = {"script": str, "env_id": str, "args": dict, "observation_space": dict, "action_space": dict, "networks": dict}
EVALUATION_FLAGS = ["exp_name", "seed", "torch_deterministic", "cuda", "capture_video", "save_model", "save_demos",
                    "demo_episodes", "eval_episodes", "load_model"]  # --load-model takes these from the command line


def space_record(space: gym.Space) -> dict:
    return {"kind": type(space).__name__, "shape": tuple(space.shape), "n": int(space.n) if hasattr(space, "n") else None}


def save_agent(path: str, args: Args, env: gym.Env, networks: dict) -> None:
    """Written to path.tmp and renamed: never half a file."""
    agent = {"script": os.path.basename(__file__), "env_id": args.env_id, "args": dataclasses.asdict(args),
             "observation_space": space_record(env.observation_space), "action_space": space_record(env.action_space),
             "networks": {name: network.state_dict() for name, network in networks.items()}}
    try:
        torch.save(agent, path + ".tmp")
        os.replace(path + ".tmp", path)
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


def read_agent(path: str) -> dict:
    """A --save-model file, read by torch.load(weights_only=True), which runs no code from it. Refused before it is
    what its guard lets through: a path that is no regular file (a FIFO would hang), a pickle naming anything else
    (bytearray(2**32) fills 4 GiB), more records or bytes than the file holds (a compressed or shared record inflates
    to any size; a million empty ones take seconds). Raises ValueError with one sentence."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"--load-model {path} is not a regular file; it takes a .pt file written by --save-model.")
        reader = torch._C.PyTorchFileReader(path)  # torch.load's own zip reader
        records = reader.get_all_records()
        if len(records) > 100 or sum(map(reader.get_record_size, records)) > os.path.getsize(path):
            raise ValueError(f"--load-model {path} was refused: it holds more or larger records than its own size.")
        names = {str(name or op.name).replace(" ", ".") for op, name, _ in pickletools.genops(reader.get_record("data.pkl"))
                 if op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4")} - AGENT_PICKLE_NAMES
        if names:
            raise ValueError(f"--load-model {path} was refused: its pickle asks for {min(names)[:80]}, never in an agent.")
        agent = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # missing, a symlink loop, a name too long, a path through a file...
        raise ValueError(f"cannot read --load-model {path}: {e.strerror}.")
    except ValueError:
        raise
    except Exception:  # not a zip, truncated or corrupt: whatever torch raises
        agent = None
    if not (isinstance(agent, dict) and all(isinstance(agent.get(key), kind) for key, kind in AGENT_KINDS.items())):
        raise ValueError(f"--load-model {path} is not an agent saved by --save-model (it is empty, truncated, corrupt "
                         f"or another kind of file).")
    if agent["script"] != os.path.basename(__file__):
        raise ValueError(f"--load-model {path} holds an agent saved by {agent['script'][:80]}, not by "
                         f"{os.path.basename(__file__)}; load it with that script.")
    return agent


def agent_settings(args: Args, agent: dict, env_id_given: bool) -> Args:
    """The saved run's settings, with EVALUATION_FLAGS from the command line. Raises ValueError when --env-id names
    another environment or a saved setting has another type."""
    if env_id_given and agent["env_id"] != args.env_id:
        raise ValueError(f"--load-model {args.load_model} holds an agent for {agent['env_id'][:80]}, not for --env-id "
                         f"{args.env_id}; leave --env-id out to evaluate it on its own environment.")
    settings = {name: value for name, value in agent["args"].items() if name in vars(args) and name not in EVALUATION_FLAGS}
    for name, value in settings.items():
        kinds = [[type(v), *map(type, v)] if isinstance(v, tuple) else [type(v)] for v in (value, getattr(args, name))]
        if kinds[0] != kinds[1]:
            raise ValueError(f"--load-model {args.load_model} holds a {name} that is not a {type(getattr(args, name)).__name__}.")
    return dataclasses.replace(args, **settings)


def check_agent(agent: Optional[dict], env: gym.Env, args: Args) -> Optional[str]:
    """Before any network is built: a saved agent's spaces must be env's, and its tensors as many numbers as its
    settings build (a hidden size of 30,000 claimed over small tensors would first build 3.7 GiB of network)."""
    if agent is None:
        return None
    if [agent["observation_space"], agent["action_space"]] != [space_record(env.observation_space), space_record(env.action_space)]:
        return f"--load-model {args.load_model} holds an agent for other observation or action spaces than {args.env_id} has here."
    try:
        numbers = sum(tensor.numel() for network in agent["networks"].values() for tensor in network.values())
    except (AttributeError, TypeError):  # a network that is no dict of tensors
        numbers = None
    if numbers != network_size(env.observation_space, env.action_space, args):
        return f"--load-model {args.load_model}: its networks do not have the tensors its own settings build."
    return None


def load_weights(agent: dict, networks: dict, path: str) -> None:
    """The saved weights into the networks its settings built, each tensor in its place (a strict load)."""
    for name, network in networks.items():
        try:
            network.load_state_dict(agent["networks"][name])
        except Exception:  # a missing, extra or misshapen tensor, a malformed state_dict
            fail(f"--load-model {path}: its {name} does not have the tensors its own settings build.")


def open_outputs(args: Args, run_name: str) -> tuple:
    """The run's TensorBoard log, runs/<run_name>, closed at exit whatever happens, and the path --save-model writes."""
    try:
        writer = SummaryWriter(f"runs/{run_name}")
    except OSError as e:  # runs is a file or a dangling link, cannot be written, the name is too long...
        fail(f"cannot write the run's log to runs/{run_name}: {e.strerror}.")
    atexit.register(writer.close)
    model_path = f"runs/{run_name}/{args.exp_name}.pt" if args.save_model and not args.load_model else None
    if model_path and glob.glob(glob.escape(model_path[: -len(".pt")]) + "*"):  # the agent, the best agent, a .tmp
        fail(f"{model_path} already exists; --save-model never overwrites it.")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    print(f"logging to runs/{run_name}")
    return writer, model_path


def keep_best(best: Optional[dict], mean_return: float, step: int, networks: dict) -> dict:
    """The networks' weights at their best periodic evaluation so far."""
    if best is None or mean_return > best["return"]:
        return {"return": mean_return, "step": step, "weights": {name: copy.deepcopy(network.state_dict())
                                                                 for name, network in networks.items()}}
    return best


def save_best(best: dict, networks: dict, args: Args, env: gym.Env, model_path: str, eval_env: gym.Env, device) -> str:
    """The best periodic agent, saved beside the final one; it and the final network evaluated on episodes seeded
    --seed + 3, which chose neither (the periodic evaluations that chose it were seeded --seed + 1)."""
    policy, path = next(iter(networks.values())), model_path[: -len(".pt")] + "-best.pt"
    final_returns = evaluate(policy, eval_env, args.eval_episodes, args.seed + 3, device)
    for name, network in networks.items():
        network.load_state_dict(best["weights"][name])
    best_returns = evaluate(policy, eval_env, args.eval_episodes, args.seed + 3, device)
    save_agent(path, args, env, networks)
    return (f"best agent: {np.mean(best_returns):.1f} ± {np.std(best_returns):.1f} over {args.eval_episodes} greedy episodes "
            f"seeded --seed + 3 (the final network: {np.mean(final_returns):.1f}), from step {best['step']}; saved to {path}")


def summary(args: Args, eval_returns: list, best_line: Optional[str], wall_time: float, train_time: float, run_name: str, model_path: Optional[str]):
    """The last lines a run prints: its evaluation, its time, and where its log, model, video and demos are."""
    print(f"eval: {np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over {args.eval_episodes} greedy episodes")
    if best_line:
        print(best_line)
    print(f"wall time: {wall_time:.1f} s" + (f" ({int(args.total_timesteps / train_time)} steps/s in training)" if train_time else ""))
    print(f"run: runs/{run_name}  (see it: tensorboard --logdir runs)")
    print(f"model: {args.load_model} (loaded)" if args.load_model else "model: not saved (add --save-model)" if not model_path
          else f"model: {model_path}  (replay it: python {sys.argv[0]} --load-model {model_path} --capture-video)")
    for video in sorted(glob.glob(f"videos/{glob.escape(run_name)}/*.mp4")):
        print(f"video: {video}")
    if getattr(args, "save_demos", None):
        print(f"demos: {args.save_demos}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    args, agent = checked_settings(parse_args())  # the checked flags, or a --load-model agent with its own settings
    # A replay of a saved agent is named as one, so TensorBoard tells it from a training run
    run_name = f"{args.env_id}__{args.exp_name}{'' if agent is None else '-replay'}__{args.seed}__{int(time.time())}"

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
    env, eval_env, periodic_eval_env = make_envs(args, action_seed, run_name, agent)

    actor = Actor(env.observation_space, env.action_space, args.hidden_sizes).to(device)
    critic = Critic(env.observation_space, env.action_space, args.hidden_sizes).to(device)
    networks = {"actor": actor, "critic": critic}  # what --save-model saves and --load-model loads
    if agent:
        load_weights(agent, networks, args.load_model)
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
    recent_returns, best = [], None
    progress_every = max(args.total_timesteps // 10, 1)
    obs, _ = env.reset(seed=args.seed)
    episode_return, episode_length = 0.0, 0
    for global_step in range(1, 0 if agent else args.total_timesteps + 1):  # --load-model: no training
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
            if model_path:  # --save-model also keeps the best of these agents, as SB3's EvalCallback does
                best = keep_best(best, np.mean(periodic_returns), global_step, networks)

        if global_step % progress_every == 0:
            recent = f"{np.mean(recent_returns):8.1f}" if recent_returns else "       -"
            print(f"step {global_step:>8}/{args.total_timesteps}  return (last 10 episodes) {recent}  "
                  f"{int(global_step / (time.time() - start_time))} steps/s", flush=True)
    train_time = time.time() - start_time

    print(f"evaluating {'the loaded agent' if agent else 'the final network'}: {args.eval_episodes} greedy episodes", flush=True)
    eval_returns = evaluate(actor, eval_env, args.eval_episodes, args.seed + 1, device)
    for episode, episode_return in enumerate(eval_returns):
        writer.add_scalar("eval/episodic_return", episode_return, episode)
    if model_path:
        try:
            save_agent(model_path, args, env, networks)
        except OSError as e:
            fail(f"cannot save the model to {model_path}: {e.strerror}.")
    best_line = best and save_best(best, networks, args, env, model_path, periodic_eval_env, device)
    eval_env.close()  # finishes the video
    writer.close()
    summary(args, eval_returns, best_line, time.time() - start_time, None if agent else train_time, run_name, model_path)
