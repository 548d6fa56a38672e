"""Collection throughput: dicp_ray (RLlib PPO learners as Ray tasks) vs Stable-Baselines3 PPO, same run.

Paper Darkroom settings: 100 streams, n_steps 20, minibatch 50, 20 epochs, lr 3e-4, 64x64 tanh actor and
critic. Measures env steps/s per CPU core for 1 and 2 parallel learners (scaling efficiency), SB3 PPO over
a DummyVecEnv of 100 copies on one core, the peak driver RSS while collecting, the source PPO's mean episode
return in the first vs last 10% of its histories, and sampling-only throughput of the two ways of plugging
the streams into RLlib (batched GridVectorEnv via vector_entry_point vs gymnasium SyncVectorEnv).

    .venv/bin/pip install -e ".[bench]"        # stable-baselines3
    .venv/bin/python benchmarks/bench_collect.py --quick    # 10K env steps per learner (~2 min on 2 cores)
    .venv/bin/python benchmarks/bench_collect.py            # 100K (the paper's budget per task)
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class PeakRss:
    """Samples this process's RSS every 50 ms in a thread; ``peak_mib`` after the ``with`` block."""

    def __enter__(self):
        self.peak_mib, self._stop = _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak_mib = max(self.peak_mib, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def paper_config(steps: int, num_tasks: int):
    from dicp_ray.config import config_from_dict

    return config_from_dict({
        "env": {"name": "Darkroom", "max_train_tasks": num_tasks},
        "collect": {"num_streams": 100, "rollout_steps": 20, "minibatch_size": 50, "num_epochs": 20,
                    "env_steps_per_task": steps, "include_test_tasks": False},
        "resources": {"num_cpus": 2}})


def bench_rllib(steps: int, num_learners: int) -> dict:
    from dicp_ray import data
    from dicp_ray.collect import collect_histories

    config = paper_config(steps, num_learners)
    with tempfile.TemporaryDirectory() as tmp, PeakRss() as rss:
        start = time.perf_counter()
        path = collect_histories(config, os.path.join(tmp, "dataset"), progress=False)
        wall = time.perf_counter() - start
        manifest = data.read_manifest(path)
        sidecars = [data.read_sidecar(path, t) for t in manifest["task_ids"]]
    total = sum(s["env_steps"] for s in sidecars)
    learner_rate = np.mean([s["env_steps"] / s["wall_s"] for s in sidecars])
    return {"wall_s": wall, "env_steps": total, "steps_per_s": total / wall,
            "learner_steps_per_s": learner_rate, "peak_driver_rss_mib": rss.peak_mib, "sidecars": sidecars}


def bench_sb3(steps: int, task_id: int) -> dict:
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

    import dicp_ray.envs  # noqa: F401

    torch.set_num_threads(1)
    venv = VecMonitor(DummyVecEnv([lambda: gym.wrappers.DtypeObservation(
        gym.make("dicp_ray/Darkroom-v0", task_id=task_id), np.float32)] * 100))
    model = PPO("MlpPolicy", venv, learning_rate=3e-4, n_steps=20, batch_size=50, n_epochs=20, gamma=0.99,
                gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=0,
                device="cpu", stats_window_size=10**6, verbose=0)
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    wall = time.perf_counter() - start
    returns = np.array([info["r"] for info in model.ep_info_buffer])   # in completion order
    tenth = max(1, len(returns) // 10)
    return {"wall_s": wall, "steps_per_s": steps / wall, "first_10pct": returns[:tenth].mean(),
            "last_10pct": returns[-tenth:].mean()}


def bench_sampling(task_id: int, num_samples: int = 10) -> dict:
    """Sampling only (no learner update): env steps/s of one EnvRunner with 100 streams, per mode."""
    import torch

    from dicp_ray.collect import build_learner_config

    torch.set_num_threads(1)
    out = {}
    for mode in ("vector_entry_point", "sync"):
        algo = build_learner_config(paper_config(10_000, 1), task_id, vectorize_mode=mode).build_algo()
        algo.env_runner.sample()
        start = time.perf_counter()
        for _ in range(num_samples):
            algo.env_runner.sample()
        out[mode] = num_samples * 20 * 100 / (time.perf_counter() - start)
        algo.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10K env steps per learner instead of 100K")
    args = parser.parse_args()
    steps = 10_000 if args.quick else 100_000
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    from dicp_ray.config import ResourcesConfig
    from dicp_ray.envs import max_return, split_tasks
    from dicp_ray.runtime import init_ray

    init_ray(ResourcesConfig(num_cpus=2), log_to_driver=False)
    print(f"bench_collect: Darkroom, paper PPO settings, {steps:,} env steps per learner, "
          f"{os.cpu_count()} CPU cores, ray {ray.__version__}")
    one = bench_rllib(steps, 1)
    two = bench_rllib(steps, 2)
    task_id = split_tasks("Darkroom", 0)[0][0]
    sb3 = bench_sb3(steps, task_id)
    sampling = bench_sampling(task_id)
    ray.shutdown()

    print(f"\n{'setup':<44}{'wall s':>8}{'env steps/s':>13}{'per core':>10}")
    rows = [("dicp_ray, 1 learner (end to end)", one["wall_s"], one["steps_per_s"], one["steps_per_s"]),
            ("dicp_ray, 2 learners (end to end)", two["wall_s"], two["steps_per_s"], two["steps_per_s"] / 2),
            ("dicp_ray, inside a learner (build+train)", np.nan, one["learner_steps_per_s"],
             one["learner_steps_per_s"]),
            ("SB3 PPO, DummyVecEnv x100, 1 thread", sb3["wall_s"], sb3["steps_per_s"], sb3["steps_per_s"])]
    for name, wall, rate, per_core in rows:
        print(f"{name:<44}{wall:>8.1f}{rate:>13,.0f}{per_core:>10,.0f}")
    print(f"scaling efficiency 1 -> 2 learners: {two['steps_per_s'] / (2 * one['steps_per_s']):.0%} "
          "(end to end, includes per-worker RLlib import and Ray start-up)")
    print(f"dicp_ray per-core throughput vs SB3: {one['steps_per_s'] / sb3['steps_per_s']:.2f}x (1 learner), "
          f"{two['steps_per_s'] / 2 / sb3['steps_per_s']:.2f}x (2 learners)")
    print(f"peak driver RSS while collecting: {one['peak_driver_rss_mib']:.0f} MiB (1 learner), "
          f"{two['peak_driver_rss_mib']:.0f} MiB (2 learners)")
    print(f"sampling only, 100 streams, one EnvRunner: vector_entry_point (GridVectorEnv) "
          f"{sampling['vector_entry_point']:,.0f} steps/s vs sync (SyncVectorEnv) "
          f"{sampling['sync']:,.0f} steps/s")
    print("\nsource PPO mean episode return, first vs last 10% of each stream's history:")
    for sidecar in two["sidecars"]:
        r = sidecar["returns"]
        best = max_return("Darkroom", sidecar["task_id"])
        print(f"  dicp_ray task {sidecar['task_id']:>2} (max {best:.0f}): "
              f"{r['first_10pct_mean']:.2f} -> {r['last_10pct_mean']:.2f}")
    print(f"  SB3      task {task_id:>2} (max {max_return('Darkroom', task_id):.0f}): "
          f"{sb3['first_10pct']:.2f} -> {sb3['last_10pct']:.2f}")


if __name__ == "__main__":
    main()
