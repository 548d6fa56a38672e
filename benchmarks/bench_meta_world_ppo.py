"""Meta-World source PPO speed: Stable-Baselines3 PPO vs the population learner at N = 1, 4, 8, all rows in one run.

Settings are the release's Meta-World PPO (SPEC §3): 100 streams per learner, n_steps 100, minibatch 200,
20 epochs, lr 3e-4, gamma 0.99, 64x64 tanh, Meta-World's 39-number observation (``collect.source_obs: full``),
truncation bootstrap. Each row runs ``--updates`` PPO updates (rollout + update) of every learner on one core
(``torch.set_num_threads(1)``) and reports env steps per CPU-second of the learning loop (setup excluded: env
and model construction amortise over a real run's 100 updates), and the ratio against SB3 in the same run, per
task. Rows:

* ``sb3``: one SB3 ``PPO("MlpPolicy")`` over a ``DummyVecEnv`` of 100 ``ML1Env(observation="full",
  fast_contacts=False)`` streams (streams sharing one MuJoCo model, like ours; Meta-World's own grasp check, as
  the release's SB3 learners run it; ``model.learn``);
* ``population N``: `dicp_ray.collect.population_meta_world.MetaWorldPopulation` with N learners on ML1 goals
  0..N-1 (N x 100 envs), also splitting its CPU between rollout and update.

Usage: ``python benchmarks/bench_meta_world_ppo.py [--tasks reach-v3 pick-place-v3] [--sizes 1 4 8]
[--updates 1] [--streams 100]``

``--learn STEPS``: the learning comparison instead. SB3 PPO (one per goal) and one population of all goals on
ML1 ``--goals`` (default the 8 reach-v3 train goals 0..7), ``STEPS`` env steps per goal, the release's settings
but ``--streams`` streams; per goal the mean episode return and success (any step) of each stream's first and
last 10% of episodes.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch


def release_config(task: str, streams: int):
    from dicp_ray.config.load import config_from_dict

    return config_from_dict({"env": {"name": "ML1", "task": task}, "model": {"context_episodes": 1},
                             "collect": {"learner": "population", "num_streams": streams, "rollout_steps": 100,
                                         "minibatch_size": 200, "num_epochs": 20, "lr": 3e-4, "gamma": 0.99,
                                         "env_steps_per_task": 1_000_000}})


def run_sb3(task: str, streams: int, updates: int) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from dicp_ray.envs.meta_world import ML1VectorEnv

    venv = ML1VectorEnv(num_envs=streams, task_id=0, task=task, observation="full",    # one shared MjModel,
                        fast_contacts=False)                                           # Meta-World's own code
    model = PPO("MlpPolicy", DummyVecEnv([lambda env=env: env for env in venv.envs]), learning_rate=3e-4,
                n_steps=100, batch_size=200, n_epochs=20, gamma=0.99, seed=0, device="cpu")
    start = time.process_time()
    model.learn(total_timesteps=updates * streams * 100)
    cpu = time.process_time() - start
    venv.close()
    return {"steps": updates * streams * 100, "cpu": cpu, "update_cpu": float("nan")}


def run_population(task: str, streams: int, updates: int, size: int) -> dict:
    from dicp_ray.collect.population_meta_world import MetaWorldPopulation

    population = MetaWorldPopulation(release_config(task, streams), list(range(size)))
    start = time.process_time()
    for _ in range(updates):
        population.update()
    cpu = time.process_time() - start
    population.close()
    return {"steps": updates * streams * 100 * size, "cpu": cpu, "update_cpu": population.update_cpu}


def _first_last(returns: np.ndarray) -> tuple[float, float]:
    """``returns (streams, episodes)`` -> mean of each stream's first and last 10% of episodes."""
    tenth = max(1, returns.shape[1] // 10)
    return float(returns[:, :tenth].mean()), float(returns[:, -tenth:].mean())


def learn(task: str, goals: list[int], streams: int, steps: int) -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from dicp_ray.collect.population_meta_world import MetaWorldPopulation
    from dicp_ray.envs.meta_world import EpisodeTally, ML1VectorEnv

    updates = steps // (streams * 100)
    print(f"# learning: {task} goals {goals}, {streams} streams x {updates} updates ({updates * streams * 100:,} env "
          "steps per goal); mean episode return / success rate, first -> last 10% of each stream's episodes")
    print("| goal | SB3 return | population return | SB3 success | population success |")
    print("|---|---|---|---|---|")
    population = MetaWorldPopulation(release_config(task, streams), goals)
    for _ in range(updates):
        population.update()
    ours = [population.columns(i, updates * 100) for i in range(len(goals))]
    population.close()
    rows = []
    for i, goal in enumerate(goals):
        venv = ML1VectorEnv(num_envs=streams, task_id=goal, task=task, observation="full", fast_contacts=False)
        tally = EpisodeTally(streams)
        model = PPO("MlpPolicy", DummyVecEnv([lambda env=env: env for env in venv.envs]), learning_rate=3e-4,
                    n_steps=100, batch_size=200, n_epochs=20, gamma=0.99, seed=goal, device="cpu")
        model.learn(total_timesteps=updates * streams * 100, callback=tally.sb3_callback)
        venv.close()
        sb3 = tally.array()                                              # (streams, episodes, 2)
        cols = ours[i]
        pop_return = cols["reward"].reshape(streams, -1, 100).sum(-1)
        pop_success = cols["success"].reshape(streams, -1, 100).max(-1)
        row = (*_first_last(sb3[..., 0]), *_first_last(pop_return), *_first_last(sb3[..., 1]),
               *_first_last(pop_success))
        rows.append(row)
        print(f"| {goal} | {row[0]:.0f} -> {row[1]:.0f} | {row[2]:.0f} -> {row[3]:.0f} | {row[4]:.2f} -> {row[5]:.2f} "
              f"| {row[6]:.2f} -> {row[7]:.2f} |", flush=True)
    m = np.mean(rows, 0)
    print(f"| mean | {m[0]:.0f} -> {m[1]:.0f} | {m[2]:.0f} -> {m[3]:.0f} | {m[4]:.2f} -> {m[5]:.2f} "
          f"| {m[6]:.2f} -> {m[7]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["reach-v3", "pick-place-v3"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--updates", type=int, default=1)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--learn", type=int, default=0, metavar="STEPS")
    parser.add_argument("--goals", nargs="+", type=int, default=list(range(8)))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.learn:
        learn(args.tasks[0], args.goals, args.streams, args.learn)
        return
    print(f"# {platform.node()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{args.streams} streams x {args.updates} update(s) of 100 steps per learner, release settings")
    print("| task | learner | env steps | CPU s | env steps / CPU s | vs SB3 | update share of CPU |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        rows = [("sb3", run_sb3(task, args.streams, args.updates))]
        for size in args.sizes:
            rows.append((f"population N = {size}", run_population(task, args.streams, args.updates, size)))
        base = rows[0][1]["steps"] / rows[0][1]["cpu"]
        for name, row in rows:
            rate = row["steps"] / row["cpu"]
            share = "" if np.isnan(row["update_cpu"]) else f"{row['update_cpu'] / row['cpu']:.0%}"
            print(f"| {task} | {name} | {row['steps']:,} | {row['cpu']:.1f} | {rate:,.0f} | {rate / base:.2f}x "
                  f"| {share} |", flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
