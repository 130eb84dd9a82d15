"""double_dqn.py: the Double DQN target against hand-worked numbers, and the script run as a user runs it.

Flags, logging, --save-model, --save-demos and bad input are shared with dqn.py and tested in test_dqn.py.
"""

import numpy as np
import torch

import double_dqn
import dqn
from helpers import assert_one_line_error, only_run_dir, read_scalars, run_ok, run_script


def test_double_target_differs_from_the_max_target_where_the_argmaxes_differ():
    rewards = torch.tensor([1.0, 0.0, 2.0, 0.5])
    next_q_online = torch.tensor([[1.0, 3.0], [5.0, 4.0], [0.0, 9.0], [0.0, 1.0]])
    next_q_target = torch.tensor([[2.0, 0.5], [1.0, 6.0], [7.0, 8.0], [-1.0, 2.0]])
    terminations = torch.tensor([0.0, 0.0, 1.0, 0.0])
    target = double_dqn.td_target(rewards, next_q_online, next_q_target, terminations, gamma=0.9)
    # Row 0: online argmax 1, target values it 0.5:  1 + 0.9 * 0.5 = 1.45  (max target: 1 + 0.9 * 2 = 2.8)
    # Row 1: online argmax 0, target values it 1.0:  0 + 0.9 * 1.0 = 0.9   (max target: 0 + 0.9 * 6 = 5.4)
    # Row 2: terminated, no bootstrap:               2                     (max target: 2)
    # Row 3: both argmaxes are 1:                    0.5 + 0.9 * 2 = 2.3   (max target: 2.3)
    torch.testing.assert_close(target, torch.tensor([1.45, 0.9, 2.0, 2.3]))
    # So Double DQN lies below the max target by gamma * (max - chosen): 0.9 * 1.5 = 1.35 and 0.9 * 5 = 4.5.
    max_target = dqn.td_target(rewards, next_q_target, terminations, gamma=0.9)
    torch.testing.assert_close(max_target - target, torch.tensor([1.35, 4.5, 0.0, 0.0]))


def test_smoke_run(tmp_path):
    result = run_ok("double_dqn.py", "--total-timesteps", "400", "--learning-starts", "100", "--eval-episodes", "2",
                    cwd=tmp_path)
    assert "eval:" in result.stdout
    scalars = read_scalars(only_run_dir(tmp_path))
    assert scalars.get("losses/td_loss") and len(scalars["eval/episodic_return"]) == 2


def test_box_action_space_is_refused(tmp_path):
    assert_one_line_error(run_script("double_dqn.py", "--env-id", "Pendulum-v1", cwd=tmp_path), "ddpg.py")


def test_learning_cartpole(tmp_path):
    """test_dqn.py's learning flags (seed 2, 20k steps, epsilon decaying over the first 30%): a greedy return
    that random play (about 22) and a broken learner never reach. This seed measured 450.2 (mean of 10 greedy
    episodes); the full default run is 50k steps."""
    flags = ["--seed", "2", "--total-timesteps", "20000", "--exploration-fraction", "0.3"]
    result = run_ok("double_dqn.py", *flags, cwd=tmp_path)
    eval_returns = [value for _, value in read_scalars(only_run_dir(tmp_path))["eval/episodic_return"]]
    assert np.mean(eval_returns) >= 250, result.stdout
