"""Where dqn.py's time goes on a CPU, and what each speed choice buys.

Prints, on this machine: the raw CartPole-v1 step rate with random actions (the ceiling), the cost
of one batch-1 action selection and of one batch-128 DQN update under each choice dqn.py makes
(fused Adam, one torch thread, no autograd for acting), and dqn.py's own steps per second with its
default flags. Medians over repeats; run it on an idle machine.

    python benchmark/dqn_speed.py
"""

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dqn  # noqa: E402


def median_us(function, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time of one call, in microseconds."""
    for _ in range(calls // 10):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def env_steps_per_second(steps: int = 50_000) -> float:
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def update_us(fused: bool, batch_size: int = 128) -> float:
    """One DQN gradient step as dqn.py takes it, on a random batch."""
    space = gym.make("CartPole-v1").observation_space
    q_network = dqn.QNetwork(space, 2, dqn.Args.hidden_size)
    target_network = dqn.QNetwork(space, 2, dqn.Args.hidden_size)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=1e-3, fused=fused)
    obs, next_obs = torch.randn(batch_size, 4), torch.randn(batch_size, 4)
    actions, rewards = torch.randint(0, 2, (batch_size,)), torch.ones(batch_size)
    terminations = torch.zeros(batch_size)

    def update():
        with torch.no_grad():
            target = dqn.td_target(rewards, target_network(next_obs), terminations, 0.99)
        q_values = q_network(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q_values, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return median_us(update, 500)


def act_us(no_grad: bool) -> float:
    q_network = dqn.QNetwork(gym.make("CartPole-v1").observation_space, 2, dqn.Args.hidden_size)
    obs = np.zeros(4, dtype=np.float32)
    if no_grad:
        return median_us(lambda: dqn.greedy_action(q_network, obs, torch.device("cpu")), 5000)
    return median_us(lambda: int(q_network(torch.as_tensor(obs).unsqueeze(0)).argmax(dim=1).item()), 5000)


def script_steps_per_second(seeds=(1, 2, 3)) -> float:
    rates = []
    with tempfile.TemporaryDirectory() as cwd:
        for seed in seeds:
            out = subprocess.run([sys.executable, str(ROOT / "dqn.py"), "--seed", str(seed)], cwd=cwd,
                                 capture_output=True, text=True, check=True).stdout
            rates.append(int(re.search(r"^wall time: .*\((\d+) steps/s", out, re.M).group(1)))  # "wall time: 20.1 s (1500 steps/s in training)"
    return statistics.median(rates)


if __name__ == "__main__":
    print(f"CartPole-v1, random actions:          {env_steps_per_second():>9,.0f} steps/s (the ceiling)")
    for threads in (2, 1):
        torch.set_num_threads(threads)
        print(f"torch threads {threads}:")
        print(f"  batch-1 action, autograd on:          {act_us(no_grad=False):7.1f} us")
        print(f"  batch-1 action, no_grad:              {act_us(no_grad=True):7.1f} us")
        print(f"  batch-128 update, Adam:               {update_us(fused=False):7.1f} us")
        print(f"  batch-128 update, Adam(fused=True):   {update_us(fused=True):7.1f} us")
    print(f"dqn.py, default flags (median of 3 seeds): {script_steps_per_second():,.0f} steps/s")
