"""Coordinate-linear vs cell query embedding, distilled on the SAME Darkroom data at a fixed budget (issue #14).

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/fidelity_embedding.py \
        --config tune_configs/fidelity_2core.yaml --dataset runs/fidelity_2core/dataset --output runs/fidelity_emb

Trains up to four models without Ray (`train_in_process` on CPU, one process and one torch thread each,
``--parallel`` at a time): DICP-AD and AD without world model, each with ``model.obs_embedding`` linear (a
Linear map of the raw (x, y)) and cell (the release's learned table over the 81 cells); everything else is the
config's (the release's backbone, the same windows, seeds and held-out batches). Each process then scores its
model on split 0's 8 held-out goals: DICP-AD in plan and policy mode, AD in policy mode. Prints one JSON line
per model: the held-out action loss at the last step and the mean return at episodes 1, 10 and 50; writes
them to ``<output>/summary.json``. ``--runs wm1_linear wm1_cell`` runs only the DICP-AD pair.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RUNS = {f"wm{int(wm)}_{emb}": (wm, emb) for wm in (True, False) for emb in ("linear", "cell")}


def _run_one(args, name: str) -> dict:
    """Train one model in this process (one torch thread), then score it on split 0's held-out goals."""
    from dicp_ray.config.load import load_config
    from dicp_ray.evaluate.episodes import evaluate_in_context
    from dicp_ray.train.launch import train_in_process

    torch.set_num_threads(1)
    world_model, embedding = RUNS[name]
    run_dir = Path(args.output) / name
    modes = "[policy,plan]" if world_model else "[policy]"
    config = load_config(args.config, [f"model.world_model={str(world_model).lower()}", f"eval.modes={modes}",
                                       f"model.obs_embedding={embedding}", f"train.eval_batches={args.eval_batches}"])
    train_in_process(config, args.dataset, str(run_dir), 0, "cpu")
    row = {"run": name, "world_model": world_model, "obs_embedding": embedding,
           "heldout_loss_action": _heldout_action_loss(run_dir)}
    for mode in (("policy", "plan") if world_model else ("policy",)):
        result = evaluate_in_context(str(run_dir / "model.pt"), None, str(run_dir / f"eval_{mode}"), mode)
        row[mode] = {f"episode_{e}": round(float(result["return_mean"][e - 1]), 3) for e in (1, 10, 50)
                     if e <= len(result["return_mean"])}
    (run_dir / "row.json").write_text(json.dumps(row))
    return row


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
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS),
                        help="models to train and score (default: all four)")
    parser.add_argument("--parallel", type=int, default=2, help="processes at a time")
    parser.add_argument("--one", choices=list(RUNS), help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_run_one(args, args.one)), flush=True)
        return
    Path(args.output).mkdir(parents=True, exist_ok=True)
    common = ["--config", args.config, "--dataset", args.dataset, "--output", args.output,
              "--eval-batches", str(args.eval_batches)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for i in range(0, len(args.runs), args.parallel):
        procs = []
        for name in args.runs[i:i + args.parallel]:
            log = open(Path(args.output) / f"{name}.log", "w")
            procs.append(subprocess.Popen([sys.executable, __file__, *common, "--one", name], stdout=log,
                                          stderr=subprocess.STDOUT, env=env))
        if any(p.wait() for p in procs):
            raise SystemExit(f"a run failed: see the logs in {args.output}")
    rows = [json.loads((Path(args.output) / name / "row.json").read_text()) for name in args.runs]
    for row in rows:
        print(json.dumps(row))
    (Path(args.output) / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
