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
    python benchmarks/bench_train.py --device cuda --workload ml1_ad --bf16   # Meta-World AD, k = 1000 (also ml1_idt)

On CUDA the windows are gathered on the GPU (train.sample_on_device's default; rows with
``"sample_on_device": false`` in their child arguments time the host sampler). scripts/device_run.sh builds its
speed table from `write_dataset` and `run_row`.

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
# Models timed: the paper's grid AD (Table 5) on Darkroom (k = 80) or Dark Key-to-Door (k = 200), and its
# Meta-World AD and IDT (k = 1000: 10 episodes of 100 steps; 4 layers, 8 heads, embedding 64, MLP 256, as
# tune_configs/ml1_reach.yaml) on synthetic Meta-World windows (random numbers in the real shard format).
WORKLOADS = {
    "darkroom": ({"name": "Darkroom", "max_train_tasks": NUM_TASKS}, {"variant": "ad", "context_episodes": 4}),
    "darkkeytodoor": ({"name": "DarkKeyToDoor", "max_train_tasks": NUM_TASKS},
                      {"variant": "ad", "context_episodes": 4}),
    "ml1_ad": ({"name": "ML1", "task": "reach-v3"}, {"variant": "ad", "context_episodes": 10, "num_heads": 8,
                                                     "embed_dim": 64, "mlp_dim": 256}),
    "ml1_idt": ({"name": "ML1", "task": "reach-v3"}, {"variant": "idt", "context_episodes": 10, "num_heads": 8,
                                                      "embed_dim": 64, "mlp_dim": 256}),
}


def paper_config(workload: str, batch_size: int, num_steps: int, mixed_precision: bool = False,
                 sample_on_device: bool | None = None):
    from dicp_ray.config.load import config_from_dict

    env, model = WORKLOADS[workload]
    return config_from_dict({
        "env": env, "model": {"world_model": True, **model},
        "train": {"num_steps": num_steps, "batch_size": batch_size, "mixed_precision": mixed_precision,
                  "sample_on_device": sample_on_device},
        "resources": {"num_cpus": 2}})


def write_dataset(workload: str, path: str) -> str:
    """The timing dataset of `workload` at `path`: scripted grid histories (8 tasks x 4 streams x 20 episodes), or
    synthetic Meta-World ones (8 tasks x 4 streams x 20 episodes of 100 steps of random numbers)."""
    import numpy as np

    from dicp_ray.collect.scripted import write_scripted_dataset
    from dicp_ray.data import shards
    from dicp_ray.envs import split_tasks

    env = WORKLOADS[workload][0]["name"]
    if env != "ML1":
        write_scripted_dataset(path, env, split_tasks(env, 0)[0][:NUM_TASKS], NUM_STREAMS, NUM_EPISODES,
                               fingerprint="bench")
        return path
    rng, horizon, obs_dim, sidecars = np.random.default_rng(0), 100, 11, []
    n = NUM_STREAMS * NUM_EPISODES * horizon
    for task_id in range(NUM_TASKS):
        step = np.tile(np.arange(horizon, dtype=np.int32), NUM_STREAMS * NUM_EPISODES)
        columns = {"stream": np.repeat(np.arange(NUM_STREAMS, dtype=np.int32), n // NUM_STREAMS),
                   "episode": np.tile(np.repeat(np.arange(NUM_EPISODES, dtype=np.int32), horizon), NUM_STREAMS),
                   "step": step, "obs": rng.normal(size=(n, obs_dim)).astype(np.float32),
                   "action": rng.uniform(-1, 1, (n, 4)).astype(np.float32),
                   "reward": rng.uniform(0, 10, n).astype(np.float32),
                   "next_obs": rng.normal(size=(n, obs_dim)).astype(np.float32),
                   "terminated": np.zeros(n, bool), "truncated": step == horizon - 1,
                   "success": (rng.random(n) < 0.1).astype(np.float32)}
        sidecars.append(shards.write_shard(path, task_id, columns, {}))
    shards.write_manifest(path, env_name="ML1", obs_dim=obs_dim, num_actions=None, action_type="continuous",
                          action_dim=4, env_task="reach-v3", task_ids=list(range(NUM_TASKS)), shards=sidecars,
                          collect_config={}, seeds={}, provenance={}, fingerprint="bench", complete=True)
    return path


def child(args: dict) -> dict:
    """One row: build the models and samplers, warm up, time `steps` steps."""
    import torch

    from dicp_ray.data import history
    from dicp_ray.models import attention
    from dicp_ray.models.checkpoints import build_model
    from dicp_ray.models.transformer import count_parameters
    from dicp_ray.train.batches import make_window_sampler, model_spec_from_config, windows_to_batch

    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    cfg = paper_config(args["workload"], args["batch"], 1000, args.get("mixed_precision", False),
                       args.get("sample_on_device"))
    dataset = history.HistoryDataset.open(args["dataset"], verify=False)
    spec = model_spec_from_config(cfg, dataset)
    samplers = [make_window_sampler(cfg, dataset, seed=[0, m], device=device) for m in range(args["models"])]
    models = []
    for _ in range(args["models"]):
        torch.manual_seed(0)
        models.append(build_model(spec))

    def batches():  # as the training loop does it (host windows: pinned memory, non-blocking copies)
        from dicp_ray.train.loop import member_batch

        return [member_batch(s.sample(args["batch"]), spec, device) for s in samplers]

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


def run_row(args: dict, timeout: float | None = None, check: bool = True) -> dict:
    """One row in a fresh child process. `check` False: a failed or timed-out row returns {"error": ...}."""
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        if check:
            raise SystemExit(f"row {args} took more than {timeout} s") from None
        return {"error": f"timed out after {timeout} s"}
    if out.returncode:
        if check:
            raise SystemExit(f"row {args} failed:\n{out.stderr[-3000:]}")
        return {"error": out.stderr.strip().splitlines()[-1][-300:] if out.stderr.strip() else f"exit {out.returncode}"}
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
    parser.add_argument("--workload", default="darkroom", choices=sorted(WORKLOADS), help="which paper model")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only; train.mixed_precision)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    workload = "darkkeytodoor" if args.key_to_door else args.workload
    batch = args.batch_size or (4096 if args.key_to_door else 512)
    steps = args.steps or (50 if args.device == "cuda" else 4)
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        write_dataset(workload, f"{tmp}/dataset")
        k = paper_config(workload, batch, 1).context_len
        print(f"DICP {WORKLOADS[workload][1]['variant'].upper()} paper model ({workload}), k = {k}, batch {batch} "
              f"per model, {steps} timed steps per row, {card}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        base = {"dataset": f"{tmp}/dataset", "workload": workload, "batch": batch, "device": args.device,
                "threads": args.threads, "warmup": 1 if args.device == "cpu" else 5, "per_pass": args.per_pass,
                "compile": False, "mixed_precision": args.bf16}
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
