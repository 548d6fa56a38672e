"""Train several models side by side on one device without Ray, sized to a wall-clock budget.

Used for docs/results.md on a lent bare GPU box (PyTorch, no Ray): each (split seed, world model on/off)
run is a separate `scripts/train_in_process.py` process sharing the GPU. A short probe of all runs
together measures the shared throughput; the real runs then get as many steps as fit in --budget-s.

    PYTHONPATH=. python scripts/train_many_in_process.py --config tune_configs/darkroom_2core.yaml \
        --dataset DATASET --output OUT --split-seeds 0 1 2 --budget-s 420 --set train.batch_size=512
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path


def launch(args, steps: int, root: Path, log_every: int) -> list[tuple[subprocess.Popen, Path]]:
    procs = []
    for seed in args.split_seeds:
        for wm in ("true", "false"):
            out = root / f"{'dicp_ad' if wm == 'true' else 'ad'}_seed{seed}"
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "train.log", "w")
            cmd = [sys.executable, "scripts/train_in_process.py", "--config", args.config, "--dataset",
                   args.dataset, "--output", str(out), "--split-seed", str(seed), "--device", args.device,
                   "--set", *args.set, f"model.world_model={wm}", "eval.modes=[policy]" if wm == "false" else "eval.modes=[policy,plan]", f"train.num_steps={steps}",
                   f"train.log_every_steps={log_every}", f"train.checkpoint_every_steps={max(steps // 4, 1)}"]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out))
    return procs


def wait(procs) -> None:
    for proc, out in procs:
        if proc.wait() != 0:
            print((out / "train.log").read_text()[-3000:])
            raise SystemExit(f"{out} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, required=True, help="wall time for the real runs")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args()
    args.set = [*args.set, f"train.batch_size={args.batch_size}"]
    start = time.perf_counter()
    probe = launch(args, 300, Path(args.output) / "probe", 100)
    wait(probe)
    rates = [float(re.findall(r"\| (\d+) windows/s", (out / "train.log").read_text())[-1]) for _, out in probe]
    steps = int(min(rates) * args.budget_s / args.batch_size) // 100 * 100
    print(f"probe ({time.perf_counter() - start:.0f} s): {len(probe)} runs side by side at "
          f"{min(rates):.0f}-{max(rates):.0f} windows/s each -> {steps} steps of batch {args.batch_size}")
    start = time.perf_counter()
    wait(launch(args, steps, Path(args.output), max(steps // 20, 1)))
    print(f"trained {len(probe)} models x {steps} steps in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
