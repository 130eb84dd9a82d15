"""Prioritized experience replay (proportional) on Double DQN.

Schaul, Quan, Antonoglou & Silver 2016, "Prioritized Experience Replay", ICLR, Algorithm 1.
double_dqn.py samples its replay buffer uniformly; here transition i is drawn with probability
P(i) = p_i^alpha / sum_k p_k^alpha, p_i = |delta_i| + eps, from a sum tree, and importance-sampling
weights correct the bias this introduces. Only the buffer, the sampling and the weighted loss change.

One departure, measured: the step size stays Double DQN's (--learning-rate 5e-4), where Schaul et al.
reduce it 4x for prioritized replay. On CartPole-v1 (50k steps, tuning seeds 101-103; the sweep in
benchmark/tuning/per_dqn-CartPole-v1/learning-rate) 5e-4 solved 2 of 3 seeds (500, 324.1, 500) and
the paper's quarter, 1.25e-4, 1 of 3 (452.7, 271.1, 500): too slow for a 50k-step run.
`--learning-rate 1.25e-4` restores the paper's ratio.

Run:  python per_dqn.py --env-id CartPole-v1 --seed 1
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
from typing import Optional

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
    save_model: bool = False  # save the network and the run's settings to runs/<run_name>/<exp_name>.pt for --load-model
    load_model: Optional[str] = None
    """skip training: load a --save-model file and run only its greedy evaluation (and --save-demos); the
    network and environment come from the file, --seed, --eval-episodes and --capture-video from the command line"""
    save_demos: Optional[str] = None  # after training, record greedy episodes of the agent to this .npy file (for dqfd.py)
    demo_episodes: int = 2  # how many episodes --save-demos records
    env_id: str = "CartPole-v1"  # the Gymnasium environment id (defaults tuned for it; TUNED holds other environments')
    total_timesteps: int = 50_000  # environment steps of training
    eval_episodes: int = 10  # greedy episodes in the final evaluation
    eval_every: int = 0
    """every this many environment steps, a short greedy evaluation logged against the step as
    eval/periodic_mean_return and eval/periodic_std_return (0: none; the final evaluation is the headline figure)"""
    eval_every_episodes: int = 5  # greedy episodes in each --eval-every evaluation (seeded as the final evaluation's first)

    # Algorithm-specific arguments
    learning_rate: float = 5e-4  # the Adam learning rate
    buffer_size: int = 50_000  # the replay buffer's capacity in transitions
    gamma: float = 0.99  # the discount factor
    tau: float = 0.005  # target network update rate (1.0: the paper's hard copy every target_network_frequency steps)
    target_network_frequency: int = 1  # environment steps between target network updates
    batch_size: int = 128  # the minibatch size of each gradient step
    start_e: float = 1.0  # the starting epsilon of epsilon-greedy exploration
    end_e: float = 0.01  # the final epsilon
    exploration_fraction: float = 0.12  # the fraction of total_timesteps over which epsilon falls linearly from start_e to end_e
    learning_starts: int = 1_000  # environment steps before the first gradient step (epsilon-greedy actions from the first step)
    train_frequency: int = 1  # environment steps between gradient steps
    hidden_size: int = 128  # units in each of the network's two hidden layers
    huber_delta: float = 1.0  # TD errors beyond this count linearly in the Huber loss (Mnih et al. 2015: 1, the clipped error)
    max_grad_norm: float = 0.0  # clip the gradient's global norm to this before each step (0: no clipping, as in the paper)
    anneal_lr: bool = False  # decay the learning rate linearly to 0 over training (off: constant, as in the paper)
    alpha: float = 0.6  # prioritization exponent: P(i) = p_i^alpha / sum_k p_k^alpha (0: uniform sampling)
    beta_start: float = 0.4  # importance-sampling exponent at the start; it grows linearly to 1 over total_timesteps
    prior_eps: float = 1e-2
    """eps in p_i = |delta_i| + eps: keeps every transition sampleable, and bounds how far one tiny
    priority (which sets the weights' normalizer) can shrink every other importance weight"""


# Settings tuned per environment: `--env-id ENV` starts from Args' defaults with TUNED[ENV] on top, and
# flags given on the command line override both. The evidence for each value is the sweep committed in
# benchmark/tuning/<script>-<env>/.
TUNED = {
    # benchmark/tuning/dqn-LunarLander-v3/end-e-buffer and anneal-lr: the RL Zoo's settings with SB3's gradient clipping
    # at 10, its 4 gradient steps every 4 env steps as one every step, a buffer that holds the whole run, and the step
    # size annealed to 0 (not in the paper; it steadies the final network: median 222.1 against 214.8 on seeds 101-105)
    "LunarLander-v3": dict(total_timesteps=200_000, learning_rate=6.3e-4, batch_size=128, buffer_size=200_000,
                           learning_starts=0, tau=1.0, target_network_frequency=250, end_e=0.1, exploration_fraction=0.12,
                           hidden_size=256, train_frequency=1, max_grad_norm=10.0, anneal_lr=True,
                           # PER's own: the full importance-sampling correction from the start. At beta 0.4 the
                           # uncorrected bias ran the Q-values away on some seeds (tuning/per_dqn-LunarLander-v3/
                           # divergence.md); beta-start-1: median 231.0 against 130.3 on seeds 101-105
                           beta_start=1.0),
    # benchmark/tuning/dqn-Taxi-v4/lr-exploration: twice the steps, and epsilon falls over 30% of them, not 12%
    # (median 8.4 against -76.2 on seeds 101-103)
    "Taxi-v4": dict(total_timesteps=100_000, exploration_fraction=0.3),
    # benchmark/tuning/dqn-MountainCar-v0/length-exploration: 120k steps, the defaults otherwise (median -133.7 on
    # seeds 101-104, short of the -110 target; 200k steps, or epsilon falling over 30%, did no better)
    "MountainCar-v0": dict(total_timesteps=120_000),
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


def network_size(observation_space: gym.Space, action_space: gym.Space, args: Args) -> int:
    """The weights and biases QNetwork holds, counted from its layer sizes."""
    discrete = isinstance(observation_space, gym.spaces.Discrete)
    inputs, hidden = int(observation_space.n) if discrete else math.prod(observation_space.shape), args.hidden_size
    return (inputs + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * int(action_space.n)


class ReplayBuffer:
    """A circular buffer of preallocated numpy arrays, sampled in proportion to priority (Schaul et al. 2016, Algorithm 1).

    Priorities p_i^alpha sit in the leaves of two binary trees stored as flat arrays: node k's
    children are 2k and 2k + 1, the root is node 1, and slot i's leaf is node leaves + i, where
    `leaves` is the capacity rounded up to a power of two. sum_tree[k] is the sum of the leaves
    below k (for sampling), min_tree[k] their minimum (for the weights' normalization). Leaves of
    empty or padding slots hold 0 in the sum tree and +inf in the min tree, so they are never drawn.
    The two trees are the columns of one array, so a node's sum and minimum, and its sibling's, share
    a cache line: the walk up from the slots just sampled finds in the cache what the walk down read.
    """

    def __init__(self, capacity: int, observation_space: gym.Space, seed: int, alpha: float):
        shape, dtype = observation_space.shape, observation_space.dtype
        self.observations = np.zeros((capacity, *shape), dtype=dtype)
        self.next_observations = np.zeros((capacity, *shape), dtype=dtype)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminations = np.zeros(capacity, dtype=np.float32)
        self.capacity, self.position, self.size = capacity, 0, 0
        self.rng = np.random.default_rng(seed)
        self.alpha = alpha
        self.depth = (capacity - 1).bit_length()  # levels below the root: leaves = 2^depth >= capacity
        self.leaves = 2 ** self.depth
        self.trees = np.zeros((2 * self.leaves, 2), dtype=np.float64)  # row k: sum_tree[k], min_tree[k]
        self.sum_tree, self.min_tree = self.trees[:, 0], self.trees[:, 1]  # views: writing them writes trees
        self.min_tree[:] = np.inf
        self.max_priority = 1.0  # p_1 = 1, then max_i p_i (Algorithm 1, lines 2 and 6)

    def add(self, obs, action: int, reward: float, next_obs, terminated: bool) -> None:
        self.observations[self.position] = obs
        self.next_observations[self.position] = next_obs
        self.actions[self.position] = action
        self.rewards[self.position] = reward
        self.terminations[self.position] = terminated
        # A new transition gets the maximal priority so far, so all experience is seen at least once (Sec. 3.2)
        node = self.leaves + self.position
        self.sum_tree[node] = self.min_tree[node] = self.max_priority ** self.alpha
        while node > 1:  # one slot: a scalar walk up to the root beats a vector step per level
            node //= 2
            self.sum_tree[node] = self.sum_tree[2 * node] + self.sum_tree[2 * node + 1]
            self.min_tree[node] = min(self.min_tree[2 * node], self.min_tree[2 * node + 1])
        self.position = (self.position + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def update_priorities(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Set p_i for the slots `indices` (a repeated slot keeps its last priority), then refresh their ancestors."""
        self.max_priority = max(self.max_priority, float(np.max(priorities)))
        # numpy leaves the winner of a repeated index unspecified in a[idx] = v; keep each slot's last write
        last = len(indices) - 1 - np.unique(indices[::-1], return_index=True)[1]
        nodes = self.leaves + indices[last]
        self.sum_tree[nodes] = self.min_tree[nodes] = priorities[last] ** self.alpha
        # Row k: the ancestors k + 1 levels up. Siblings share a parent; writing it twice writes the same value.
        parents = nodes >> np.arange(1, self.depth + 1)[:, None]
        for parent, left, right in zip(parents, 2 * parents, 2 * parents + 1):  # one vector step per level, up
            self.sum_tree[parent] = self.sum_tree[left] + self.sum_tree[right]
            self.min_tree[parent] = np.minimum(self.min_tree[left], self.min_tree[right])

    def find_prefix_sums(self, values: np.ndarray) -> np.ndarray:
        """For each value v in [0, total), the slot i whose leaf spans v in the running sum of the leaves."""
        values = np.array(values, dtype=np.float64)  # a copy, updated in place below
        nodes = np.ones(len(values), dtype=np.int64)
        for _ in range(self.depth):  # one vector step per level, root to leaves, in place: numpy calls are the cost
            nodes *= 2  # the left child
            left_sums = self.sum_tree[nodes]
            go_right = values >= left_sums  # v is past the left subtree: look for v - left_sum on the right
            np.subtract(values, left_sums, out=values, where=go_right)
            nodes += go_right
        # Only the slots from size on hold 0; a rounding error that runs past the last filled slot lands on it
        return np.minimum(nodes - self.leaves, self.size - 1)

    def sample_indices(self, batch_size: int) -> np.ndarray:
        """Stratified: cut [0, total) into batch_size equal segments, draw one value in each (Appendix B.2.1)."""
        segment = self.sum_tree[1] / batch_size
        return self.find_prefix_sums((np.arange(batch_size) + self.rng.random(batch_size)) * segment)

    def importance_weights(self, indices: np.ndarray, beta: float) -> np.ndarray:
        """w_j = (N * P(j))^-beta / max_i w_i (Algorithm 1, line 10), computed as (p_j^alpha / min_i p_i^alpha)^-beta.

        As in the paper and OpenAI Baselines, the max is over the whole buffer (reached at the minimal
        priority), not over the batch as in CleanRL's Rainbow or Tianshou: the scale of a transition's
        weight then does not depend on which other transitions share its batch, and weights only
        ever scale the update down. The price: the buffer's smallest priority scales every weight,
        so --prior-eps must not be tiny. N and the total cancel, and alpha 0 gives exactly 1.
        """
        return (self.sum_tree[self.leaves + indices] / self.min_tree[1]) ** -beta

    def sample(self, batch_size: int, beta: float):
        idx = self.sample_indices(batch_size)
        return (self.observations[idx], self.actions[idx], self.rewards[idx],
                self.next_observations[idx], self.terminations[idx],
                self.importance_weights(idx, beta).astype(np.float32), idx)


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    """Epsilon decays linearly from start_e to end_e over `duration` steps (at least 1), then stays at end_e."""
    slope = (end_e - start_e) / max(duration, 1)
    return max(slope * t + start_e, end_e) if end_e <= start_e else min(slope * t + start_e, end_e)


def td_target(rewards: torch.Tensor, next_q_online: torch.Tensor, next_q_target: torch.Tensor, terminations: torch.Tensor,
              gamma: float) -> torch.Tensor:
    """y = r + gamma * Q_target(s', argmax_a' Q(s', a')), no bootstrap past a termination (van Hasselt et al. 2016, eq. 4)."""
    next_actions = next_q_online.argmax(dim=1, keepdim=True)  # the online network picks a', the target network values it
    return rewards + gamma * next_q_target.gather(1, next_actions).squeeze(1) * (1.0 - terminations)


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
    (lambda a: a.learning_rate > 0, "--learning-rate must be positive, got {a.learning_rate}"),
    (lambda a: 0 <= a.start_e <= 1 and 0 <= a.end_e <= 1, "--start-e and --end-e must lie in [0, 1], got {a.start_e} and {a.end_e}"),
    (lambda a: 0 < a.exploration_fraction <= 1, "--exploration-fraction must lie in (0, 1], got {a.exploration_fraction}"),
    (lambda a: a.huber_delta > 0, "--huber-delta must be positive, got {a.huber_delta}"),
    (lambda a: a.max_grad_norm >= 0, "--max-grad-norm must be at least 0, got {a.max_grad_norm}"),
    (lambda a: a.alpha >= 0, "--alpha must be at least 0, got {a.alpha}"),
    (lambda a: 0 <= a.beta_start <= 1, "--beta-start must lie in [0, 1], got {a.beta_start}"),
    (lambda a: a.prior_eps > 0, "--prior-eps must be positive, got {a.prior_eps}"),
]


def check_spaces(env: gym.Env) -> Optional[str]:
    if not isinstance(env.action_space, gym.spaces.Discrete):
        return f"{env.spec.id} has a {type(env.action_space).__name__} action space; this script needs discrete actions (ddpg.py takes Box)."
    if not isinstance(env.observation_space, (gym.spaces.Box, gym.spaces.Discrete)):
        return f"{env.spec.id} has a {type(env.observation_space).__name__} observation space; this script needs Box or Discrete."
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


def save_demos(q_network: nn.Module, args: Args, device: torch.device) -> None:
    """--save-demos: args.demo_episodes greedy episodes (from seed + 2) into a new .npy file, for dqfd.py."""
    demos = record_demos(q_network, make_env(args.env_id, args.seed + 2), args.demo_episodes, args.seed + 2, device)
    try:
        with open(args.save_demos, "xb") as demo_file:  # "x": a file that appeared meanwhile is never overwritten
            np.save(demo_file, demos, allow_pickle=True)
    except FileExistsError:
        fail(f"--save-demos {args.save_demos} appeared during training; it was left untouched.")
    except BaseException:
        os.remove(args.save_demos)  # an interrupted write leaves no half-written file
        raise
    for episode, steps in enumerate(demos):
        print(f"demo episode {episode}: return {sum(step[2] for step in steps):.1f}, {len(steps)} steps")


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
    action_seed, buffer_seed = independent_seeds(args.seed, 2)  # the random actions' and the buffer's streams
    env, eval_env, periodic_eval_env = make_envs(args, action_seed, run_name, agent)

    q_network = QNetwork(env.observation_space, int(env.action_space.n), args.hidden_size).to(device)
    networks = {"q_network": q_network}  # what --save-model saves and --load-model loads
    if agent:
        load_weights(agent, networks, args.load_model)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)  # fused: one kernel per step
    target_network = QNetwork(env.observation_space, int(env.action_space.n), args.hidden_size).to(device)
    target_network.load_state_dict(q_network.state_dict())
    rb = ReplayBuffer(args.buffer_size, env.observation_space, buffer_seed, args.alpha)
    writer, model_path = open_outputs(args, run_name)

    start_time = time.time()
    recent_returns, best = [], None
    progress_every = max(args.total_timesteps // 10, 1)
    obs, _ = env.reset(seed=args.seed)
    episode_return, episode_length = 0.0, 0
    for global_step in range(1, 0 if agent else args.total_timesteps + 1):  # --load-model: no training
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
                # beta anneals linearly to 1, where the correction is full, by the end of training (Sec. 3.4)
                beta = linear_schedule(args.beta_start, 1.0, args.total_timesteps, global_step)
                *batch, indices = rb.sample(args.batch_size, beta)
                observations, actions, rewards, next_observations, terminations, weights = (
                    torch.as_tensor(array, device=device) for array in batch
                )
                with torch.no_grad():
                    target = td_target(rewards, q_network(next_observations), target_network(next_observations),
                                       terminations, args.gamma)
                q_values = q_network(observations).gather(1, actions.unsqueeze(1)).squeeze(1)
                # Huber loss: the gradient of an error beyond delta is clipped (Mnih et al. 2015, Methods: delta 1),
                # each sample's term scaled by its importance weight w_j (Algorithm 1, line 13)
                loss = (weights * F.huber_loss(q_values, target, reduction="none", delta=args.huber_delta)).mean()
                if not torch.isfinite(loss):
                    fail(f"the loss became {loss.item()} at step {global_step}; try a smaller --learning-rate.")
                optimizer.zero_grad()
                loss.backward()
                if args.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)
                optimizer.step()
                # p_j = |delta_j| + eps (Sec. 3.3; Algorithm 1, line 12)
                rb.update_priorities(indices, (target - q_values).abs().detach().cpu().numpy() + args.prior_eps)

                if global_step % 100 == 0:
                    writer.add_scalar("losses/td_loss", loss.item(), global_step)
                    writer.add_scalar("losses/q_values", q_values.mean().item(), global_step)
                    writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
                    writer.add_scalar("charts/beta", beta, global_step)
                    writer.add_scalar("charts/importance_weight", weights.mean().item(), global_step)

            if global_step % args.target_network_frequency == 0:
                update_target(target_network, q_network, args.tau)

        if args.eval_every and global_step % args.eval_every == 0:  # a greedy curve, on its own environment
            periodic_returns = evaluate(q_network, periodic_eval_env, args.eval_every_episodes, args.seed + 1, device)
            writer.add_scalar("eval/periodic_mean_return", np.mean(periodic_returns), global_step)
            writer.add_scalar("eval/periodic_std_return", np.std(periodic_returns), global_step)
            if model_path:  # --save-model also keeps the best of these agents, as SB3's EvalCallback does
                best = keep_best(best, np.mean(periodic_returns), global_step, networks)

        if global_step % progress_every == 0:
            recent = f"{np.mean(recent_returns):8.1f}" if recent_returns else "       -"
            print(f"step {global_step:>8}/{args.total_timesteps}  return (last 10 episodes) {recent}  "
                  f"epsilon {epsilon:.3f}  {int(global_step / (time.time() - start_time))} steps/s", flush=True)
    train_time = time.time() - start_time

    print(f"evaluating {'the loaded agent' if agent else 'the final network'}: {args.eval_episodes} greedy episodes", flush=True)
    eval_returns = evaluate(q_network, eval_env, args.eval_episodes, args.seed + 1, device)
    for episode, episode_return in enumerate(eval_returns):
        writer.add_scalar("eval/episodic_return", episode_return, episode)
    if model_path:
        try:
            save_agent(model_path, args, env, networks)
        except OSError as e:
            fail(f"cannot save the model to {model_path}: {e.strerror}.")
    if args.save_demos:
        save_demos(q_network, args, device)
    best_line = best and save_best(best, networks, args, env, model_path, periodic_eval_env, device)
    eval_env.close()  # finishes the video
    writer.close()
    summary(args, eval_returns, best_line, time.time() - start_time, None if agent else train_time, run_name, model_path)
