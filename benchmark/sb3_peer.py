"""Stable-Baselines3 as the benchmark's peer: its DQN and DDPG with the RL Zoo's tuned hyperparameters,
started, logged and evaluated the way this repo's scripts are, so one grid runs both.

Raffin et al. 2021, "Stable-Baselines3: Reliable Reinforcement Learning Implementations", JMLR 22(268).
Hyperparameters from the RL Zoo (rl-baselines3-zoo, hyperparams/dqn.yml and ddpg.yml). Same flags
and outputs as dqn.py: TensorBoard scalars charts/episodic_return, charts/SPS and
eval/episodic_return under runs/{env_id}__{exp_name}__{seed}__{unix_time}/, and the same summary.

Run:  python benchmark/sb3_peer.py --env-id CartPole-v1 --seed 1
"""

import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

# The RL Zoo's tuned hyperparameters (hyperparams/dqn.yml and ddpg.yml): (algorithm, environment steps,
# keyword arguments of the SB3 class, DDPG's action noise as (kind, std) or None)
ZOO = {
    "CartPole-v1": ("dqn", 50_000, dict(
        learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1_000, gamma=0.99,
        target_update_interval=10, train_freq=256, gradient_steps=128, exploration_fraction=0.16,
        exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[256, 256])), None),
    "LunarLander-v3": ("dqn", 100_000, dict(
        learning_rate=6.3e-4, batch_size=128, buffer_size=50_000, learning_starts=0, gamma=0.99,
        target_update_interval=250, train_freq=4, gradient_steps=-1, exploration_fraction=0.12,
        exploration_final_eps=0.1, policy_kwargs=dict(net_arch=[256, 256])), None),
    "MountainCar-v0": ("dqn", 120_000, dict(
        learning_rate=4e-3, batch_size=128, buffer_size=10_000, learning_starts=1_000, gamma=0.98,
        target_update_interval=600, train_freq=16, gradient_steps=8, exploration_fraction=0.2,
        exploration_final_eps=0.07, policy_kwargs=dict(net_arch=[256, 256])), None),
    "Pendulum-v1": ("ddpg", 20_000, dict(
        gamma=0.98, buffer_size=200_000, learning_starts=10_000, learning_rate=1e-3,
        policy_kwargs=dict(net_arch=[400, 300])), ("normal", 0.1)),
    "MountainCarContinuous-v0": ("ddpg", 300_000, dict(learning_starts=100), ("ornstein-uhlenbeck", 0.5)),
    "LunarLanderContinuous-v3": ("ddpg", 300_000, dict(
        gamma=0.98, buffer_size=200_000, learning_starts=10_000, learning_rate=1e-3, train_freq=(1, "episode"),
        gradient_steps=-1, policy_kwargs=dict(net_arch=[400, 300])), ("normal", 0.1)),
}


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the run name)"""
    seed: int = 1
    """seed of Python, numpy, torch and the environment"""
    env_id: str = "CartPole-v1"
    """an environment with RL Zoo settings: CartPole-v1, LunarLander-v3, MountainCar-v0 (SB3's DQN), Pendulum-v1,
    MountainCarContinuous-v0, LunarLanderContinuous-v3 (SB3's DDPG)"""
    total_timesteps: Optional[int] = None
    """environment steps of training (default: the RL Zoo's budget for the env)"""
    eval_episodes: int = 10
    """greedy episodes in the final evaluation"""


def fail(message: str) -> None:
    """End the run with one sentence on stderr and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args: Args) -> Optional[str]:
    """Return one sentence describing the first bad flag, or None when the flags are usable."""
    if args.env_id not in ZOO:
        return f"no RL Zoo hyperparameters here for '{args.env_id}'; choose one of {', '.join(ZOO)}."
    if args.eval_episodes <= 0:
        return f"--eval-episodes must be a positive whole number, got {args.eval_episodes}."
    learning_starts = ZOO[args.env_id][2]["learning_starts"]
    if args.total_timesteps is not None and args.total_timesteps <= learning_starts:
        return (f"--total-timesteps ({args.total_timesteps}) must exceed the RL Zoo's learning_starts "
                f"({learning_starts}) for {args.env_id}.")
    return None


def evaluate(model, env: gym.Env, episodes: int, seed: int) -> list:
    """Returns of `episodes` greedy episodes (SB3's deterministic actions), seeded as dqn.py's evaluate."""
    returns = []
    obs, _ = env.reset(seed=seed)
    while len(returns) < episodes:
        episode_return, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
        obs, _ = env.reset()
    return returns


if __name__ == "__main__":
    args = tyro.cli(Args)
    error = check_args(args)
    if error:
        fail(error)
    try:
        from stable_baselines3 import DDPG, DQN
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise
    except ImportError:
        fail("the SB3 peer needs stable-baselines3: pip install -r benchmark/requirements.txt")
    algorithm, zoo_timesteps, hyperparameters, noise_kind = ZOO[args.env_id]
    total_timesteps = args.total_timesteps or zoo_timesteps
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # as our scripts: one thread per run, so runs side by side share the cores evenly

    env = gym.make(args.env_id)
    eval_env = gym.make(args.env_id)
    if algorithm == "dqn":
        model = DQN("MlpPolicy", env, seed=args.seed, device="cpu", **hyperparameters)
    else:
        n_actions = env.action_space.shape[0]
        kind, std = noise_kind
        noise_class = NormalActionNoise if kind == "normal" else OrnsteinUhlenbeckActionNoise
        noise = noise_class(np.zeros(n_actions), std * np.ones(n_actions))
        model = DDPG("MlpPolicy", env, action_noise=noise, seed=args.seed, device="cpu", **hyperparameters)

    writer = SummaryWriter(f"runs/{run_name}")
    settings = {**vars(args), "algorithm": f"SB3 {algorithm.upper()}", "total_timesteps": total_timesteps, **hyperparameters,
                "action_noise": noise_kind}
    writer.add_text("hyperparameters",
                    "|param|value|\n|-|-|\n%s" % "\n".join(f"|{key}|{value}|" for key, value in settings.items()))
    print(f"SB3 {algorithm.upper()} on {args.env_id}, seed {args.seed}: logging to runs/{run_name}")

    class LogLikeOurScripts(BaseCallback):
        """Episode returns, steps per second and a progress line, under the tags our scripts use."""

        def _on_training_start(self) -> None:
            self.start_time, self.recent_returns = time.time(), []
            self.progress_every = max(total_timesteps // 10, 1)

        def _on_step(self) -> bool:
            step = self.num_timesteps
            for info in self.locals["infos"]:
                if "episode" in info:  # SB3's Monitor wrapper marks the end of an episode
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], step)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], step)
                    self.recent_returns = (self.recent_returns + [info["episode"]["r"]])[-10:]
            if step % 100 == 0:
                writer.add_scalar("charts/SPS", int(step / (time.time() - self.start_time)), step)
            if step % self.progress_every == 0:
                recent = f"{np.mean(self.recent_returns):8.1f}" if self.recent_returns else "       -"
                print(f"step {step:>8}/{total_timesteps}  return (last 10 episodes) {recent}  "
                      f"{int(step / (time.time() - self.start_time))} steps/s", flush=True)
            return True

    start_time = time.time()
    model.learn(total_timesteps=total_timesteps, callback=LogLikeOurScripts())
    train_time = time.time() - start_time

    eval_returns = evaluate(model, eval_env, args.eval_episodes, args.seed + 1)
    for episode, episode_return in enumerate(eval_returns):
        writer.add_scalar("eval/episodic_return", episode_return, episode)
    env.close()
    eval_env.close()
    writer.close()

    print(f"eval: {np.mean(eval_returns):.1f} ± {np.std(eval_returns):.1f} over {args.eval_episodes} greedy episodes")
    print(f"wall time: {time.time() - start_time:.1f} s ({int(total_timesteps / train_time)} steps/s in training)")
    print(f"run: runs/{run_name}")
