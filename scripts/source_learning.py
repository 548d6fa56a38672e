"""Source-learner variants on Meta-World goals: learn, then compare success and return per goal.

Two questions of the fidelity record were answered with it: which observation the source learner gets
(docs/fidelity.md row 4: ``collect.source_obs`` full vs model) and which SAC setting produced the release's
data (docs/fidelity.md row 15: the paper's Table 4 vs the release's ``cfg/alg/sac_ml1.yaml``).

``learn``  runs `dicp_ray.collect.rllib_learner.learn_task` (the RLlib PPO / SAC learner) in this process
           (one torch thread, no remote env runners; RLlib starts a local Ray itself) for each task id, with the config's
           settings and ``--set`` overrides, writing each task's shard + sidecar under OUT/shards.
``sb3-sac`` runs Stable-Baselines3's SAC, the release's own source learner (``release:metaworld/collect_data.py``:
           ``SAC("MlpPolicy")`` over a ``DummyVecEnv`` of ``collect.num_streams`` envs), with the config's
           ``collect.sac_*`` settings on the same envs (Meta-World's 39 numbers, its own grasp check), and
           writes OUT/sb3_task_XXXXX.npz (per stream and episode: return, success at any step).
``summary`` reads any such directories and prints, per goal and their mean, success in each stream's first
           and last 10 % of episodes and return there; the mean learning curve in tenths of the episodes; and the
           paired difference of last-10 % success between the first directory and each other one.

    PYTHONPATH=. python scripts/source_learning.py learn --config tune_configs/ml1_reach_2core.yaml \
        --output /tmp/src_full --tasks 0 1 2 3 4 5 6 7 --set collect.source_obs=full
    PYTHONPATH=. python scripts/source_learning.py summary /tmp/src_full /tmp/src_model
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time

import numpy as np


def _config(config_path: str, overrides: list[str]):
    from dicp_ray.config.load import load_config

    # the RLlib learner, so a shard's fingerprint names it (the population learner has no SAC)
    return load_config(config_path, ["collect.learner=rllib", *overrides])


def learn(config_path: str, output: str, task_ids: list[int], overrides: list[str]) -> None:
    import torch

    from dicp_ray.collect.rllib_learner import learn_task

    torch.set_num_threads(1)
    config = _config(config_path, overrides)
    for task_id in task_ids:
        start = time.time()
        sidecar = learn_task(config, task_id, output)
        print(json.dumps({"task_id": task_id, "wall_s": round(time.time() - start, 1), **sidecar["success"]}),
              flush=True)


def sb3_sac(config_path: str, output: str, task_ids: list[int], overrides: list[str]) -> None:
    import torch
    from stable_baselines3 import SAC
    from stable_baselines3.common.vec_env import DummyVecEnv

    from dicp_ray.envs.meta_world import EpisodeTally, ML1VectorEnv

    torch.set_num_threads(1)
    config = _config(config_path, overrides)
    c = config.collect
    os.makedirs(output, exist_ok=True)
    for task_id in task_ids:
        start = time.time()
        venv = ML1VectorEnv(num_envs=c.num_streams, task_id=task_id, task=config.env.task, observation="full",
                            fast_contacts=False)
        tally = EpisodeTally(c.num_streams)
        model = SAC("MlpPolicy", DummyVecEnv([lambda env=env: env for env in venv.envs]), learning_rate=c.lr,
                    buffer_size=c.sac_buffer_size, learning_starts=c.sac_learning_starts,
                    batch_size=c.sac_batch_size, train_freq=c.sac_train_freq, gradient_steps=c.sac_gradient_steps,
                    gamma=c.gamma, seed=c.seed + task_id, device="cpu")
        model.learn(total_timesteps=c.env_steps_per_task, callback=tally.sb3_callback)
        venv.close()
        per_stream = tally.array()                                        # (streams, episodes, 2)
        np.savez(os.path.join(output, f"sb3_task_{task_id:05d}.npz"), returns=per_stream[..., 0],
                 success=per_stream[..., 1])
        print(json.dumps({"task_id": task_id, "wall_s": round(time.time() - start, 1),
                          "episode_success_rate": float(per_stream[..., 1].mean())}), flush=True)


def _runs(root: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Task id -> (returns, success), each (streams, episodes), of one `learn` or `sb3-sac` directory."""
    from dicp_ray.data.history import read_shard_episodes

    out = {}
    for path in glob.glob(os.path.join(root, "shards", "task_*.arrow")):
        episodes = read_shard_episodes(path)
        out[int(os.path.basename(path)[5:10])] = (episodes["return"], episodes["success"])
    for path in glob.glob(os.path.join(root, "sb3_task_*.npz")):
        data = np.load(path)
        out[int(os.path.basename(path)[9:14])] = (data["returns"], data["success"])
    return out


def _tenths(returns: np.ndarray, success: np.ndarray) -> tuple[float, float, float, float]:
    """Success first 10 %, success last 10 %, return first 10 %, return last 10 % of every stream's episodes."""
    k = math.ceil(0.1 * returns.shape[1])
    return (float(success[:, :k].mean()), float(success[:, -k:].mean()),
            float(returns[:, :k].mean()), float(returns[:, -k:].mean()))


def run_labels(roots: list[str]) -> list[str]:
    """A short, distinct name per directory: its last path component, or as many trailing components as it takes
    to tell it from the others (two runs' ``.../dataset`` directories must not be merged into one)."""
    parts = [os.path.abspath(r).strip(os.sep).split(os.sep) for r in roots]
    if len(set(map(tuple, parts))) < len(parts):
        raise SystemExit(f"a directory is given twice: {roots}")
    depth = 1
    while len({tuple(p[-depth:]) for p in parts}) < len(parts):
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


def summary(roots: list[str]) -> None:
    runs = {label: _runs(r) for label, r in zip(run_labels(roots), roots)}
    names = list(runs)
    tasks = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not tasks:
        raise SystemExit(f"no task is in all of {roots}")
    print("success (any step) and return in each stream's first -> last 10 % of episodes")
    print("| goal (task id) | " + " | ".join(f"{n}: success | {n}: return" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    table = {n: np.array([_tenths(*runs[n][t]) for t in tasks]) for n in names}
    for i, t in enumerate(tasks):
        print(f"| {t} | " + " | ".join(f"{table[n][i, 0]:.2f} -> {table[n][i, 1]:.2f} | "
                                        f"{table[n][i, 2]:.0f} -> {table[n][i, 3]:.0f}" for n in names) + " |")
    print(f"| mean of {len(tasks)} | " + " | ".join(
        "{:.3f} -> {:.3f} | {:.0f} -> {:.0f}".format(*table[n].mean(0)) for n in names) + " |")
    print("\nmean over the goals in each tenth of every stream's episodes: return (success)")
    print("| run | " + " | ".join(f"{i + 1}/10" for i in range(10)) + " |")
    print("|---|" + "---|" * 10)
    for n in names:
        deciles = [[(r.mean(), sc.mean()) for r, sc in zip(np.array_split(runs[n][t][0], 10, axis=1),
                                                            np.array_split(runs[n][t][1], 10, axis=1))]
                   for t in tasks]
        curve = np.mean(deciles, axis=0)                                  # (10, 2)
        print(f"| {n} | " + " | ".join(f"{ret:.0f} ({suc:.2f})" for ret, suc in curve) + " |")
    print()
    for other in names[1:]:
        diff = table[names[0]][:, 1] - table[other][:, 1]
        sd = float(diff.std(ddof=1)) if len(diff) > 1 else float("nan")
        print(f"paired difference of last-10 % success ({names[0]} - {other}): {diff.mean():+.3f} (sd {sd:.3f}, "
              f"s.e. {sd / math.sqrt(len(diff)):.3f}); {names[0]} higher on {(diff > 0).sum()} of {len(diff)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("learn", "sb3-sac"):
        run = sub.add_parser(name)
        run.add_argument("--config", default="tune_configs/ml1_reach_2core.yaml")
        run.add_argument("--output", required=True)
        run.add_argument("--tasks", type=int, nargs="+", required=True)
        run.add_argument("--set", nargs="+", default=[], help="config overrides, e.g. collect.seed=1")
    sub.add_parser("summary").add_argument("dirs", nargs="+")
    args = parser.parse_args()
    if args.command == "summary":
        summary(args.dirs)
    else:
        (learn if args.command == "learn" else sb3_sac)(args.config, args.output, args.tasks, args.set)


if __name__ == "__main__":
    main()
