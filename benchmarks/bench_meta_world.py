"""Env steps per second (one core) of the Meta-World wrappers versus the raw Meta-World env, in one run.

For each task it steps uniformly random actions (drawn up front), resetting every 100 steps as collection does
(the paper's horizon), and reports env steps/s for:
  * ``raw``               - metaworld's own env class after ``set_task`` (39-dim float64 obs, no wrapper),
  * ``wrapper``           - ``MetaWorldEnv`` (11/18-dim float32 obs, clipped action, info), unwrapped,
  * ``wrapper/gym.make``  - the same through Gymnasium's default wrappers (passive checker, order enforcing),
  * ``vector N``          - ``MetaWorldVectorEnv`` (SyncVectorEnv, NEXT_STEP autoreset) of N streams,
  * ``raw loop N``        - a Python loop over N raw envs (the baseline for ``vector N``).
Ratios are against ``raw`` (single envs) and ``raw loop N`` (vector). Each rate is the best of ``--repeats``
runs (the machine may be shared). Also prints the raw reset cost.

Usage: ``python benchmarks/bench_meta_world.py [--quick] [--tasks reach-v3 pick-place-v3] [--streams N]``
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import gymnasium as gym
import numpy as np

from dicp_ray.envs import meta_world_tasks

HORIZON = meta_world_tasks.HORIZON


def raw_env(task: str, task_id: int):
    """metaworld's env for `task` with the task of ML1 id `task_id` set (what the wrapper wraps)."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    split_seed, index = meta_world_tasks.decode_task_id("ML1", task_id)
    env = ALL_V3_ENVIRONMENTS[task]()
    env.set_task(meta_world_tasks.load_tasks("ML1", task, split_seed).tasks[index])
    return env


def steps_per_s_single(env, actions: np.ndarray) -> float:
    env.reset(seed=0)
    start = time.perf_counter()
    for t, action in enumerate(actions, start=1):
        env.step(action)
        if t % HORIZON == 0:
            env.reset()
    return len(actions) / (time.perf_counter() - start)


def steps_per_s_vector(venv, actions: np.ndarray) -> float:
    """`actions` (steps, N, 4); the NEXT_STEP autoreset steps (a reset, no transition) are not counted."""
    venv.reset(seed=0)
    transitions, resetting = 0, np.zeros(venv.num_envs, bool)
    start = time.perf_counter()
    for step_actions in actions:
        transitions += int((~resetting).sum())
        resetting = venv.step(step_actions)[3]
    return transitions / (time.perf_counter() - start)


def steps_per_s_raw_loop(envs: list, actions: np.ndarray) -> float:
    for env in envs:
        env.reset()
    start = time.perf_counter()
    for t, step_actions in enumerate(actions, start=1):
        for env, action in zip(envs, step_actions):
            env.step(action)
            if t % HORIZON == 0:
                env.reset()
    return actions.shape[0] * actions.shape[1] / (time.perf_counter() - start)


def reset_ms(env, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        env.reset()
    return 1e3 * (time.perf_counter() - start) / repeats


def bench_task(task: str, steps: int, streams: int, vector_steps: int,
               repeats: int) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (steps, 4)).astype(np.float32)
    vector_actions = rng.uniform(-1, 1, (vector_steps, streams, 4)).astype(np.float32)
    raw = raw_env(task, 0)
    wrapper = gym.make("dicp_ray/ML1-v0", task=task, task_id=0)
    raw_envs = [raw_env(task, 0) for _ in range(streams)]
    venv = gym.make_vec("dicp_ray/ML1-v0", num_envs=streams, task=task, task_id=0,
                        vectorization_mode="vector_entry_point")
    runs = {"raw": lambda: steps_per_s_single(raw, actions),
            "wrapper": lambda: steps_per_s_single(wrapper.unwrapped, actions),
            "wrapper/gym.make": lambda: steps_per_s_single(wrapper, actions),
            f"raw loop {streams}": lambda: steps_per_s_raw_loop(raw_envs, vector_actions),
            f"vector {streams}": lambda: steps_per_s_vector(venv, vector_actions)}
    best = {label: 0.0 for label in runs}
    for _ in range(repeats):                 # interleaved, so a burst of load hits every variant alike
        for label, run in runs.items():
            best[label] = max(best[label], run())
    base, loop = best["raw"], best[f"raw loop {streams}"]
    rows = [(label, rate, rate / (loop if label.startswith("vector") else base))
            for label, rate in best.items()]
    rows.append(("raw reset (ms)", reset_ms(raw, 20), float("nan")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (~20 s)")
    parser.add_argument("--tasks", nargs="+", default=["reach-v3", "pick-place-v3"])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    steps, vector_steps = (500, 100) if args.quick else (3000, 300)
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, one process (one core); "
          f"{steps} single steps, {vector_steps} x {args.streams} vector steps, reset every {HORIZON}")
    print(f"{'task':<16} {'variant':<18} {'env steps/s':>12} {'ratio':>7}")
    for task in args.tasks:
        for label, rate, ratio in bench_task(task, steps, args.streams, vector_steps, args.repeats):
            ratio_text = "" if np.isnan(ratio) else f"{ratio:6.2f}x"
            print(f"{task:<16} {label:<18} {rate:12,.1f} {ratio_text:>7}")


if __name__ == "__main__":
    main()
