"""Collection throughput: population PPO learners vs one RLlib learner per task vs Stable-Baselines3, one run.

Paper Darkroom settings: 100 streams, n_steps 20, minibatch 50, 20 epochs, lr 3e-4, 64x64 tanh actor and
critic. Every contender runs in THIS process on one thread, one after the other, and is timed in CPU seconds
(``time.process_time``) as well as wall seconds: on a shared machine the CPU time is what a free core would
take, the wall time is what this run got. Rows: SB3 PPO over a DummyVecEnv of 100 copies; the RLlib learner
(``collect.learner=rllib``, ``learn_task``); population learners of N = 1, 9, 81 tasks (``learn_population``);
Dark Key-to-Door at its paper settings (n_steps 50, minibatch 100, 10 epochs) with N = 81, which gives the
projection of the paper's Key-to-Door collection (6561 tasks x 100K steps). Then scaling from 1 to 2 worker
processes through Ray (``collect_histories``, populations of 9 tasks): wall and CPU efficiency.

    .venv/bin/pip install -e ".[bench]"        # stable-baselines3
    .venv/bin/python benchmarks/bench_collect.py --quick    # 10K env steps per learner
    .venv/bin/python benchmarks/bench_collect.py            # 100K (the paper's budget per task)
Learning curves (first vs last 10% return): benchmarks/bench_population_learning.py.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

KTD_TASKS, KTD_STEPS = 6561, 100_000


def paper_config(steps: int, num_tasks: int, env: str = "Darkroom", **collect):
    from dicp_ray.config.load import config_from_dict

    settings = {"num_streams": 100, "rollout_steps": 20, "minibatch_size": 50, "num_epochs": 20}
    if env == "DarkKeyToDoor":
        settings = {"num_streams": 100, "rollout_steps": 50, "minibatch_size": 100, "num_epochs": 10}
    return config_from_dict({
        "env": {"name": env, "max_train_tasks": num_tasks}, "model": {"context_episodes": 1},
        "collect": {**settings, "env_steps_per_task": steps, "include_test_tasks": False, **collect},
        "resources": {"num_cpus": 2}})


class Clock:
    """Wall and CPU seconds of a ``with`` block (this process, all its threads)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bench_population(steps: int, n: int, env: str = "Darkroom") -> dict:
    from dicp_ray.collect.population_learner import learn_population
    from dicp_ray.envs import split_tasks

    tasks = [int(t) for t in split_tasks(env, 0)[0][:n]]
    with tempfile.TemporaryDirectory() as tmp, Clock() as clock:
        learn_population(paper_config(steps, n, env), tasks, tmp)
    return {"steps": n * steps, "wall": clock.wall, "cpu": clock.cpu}


def bench_rllib(steps: int, task_id: int) -> dict:
    import torch

    from dicp_ray.collect.rllib_learner import learn_task

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, Clock() as clock:
        learn_task(paper_config(steps, 1, learner="rllib"), task_id, tmp)
    return {"steps": steps, "wall": clock.wall, "cpu": clock.cpu}


def bench_sb3(steps: int, task_id: int) -> dict:
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    import dicp_ray.envs  # noqa: F401

    torch.set_num_threads(1)
    venv = DummyVecEnv([lambda: gym.wrappers.DtypeObservation(
        gym.make("dicp_ray/Darkroom-v0", task_id=task_id), np.float32)] * 100)
    model = PPO("MlpPolicy", venv, learning_rate=3e-4, n_steps=20, batch_size=50, n_epochs=20, gamma=0.99,
                gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=0,
                device="cpu", verbose=0)
    with Clock() as clock:
        model.learn(total_timesteps=steps)
    return {"steps": steps, "wall": clock.wall, "cpu": clock.cpu}


def bench_scaling(steps: int, per_population: int = 9) -> dict:
    """1 vs 2 populations of ``per_population`` tasks at once through Ray (2 CPUs): wall and CPU rates."""
    from dicp_ray.collect.driver import collect_histories
    from dicp_ray.data import shards

    out = {}
    for workers in (1, 2):
        config = paper_config(steps, workers * per_population, tasks_per_population=per_population)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            path = collect_histories(config, os.path.join(tmp, "dataset"), progress=False)
            wall = time.perf_counter() - start
            sidecars = [shards.read_sidecar(path, t) for t in shards.read_manifest(path)["task_ids"]]
        total = sum(s["env_steps"] for s in sidecars)
        populations = {(s["wall_s"], s["cpu_s"]) for s in sidecars}   # a population's members share them
        out[workers] = {"steps": total, "wall": wall, "cpu": sum(cpu for _, cpu in populations),
                        "population_wall": max(s["wall_s"] for s in sidecars)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10K env steps per learner instead of 100K")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1 -> 2 worker Ray measurement")
    args = parser.parse_args()
    steps = 10_000 if args.quick else 100_000
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    import torch

    from dicp_ray.envs import split_tasks

    torch.set_num_threads(1)
    task_id = int(split_tasks("Darkroom", 0)[0][0])
    print(f"bench_collect: paper PPO settings, {steps:,} env steps per learner, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}, ray {ray.__version__}, torch {torch.__version__}")
    rows = {"SB3 PPO, DummyVecEnv x100": bench_sb3(steps, task_id),
            "RLlib PPO, 1 learner per task": bench_rllib(steps, task_id)}
    for n in (1, 9, 81):
        rows[f"population, N = {n}"] = bench_population(steps, n)
    rows["population, N = 81, Dark Key-to-Door"] = bench_population(steps, 81, "DarkKeyToDoor")
    sb3 = rows["SB3 PPO, DummyVecEnv x100"]
    sb3_rate = sb3["steps"] / sb3["cpu"]
    print(f"\n{'Darkroom (one thread each)':<40}{'env steps':>11}{'CPU s':>8}{'wall s':>8}"
          f"{'steps/CPU-s':>13}{'vs SB3':>8}")
    for name, r in rows.items():
        rate = r["steps"] / r["cpu"]
        ratio = "" if "Key-to-Door" in name else f"{rate / sb3_rate:>7.1f}x"     # other PPO settings
        print(f"{name:<40}{r['steps']:>11,}{r['cpu']:>8.1f}{r['wall']:>8.1f}{rate:>13,.0f}{ratio}")
    ktd = rows["population, N = 81, Dark Key-to-Door"]
    ktd_rate = ktd["steps"] / ktd["cpu"]
    if not args.no_scaling:
        from dicp_ray.config.schema import ResourcesConfig
        from dicp_ray.runtime import init_ray

        init_ray(ResourcesConfig(num_cpus=2), log_to_driver=False)
        scaling = bench_scaling(steps)
        ray.shutdown()
        one, two = scaling[1], scaling[2]
        wall_eff = (two["steps"] / two["wall"]) / (2 * one["steps"] / one["wall"])
        cpu_eff = (two["steps"] / two["cpu"]) / (one["steps"] / one["cpu"])
        print(f"\nscaling 1 -> 2 worker processes (Ray, populations of 9): wall efficiency {wall_eff:.1%} "
              f"(end to end, incl. Ray start of the workers; the machine's other load counts), "
              f"CPU efficiency {cpu_eff:.1%} (steps per CPU-second of a worker, 2 at once vs 1)")
    else:
        cpu_eff = 1.0
    cpu_eff = min(cpu_eff, 1.0)                                # above 100% is the machine's load changing
    hours = KTD_TASKS * KTD_STEPS / ktd_rate / 3600
    print(f"\nprojected paper Dark Key-to-Door collection ({KTD_TASKS} tasks x {KTD_STEPS:,} steps) at "
          f"{ktd_rate:,.0f} steps per CPU-second: {hours:.1f} core-hours = {hours / 2 / cpu_eff:.1f} h on 2 "
          f"free cores, {hours / 16 / cpu_eff:.2f} h on a 16-core node (CPU efficiency {cpu_eff:.0%} assumed)")


if __name__ == "__main__":
    main()
