"""Training throughput of the paper's AD model: today's step vs the new step, 1 and M models per process.

Model (paper Table 5): DICP-AD, 4 layers, 4 heads, embedding 32, SwiGLU MLP 128, k = 80 (Darkroom, 4 episodes),
AdamW + cosine, batch 512 windows per model, dropout 0.1 and attention dropout 0.1. Data: Darkroom histories of a
random/oracle-mixed policy written with dicp_ray.data (8 tasks x 4 streams x 20 episodes); every model samples its
own windows (WindowSampler -> windows_to_batch) every step, as in training.

Rows, each in a fresh child process (glibc's allocator settings are per process):
  * today's step: `train_step` on a lone model, SDPA for attention with dropout, the per-tensor AdamW loop,
    the default allocator (the step before issue 17);
  * new step, M models: `dicp_ray.train.model_group.ModelGroup` as the training loop runs it (`tune_allocator`,
    CausalAttentionDropout on CPU, fused AdamW, stacked weights for M > 1, passes of --per-pass models).
Reported: windows/s summed over the models by wall clock and by the process's CPU time (`time.process_time`:
on a shared machine the CPU-time rate is the per-core figure; wall rates move with the other load), and the
projected time of the paper's Darkroom table (30 models x 50K steps x 512 windows = 768M windows) at that rate.

    python benchmarks/bench_train.py                         # CPU, 1 thread: today vs new, M = 1 / 6 / 15 / 30
    python benchmarks/bench_train.py --models 1 6 --steps 4  # fewer rows
    python benchmarks/bench_train.py --device cuda           # a GPU: the same rows (+ --compile, --key-to-door)
    python benchmarks/bench_train.py --device cuda --key-to-door   # k = 200, batch 4096 (Key-to-Door setting)

Timings on a shared machine are noisy: compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

NUM_TASKS, NUM_STREAMS, NUM_EPISODES = 8, 4, 20
TABLE_WINDOWS = 30 * 50_000 * 512  # the paper's Darkroom table: 5 seeds x 2 variants x 3 layouts


def paper_config(env: str, batch_size: int, num_steps: int):
    from dicp_ray.config.load import config_from_dict

    return config_from_dict({
        "env": {"name": env, "max_train_tasks": NUM_TASKS},
        "model": {"variant": "ad", "world_model": True, "context_episodes": 4},
        "train": {"num_steps": num_steps, "batch_size": batch_size}, "resources": {"num_cpus": 2}})


def child(args: dict) -> dict:
    """One row: build the models and samplers, warm up, time `steps` steps."""
    import torch

    from dicp_ray.data import history
    from dicp_ray.models import attention
    from dicp_ray.models.checkpoints import build_model
    from dicp_ray.models.transformer import count_parameters
    from dicp_ray.train.batches import model_spec_from_config, windows_to_batch

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    cfg = paper_config(args["env"], args["batch"], 1000)
    dataset = history.HistoryDataset.open(args["dataset"], verify=False)
    spec = model_spec_from_config(cfg, dataset)
    samplers = [history.WindowSampler(dataset, cfg.context_len, seed=[0, m]) for m in range(args["models"])]
    models = []
    for _ in range(args["models"]):
        torch.manual_seed(0)
        models.append(build_model(spec))

    def batches():  # as the training loop does it (CUDA: pinned memory, non-blocking copies)
        from dicp_ray.train.loop import _to_device

        return [_to_device(windows_to_batch(s.sample(args["batch"]), spec.layout, spec.world_model), device)
                for s in samplers]

    if args["mode"] == "today":
        from dicp_ray.train.step import train_step

        def batches():  # noqa: F811  today's: straight to the device
            return [windows_to_batch(samplers[0].sample(args["batch"]), spec.layout, spec.world_model, device)]

        attention.ATTENTION_DROPOUT_CPU = "sdpa"
        model = models[0].to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                                      weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

        def step():
            return [train_step(model, optimizer, scheduler, *batches()[0], cfg.train)]
    else:
        from dicp_ray.train.backends import tune_allocator
        from dicp_ray.train.loop import models_per_pass
        from dicp_ray.train.model_group import ModelGroup

        tune_allocator()
        per_pass = args["per_pass"] or models_per_pass(spec, args["batch"], device)
        group = ModelGroup(models, cfg.train, device, compile=args["compile"], models_per_pass=per_pass)

        def step():
            return group.step(batches())

    for _ in range(args["warmup"]):
        float(step()[0]["loss"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args["steps"]):
        losses = step()
    float(losses[-1]["loss"])  # wait for the device
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    windows = args["batch"] * args["models"] * args["steps"]
    return {"wall": windows / wall, "cpu": windows / cpu, "params": count_parameters(models[0]),
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "gpu_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None}


def run_row(args: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"row {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 6, 15, 30], help="M rows of the new step")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per model (512; 4096 Key-to-Door)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default: CPU 4, GPU 50)")
    parser.add_argument("--per-pass", type=int, default=None, help="models per forward/backward pass "
                        "(default: train_loop.models_per_pass's memory estimate)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also rows with torch.compile (GPU: CUDA graphs)")
    parser.add_argument("--key-to-door", action="store_true", help="DarkKeyToDoor, k = 200, batch 4096")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    from dicp_ray.collect.scripted import write_scripted_dataset
    from dicp_ray.envs import split_tasks

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    env = "DarkKeyToDoor" if args.key_to_door else "Darkroom"
    batch = args.batch_size or (4096 if args.key_to_door else 512)
    steps = args.steps or (50 if args.device == "cuda" else 4)
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        task_ids = split_tasks(env, 0)[0][:NUM_TASKS]
        write_scripted_dataset(f"{tmp}/dataset", env, task_ids, NUM_STREAMS, NUM_EPISODES, fingerprint="bench")
        k = paper_config(env, batch, 1).context_len
        print(f"DICP-AD paper model on {env}, k = {k}, batch {batch} per model, {steps} timed steps per row, "
              f"{card}, torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        base = {"dataset": f"{tmp}/dataset", "env": env, "batch": batch, "device": args.device,
                "threads": args.threads, "warmup": 1 if args.device == "cpu" else 5, "per_pass": args.per_pass,
                "compile": False}
        rows = [("today's step, 1 model", run_row({**base, "mode": "today", "models": 1, "steps": steps}))]
        for m in args.models:
            rows.append((f"new step, {m} model(s)", run_row({**base, "mode": "new", "models": m,
                                                              "steps": max(1, steps if m == 1 else steps // 2)})))
            if args.compile:
                rows.append((f"new step + torch.compile, {m} model(s)",
                             run_row({**base, "mode": "new", "models": m, "compile": True, "warmup": 3,
                                      "steps": max(1, steps // 2)})))
        print(f"{'row':<40} {'windows/s wall':>15} {'windows/s CPU':>14} {'vs today':>9} {'table (768M)':>13} "
              f"{'peak mem GB':>11}")
        key = "cpu" if args.device == "cpu" else "wall"
        for name, r in rows:
            hours = TABLE_WINDOWS / r[key] / 3600
            mem = r["gpu_mem_gb"] if r["gpu_mem_gb"] is not None else r["max_rss_gb"]
            print(f"{name:<40} {r['wall']:15.0f} {r['cpu']:14.0f} {r[key] / rows[0][1][key]:8.2f}x "
                  f"{hours:11.1f} h {mem:11.1f}")
        print("vs today and table hours use the CPU-time rate on CPU (per core), the wall rate on a GPU")


if __name__ == "__main__":
    main()
