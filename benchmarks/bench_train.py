"""Training throughput of the paper's AD model: in-process (1 thread) vs Ray Train with 1 and 2 workers.

Model (paper Table 5): DICP-AD, 4 layers, 4 heads, embedding 32, SwiGLU MLP 128, k = 80 (Darkroom, 4
episodes), AdamW + cosine, batch 512. All modes run the same code path (WindowSampler -> windows_to_batch
-> train_step) on the same dataset: Darkroom histories of a random/oracle-mixed policy written with
dicp_ray.data (8 tasks x 4 streams x 20 episodes). Reported: windows/s and tokens/s (a window is k + 1
tokens with the world-model query-action token) in steady state (first interval dropped), and for Ray the
end-to-end wall time including its start-up.

    .venv/bin/python benchmarks/bench_train.py --quick          # batch 128, 10 steps, ~1.5 min on 2 cores
    .venv/bin/python benchmarks/bench_train.py                  # batch 512, 20 steps, ~5 min
    python benchmarks/bench_train.py --device cuda              # in-process only; Ray is never imported

Timings on a shared machine are noisy (other processes compete for the cores): compare rows of one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dicp_ray.scripted import write_scripted_dataset
from dicp_ray import data
from dicp_ray.config import ExperimentConfig, config_from_dict
from dicp_ray.model import DICPTransformer, count_parameters
from dicp_ray.train import build_optimizer, model_spec_from_config, train_step, windows_to_batch

NUM_TASKS, NUM_STREAMS, NUM_EPISODES = 8, 4, 20


def paper_config(batch_size: int, num_steps: int, num_workers: int = 1) -> ExperimentConfig:
    return config_from_dict({
        "env": {"name": "Darkroom", "max_train_tasks": NUM_TASKS},
        "model": {"variant": "ad", "world_model": True, "context_episodes": 4},
        "train": {"num_steps": num_steps, "batch_size": batch_size, "num_workers": num_workers,
                  "cpus_per_worker": 1, "log_every_steps": 5, "checkpoint_every_steps": num_steps,
                  "eval_batches": 1},
        "resources": {"num_cpus": 2}})


def write_dataset(path: str, task_ids: list[int]) -> None:
    write_scripted_dataset(path, "Darkroom", task_ids, NUM_STREAMS, NUM_EPISODES, fingerprint="bench_train")


def bench_in_process(config: ExperimentConfig, dataset_path: str, task_ids: list[int], device: str,
                     num_threads: int, bf16: bool | None = None) -> dict:
    """Steady-state windows/s of sampling + training steps in this process (no Ray)."""
    torch.set_num_threads(num_threads)
    dataset = data.HistoryDataset.open(dataset_path, task_ids=task_ids, verify=False)
    spec = model_spec_from_config(config, dataset)
    torch.manual_seed(0)
    model = DICPTransformer(spec).to(device)
    optimizer, scheduler = build_optimizer(model, config.train)
    sampler = data.WindowSampler(dataset, config.context_len, seed=0)
    step_s = []
    for _ in range(config.train.num_steps):
        start = time.perf_counter()
        windows = sampler.sample(config.train.batch_size)
        batch, targets = windows_to_batch(windows, spec.layout, spec.world_model, device)
        loss = train_step(model, optimizer, scheduler, batch, targets, config.train, bf16=bf16)["loss"]
        float(loss)  # wait for the device
        step_s.append(time.perf_counter() - start)
    steady = step_s[5:] or step_s  # like the Ray rows: the first log interval (5 steps) is dropped
    return {"windows_per_s": config.train.batch_size * len(steady) / sum(steady),
            "params": count_parameters(model)}


def bench_ray(config: ExperimentConfig, dataset_path: str, output_dir: str) -> dict:
    """A Ray Train run: in-loop windows/s (from TensorBoard, first 5 steps dropped) and wall time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dicp_ray.train import train_model

    start = time.perf_counter()
    train_model(config, dataset_path, output_dir, split_seed=0)
    wall_s = time.perf_counter() - start
    events = EventAccumulator(str(Path(output_dir) / "tb"))
    events.Reload()
    rates = [e.value for e in events.Scalars("train/samples_per_s")]
    # equal 5-step intervals: the harmonic mean of their rates is windows / time
    return {"windows_per_s": statistics.harmonic_mean(rates[1:] or rates), "wall_s": wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 128 and fewer steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: in-process only (bf16 autocast), Ray is not imported")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    batch = args.batch_size or (128 if args.quick else 512)
    steps = args.steps or (10 if args.quick else 20)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    from dicp_ray.envs import split_tasks

    task_ids = split_tasks("Darkroom", 0)[0][:NUM_TASKS]  # train tasks of split seed 0
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        write_dataset(f"{tmp}/dataset", task_ids)
        cfg = paper_config(batch, steps)
        print(f"DICP-AD paper model, k = {cfg.context_len}, batch {batch}, {steps} steps per mode, "
              f"torch {torch.__version__}, {os.cpu_count()} CPUs")
        rows = []
        if args.device == "cuda":  # baseline: this machine's CPUs; then the GPU in fp32 and bf16 autocast
            threads = os.cpu_count() or 1
            base = bench_in_process(cfg, f"{tmp}/dataset", task_ids, "cpu", num_threads=threads)
            rows.append((f"in-process CPU, {threads} threads", base["windows_per_s"], None))
            for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
                gpu = bench_in_process(cfg, f"{tmp}/dataset", task_ids, "cuda", num_threads=threads, bf16=bf16)
                rows.append((f"in-process {torch.cuda.get_device_name()} ({name})", gpu["windows_per_s"], None))
        else:
            base = bench_in_process(cfg, f"{tmp}/dataset", task_ids, "cpu", num_threads=1)
            rows.append(("in-process CPU, 1 thread", base["windows_per_s"], None))
            from dicp_ray.config import ResourcesConfig
            from dicp_ray.runtime import init_ray

            init_ray(ResourcesConfig(num_cpus=2), log_to_driver=False)
            for workers in (1, 2):
                result = bench_ray(paper_config(batch, steps, workers), f"{tmp}/dataset",
                                   f"{tmp}/ray_{workers}")
                rows.append((f"Ray Train, {workers} worker(s) x 1 CPU", result["windows_per_s"],
                             result["wall_s"]))
            again = bench_in_process(cfg, f"{tmp}/dataset", task_ids, "cpu", num_threads=1)  # drift check
            rows.append(("in-process CPU, 1 thread (again, at the end)", again["windows_per_s"], None))
        tokens = cfg.context_len + 1
        print(f"{'mode':<44} {'windows/s':>10} {'tokens/s':>10} {'vs 1st row':>10} {'end-to-end s':>13}")
        for name, rate, wall in rows:
            wall_text = f"{wall:13.1f}" if wall is not None else f"{'-':>13}"
            print(f"{name:<44} {rate:10.0f} {rate * tokens:10.0f} {rate / rows[0][1]:9.2f}x {wall_text}")


if __name__ == "__main__":
    main()
