"""Train several models side by side on one device without Ray, sized to a wall-clock budget.

Used for docs/results.md on a lent bare GPU box (PyTorch, no Ray): each run is a separate
`scripts/train_in_process.py` process sharing the GPU. A short probe of all runs together measures each
run's throughput while sharing; the real runs then get as many steps as fit in --budget-s (a multiple of 100),
the same for all runs of one config file (or "group"), so that compared runs train equally long.

    # one config: (split seed x world model on/off) runs
    PYTHONPATH=. python scripts/train_many_in_process.py --config tune_configs/darkroom_2core.yaml \
        --dataset DATASET --output OUT --split-seeds 0 1 2 --budget-s 420 --batch-size 512
    # any list of runs: a JSON list of {"name", "config", "dataset", "split_seed", "set": [K=V, ...]}
    PYTHONPATH=. python scripts/train_many_in_process.py --jobs jobs.json --output OUT --budget-s 150
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def jobs_from_args(args) -> list[dict]:
    if args.jobs:
        return json.loads(Path(args.jobs).read_text())
    jobs = []
    for seed in args.split_seeds:
        for wm in (True, False):
            jobs.append({"name": f"{'dicp_ad' if wm else 'ad'}_seed{seed}", "config": args.config,
                         "dataset": args.dataset, "split_seed": seed,
                         "set": [*args.set, f"train.batch_size={args.batch_size}", f"model.world_model={str(wm).lower()}",
                                 "eval.modes=[policy,plan]" if wm else "eval.modes=[policy]"]})
    return jobs


def launch(jobs: list[dict], steps: dict[str, int], root: Path, device: str) -> list[tuple[subprocess.Popen, Path]]:
    procs = []
    for job in jobs:
        n = steps[job["name"]]
        out = root / job["name"]
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "train.log", "w")
        cmd = [sys.executable, "scripts/train_in_process.py", "--config", job["config"], "--dataset", job["dataset"],
               "--output", str(out), "--split-seed", str(job["split_seed"]), "--device", device,
               "--set", *job.get("set", []), f"train.num_steps={n}", f"train.log_every_steps={max(n // 20, 1)}",
               f"train.checkpoint_every_steps={max(n // 4, 1)}"]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out))
    return procs


def wait(procs) -> None:
    failed = []
    for proc, out in procs:
        if proc.wait() != 0:
            print((out / "train.log").read_text()[-3000:])
            failed.append(str(out))
    if failed:
        raise SystemExit(f"failed: {failed}")


def batch_size(job: dict) -> int:
    sets = dict(s.split("=", 1) for s in job.get("set", []))
    if "train.batch_size" in sets:
        return int(sets["train.batch_size"])
    from dicp_ray.config import load_config

    return load_config(job["config"]).train.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", help="JSON list of runs (instead of --config/--dataset/--split-seeds)")
    parser.add_argument("--config")
    parser.add_argument("--dataset")
    parser.add_argument("--output", required=True)
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, required=True, help="wall time for the real runs")
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args()
    jobs = jobs_from_args(args)
    start = time.perf_counter()
    probe = launch(jobs, {j["name"]: args.probe_steps for j in jobs}, Path(args.output) / "probe", args.device)
    wait(probe)
    rates = {job["name"]: float(re.findall(r"\| (\d+) windows/s", (out / "train.log").read_text())[-1])
             for job, (_, out) in zip(jobs, probe)}
    # Runs that are compared with each other (same config file, e.g. world model on/off) get the same number of
    # steps, set by the slowest of them, so that their schedules and training budgets match.
    steps = {}
    for group in dict.fromkeys(j.get("group", j["config"]) for j in jobs):
        members = [j for j in jobs if j.get("group", j["config"]) == group]
        slowest = min(rates[j["name"]] for j in members)
        n = max(100, int(slowest * args.budget_s / max(batch_size(j) for j in members)) // 100 * 100)
        for job in members:
            steps[job["name"]] = n
            print(f"probe: {job['name']}: {rates[job['name']]:.0f} windows/s while sharing -> {n} steps")
    print(f"probe took {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    wait(launch(jobs, steps, Path(args.output), args.device))
    print(f"trained {len(jobs)} models in {time.perf_counter() - start:.0f} s: {json.dumps(steps)}")


if __name__ == "__main__":
    main()
