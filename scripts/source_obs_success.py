"""Source learner success on Meta-World with the release's 39-dim observation vs the 11/18-dim model view.

Runs `dicp_ray.collect.learn_task` in this process (no Ray, one torch thread) for each given task id with
``collect.source_obs`` = SOURCE_OBS, writing each task's shard + sidecar to OUT (learner seed collect.seed +
task id, so the same for both observations), and prints one JSON line per task. ``--summary`` instead reads
the shards of two such runs (OUT/../src_full, OUT/../src_model style: pass both directories) and prints the
per-goal table of docs/fidelity.md (row 4 measurement): success in each stream's first and last 10 % of episodes (an
episode succeeds if ``success`` is 1 at any step, as in the sidecar) and return in the last 10 %.

    PYTHONPATH=. python scripts/source_obs_success.py --config tune_configs/ml1_reach_2core.yaml \
        --source-obs full --output /tmp/src_full --tasks 0 1 2 3 4 5 6 7
    PYTHONPATH=. python scripts/source_obs_success.py --summary /tmp/src_full /tmp/src_model
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time

import numpy as np


def learn(config_path: str, source_obs: str, output: str, task_ids: list[int], overrides: list[str]) -> None:
    import torch

    from dicp_ray.collect.rllib_learner import learn_task
    from dicp_ray.config.load import load_config

    torch.set_num_threads(1)
    # the RLlib learner (as measured in docs/fidelity.md row 4), so the shards' fingerprint says rllib
    config = load_config(config_path, [f"collect.source_obs={source_obs}", "collect.learner=rllib", *overrides])
    for task_id in task_ids:
        start = time.time()
        sidecar = learn_task(config, task_id, output)
        print(json.dumps({"task_id": task_id, "source_obs": source_obs, "wall_s": round(time.time() - start, 1),
                          **sidecar["success"]}), flush=True)


def _episodes(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per stream: (return, success) of each episode, in order."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    stream, episode, reward, success = (table.column(k).to_numpy() for k in ("stream", "episode", "reward",
                                                                             "success"))
    out = []
    for s in np.unique(stream):
        rows = stream == s
        eps, n = episode[rows], int(episode[rows].max()) + 1
        returns = np.bincount(eps, weights=reward[rows], minlength=n)
        solved = np.zeros(n)
        np.maximum.at(solved, eps, success[rows])
        out.append((returns, solved))
    return out


def _tenth(streams, last: bool) -> tuple[float, float]:
    """Mean success and return over every stream's first or last ceil(10 %) of episodes."""
    successes, returns = [], []
    for ret, solved in streams:
        k = math.ceil(0.1 * len(ret))
        part = slice(-k, None) if last else slice(None, k)
        successes += list(solved[part])
        returns += list(ret[part])
    return float(np.mean(successes)), float(np.mean(returns))


def summary(full_dir: str, model_dir: str) -> None:
    rows = {}
    for name, root in (("full", full_dir), ("model", model_dir)):
        for path in sorted(glob.glob(os.path.join(root, "shards", "task_*.arrow"))):
            task = int(os.path.basename(path)[5:10])
            streams = _episodes(path)
            rows.setdefault(task, {})[name] = (_tenth(streams, False), _tenth(streams, True))
    tasks = sorted(t for t, r in rows.items() if len(r) == 2)
    print("| goal (task id) | 39-dim: success, first 10 % | last 10 % | return, last 10 % "
          "| 11-dim: success, first 10 % | last 10 % | return, last 10 % |")
    print("|---|---|---|---|---|---|---|")
    for t in tasks:
        (ff, fl), (mf, ml) = rows[t]["full"], rows[t]["model"]
        print(f"| {t} | {ff[0]:.2f} | {fl[0]:.2f} | {fl[1]:.0f} | {mf[0]:.2f} | {ml[0]:.2f} | {ml[1]:.0f} |")
    means = {n: [np.mean([rows[t][n][i][j] for t in tasks]) for i in (0, 1) for j in (0, 1)] for n in rows[tasks[0]]}
    print(f"| mean of {len(tasks)} | " + " | ".join(
        f"{means[n][0]:.3f} | {means[n][2]:.3f} | {means[n][3]:.0f}" for n in ("full", "model")) + " |")
    diff = np.array([rows[t]["full"][1][0] - rows[t]["model"][1][0] for t in tasks])
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else float("nan")
    print(f"paired difference of last-10 % success (39-dim - 11-dim): {diff.mean():+.3f} "
          f"(sd {sd:.3f}, s.e. {sd / math.sqrt(len(diff)):.3f}); 39-dim higher on {(diff > 0).sum()} of {len(diff)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tune_configs/ml1_reach_2core.yaml")
    parser.add_argument("--source-obs", choices=("full", "model"))
    parser.add_argument("--output")
    parser.add_argument("--tasks", type=int, nargs="+")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. collect.seed=1")
    parser.add_argument("--summary", nargs=2, metavar=("FULL_DIR", "MODEL_DIR"))
    args = parser.parse_args()
    if args.summary:
        summary(*args.summary)
    elif args.source_obs and args.output and args.tasks:
        learn(args.config, args.source_obs, args.output, args.tasks, args.set)
    else:
        parser.error("pass --source-obs, --output and --tasks (or --summary FULL_DIR MODEL_DIR)")


if __name__ == "__main__":
    main()
