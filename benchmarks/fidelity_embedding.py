"""Coordinate-linear vs cell query embedding, distilled on the SAME Darkroom data at a fixed budget (issue #14).

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/fidelity_embedding.py \
        --config tune_configs/fidelity_2core.yaml --dataset runs/fidelity_2core/dataset --output runs/fidelity_emb

Trains four models without Ray (`train_in_process` on CPU, one torch thread each, two at a time): AD without
world model and DICP-AD, each with ``model.obs_embedding`` linear (a Linear map of the raw (x, y)) and cell (the
release's learned table over the 81 cells); everything else is the config's (the release's backbone, the same
windows, seeds and held-out batches). Then scores each on split 0's 8 held-out goals: AD in policy mode,
DICP-AD in plan mode (and policy mode). Prints one JSON line per model: the held-out action loss at the last
step and the mean return at episodes 1, 10 and 50; writes them to ``<output>/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

RUNS = [(wm, emb) for wm in (False, True) for emb in ("linear", "cell")]


def _train(args, world_model: bool, embedding: str) -> subprocess.Popen:
    out = Path(args.output) / f"wm{int(world_model)}_{embedding}"
    sets = [f"model.world_model={str(world_model).lower()}", f"model.obs_embedding={embedding}",
            f"train.eval_batches={args.eval_batches}"]
    cmd = [sys.executable, "scripts/train_in_process.py", "--config", args.config, "--dataset", args.dataset,
           "--output", str(out), "--split-seed", "0", "--device", "cpu", "--set", *sets]
    log = open(out.with_suffix(".log"), "w")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": ".", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _heldout_action_loss(run_dir: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return float(events.Scalars("heldout/loss_action")[-1].value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    Path(args.output).mkdir(parents=True, exist_ok=True)
    for i in range(0, len(RUNS), args.parallel):
        procs = [_train(args, *run) for run in RUNS[i:i + args.parallel]]
        if any(p.wait() for p in procs):
            raise SystemExit(f"a training run failed: see the logs in {args.output}")

    from dicp_ray.evaluate import evaluate_in_context

    torch.set_num_threads(1)
    summary = []
    for world_model, embedding in RUNS:
        run_dir = Path(args.output) / f"wm{int(world_model)}_{embedding}"
        row = {"world_model": world_model, "obs_embedding": embedding,
               "heldout_loss_action": _heldout_action_loss(run_dir)}
        for mode in (("policy", "plan") if world_model else ("policy",)):
            result = evaluate_in_context(str(run_dir / "model.pt"), None, str(run_dir / f"eval_{mode}"), mode)
            means = result["return_mean"]
            row[mode] = {f"episode_{e}": round(float(means[e - 1]), 3) for e in (1, 10, 50) if e <= len(means)}
        print(json.dumps(row), flush=True)
        summary.append(row)
    (Path(args.output) / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
