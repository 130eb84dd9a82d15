"""DQfD: Deep Q-learning from Demonstrations, on prioritized Double DQN.

Hester et al. 2018, "Deep Q-learning from Demonstrations", AAAI, Algorithm 1.
per_dqn.py learns from its own experience only; here demonstrations sit in the replay buffer for
good, the network is pre-trained on them alone, and the loss adds an n-step return, a large-margin
loss that ranks the demonstrated action first, and L2 regularization.

The loss weights, margin, n, priorities (alpha 0.4, beta0 0.6, eps_d 1.0, eps_a 0.001) and epsilon
0.01 are the paper's. Defaults that depart from its Atari settings, measured on CartPole-v1 with
demo_traj_2.npy over seeds 1-5 (the first episode at which the mean of the last 20 returns reaches 475):
  --gamma 0.95 (paper 0.99; the course's value): with 0.99 no seed reached 475 in the 15k steps
      (final greedy returns 500, 500, 386, 73, 500); with 0.95 all five did at episode 20.
  --pretrain-steps 1000 (paper 750,000 on Atari): enough for 1000 CartPole transitions; with 0 the
      agent needs a median of 47 episodes.
  --tau 0.005 every step (paper: a hard copy every 10,000 steps, once in a 15k-step run):
      `--tau 1 --target-network-frequency 500` also reaches 475 at episode 20 on 4 of 5 seeds.
  --train-frequency 2: a gradient step every 2 environment steps; every step (1) also reaches 475 at
      episode 20 on 5 of 5 seeds but takes 1.7x the wall time.

Run:  python dqfd.py --demo-path demo_traj_2.npy
"""

import os
import pickle
import random
import sys
import time
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
    """save the trained network's state_dict to runs/<run_name>/"""
    save_demos: Optional[str] = None
    """after training, record greedy episodes of the agent to this .npy file (for dqfd.py)"""
    demo_episodes: int = 2
    """how many episodes --save-demos records"""
    env_id: str = "CartPole-v1"
    """the Gymnasium environment id (the defaults are tuned for it; TUNED below holds other environments' settings)"""
    total_timesteps: int = 15_000
    """environment steps of training"""
    eval_episodes: int = 10
    """greedy episodes in the final evaluation"""

    # Algorithm-specific arguments
    learning_rate: float = 5e-4
    """the Adam learning rate"""
    buffer_size: int = 50_000
    """the replay buffer's capacity in transitions"""
    gamma: float = 0.95
    """the discount factor"""
    tau: float = 0.005
    """target network update rate (1.0: the paper's hard copy every target_network_frequency steps)"""
    target_network_frequency: int = 1
    """environment steps between target network updates"""
    batch_size: int = 128
    """the minibatch size of each gradient step"""
    start_e: float = 0.01
    """the starting epsilon of epsilon-greedy exploration"""
    end_e: float = 0.01
    """the final epsilon"""
    exploration_fraction: float = 0.25
    """the fraction of total_timesteps over which epsilon decays linearly from start_e to end_e"""
    learning_starts: int = 0
    """environment steps of random play before learning starts"""
    train_frequency: int = 2
    """environment steps between gradient steps"""
    hidden_size: int = 128
    """units in each of the network's two hidden layers"""
    max_grad_norm: float = 0.0
    """clip the gradient's global norm to this before each step (0: no clipping, as in the paper)"""
    anneal_lr: bool = False
    """decay the learning rate linearly to 0 over training (off: constant, as in the paper)"""
    alpha: float = 0.4
    """prioritization exponent: P(i) = p_i^alpha / sum_k p_k^alpha (0: uniform sampling)"""
    beta_start: float = 0.6
    """importance-sampling exponent at the start; it grows linearly to 1 over total_timesteps"""
    prior_eps: float = 0.001
    """eps_a: the priority bonus in p_i = |delta_i| + eps of the agent's own transitions"""
    demo_prior_eps: float = 1.0
    """eps_d: the priority bonus of demonstration transitions, so they are sampled more often"""
    use_per: bool = True
    """sample the buffer by priority (--no-use-per: uniformly, with importance weights 1)"""
    demo_path: str = "demo_traj_2.npy"
    """the demonstrations: a .npy file of episodes of [state, action, reward, next_state, done] steps"""
    pretrain_steps: int = 1_000
    """gradient steps on the demonstrations alone before the agent acts (0: no pre-training)"""
    n_step: int = 10
    """n of the n-step return in J_n"""
    margin: float = 0.8
    """the margin l(a_E, a) for a != a_E in the supervised loss J_E"""
    lambda_n: float = 1.0
    """weight lambda1 of the n-step loss J_n (0 removes it)"""
    lambda_e: float = 1.0
    """weight lambda2 of the supervised large-margin loss J_E (0 removes it)"""
    l2: float = 1e-5
    """weight lambda3 of the L2 loss lambda3/2 * |theta|^2 on the weights and biases (Adam's weight decay; 0 removes it)"""


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
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args: Args) -> Optional[str]:
    """Return one sentence describing the first bad flag, or None when the flags are usable."""
    if not 0 <= args.seed <= 2**32 - 3:  # numpy and gymnasium take 32-bit seeds; evaluation uses seed + 1 and + 2
        return f"--seed must lie in [0, {2**32 - 3}], got {args.seed}."
    counts = ["total_timesteps", "eval_episodes", "buffer_size", "target_network_frequency",
              "batch_size", "train_frequency", "hidden_size", "demo_episodes"]
    for name in counts:
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be a positive whole number, got {getattr(args, name)}."
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
    if args.save_demos is not None and os.path.exists(args.save_demos):
        return f"--save-demos {args.save_demos} already exists; choose a new path, it is never overwritten."
    if args.alpha < 0:
        return f"--alpha must be at least 0, got {args.alpha}."
    if not 0 <= args.beta_start <= 1:
        return f"--beta-start must lie in [0, 1], got {args.beta_start}."
    if not args.prior_eps > 0:
        return f"--prior-eps must be positive, got {args.prior_eps}."
    if not args.demo_prior_eps > 0:
        return f"--demo-prior-eps must be positive, got {args.demo_prior_eps}."
    if args.pretrain_steps < 0:
        return f"--pretrain-steps must be at least 0, got {args.pretrain_steps}."
    if args.n_step < 1:
        return f"--n-step must be a positive whole number, got {args.n_step}."
    for name in ["margin", "lambda_n", "lambda_e", "l2"]:
        if not getattr(args, name) >= 0:
            return f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}."
    if args.env_id not in gym.registry:
        return f"unknown environment id '{args.env_id}' (gymnasium.pprint_registry() lists them)."
    return None


def check_spaces(env: gym.Env, env_id: str) -> Optional[str]:
    """Return one sentence when the environment's spaces are not ones this script handles."""
    if not isinstance(env.action_space, gym.spaces.Discrete):
        return (f"{env_id} has a {type(env.action_space).__name__} action space; this script needs "
                f"discrete actions (for continuous actions use ddpg.py).")
    if not isinstance(env.observation_space, (gym.spaces.Box, gym.spaces.Discrete)):
        return f"{env_id} has a {type(env.observation_space).__name__} observation space; this script needs Box or Discrete."
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
    """A circular buffer of preallocated numpy arrays, sampled in proportion to priority (Schaul et al. 2016, Algorithm 1).

    Priorities p_i^alpha sit in the leaves of two binary trees stored as flat arrays: node k's
    children are 2k and 2k + 1, the root is node 1, and slot i's leaf is node leaves + i, where
    `leaves` is the capacity rounded up to a power of two. sum_tree[k] is the sum of the leaves
    below k (for sampling), min_tree[k] their minimum (for the weights' normalization). Leaves of
    empty or padding slots hold 0 in the sum tree and +inf in the min tree, so they are never drawn.
    The two trees are the columns of one array, so a node's sum and minimum, and its sibling's, share
    a cache line: the walk up from the slots just sampled finds in the cache what the walk down read.

    The demonstrations fill slots 0 .. demo_size - 1 for good; the agent's transitions cycle through
    the slots after them, so they never overwrite a demonstration (Hester et al. 2018, Algorithm 1).
    """

    def __init__(self, capacity: int, observation_space: gym.Space, seed: int, alpha: float):
        shape, dtype = observation_space.shape, observation_space.dtype
        self.observations = np.zeros((capacity, *shape), dtype=dtype)
        self.next_observations = np.zeros((capacity, *shape), dtype=dtype)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminations = np.zeros(capacity, dtype=np.float32)
        self.episode_ends = np.zeros(capacity, dtype=bool)  # terminated or truncated: the n-step return stops here
        self.capacity, self.position, self.size, self.demo_size = capacity, 0, 0, 0
        self.rng = np.random.default_rng(seed)
        self.alpha = alpha
        self.depth = (capacity - 1).bit_length()  # levels below the root: leaves = 2^depth >= capacity
        self.leaves = 2 ** self.depth
        self.trees = np.zeros((2 * self.leaves, 2), dtype=np.float64)  # row k: sum_tree[k], min_tree[k]
        self.sum_tree, self.min_tree = self.trees[:, 0], self.trees[:, 1]  # views: writing them writes trees
        self.min_tree[:] = np.inf
        self.max_priority = 1.0  # p_1 = 1, then max_i p_i (Algorithm 1, lines 2 and 6)

    def add(self, obs, action: int, reward: float, next_obs, terminated: bool, episode_end: bool) -> None:
        self.observations[self.position] = obs
        self.next_observations[self.position] = next_obs
        self.actions[self.position] = action
        self.rewards[self.position] = reward
        self.terminations[self.position] = terminated
        self.episode_ends[self.position] = episode_end
        # A new transition gets the maximal priority so far, so all experience is seen at least once (Sec. 3.2)
        node = self.leaves + self.position
        self.sum_tree[node] = self.min_tree[node] = self.max_priority ** self.alpha
        while node > 1:  # one slot: a scalar walk up to the root beats a vector step per level
            node //= 2
            self.sum_tree[node] = self.sum_tree[2 * node] + self.sum_tree[2 * node + 1]
            self.min_tree[node] = min(self.min_tree[2 * node], self.min_tree[2 * node + 1])
        self.position = self.position + 1 if self.position + 1 < self.capacity else self.demo_size  # demos stay
        self.size = min(self.size + 1, self.capacity)

    def add_demonstrations(self, demos: dict) -> None:
        """Fill the first slots of an empty buffer with the demonstrations, which add() then never overwrites."""
        n = len(demos["actions"])
        for name in ["observations", "actions", "rewards", "next_observations", "terminations", "episode_ends"]:
            getattr(self, name)[:n] = demos[name]
        self.update_priorities(np.arange(n), np.full(n, self.max_priority))
        self.demo_size = self.position = self.size = n

    def next_slots(self, slots):
        """The slot written after each of `slots`: the next one, past the last back to the first non-demo slot."""
        return np.where(slots + 1 < self.capacity, slots + 1, self.demo_size)

    def n_step(self, indices: np.ndarray, n: int, gamma: float):
        """Forward-view n-step returns from slots `indices` (Hester et al. 2018, J_n; Sutton & Barto 2018, eq. 7.1).

        R = sum_{k<m} gamma^k r_{t+k} over m <= n steps, stopping early at the episode's last step or at
        the newest transition stored. Returns R, the state s_{t+m} to bootstrap from, whether step
        t+m-1 terminated (then no bootstrap; a truncation bootstraps) and gamma^m.
        """
        returns = np.zeros(len(indices), dtype=np.float32)
        discounts = np.ones(len(indices), dtype=np.float32)
        running = np.ones(len(indices), dtype=bool)
        slots, last = indices, indices
        for _ in range(n):
            returns += running * discounts * self.rewards[slots]
            discounts = np.where(running, discounts * gamma, discounts).astype(np.float32)
            last = np.where(running, slots, last)
            slots_after = self.next_slots(slots)
            running &= ~self.episode_ends[slots] & (slots_after != self.position)
            slots = slots_after
        return returns, self.next_observations[last], self.terminations[last], discounts

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
        ever scale the update down. N and the total cancel, and alpha 0 gives exactly 1.
        """
        return (self.sum_tree[self.leaves + indices] / self.min_tree[1]) ** -beta

    def sample(self, batch_size: int, beta: float):
        idx = self.sample_indices(batch_size)
        return (self.observations[idx], self.actions[idx], self.rewards[idx],
                self.next_observations[idx], self.terminations[idx],
                self.importance_weights(idx, beta).astype(np.float32), idx)


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    """Epsilon decays linearly from start_e to end_e over `duration` steps, then stays at end_e."""
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e) if end_e <= start_e else min(slope * t + start_e, end_e)


def td_target(rewards: torch.Tensor, next_q_online: torch.Tensor, next_q_target: torch.Tensor, terminations: torch.Tensor,
              gamma: float) -> torch.Tensor:
    """y = r + gamma * Q_target(s', argmax_a' Q(s', a')), no bootstrap past a termination (van Hasselt et al. 2016, eq. 4)."""
    next_actions = next_q_online.argmax(dim=1, keepdim=True)  # the online network picks a', the target network values it
    return rewards + gamma * next_q_target.gather(1, next_actions).squeeze(1) * (1.0 - terminations)


def margin_loss(q_values: torch.Tensor, demo_actions: torch.Tensor, margin: float) -> torch.Tensor:
    """J_E = max_a [Q(s, a) + l(a_E, a)] - Q(s, a_E), l(a_E, a) = margin for a != a_E, 0 for a_E (Hester et al. 2018, J_E).

    Zero once the demonstrated action's value leads every other action's by the margin; one value per sample.
    """
    demo_actions = demo_actions.unsqueeze(1)
    margins = torch.full_like(q_values, margin).scatter(1, demo_actions, 0.0)
    return (q_values + margins).max(dim=1).values - q_values.gather(1, demo_actions).squeeze(1)


def dqfd_losses(q_values: torch.Tensor, actions: torch.Tensor, target: torch.Tensor, n_step_target: Optional[torch.Tensor],
                is_demo: torch.Tensor, weights: torch.Tensor, lambda_n: float, lambda_e: float, margin: float) -> dict:
    """The sample terms of J = J_DQ + lambda1 J_n + lambda2 J_E (Hester et al. 2018), each a batch mean of
    importance-weighted terms (Schaul et al. 2016, Algorithm 1, line 13). J_E counts on demonstrations only;
    a lambda of 0 leaves its term out entirely."""
    q_taken = q_values.gather(1, actions.unsqueeze(1)).squeeze(1)
    # Huber loss: the paper clips the error term to [-1, 1] (Mnih et al. 2015, Methods)
    losses = {"td_loss": (weights * F.smooth_l1_loss(q_taken, target, reduction="none")).mean()}
    if lambda_n > 0:
        losses["n_step_loss"] = lambda_n * (weights * F.smooth_l1_loss(q_taken, n_step_target, reduction="none")).mean()
    if lambda_e > 0:
        losses["margin_loss"] = lambda_e * (weights * is_demo * margin_loss(q_values, actions, margin)).mean()
    return losses


def dqfd_priorities(td_errors: np.ndarray, is_demo: np.ndarray, demo_eps: float, agent_eps: float) -> np.ndarray:
    """p_i = |delta_i| + eps_d for demonstrations, |delta_i| + eps_a for the agent's data (Hester et al. 2018)."""
    return np.abs(td_errors) + np.where(is_demo, demo_eps, agent_eps)


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


class DemoUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays, dtypes and scalars and plain containers and numbers.

    A pickle names the callables it wants run; np.load(..., allow_pickle=True) runs any of them
    (os.system included). Here every other name is refused before anything is called.
    """

    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
               ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
               *(("builtins", name) for name in ("list", "tuple", "dict", "set", "frozenset", "int",
                                                  "float", "complex", "bool", "str", "bytes", "bytearray"))}

    def find_class(self, module: str, name: str):
        module = module.replace("numpy.core.", "numpy._core.")  # the same functions in files written by numpy 1.x
        if (module, name) not in self.ALLOWED:
            self.refused = f"{module}.{name}"
            raise pickle.UnpicklingError(self.refused)
        return super().find_class(module, name)


def read_npy(path: str):
    """The contents of a .npy file, read without ever running code from it."""
    try:
        with open(path, "rb") as file:
            try:
                version = np.lib.format.read_magic(file)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}[version]
                _, _, dtype = read_header(file)
            except (ValueError, KeyError, EOFError):
                raise ValueError(f"{path} is not a .npy file numpy.save can write (its header is unreadable).")
            if not dtype.hasobject:  # plain numbers: numpy reads them with pickling off
                file.seek(0)
                try:
                    return np.lib.format.read_array(file, allow_pickle=False)
                except ValueError:
                    raise ValueError(f"{path} is truncated or corrupt: its array data cannot be read.")
            unpickler = DemoUnpickler(file)
            unpickler.refused = None
            try:
                return unpickler.load()
            except Exception:
                if unpickler.refused:
                    raise ValueError(f"{path} was refused: its pickle asks for {unpickler.refused}, which a "
                                     f"demonstration file never needs, and loading it could run code.")
                raise ValueError(f"{path} is truncated or corrupt: its pickled episodes cannot be read.")
    except FileNotFoundError:
        raise ValueError(f"the demonstration file {path} does not exist; record one with "
                         f"`python dqn.py --save-demos {path}` or pass --demo-path.")
    except IsADirectoryError:
        raise ValueError(f"the demonstration path {path} is a directory, not a .npy file.")
    except PermissionError:
        raise ValueError(f"the demonstration file {path} cannot be read (permission denied).")


def as_numbers(value) -> Optional[np.ndarray]:
    """`value` as a float64 array, or None when it holds anything but numbers (or is ragged)."""
    try:
        array = np.asarray(value)
        if array.dtype == object:  # e.g. a state kept as a list inside an object array
            array = np.array(array.tolist())
        return array.astype(np.float64) if array.dtype.kind in "biuf" else None
    except (TypeError, ValueError):
        return None


def brief(value) -> str:
    """A value's repr on one short line, for an error message."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def load_demonstrations(path: str, observation_space: gym.Space, action_space: gym.spaces.Discrete) -> dict:
    """Read the course's demonstration layout and check it against the environment.

    The file holds an array of episodes (a 1-D object array, or the 3-D one np.array makes when all
    episodes have the same length); each episode is a sequence of steps
    [state, action, reward, next_state, done], lists, tuples or arrays alike. `done` is gymnasium's
    `terminated`: an episode whose last step has done False was cut by a time limit and bootstraps.
    Returns flat arrays of the transitions in order, with `episode_ends` marking each episode's
    last step. Any problem raises ValueError with one sentence naming the episode and step.
    """
    episodes = read_npy(path)
    if isinstance(episodes, np.ndarray) and episodes.ndim == 0:
        episodes = episodes.item()  # a list saved as a 0-d object array
    if not isinstance(episodes, (np.ndarray, list, tuple)):
        raise ValueError(f"{path} holds a {type(episodes).__name__}, not an array of episodes.")
    is_discrete = isinstance(observation_space, gym.spaces.Discrete)
    columns = {name: [] for name in ["observations", "actions", "rewards", "next_observations", "terminations", "episode_ends"]}
    for e, episode in enumerate(episodes):
        if not isinstance(episode, (np.ndarray, list, tuple)):
            raise ValueError(f"{path}: episode {e} is a {type(episode).__name__}, not a sequence of steps.")
        for t, step in enumerate(episode):
            where = f"{path}: episode {e}, step {t}"
            if not isinstance(step, (np.ndarray, list, tuple)) or len(step) != 5:
                raise ValueError(f"{where} is not a [state, action, reward, next_state, done] step.")
            state, action, reward, next_state, done = (as_numbers(value) for value in step)
            for name, obs in [("state", state), ("next_state", next_state)]:
                if obs is None or obs.shape != observation_space.shape:
                    shape = "no numeric shape" if obs is None else f"shape {obs.shape}"
                    raise ValueError(f"{where}: the {name} has {shape}, but the environment's observations "
                                     f"have shape {observation_space.shape}.")
                if not np.isfinite(obs).all():
                    raise ValueError(f"{where}: the {name} holds a non-finite number ({obs.tolist()}).")
                if is_discrete and (obs != int(obs) or not observation_space.contains(int(obs))):
                    raise ValueError(f"{where}: the {name} {obs.item()} is not in the observation space {observation_space}.")
            if (action is None or action.shape != () or not np.isfinite(action) or action != int(action)
                    or not action_space.contains(int(action))):
                raise ValueError(f"{where}: the action {brief(step[1])} is not in the action space {action_space}.")
            if reward is None or reward.shape != () or not np.isfinite(reward):
                raise ValueError(f"{where}: the reward {brief(step[2])} is not a finite number.")
            if done is None or done.shape != () or done not in (0, 1):
                raise ValueError(f"{where}: done {brief(step[4])} is not a bool.")
            for name, value in zip(columns, [state, action, reward, next_state, done, t == len(episode) - 1]):
                columns[name].append(value)
    if not columns["actions"]:
        raise ValueError(f"{path} holds no transitions; it needs at least one step.")
    dtypes = [observation_space.dtype, np.int64, np.float32, observation_space.dtype, np.float32, bool]
    demos = {name: np.array(values).astype(dtype) for (name, values), dtype in zip(columns.items(), dtypes)}
    demos["episode_ends"] |= demos["terminations"] > 0  # a termination ends an episode even inside a list
    return demos


def train_step(q_network: nn.Module, target_network: nn.Module, optimizer: torch.optim.Optimizer, rb: ReplayBuffer,
               args: Args, beta: float, device: torch.device, where: str) -> dict:
    """One gradient step on J over a prioritized minibatch, then the priorities' update (Hester et al. 2018, Algorithm 1)."""
    *batch, indices = rb.sample(args.batch_size, beta)
    observations, actions, rewards, next_observations, terminations, weights = (
        torch.as_tensor(array, device=device) for array in batch
    )
    is_demo = indices < rb.demo_size
    n_step_target = None
    with torch.no_grad():
        if args.lambda_n > 0:
            returns, nth_observations, nth_terminations, discounts = (
                torch.as_tensor(array, device=device) for array in rb.n_step(indices, args.n_step, args.gamma)
            )
            # One forward pass per network for s_{t+1} and s_{t+m}
            both = torch.cat([next_observations, nth_observations])
            next_q_online, nth_q_online = q_network(both).split(len(indices))
            next_q_target, nth_q_target = target_network(both).split(len(indices))
            # The n-step Double DQN target: gamma^m in place of gamma after m <= n rewards (Hester et al. 2018, J_n)
            n_step_target = td_target(returns, nth_q_online, nth_q_target, nth_terminations, discounts)
        else:
            next_q_online, next_q_target = q_network(next_observations), target_network(next_observations)
        target = td_target(rewards, next_q_online, next_q_target, terminations, args.gamma)
    q_values = q_network(observations)
    losses = dqfd_losses(q_values, actions, target, n_step_target, torch.as_tensor(is_demo, dtype=torch.float32, device=device),
                         weights, args.lambda_n, args.lambda_e, args.margin)
    loss = losses["loss"] = sum(losses.values())
    if not torch.isfinite(loss):
        fail(f"the loss became {loss.item()} {where}; try a smaller --learning-rate.")
    optimizer.zero_grad()
    loss.backward()
    if args.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)
    optimizer.step()
    q_taken = q_values.detach().gather(1, actions.unsqueeze(1)).squeeze(1)
    # p_j = |delta_j| + eps (Schaul et al. 2016, Algorithm 1, line 12), with eps_d for demonstrations
    rb.update_priorities(indices, dqfd_priorities((target - q_taken).cpu().numpy(), is_demo,
                                                  args.demo_prior_eps, args.prior_eps))
    losses["q_values"] = q_taken.mean()
    return losses


def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    """theta_target <- tau * theta + (1 - tau) * theta_target; tau 1 is the paper's hard copy."""
    with torch.no_grad():
        for target_param, param in zip(target_network.parameters(), q_network.parameters()):
            target_param.lerp_(param, tau)


if __name__ == "__main__":
    args = parse_args()
    error = check_args(args)
    if error:
        fail(error)
    print(settings_line(args), flush=True)
    if args.capture_video:
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # render headless
        try:
            import moviepy  # noqa: F401  (gymnasium's RecordVideo writes mp4 files with it)
        except ImportError:
            fail("--capture-video needs moviepy to write videos: pip install moviepy")
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # Seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.use_deterministic_algorithms(args.torch_deterministic)
    torch.set_num_threads(1)  # a small network on a CPU runs fastest on one thread
    torch.set_flush_denormal(True)  # denormal floats are slow on CPUs (DDPG on MountainCarContinuous: 7x)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    action_seed, buffer_seed = independent_seeds(args.seed, 2)  # the random actions' and the buffer's streams

    # Environments: one for training, stepped directly, and one for evaluation
    try:
        env = make_env(args.env_id, action_seed)
        eval_env = make_env(args.env_id, args.seed + 1, args.capture_video, run_name)
    except gym.error.Error as e:
        fail(f"cannot make {args.env_id}: {e}")
    error = check_spaces(env, args.env_id)
    if error:
        fail(error)
    try:
        demos = load_demonstrations(args.demo_path, env.observation_space, env.action_space)
    except ValueError as e:
        fail(str(e))
    if len(demos["actions"]) >= args.buffer_size:
        fail(f"--buffer-size ({args.buffer_size}) must exceed the {len(demos['actions'])} demonstration transitions, "
             f"which stay in the buffer for good.")

    q_network = QNetwork(env.observation_space, int(env.action_space.n), args.hidden_size).to(device)
    # J_L2 = lambda3/2 * |theta|^2 on weights and biases: its gradient, lambda3 * theta, is Adam's weight decay
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, weight_decay=args.l2, fused=True)
    target_network = QNetwork(env.observation_space, int(env.action_space.n), args.hidden_size).to(device)
    target_network.load_state_dict(q_network.state_dict())
    rb = ReplayBuffer(args.buffer_size, env.observation_space, buffer_seed, args.alpha if args.use_per else 0.0)
    rb.add_demonstrations(demos)

    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n%s" % "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
    )
    print(f"logging to runs/{run_name}")

    start_time = time.time()
    # Pre-training: gradient steps on the demonstrations alone, before the agent acts (Hester et al. 2018, Algorithm 1)
    for pretrain_step in range(1, args.pretrain_steps + 1):
        losses = train_step(q_network, target_network, optimizer, rb, args, args.beta_start, device,
                            f"at pre-training step {pretrain_step}")
        if pretrain_step % args.target_network_frequency == 0:
            update_target(target_network, q_network, args.tau)
        if pretrain_step % 100 == 0:
            for name, value in losses.items():
                writer.add_scalar(f"pretrain/{name}", value.item(), pretrain_step)
    if args.pretrain_steps:
        print(f"pre-trained for {args.pretrain_steps} steps on {rb.demo_size} demonstration transitions "
              f"in {time.time() - start_time:.1f} s", flush=True)

    # The course's protocol: the first episode at which the mean of the last 20 returns reaches the threshold
    reward_threshold = env.spec.reward_threshold
    episode_returns, episodes_to_threshold = [], None
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
        rb.add(obs, action, reward, next_obs, terminated, terminated or truncated)
        obs = next_obs
        episode_return += float(reward)
        episode_length += 1
        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", episode_return, global_step)
            writer.add_scalar("charts/episodic_length", episode_length, global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            recent_returns = (recent_returns + [episode_return])[-10:]
            episode_returns.append(episode_return)
            if (episodes_to_threshold is None and reward_threshold is not None and len(episode_returns) >= 20
                    and np.mean(episode_returns[-20:]) >= reward_threshold):
                episodes_to_threshold = len(episode_returns)
                writer.add_scalar("charts/episodes_to_threshold", episodes_to_threshold, global_step)
            obs, _ = env.reset()
            episode_return, episode_length = 0.0, 0

        if global_step > args.learning_starts:
            if global_step % args.train_frequency == 0:
                if args.anneal_lr:  # not in the paper: the step size falls linearly to 0 by the end of training
                    optimizer.param_groups[0]["lr"] = args.learning_rate * (1 - global_step / args.total_timesteps)
                # beta anneals linearly to 1, where the correction is full, by the end of training (Sec. 3.4)
                beta = linear_schedule(args.beta_start, 1.0, args.total_timesteps, global_step)
                losses = train_step(q_network, target_network, optimizer, rb, args, beta, device, f"at step {global_step}")

                if global_step % 100 == 0:
                    for name, value in losses.items():
                        writer.add_scalar(f"losses/{name}", value.item(), global_step)
                    writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
                    writer.add_scalar("charts/beta", beta, global_step)

            if global_step % args.target_network_frequency == 0:
                update_target(target_network, q_network, args.tau)

        if global_step % progress_every == 0:
            recent = f"{np.mean(recent_returns):8.1f}" if recent_returns else "       -"
            print(f"step {global_step:>8}/{args.total_timesteps}  return (last 10 episodes) {recent}  "
                  f"epsilon {epsilon:.3f}  {int(global_step / (time.time() - start_time))} steps/s", flush=True)
    train_time = time.time() - start_time

    eval_returns = evaluate(q_network, eval_env, args.eval_episodes, args.seed + 1, device)
    for episode, episode_return in enumerate(eval_returns):
        writer.add_scalar("eval/episodic_return", episode_return, episode)
    model_path = None
    if args.save_model:
        model_path = f"runs/{run_name}/{args.exp_name}.pt"
        torch.save(q_network.state_dict(), model_path + ".tmp")
        os.replace(model_path + ".tmp", model_path)  # an interrupted save never leaves half a file
    if args.save_demos is not None:
        demos = record_demos(q_network, make_env(args.env_id, args.seed + 2), args.demo_episodes, args.seed + 2, device)
        try:
            with open(args.save_demos, "xb") as demo_file:  # "x": never overwrite an existing file
                np.save(demo_file, demos, allow_pickle=True)
        except FileExistsError:
            fail(f"--save-demos {args.save_demos} appeared during training; it was left untouched.")
        for episode, steps in enumerate(demos):
            print(f"demo episode {episode}: return {sum(step[2] for step in steps):.1f}, {len(steps)} steps")
    env.close()
    eval_env.close()
    writer.close()

    if reward_threshold is None:
        print(f"episodes to threshold: {args.env_id} has no reward threshold")
    elif episodes_to_threshold is None:
        print(f"episodes to threshold: not reached in {len(episode_returns)} episodes "
              f"(the mean of 20 episode returns never reached {reward_threshold:g})")
    else:
        print(f"episodes to threshold: {episodes_to_threshold} (the mean of episodes "
              f"{episodes_to_threshold - 19}-{episodes_to_threshold} reached {reward_threshold:g})")
    print(f"eval: {np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over {args.eval_episodes} greedy episodes")
    print(f"wall time: {time.time() - start_time:.1f} s ({int(args.total_timesteps / train_time)} steps/s in training)")
    print(f"run: runs/{run_name}")
    print(f"model: {model_path or 'not saved (add --save-model)'}")
    if args.save_demos is not None:
        print(f"demos: {args.save_demos}")
