"""`dicp-ray envs`: a few episodes of each grid world with a random and an oracle policy.

Prints, per environment, the mean episode return over all tasks of a random policy and of the oracle
(shortest-path) policy next to the analytic maximum, so a user can see the benchmarks are what the paper
describes before spending compute on them. Runs in about a second on one core.
"""
from __future__ import annotations

import gymnasium
import numpy as np

from dicp_ray.envs.splits import GRID_SPECS


def _mean_return(env_id: str, task_ids: np.ndarray, horizon: int, policy: str, seed: int) -> float:
    env = gymnasium.make_vec(env_id, num_envs=len(task_ids), task_ids=task_ids)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    total = np.zeros(len(task_ids))
    for _ in range(horizon):
        actions = env.unwrapped.optimal_actions() if policy == "oracle" else rng.integers(0, 5, len(task_ids))
        _, reward, _, _, _ = env.step(actions)
        total += reward
    env.close()
    return float(total.mean())


def print_env_returns(max_tasks: int = 500, seed: int = 0) -> None:
    """Print random vs oracle vs analytic maximum return per grid world (all tasks, or a sample)."""
    import dicp_ray.envs as envs

    print(f"{'env':<18} {'tasks':>6} {'horizon':>8} {'random':>8} {'oracle':>8} {'max':>8}")
    for name, spec in GRID_SPECS.items():
        task_ids = np.arange(spec.num_tasks)
        if len(task_ids) > max_tasks:
            task_ids = np.sort(np.random.default_rng(seed).choice(task_ids, max_tasks, replace=False))
        random = _mean_return(spec.env_id, task_ids, spec.horizon, "random", seed)
        oracle = _mean_return(spec.env_id, task_ids, spec.horizon, "oracle", seed)
        best = float(np.mean(envs.max_return(name, task_ids)))
        print(f"{name:<18} {len(task_ids):>6} {spec.horizon:>8} {random:>8.2f} {oracle:>8.2f} {best:>8.2f}")
