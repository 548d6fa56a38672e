"""Throughput of the numpy-batched grid worlds versus a Python loop over single envs.

For each grid world it steps N copies (default 1000, task ids cycling over all tasks) with uniformly
random actions and reports env steps per second for:
  * ``GridVectorEnv``     - the batched env from ``gymnasium.make_vec`` (NEXT_STEP autoreset),
  * ``loop/unwrapped``    - a Python loop over N ``gymnasium.make``'d envs' ``.unwrapped`` (no wrappers),
  * ``loop/gym.make``     - the same loop through Gymnasium's default wrappers (checker, order enforcing).
Single envs are reset by hand when they truncate. Actions are drawn up front so RNG cost is not timed.

Usage: ``python benchmarks/bench_envs.py [--quick] [--num-envs N] [--steps S] [--loop-steps L]``
"""

from __future__ import annotations

import argparse
import platform
import time

import gymnasium as gym
import numpy as np

from dicp_ray.envs import GRID_SPECS


def bench_batched(env_id: str, task_ids: np.ndarray, actions: np.ndarray) -> float:
    """Env steps/s of the batched env over the pre-drawn `actions` (steps, N)."""
    env = gym.make_vec(env_id, num_envs=len(task_ids), vectorization_mode="vector_entry_point",
                       task_ids=task_ids.tolist())
    env.reset(seed=0)
    env.step(actions[0])  # warm-up outside the timed region
    start = time.perf_counter()
    for step_actions in actions:
        env.step(step_actions)
    elapsed = time.perf_counter() - start
    return actions.size / elapsed


def bench_loop(env_id: str, task_ids: np.ndarray, actions: np.ndarray, unwrap: bool) -> float:
    """Env steps/s of a Python loop over one single env per task id."""
    envs = [gym.make(env_id, task_id=int(t)) for t in task_ids]
    if unwrap:
        envs = [e.unwrapped for e in envs]
    for e in envs:
        e.reset(seed=0)
    py_actions = actions.tolist()  # plain ints, the cheapest thing a caller can pass
    start = time.perf_counter()
    for step_actions in py_actions:
        for env, action in zip(envs, step_actions):
            if env.step(action)[3]:
                env.reset()
    elapsed = time.perf_counter() - start
    return actions.size / elapsed


def main() -> None:
    """Parse arguments, run every benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, Darkroom only (~seconds)")
    parser.add_argument("--num-envs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=None, help="batched steps (default 2000, quick 200)")
    parser.add_argument("--loop-steps", type=int, default=None, help="loop steps (default 100, quick 20)")
    args = parser.parse_args()
    steps = args.steps or (200 if args.quick else 2000)
    loop_steps = args.loop_steps or (20 if args.quick else 100)
    names = ["Darkroom"] if args.quick else list(GRID_SPECS)
    rng = np.random.default_rng(0)

    print(f"python {platform.python_version()}, numpy {np.__version__}, gymnasium {gym.__version__}, "
          f"{args.num_envs} envs, random actions")
    header = f"{'env':<18}{'implementation':<17}{'steps':>7}{'env-steps/s':>14}{'vs loop/unwrapped':>19}"
    print(header)
    print("-" * len(header))
    for name in names:
        spec = GRID_SPECS[name]
        task_ids = np.arange(args.num_envs) % spec.num_tasks
        actions = rng.integers(0, spec.num_actions, (max(steps, loop_steps), args.num_envs))
        results = [
            ("GridVectorEnv", steps, bench_batched(spec.env_id, task_ids, actions[:steps])),
            ("loop/unwrapped", loop_steps, bench_loop(spec.env_id, task_ids, actions[:loop_steps], True)),
            ("loop/gym.make", loop_steps, bench_loop(spec.env_id, task_ids, actions[:loop_steps], False)),
        ]
        baseline = results[1][2]
        for impl, n_steps, rate in results:
            print(f"{name:<18}{impl:<17}{n_steps:>7}{rate:>14,.0f}{rate / baseline:>18.1f}x")


if __name__ == "__main__":
    main()
