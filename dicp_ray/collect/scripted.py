"""A scripted source learner for grid worlds: real datasets in seconds, without RLlib.

Each stream follows the oracle with probability episode / num_episodes and acts uniformly at random otherwise,
so its history improves from random to optimal like a learning algorithm's. ``write_scripted_dataset`` writes
these histories in the real on-disk format (shards + manifest), which tests and benchmarks of the training
and evaluation stages use instead of running PPO.
"""
from __future__ import annotations

import numpy as np

from dicp_ray.data import shards
from dicp_ray.envs import GRID_SPECS, GridVectorEnv, grid


def scripted_histories(env_name: str, task_id: int, num_streams: int, num_episodes: int,
                       rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Columns of `num_streams` histories of `num_episodes` episodes, rows sorted by (stream, episode, step)."""
    env: GridVectorEnv = getattr(grid, f"{env_name}VectorEnv")(num_envs=num_streams, task_id=task_id)
    rows = {k: [] for k in ("episode", "step", "obs", "action", "reward", "next_obs", "optimal_action")}
    for episode in range(num_episodes):
        obs, _ = env.reset()
        for step in range(env.horizon):
            oracle = env.optimal_actions()
            explore = rng.random(num_streams) >= episode / num_episodes
            action = np.where(explore, rng.integers(0, 5, num_streams), oracle)
            next_obs, reward, _, _, _ = env.step(action)
            index = (np.full(num_streams, episode), np.full(num_streams, step))
            for key, value in zip(rows, (*index, obs, action, reward, next_obs, oracle)):
                rows[key].append(value)
            obs = next_obs
    n = num_streams * num_episodes * env.horizon
    cols = {k: np.stack(v, axis=1).reshape(n, *np.shape(v[0])[1:]) for k, v in rows.items()}  # stream-major
    cols.update(stream=np.repeat(np.arange(num_streams), n // num_streams), terminated=np.zeros(n, bool),
                truncated=cols["step"] == env.horizon - 1)
    return cols


def write_scripted_dataset(path: str, env_name: str, task_ids: list[int], num_streams: int, num_episodes: int,
                           seed: int = 0, fingerprint: str = "scripted") -> None:
    """A complete dataset of scripted histories for `task_ids` at `path`."""
    rng = np.random.default_rng(seed)
    sidecars = [shards.write_shard(path, t, scripted_histories(env_name, t, num_streams, num_episodes, rng), {})
                for t in task_ids]
    spec = GRID_SPECS[env_name]
    shards.write_manifest(path, env_name=env_name, obs_dim=spec.obs_dim, num_actions=spec.num_actions,
                        action_type="discrete", task_ids=task_ids, shards=sidecars, collect_config={}, seeds={},
                        provenance={}, fingerprint=fingerprint, complete=True)
