"""Source PPO learning on 8 Darkroom goals at the paper's settings: population learner vs independent SB3 PPO.

Per goal (the first 8 train tasks of split seed 0; 100 streams x 100K env steps, n_steps 20, minibatch 50,
20 epochs): mean episode return in each stream's first and last 10% of episodes, and the episodes until a
stream first reaches the task's maximum return (median over streams; streams that never do count as never).

    .venv/bin/python benchmarks/bench_population_learning.py population        # horizon terminal (release)
    .venv/bin/python benchmarks/bench_population_learning.py population --bootstrap
    .venv/bin/python benchmarks/bench_population_learning.py sb3                   # 8 independent SB3 PPOs
Add --steps 20000 for a quicker, reduced budget. Prints one table row per goal and the mean row.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def stream_metrics(returns: np.ndarray, best: float) -> dict:
    """``returns (streams, episodes)`` -> first/last 10% means and median episodes until ``best``."""
    tenth = max(1, returns.shape[1] // 10)
    reached = returns >= best - 1e-6
    first_hit = np.where(reached.any(1), reached.argmax(1), np.inf)
    return {"first": returns[:, :tenth].mean(), "last": returns[:, -tenth:].mean(),
            "hit_median": float(np.median(first_hit)), "reached": reached.any(1).mean()}


def run_population(tasks: list[int], steps: int, bootstrap: bool) -> tuple[dict, float]:
    from dicp_ray.collect.population_learner import learn_population
    from dicp_ray.config.load import config_from_dict

    config = config_from_dict({"env": {"name": "Darkroom"}, "model": {"context_episodes": 1}, "collect": {
        "num_streams": 100, "rollout_steps": 20, "minibatch_size": 50, "num_epochs": 20,
        "env_steps_per_task": steps, "bootstrap_at_horizon": bootstrap}})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.process_time()
        learn_population(config, tasks, tmp)
        wall = time.process_time() - start
        out = {task: _returns_from_shard(tmp, task) for task in tasks}
    return out, wall


def _returns_from_shard(path: str, task: int) -> np.ndarray:
    """``(streams, episodes)`` episode returns of a task's shard."""
    from dicp_ray.data import shards
    from dicp_ray.data.history import read_shard_episodes

    return read_shard_episodes(os.path.join(path, shards.SHARD_DIR, shards.shard_name(task) + ".arrow"))["return"]


def run_sb3(tasks: list[int], steps: int, bootstrap: bool) -> tuple[dict, float]:
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

    import dicp_ray.envs  # noqa: F401

    torch.set_num_threads(1)

    class TerminalAtHorizon(gym.Wrapper):          # the release: terminated at the horizon, no bootstrap
        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            return obs, reward, terminated or truncated, False, info

    out, wall = {}, 0.0
    for task in tasks:
        def make(task=task):
            env = gym.wrappers.DtypeObservation(gym.make("dicp_ray/Darkroom-v0", task_id=task), np.float32)
            return env if bootstrap else TerminalAtHorizon(env)
        venv = VecMonitor(DummyVecEnv([make] * 100))
        model = PPO("MlpPolicy", venv, learning_rate=3e-4, n_steps=20, batch_size=50, n_epochs=20, gamma=0.99,
                    gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=task,
                    device="cpu", stats_window_size=10**7, verbose=0)
        start = time.process_time()
        model.learn(total_timesteps=steps)
        wall += time.process_time() - start
        # All 100 streams end an episode on the same step, in env order: position p = episode p // 100.
        flat = np.array([info["r"] for info in model.ep_info_buffer])
        out[task] = flat[:flat.size // 100 * 100].reshape(-1, 100).T
    return out, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("learner", choices=["population", "sb3"])
    parser.add_argument("--bootstrap", action="store_true", help="bootstrap V(s_T) at the horizon")
    parser.add_argument("--steps", type=int, default=100_000, help="env steps per goal (paper: 100K)")
    parser.add_argument("--goals", type=int, default=8, help="the first GOALS train tasks of split seed 0")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first SKIP of those goals")
    args = parser.parse_args()
    from dicp_ray.envs import max_return, split_tasks

    tasks = [int(t) for t in split_tasks("Darkroom", 0)[0][args.skip:args.goals]]
    runner = run_population if args.learner == "population" else run_sb3
    returns, wall = runner(tasks, args.steps, args.bootstrap)
    print(f"{args.learner}, bootstrap_at_horizon={args.bootstrap}, {args.steps:,} steps per goal, "
          f"{wall:.0f} CPU s ({len(tasks) * args.steps / wall:,.0f} env steps per CPU-second, 1 thread)")
    print(f"{'task':>5}{'max':>5}{'first 10%':>11}{'last 10%':>10}{'episodes to max (median)':>26}"
          f"{'reached':>9}")
    rows = []
    for task in tasks:
        m = stream_metrics(returns[task], max_return("Darkroom", task))
        rows.append(m)
        print(f"{task:>5}{max_return('Darkroom', task):>5.0f}{m['first']:>11.2f}{m['last']:>10.2f}"
              f"{m['hit_median']:>26.1f}{m['reached']:>9.0%}")
    mean = {k: np.mean([r[k] for r in rows]) for k in rows[0]}
    print(f"{'mean':>10}{mean['first']:>11.2f}{mean['last']:>10.2f}{mean['hit_median']:>26.1f}"
          f"{mean['reached']:>9.0%}")


if __name__ == "__main__":
    main()
