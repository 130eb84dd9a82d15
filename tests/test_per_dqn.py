"""per_dqn.py: the sum tree, the sampling and the weights against independent numbers, and the script run."""

import gymnasium as gym
import numpy as np
import pytest

import per_dqn
from helpers import (CARTPOLE_LEARNING, assert_one_line_error, best_greedy_return, learning_seed, only_run_dir,
                     read_scalars, run_ok, run_script)

SPACE = gym.spaces.Box(-10, 10, shape=(2,), dtype=np.float32)


def filled_buffer(capacity: int, priorities, alpha: float, seed: int = 0) -> per_dqn.ReplayBuffer:
    """A buffer whose slot i holds a transition with reward i and priority priorities[i]."""
    buffer = per_dqn.ReplayBuffer(capacity, SPACE, seed, alpha)
    for i in range(len(priorities)):
        buffer.add(np.array([i, 0]), action=0, reward=float(i), next_obs=np.array([i, 1]), terminated=False)
    buffer.update_priorities(np.arange(len(priorities)), np.array(priorities, dtype=np.float64))
    return buffer


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Pearson's statistic sum_i (O_i - E_i)^2 / E_i, with E_i = n * P(i)."""
    expected = counts.sum() * probabilities
    return float(((counts - expected) ** 2 / expected).sum())


def test_find_prefix_sums_by_hand():
    # alpha 1: the leaves are the priorities 1, 2, 3, 4; their running sums are 0 | 1 | 3 | 6 | 10,
    # so slot 0 spans [0, 1), slot 1 [1, 3), slot 2 [3, 6), slot 3 [6, 10). Capacity 5 pads to 8 leaves.
    buffer = filled_buffer(5, [1.0, 2.0, 3.0, 4.0], alpha=1.0)
    assert buffer.sum_tree[1] == 10.0
    values = np.array([0.0, 0.99, 1.0, 2.99, 3.0, 5.99, 6.0, 9.99])
    np.testing.assert_array_equal(buffer.find_prefix_sums(values), [0, 0, 1, 1, 2, 2, 3, 3])
    # A value at or past the total (a rounding error upstream) still lands on a filled slot, never slot 4.
    np.testing.assert_array_equal(buffer.find_prefix_sums(np.array([10.0, 10.5])), [3, 3])


def test_sampling_frequencies_match_p_to_the_alpha():
    """Chi-square goodness of fit of 64,000 draws against P(i) = p_i^alpha / sum_k p_k^alpha."""
    priorities = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 0.3, 3.0, 1.5, 0.7, 5.0])
    buffer = filled_buffer(10, priorities, alpha=0.6, seed=3)  # capacity 10: 16 leaves, 6 of them padding
    counts = np.zeros(10)
    for _ in range(2000):
        np.add.at(counts, buffer.sample_indices(32), 1)
    expected = priorities ** 0.6 / (priorities ** 0.6).sum()
    # 10 slots, 9 degrees of freedom: P(chi2_9 > 27.88) = 0.001. Stratified draws vary less than
    # independent ones, which only makes a correct sampler pass more easily.
    assert chi_square(counts, expected) < 27.88, counts
    # The test has power: the same counts reject sampling proportional to p itself (alpha 1)...
    assert chi_square(counts, priorities / priorities.sum()) > 1000
    # ...and uniform sampling.
    assert chi_square(counts, np.full(10, 0.1)) > 1000


def test_every_stratified_draw_falls_in_its_own_segment():
    priorities = np.array([3.0, 0.2, 0.2, 5.0, 1.0, 0.01, 2.0])
    buffer = filled_buffer(7, priorities, alpha=0.7, seed=1)
    leaves = priorities ** 0.7
    ends = np.cumsum(leaves)  # slot i spans [ends[i] - leaves[i], ends[i]) of the running sum
    batch_size = 8
    segment = ends[-1] / batch_size
    for _ in range(300):
        slots = buffer.sample_indices(batch_size)
        for k, slot in enumerate(slots):  # draw k came from [k * segment, (k + 1) * segment)
            assert ends[slot] - leaves[slot] < (k + 1) * segment and ends[slot] > k * segment, (k, slot)


def test_importance_weights_by_hand():
    # alpha 0.5, p = 1, 4, 9, 16: p^alpha = 1, 2, 3, 4, total 10, so P = 0.1, 0.2, 0.3, 0.4 and N = 4.
    # beta 0.5: (N P)^-beta = 0.4^-0.5, 0.8^-0.5, 1.2^-0.5, 1.6^-0.5 = 1.5811, 1.1180, 0.9129, 0.7906;
    # the largest over the buffer is 1.5811 (slot 0, the smallest priority), so the weights are
    # 1, 0.7071, 0.5774, 0.5 (= 1, 1/sqrt 2, 1/sqrt 3, 1/2).
    buffer = filled_buffer(6, [1.0, 4.0, 9.0, 16.0], alpha=0.5)  # two slots still empty
    slots = np.array([0, 1, 2, 3, 3])
    np.testing.assert_allclose(buffer.importance_weights(slots, beta=0.5), [1, 0.70711, 0.57735, 0.5, 0.5], rtol=1e-4)
    # beta 1: (N P)^-1 = 2.5, 1.25, 0.8333, 0.625, divided by 2.5: 1, 0.5, 0.3333, 0.25.
    np.testing.assert_allclose(buffer.importance_weights(slots, beta=1.0), [1, 0.5, 1 / 3, 0.25, 0.25], rtol=1e-6)
    # The batch max would be different: a batch of slots 2 and 3 alone gets 0.5774 and 0.5, not 1 and 0.866.
    np.testing.assert_allclose(buffer.importance_weights(np.array([2, 3]), beta=0.5), [0.57735, 0.5], rtol=1e-4)
    # sample() hands back each row's weight next to its transition.
    *batch, weights, slots = buffer.sample(64, beta=1.0)
    assert weights.dtype == np.float32
    np.testing.assert_array_equal(batch[2], slots)  # reward i sits in slot i
    np.testing.assert_allclose(weights, np.array([1, 0.5, 1 / 3, 0.25])[slots], rtol=1e-6)


def test_trees_match_a_brute_force_reference_after_many_updates():
    """Random adds (wrapping around twice) and batch updates with repeats; every node checked by brute force."""
    capacity, alpha = 37, 0.6  # not a power of two: 64 leaves
    rng = np.random.default_rng(0)
    buffer = per_dqn.ReplayBuffer(capacity, SPACE, seed=0, alpha=alpha)
    reference = np.zeros(capacity)  # p_i per slot, written one at a time in order: the last write wins
    max_priority = 1.0
    for step in range(100):
        buffer.add(np.zeros(2), 0, 0.0, np.zeros(2), False)
        reference[step % capacity] = max_priority  # a new transition gets the max priority so far
        if step >= 5:
            slots = rng.integers(0, min(step + 1, capacity), size=16)
            slots[:4] = slots[4]  # make sure every batch repeats a slot
            priorities = rng.exponential(size=16) + 1e-6
            buffer.update_priorities(slots, priorities)
            for slot, priority in zip(slots, priorities):
                reference[slot] = priority
            max_priority = max(max_priority, priorities.max())
    leaves = buffer.leaves
    assert leaves == 64 and buffer.size == capacity and buffer.position == 100 % capacity
    padded_sums = np.zeros(leaves)
    padded_sums[:capacity] = reference ** alpha
    padded_mins = np.full(leaves, np.inf)
    padded_mins[:capacity] = reference ** alpha
    np.testing.assert_allclose(buffer.sum_tree[leaves:], padded_sums, rtol=1e-12)
    for node in range(1, leaves):
        height = leaves.bit_length() - node.bit_length()  # levels between the node and the leaves
        first, last = node * 2 ** height - leaves, (node + 1) * 2 ** height - leaves
        assert buffer.sum_tree[node] == pytest.approx(padded_sums[first:last].sum(), rel=1e-12), node
        assert buffer.min_tree[node] == padded_mins[first:last].min(), node
    assert buffer.max_priority == max_priority


def test_repeated_slots_keep_their_last_priority_and_new_ones_get_the_max():
    buffer = filled_buffer(3, [1.0, 1.0, 1.0], alpha=1.0)
    buffer.update_priorities(np.array([2, 0, 2, 2, 0]), np.array([5.0, 7.0, 1.0, 3.0, 2.0]))
    # slot 2 was set to 5, 1 and last 3; slot 0 to 7 and last 2; slot 1 untouched at 1.
    np.testing.assert_array_equal(buffer.sum_tree[buffer.leaves:buffer.leaves + 3], [2.0, 1.0, 3.0])
    assert buffer.sum_tree[1] == 6.0 and buffer.min_tree[1] == 1.0
    # The largest priority ever seen is 7 (even though slot 0 now holds 2): the next transition
    # (wrapping into slot 0) enters with 7.
    buffer.add(np.zeros(2), 0, 0.0, np.zeros(2), False)
    np.testing.assert_array_equal(buffer.sum_tree[buffer.leaves:buffer.leaves + 3], [7.0, 1.0, 3.0])
    assert buffer.sum_tree[1] == 11.0


def test_alpha_zero_samples_uniformly_with_unit_weights():
    priorities = np.array([0.01, 100.0, 3.0, 0.5, 8.0, 1e-4, 42.0, 1.0, 2.0, 0.2, 7.0, 9.0])
    buffer = filled_buffer(12, priorities, alpha=0.0, seed=5)
    assert buffer.sum_tree[1] == 12.0  # every p^0 is 1
    counts = np.zeros(12)
    for _ in range(1000):
        slots = buffer.sample_indices(24)
        np.add.at(counts, slots, 1)
        np.testing.assert_array_equal(buffer.importance_weights(slots, beta=0.7), np.ones(24))
    # 11 degrees of freedom: P(chi2_11 > 31.26) = 0.001.
    assert chi_square(counts, np.full(12, 1 / 12)) < 31.26, counts


SHORT = ["--total-timesteps", "400", "--learning-starts", "100", "--eval-episodes", "2"]


def test_smoke_run_anneals_beta(tmp_path):
    result = run_ok("per_dqn.py", *SHORT, "--beta-start", "0.5", cwd=tmp_path)
    assert "eval:" in result.stdout
    scalars = read_scalars(only_run_dir(tmp_path))
    for tag in ["charts/episodic_return", "losses/td_loss", "charts/importance_weight", "eval/episodic_return"]:
        assert scalars.get(tag), tag
    # beta grows linearly from 0.5 at step 0 to 1 at step 400: 0.5 + 0.5 * 200 / 400 = 0.75 at step 200.
    beta = dict(scalars["charts/beta"])
    assert beta[200] == pytest.approx(0.75) and beta[400] == pytest.approx(1.0)


def test_smoke_taxi_with_alpha_zero(tmp_path):
    run_ok("per_dqn.py", "--env-id", "Taxi-v4", "--alpha", "0", *SHORT, cwd=tmp_path)


def test_bad_per_flags_are_refused(tmp_path):
    assert_one_line_error(run_script("per_dqn.py", "--alpha", "-0.5", cwd=tmp_path), "--alpha")
    assert_one_line_error(run_script("per_dqn.py", "--beta-start", "1.5", cwd=tmp_path), "--beta-start")
    assert_one_line_error(run_script("per_dqn.py", "--prior-eps", "0", cwd=tmp_path), "--prior-eps")
    assert not (tmp_path / "runs").exists()


def test_learning_cartpole(tmp_path):
    """Prioritized replay, at the paper's alpha and beta, for 20k steps: the best of its greedy evaluations (5 episodes
    every 1000 steps) reaches 150, where random play returns about 22 and an untrained network's greedy policy a
    median of 10 (at most 62 over seeds 1-100). The best evaluation, not the final one: on CartPole the family's
    greedy return often climbs within a few thousand steps and then sinks to a plateau of 100 to 200 (the late
    drift, benchmark/README.md), so a short run's final network is one point of a noisy curve, and another CPU's
    float kernels, like another seed, pick another point; the best evaluation is what the algorithm earned. Passed
    on 20 of seeds 1-20 (`python -m benchmark.learning_tests --tests test_per_dqn`, on this project's Intel Xeon; on
    tuning seeds 101-110 the lowest best evaluation of the family was 217)."""
    result = run_ok("per_dqn.py", *CARTPOLE_LEARNING, "--learning-rate", "5e-4", "--alpha", "0.6", "--beta-start", "0.4",
                    "--prior-eps", "1e-2", "--seed", learning_seed(1), cwd=tmp_path)
    assert best_greedy_return(only_run_dir(tmp_path)) >= 150, result.stdout
