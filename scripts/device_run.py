"""One prepared run on a bare GPU box (issue #25): facts, the GPU speed table, the paper-scale Darkroom comparison.

    scripts/device_run.sh            # the whole run, ~9 minutes on one GPU + 16 cores (--budget-s)
    scripts/device_run.sh --smoke    # the same steps at tiny sizes on a CPU in ~2-3 minutes (make test runs it)

Needs PyTorch, numpy, pyarrow, pyyaml, tqdm, tensorboard, matplotlib and gymnasium; never Ray, MuJoCo or
metaworld (every stage runs on its local backend). Steps, each recorded in ``$OUT/summary.json`` as soon as it
ends (a run cut short still returns what it measured):

1. facts: torch, CUDA, the device's name and free memory, cores, packages present.
2. speed: training windows/s of the paper's models (benchmarks/bench_train.py rows, each in a child process with
   a time limit): Darkroom AD (k = 80, batch 512) for 1, 6, 10 and 30 stacked models, fp32 and bf16, with and
   without torch.compile, windows sampled on the host and on the device; the Meta-World AD and IDT (k = 1000).
3. collect: Darkroom at the paper's scale (tune_configs/darkroom.yaml: 81 goals x 100 streams x 100K steps) on
   every core through collect.backend local.
4. train: AD and DICP-AD, one stacked group each (train.models_per_process = split seeds), both at once on the
   device, at the paper's hyper-parameters until train.deadline_unix_s; as many split seeds as the measured
   rate lets reach --min-fraction of the 50K steps. Each model's steps reached are recorded.
5. evaluate: policy (AD, DICP) and plan (DICP) for every model on its held-out goals, every run in its own
   process (the planner is launch-bound, so runs overlap on the GPU), then the summary over split seeds.
6. report: ``python -m dicp_ray.evaluate.report`` -> $OUT/table.md, table.csv, curves.png.

$OUT gets five files: summary.json, table.md, table.csv, curves.png and device_run.log (the console). The
dataset, checkpoints and per-run results go to $WORK (default /tmp/dicp_device_work), outside $OUT.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicp_ray.config.load import load_config  # noqa: E402
from dicp_ray.runtime import write_text_atomic  # noqa: E402

# name -> (config, overrides, budget s, speed-table budget s, eval reserve s, eval episodes, max split seeds)
SCALES = {
    "full": ("tune_configs/darkroom.yaml", [], 540, 150, 150, 100, 5),
    "smoke": ("tune_configs/smoke.yaml", ["collect.env_steps_per_task=200", "collect.num_streams=2",
                                          "train.num_steps=20", "train.checkpoint_every_steps=10",
                                          "train.log_every_steps=10", "eval.num_episodes=3"], 170, 45, 45, 3, 2),
}


def log(message: str) -> None:
    print(f"[device_run {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Summary(dict):
    """$OUT/summary.json, rewritten atomically after every step."""

    def __init__(self, path: Path, **fields):
        super().__init__(**fields)
        self.path = path
        self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self, indent=1, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------------ 1. facts
def facts() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(), "host": platform.node()}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out.update(device=torch.cuda.get_device_name(), memory_free_gb=round(free / 2 ** 30, 1),
                   memory_total_gb=round(total / 2 ** 30, 1), capability=list(torch.cuda.get_device_capability()))
    probe = ("import importlib, json\nok = {}\nfor name in %r:\n    try:\n        importlib.import_module(name)\n"
             "        ok[name] = True\n    except Exception:\n        ok[name] = False\nprint(json.dumps(ok))")
    names = ("gymnasium", "ray", "metaworld", "mujoco", "tensorboard", "matplotlib")
    done = subprocess.run([sys.executable, "-c", probe % (names,)], capture_output=True, text=True, timeout=120)
    out["importable"] = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-300:]}
    return out


# ------------------------------------------------------------------------------------------------ 2. speed
def speed_rows(smoke: bool) -> list[dict]:
    """The rows in priority order (the table stops at its budget): what training needs first, compile last."""
    grid = {"workload": "darkroom", "batch": 16 if smoke else 512}
    models = [1, 2] if smoke else [1, 6, 10, 30]
    rows = [{**grid, "models": 1, "mixed_precision": False, "compile": False, "sample_on_device": False}]
    rows += [{**grid, "models": m, "mixed_precision": bf16, "compile": False, "sample_on_device": True}
             for bf16 in (False, True) for m in models]
    rows += [{"workload": w, "batch": 2 if smoke else 512, "models": 1, "mixed_precision": bf16, "compile": False,
              "sample_on_device": True} for w in ("ml1_ad", "ml1_idt") for bf16 in ((False,) if smoke else
                                                                                     (False, True))]
    if not smoke:  # compile warm-ups are long: the most telling rows first, the rest as the budget allows
        rows += [{**grid, "models": m, "mixed_precision": bf16, "compile": True, "sample_on_device": True}
                 for m in (1, 30, 6, 10) for bf16 in (False, True)]
    return rows


def speed_table(smoke: bool, device: str, budget_s: float, work: Path) -> list[dict]:
    bench = _load_bench()
    datasets, table, start = {}, [], time.time()
    steps, warmup = (1, 1) if smoke else (20, 5)
    for row in speed_rows(smoke):
        left = budget_s - (time.time() - start)
        if left < 5:
            table.append({**row, "windows_per_s": None, "error": "skipped: speed-table budget spent"})
            continue
        if row["workload"] not in datasets:
            datasets[row["workload"]] = bench.write_dataset(row["workload"], str(work / f"bench_{row['workload']}"))
        args = {**row, "dataset": datasets[row["workload"]], "device": device, "threads": 1, "per_pass": None,
                "mode": "new", "steps": steps, "warmup": 3 if row["compile"] else warmup}
        if smoke:  # in this process: a child's start-up (torch, dicp_ray) would cost more than the row
            try:
                result = bench.child(args)
            except Exception as err:  # noqa: BLE001 - recorded in the table
                result = {"error": repr(err)[-300:]}
        else:
            result = bench.run_row(args, timeout=min(left, 120 if row["compile"] else 60), check=False)
        entry = {**row, "k": {"darkroom": 80}.get(row["workload"], 1000),
                 "windows_per_s": None if "error" in result else round(result["wall"], 1),
                 "per_model_windows_per_s": None if "error" in result else round(result["wall"] / row["models"], 1),
                 "peak_memory_gb": None if "error" in result else round(
                     result["gpu_mem_gb"] if result["gpu_mem_gb"] is not None else result["max_rss_gb"], 2),
                 **({"error": result["error"]} if "error" in result else {})}
        table.append(entry)
        log(f"speed {row['workload']} x{row['models']} {'bf16' if row['mixed_precision'] else 'fp32'}"
            f"{' compile' if row['compile'] else ''} windows on {'device' if row['sample_on_device'] else 'host'}"
            f": {entry['windows_per_s'] or entry.get('error')} windows/s")
    return table


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rate_for(table: list[dict], models: int, mixed_precision: bool) -> float | None:
    """Windows/s of a group of `models`, interpolated linearly between the measured group sizes."""
    points = sorted((r["models"], r["windows_per_s"]) for r in table if r["workload"] == "darkroom"
                    and not r["compile"] and r["windows_per_s"] and r["sample_on_device"]
                    and r["mixed_precision"] == mixed_precision)
    if not points:
        return None
    for (m0, r0), (m1, r1) in zip(points, points[1:]):
        if m0 <= models <= m1:
            return r0 + (r1 - r0) * (models - m0) / (m1 - m0)
    return points[0][1] * models / points[0][0] if models < points[0][0] else points[-1][1]


def choose_seeds(table, seconds: float, batch: int, num_steps: int, max_seeds: int, min_fraction: float):
    """As many split seeds as reach min_fraction of num_steps in `seconds` when AD and DICP-AD train at once, each
    group size at its faster eager precision (on an H200 fp32 for one model, bf16 from six stacked on: README)."""
    plan = {"seconds": round(seconds), "min_fraction": min_fraction, "projected": {}, "mixed_precision": False}
    seeds = 1
    for s in range(1, max_seeds + 1):
        rates = {bf16: rate_for(table, 2 * s, bf16) for bf16 in (False, True)}
        rates = {bf16: rate for bf16, rate in rates.items() if rate is not None}
        if not rates:
            break
        bf16 = max(rates, key=rates.get)
        fraction = min(1.0, rates[bf16] / (2 * s * batch) * seconds / num_steps)
        plan["projected"][s] = {"fraction": round(fraction, 4), "mixed_precision": bf16}
        if fraction >= min_fraction or s == 1:
            seeds, plan["mixed_precision"] = s, bf16
    plan["split_seeds"] = seeds
    return plan


# ------------------------------------------------------------------------------------------------ 4. train
def variants(config_path: str, overrides: list[str]) -> dict:
    """AD (no world model, policy only) and DICP-AD (world model; policy and plan) on one dataset."""
    return {"ad": overrides + ["model.world_model=false", "eval.modes=[policy]"], "dicp": overrides}


def train_both(config_path: str, runs: dict, work: Path, device: str, seeds: int) -> dict:
    """Both groups at once, each a `dicp-ray train --backend local` process; returns their exit codes."""
    procs = {}
    for name, overrides in runs.items():
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        link = out / "dataset"
        if not link.exists():
            link.symlink_to(work / "dataset", target_is_directory=True)
        cmd = [sys.executable, "-m", "dicp_ray.cli", "train", "--config", str(ROOT / config_path), "--output",
               str(out), "--backend", "local", "--models-per-process", str(seeds), "--device", device,
               "--set", *overrides]
        logfile = open(work / f"train_{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, cwd=ROOT,
                                        env={**os.environ, "PYTHONPATH": _pythonpath()}), logfile)
    codes = {}
    for name, (proc, logfile) in procs.items():
        codes[name] = proc.wait()
        logfile.close()
        if codes[name]:
            log(f"train {name} exited {codes[name]}: {(work / f'train_{name}.log').read_text()[-1500:]}")
    return codes


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def steps_reached(work: Path, runs: dict, seeds: list[int]) -> dict:
    from dicp_ray.models.checkpoints import load_checkpoint

    out = {}
    for name in runs:
        for seed in seeds:
            path = work / name / "train" / f"split_{seed}" / "model.pt"
            if path.is_file():
                _, payload = load_checkpoint(str(path))
                total = payload.get("num_steps") or payload["config"]["train"]["num_steps"]
                out[f"{name}/split_{seed}"] = {"step": payload["step"], "num_steps": total,
                                               "fraction": round(payload["step"] / total, 4),
                                               "stopped_at_deadline": payload.get("stopped_at_deadline", False)}
    return out


# ------------------------------------------------------------------------------------------------ 5. evaluate
def evaluate_all(config_path: str, runs: dict, work: Path, seeds: list[int], timeout_s: float) -> dict:
    """Every (variant, split seed, mode) as its own process at once, then each variant's summary (reusing them)."""
    from dicp_ray.evaluate.episodes import evaluate_in_context
    from dicp_ray.evaluate.launch import run_evaluations

    configs = {name: load_config(ROOT / config_path, overrides) for name, overrides in runs.items()}
    jobs = [(name, seed, mode) for name, config in configs.items() for seed in seeds for mode in config.eval.modes
            if (work / name / "train" / f"split_{seed}" / "model.pt").is_file()]
    done, failed = set(), {}
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    import multiprocessing

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = {pool.submit(evaluate_in_context, str(work / n / "train" / f"split_{s}" / "model.pt"), configs[n],
                           str(work / n / "eval" / f"split_{s}" / m), m, s): (n, s, m) for n, s, m in jobs}
    pending, deadline = set(futures), time.time() + timeout_s
    while pending and time.time() < deadline:
        finished, pending = wait(pending, timeout=max(1.0, deadline - time.time()), return_when=FIRST_COMPLETED)
        for future in finished:
            try:
                future.result()
                done.add(futures[future])
            except Exception as err:  # noqa: BLE001 - recorded; the other runs go on
                failed[str(futures[future])] = repr(err)[-500:]
    for future in pending:
        failed[str(futures[future])] = f"not finished within {timeout_s:.0f} s"
    for process in list(getattr(pool, "_processes", {}).values()) if pending else []:
        process.kill()  # the pool's own children: unfinished evaluations past the budget
    pool.shutdown(wait=not pending, cancel_futures=True)
    summaries = {}
    for name, config in configs.items():
        complete = [s for s in seeds if all((name, s, m) in done for m in config.eval.modes)]
        if complete:
            checkpoints = {s: str(work / name / "train" / f"split_{s}" / "model.pt") for s in complete}
            summaries[name] = run_evaluations(config, checkpoints, str(work / name / "eval"))  # all reused
    return {"summaries": summaries, "failed": failed}


# ------------------------------------------------------------------------------------------------ 6. report
def report(work: Path, out: Path, summaries: dict) -> dict:
    from dicp_ray.evaluate import report as report_module

    methods = []
    if "ad" in summaries:
        methods.append(f"AD={work / 'ad' / 'eval' / 'summary.json'}:policy")
    if "dicp" in summaries:
        methods += [f"AD + world model (no planning)={work / 'dicp' / 'eval' / 'summary.json'}:policy",
                    f"DICP-AD={work / 'dicp' / 'eval' / 'summary.json'}:plan"]
    if not methods:
        return {"error": "no evaluation finished"}
    seeds = {tuple(s["split_seeds"]) for s in summaries.values()}
    if len(seeds) > 1:  # one variant finished fewer seeds: report each on its own seeds
        methods = [m for m in methods if "DICP" in m or "world model" in m]
    argv = [a for m in methods for a in ("--method", m)] + ["--out", str(out)]
    if len(methods) == 3:
        argv += ["--compare", "DICP-AD", "AD"]
    report_module.main(argv)
    table = report_module.build_report([report_module.load_method(m) for m in methods],
                                       [("DICP-AD", "AD")] if len(methods) == 3 else [])
    rows = [{"label": r["label"], "return_mean": [round(x, 3) for x in r["mean"].tolist()]} for r in table["rows"]]
    return {"table_md": (out / "table.md").read_text(), "rows": rows, "compare": table["compare"],
            "oracle": table["oracle"], "split_seeds": table["split_seeds"]}


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU (~2-3 minutes)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/device"))
    parser.add_argument("--work", default=os.environ.get("WORK", "/tmp/dicp_device_work"))
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole run")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when visible")
    parser.add_argument("--min-fraction", type=float, default=0.1, help="of train.num_steps per model")
    parser.add_argument("--max-seeds", type=int, default=None, help="split seeds per method (paper: 5)")
    args = parser.parse_args(argv)
    import torch

    start = time.time()
    scale = "smoke" if args.smoke else "full"
    config_path, overrides, budget, speed_budget, eval_reserve, episodes, max_seeds = SCALES[scale]
    budget, max_seeds = args.budget_s or budget, args.max_seeds or max_seeds
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    summary = Summary(out / "summary.json", format="dicp_ray.device_run", scale=scale, device=device,
                      config=config_path, budget_s=budget, started_at=start, stage_s={})

    def stage(name: str, began: float) -> None:
        summary["stage_s"][name] = round(time.time() - began, 1)
        summary.save()
        log(f"{name} done in {summary['stage_s'][name]} s")

    began = time.time()
    summary["facts"] = facts()
    stage("facts", began)

    began = time.time()
    summary["speed"] = speed_table(args.smoke, device, speed_budget, work)
    stage("speed", began)

    began = time.time()
    base = overrides + [f"eval.num_episodes={episodes}", f"eval.device={device}", "eval.backend=local",
                        f"train.device={device}", "train.backend=local", "collect.backend=local",
                        f"resources.num_cpus={os.cpu_count() or 1}"]
    from dicp_ray.collect.driver import collect_histories
    from dicp_ray.data.shards import read_manifest

    every_seed = f"env.split_seeds=[{','.join(map(str, range(max_seeds)))}]"  # the tasks of any seed choice
    collect_histories(load_config(ROOT / config_path, base + [every_seed]), str(work / "dataset"), progress=False)
    manifest = read_manifest(str(work / "dataset"))
    rows = sum(s["num_rows"] for s in manifest["shards"])
    summary["collect"] = {"tasks": len(manifest["task_ids"]), "transitions": rows,
                          "env_steps_per_s_wall": round(rows / max(time.time() - began, 1e-9))}
    stage("collect", began)

    began = time.time()
    config = load_config(ROOT / config_path, base)
    deadline = start + budget - eval_reserve - 15
    plan = choose_seeds(summary["speed"], max(deadline - time.time() - 20, 1), config.train.batch_size,
                        config.train.num_steps, max_seeds, 0.0 if args.smoke else args.min_fraction)
    seeds = list(range(plan["split_seeds"]))
    train_settings = [f"env.split_seeds=[{','.join(map(str, seeds))}]", f"train.deadline_unix_s={deadline:.0f}",
                      f"train.mixed_precision={str(plan['mixed_precision']).lower()}"]
    runs = variants(config_path, base + train_settings)
    summary["train"] = {"plan": plan, "mixed_precision": plan["mixed_precision"], "deadline_unix_s": round(deadline), "exit_codes":
                        train_both(config_path, runs, work, device, len(seeds))}
    summary["train"]["models"] = steps_reached(work, runs, seeds)
    stage("train", began)

    began = time.time()
    evaluation = evaluate_all(config_path, runs, work, seeds, max(start + budget - time.time() - 10, 30))
    summary["evaluate"] = {"failed": evaluation["failed"], "episodes": episodes,
                           "decisions_per_s": {f"{n}/{m}": round(s["methods"][m]["decisions_per_s"], 1)
                                               for n, s in evaluation["summaries"].items() for m in s["methods"]}}
    stage("evaluate", began)

    began = time.time()
    summary["results"] = report(work, out, evaluation["summaries"])
    stage("report", began)
    summary["wall_s"] = round(time.time() - start, 1)
    summary.save()
    log(f"finished in {summary['wall_s']} s: {out / 'summary.json'}")
    return 0 if summary["results"].get("rows") else 1


if __name__ == "__main__":
    sys.exit(main())
