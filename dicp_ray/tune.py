"""Ray Tune sweeps: planning depth x beam width on trained checkpoints, and training hyper-parameters with ASHA.

    dicp-ray sweep --config tune_configs/sweeps/plan_darkroom.yaml --output runs/darkroom
    dicp-ray sweep --config tune_configs/sweeps/plan_smoke.yaml --checkpoint runs/smoke/train/split_0/model.pt

A planning sweep (``sweep.kind: plan``) runs one Tune trial per grid point of ``sweep.grid`` (dotted config keys,
e.g. ``plan.depth`` and ``plan.beam_width``); each trial evaluates DICP planning on every test task of every
split seed and reports ``return_final`` (mean return over the last 10% of in-context episodes) and
``return_mean`` (over all episodes). Without ``--checkpoint`` the sweep first runs (or reuses) the pipeline's
collect and train stages in ``--output``. Results stay in Tune's own format (``<output>/tune/<name>``, with
TensorBoard event files per trial); a table is printed and written as CSV, and two-key grids get a heat map.
A failing trial does not stop the sweep, and re-running the same command resumes it (finished trials are kept).

A training sweep (``sweep.kind: train``) trains one model per grid point in-process and stops poor trials early
with ASHA on the held-out loss; the best trial's checkpoint is reported.

A pipeline sweep (``sweep.kind: pipeline``, e.g. tune_configs/ml1_all.yaml over the 50 ML1 tasks) runs one whole
pipeline (collect -> train -> evaluate) per grid point, in ``<output>/runs/<point>/``. Each trial starts
``dicp-ray pipeline`` as a child process that joins the same Ray cluster as a driver of its own, so its RLlib
learners and Ray Train workers are scheduled by Ray like any pipeline's (a Tune trial's placement group would
otherwise capture them); the trial itself reserves no CPU, and ``sweep.max_concurrent_trials`` bounds how many
pipelines share the cluster. A trial reports per-mode success (Meta-World) or return (grid worlds); the sweep
writes a per-point table with a mean row, and a bar chart for one-key grids. Re-running the command resumes:
Tune keeps finished trials and every pipeline reuses its finished stages. Each child's output goes to
``<output>/runs/<point>/pipeline.log``; a failing trial's error quotes its last lines.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dicp_ray.config.load import config_from_dict, point_slug, replace, trial_config
from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.evaluate.sweep_report import (
    PLAN_METRIC,
    PLAN_METRIC_META_WORLD,
    TRAIN_METRIC,
    report_pipeline_sweep,
    report_sweep,
)

logger = logging.getLogger(__name__)


def _plan_trial(params: dict[str, Any], *, base: dict[str, Any], checkpoints: dict[int, str]) -> None:
    """One Tune trial: evaluate planning with these settings on every split's test tasks."""
    import numpy as np
    from ray import tune

    from dicp_ray.evaluate.episodes import evaluate_in_context

    config = replace(config_from_dict(base), params)
    curves, successes = [], []
    for seed, checkpoint in checkpoints.items():
        result = evaluate_in_context(checkpoint, config, output_dir=None, mode="plan", split_seed=seed)
        curves.append(np.asarray(result["return_mean"], dtype=float))
        if "success_mean" in result:
            successes.append((result["success_mean"], result["success_once_so_far_mean"]))
    curve = np.mean(curves, axis=0)  # (episodes,)
    tail = max(1, len(curve) // 10)
    metrics = {PLAN_METRIC: float(curve[-tail:].mean()), "return_mean": float(curve.mean()),
               "return_first": float(curve[0]), "num_episodes": len(curve)}
    if successes:
        success, once = (np.mean([s[i] for s in successes], axis=0) for i in (0, 1))
        metrics.update({PLAN_METRIC_META_WORLD: float(success[-tail:].mean()), "success_mean": float(success.mean()),
                        "success_once_final": float(once[-1])})
    tune.report(metrics)


def _tuner(trainable, config: ExperimentConfig, storage: Path, name: str, metric: str, mode: str,
           param_space: dict[str, Any], scheduler=None):
    """Build a Tuner, or restore the same sweep when it ran before (finished trials are kept)."""
    from ray import tune

    from dicp_ray.console import is_verbose

    path = storage / name
    if tune.Tuner.can_restore(str(path)):
        logger.info("sweep: resuming %s", path)
        return tune.Tuner.restore(str(path), trainable, resume_errored=True, restart_errored=False)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                    max_concurrent_trials=config.sweep.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1 if is_verbose() else 0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )


def run_plan_sweep(config: ExperimentConfig, output_dir: Path, checkpoints: dict[int, str]) -> Any:
    """Grid over planner settings; returns Tune's ResultGrid."""
    from ray import tune

    grid = config.sweep.grid or {"plan.depth": (1, 2, 4, 8), "plan.beam_width": (1, 5, 10)}
    param_space = {key: tune.grid_search(list(values)) for key, values in grid.items()}
    trainable = tune.with_resources(
        tune.with_parameters(_plan_trial, base=config.to_dict(), checkpoints=checkpoints),
        {"cpu": config.sweep.cpus_per_trial})
    metric = PLAN_METRIC_META_WORLD if config.env.is_meta_world else PLAN_METRIC
    tuner = _tuner(trainable, config, output_dir / "tune", f"plan_{config.name}", metric, "max", param_space)
    results = tuner.fit()
    report_sweep(results, list(grid), metric, output_dir / "sweep")
    return results


def _train_trial(params: dict[str, Any], *, base: dict[str, Any], dataset_dir: str, split_seed: int) -> None:
    """One Tune trial: train in-process, reporting held-out losses at every checkpoint interval (ASHA rungs)."""
    import tempfile

    import torch
    from ray import tune

    from dicp_ray.data.history import HistoryDataset, WindowSampler
    from dicp_ray.models.checkpoints import save_checkpoint
    from dicp_ray.models.transformer import DICPTransformer
    from dicp_ray.train.batches import model_spec_from_config, windows_to_batch
    from dicp_ray.train.runs import split_task_ids
    from dicp_ray.train.step import build_optimizer, evaluate_batches, train_step

    torch.set_num_threads(1)
    config = replace(config_from_dict(base), params)
    t, m, k = config.train, config.model, config.context_len
    torch.manual_seed(t.seed)
    dataset = HistoryDataset.open(dataset_dir, verify=False)
    train_ids, _, heldout_ids = split_task_ids(config, split_seed, dataset)
    if not heldout_ids:
        raise ValueError("a training sweep needs held-out histories: collect with collect.include_test_tasks=true")
    model = DICPTransformer(model_spec_from_config(config, dataset))
    optimizer, scheduler = build_optimizer(model, t)
    sampler = WindowSampler(HistoryDataset.open(dataset_dir, task_ids=train_ids), k, seed=t.seed)
    heldout_sampler = WindowSampler(HistoryDataset.open(dataset_dir, task_ids=heldout_ids), k, seed=t.seed + 1)
    heldout = [windows_to_batch(heldout_sampler.sample(t.batch_size), m.variant, m.world_model)
               for _ in range(t.eval_batches)]
    for step in range(1, t.num_steps + 1):
        train_step(model, optimizer, scheduler, *windows_to_batch(sampler.sample(t.batch_size), m.variant,
                                                                  m.world_model), t)
        if step % t.checkpoint_every_steps and step != t.num_steps:
            continue
        metrics = {f"heldout/{key}": value for key, value in
                   evaluate_batches(model, heldout, t.world_model_weight).items()}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(f"{tmp}/model.pt", model, {"env_name": config.env.name, "split_seed": split_seed,
                                                       "variant": m.variant, "world_model": m.world_model,
                                                       "step": step, "config": config.to_dict()})
            tune.report({**metrics, "step": step}, checkpoint=tune.Checkpoint.from_directory(tmp))


def run_train_sweep(config: ExperimentConfig, output_dir: Path, dataset_dir: Path) -> Any:
    """Training hyper-parameters on the first split seed, ASHA early stopping on the held-out action loss."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    grid = config.sweep.grid or {"train.lr": (1e-3, 3e-3, 1e-2), "train.world_model_weight": (0.5, 1.0)}
    param_space = {key: tune.grid_search(list(values)) for key, values in grid.items()}
    rungs = max(1, config.train.num_steps // config.train.checkpoint_every_steps)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=rungs, grace_period=1, reduction_factor=2)
    trainable = tune.with_resources(
        tune.with_parameters(_train_trial, base=config.to_dict(), dataset_dir=str(dataset_dir),
                             split_seed=config.env.split_seeds[0]), {"cpu": config.sweep.cpus_per_trial})
    tuner = _tuner(trainable, config, output_dir / "tune", f"train_{config.name}", TRAIN_METRIC, "min",
                   param_space, scheduler)
    results = tuner.fit()
    report_sweep(results, list(grid), TRAIN_METRIC, output_dir / "sweep")
    best = results.get_best_result(metric=TRAIN_METRIC, mode="min")
    if best.checkpoint is not None:
        print(f"best trial: {best.config}  {TRAIN_METRIC} = {best.metrics.get(TRAIN_METRIC):.4f}\n"
              f"best checkpoint: {best.checkpoint.path}/model.pt")
    return results


# --------------------------------------------------------------------------------------- pipeline sweeps
def pipeline_metrics(summary: dict) -> dict[str, float]:
    """Per-mode scalars of an evaluation summary: the last 10% of episodes (``_final``), all of them (``_mean``),
    and succeeded-at-least-once-so-far at the last episode (``success_once_last``)."""
    import numpy as np

    metrics: dict[str, float] = {}
    for mode, method in summary["methods"].items():
        curves = {"return": method["return_mean"]}
        if "success_mean" in method:
            curves.update(success=method["success_mean"], success_once=method["success_once_so_far_mean"])
        for name, curve in curves.items():
            curve = np.asarray(curve, dtype=float)
            tail = max(1, len(curve) // 10)
            if name == "success_once":  # the release's curve at its end: what Table 1 reports
                metrics[f"success_once_last_{mode}"] = float(curve[-1])
                continue
            metrics[f"{name}_final_{mode}"] = float(curve[-tail:].mean())
            metrics[f"{name}_mean_{mode}"] = float(curve.mean())
    return metrics


def pipeline_metric(config: ExperimentConfig) -> str:
    """What a pipeline sweep ranks by: success (Meta-World) or return over the last 10% of episodes, of the
    last evaluation mode (plan when it is evaluated)."""
    return f"{'success' if config.env.is_meta_world else 'return'}_final_{config.eval.modes[-1]}"


def _pipeline_trial(params: dict[str, Any], *, base: dict[str, Any], runs_dir: str) -> None:
    """One Tune trial: a whole pipeline for one grid point, as a child `dicp-ray pipeline` on the same cluster."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import ray
    from ray import tune

    from dicp_ray.runtime import write_text_atomic

    config = trial_config(config_from_dict(base), params)
    trial_dir = Path(runs_dir) / point_slug(params)
    trial_dir.mkdir(parents=True, exist_ok=True)
    config_path = trial_dir / "config.yaml"  # JSON is YAML: the full resolved config of this trial
    write_text_atomic(config_path, json.dumps(config.to_dict(), indent=2, default=list))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    log_path = trial_dir / "pipeline.log"
    with open(log_path, "ab") as log:
        # Its own process group, so that a stopped or failing trial takes the whole child pipeline down with it
        # (a second pipeline on the same directory is refused by run_pipeline's lock in any case).
        child = subprocess.Popen([sys.executable, "-m", "dicp_ray.cli", "pipeline", "--config", str(config_path),
                                  "--output", str(trial_dir)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        try:
            code = child.wait()
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"pipeline for {params} exited with code {code}; last lines of {log_path}:\n{tail}")
    summary = json.loads((trial_dir / "eval" / "summary.json").read_text())
    tune.report({**pipeline_metrics(summary), "num_episodes": summary["num_episodes"]})


def run_pipeline_sweep(config: ExperimentConfig, output_dir: Path) -> Any:
    """One pipeline per grid point (e.g. all 50 ML1 tasks); returns Tune's ResultGrid."""
    from ray import tune

    _check_same_sweep(config, output_dir)
    param_space = {key: tune.grid_search(list(values)) for key, values in config.sweep.grid.items()}
    # The trial only waits for its child pipeline, whose own tasks and workers ask Ray for their resources: it
    # reserves no CPU (even 0.01 CPU would leave a 2-CPU machine unable to place a 2-worker Ray Train group).
    # Tune refuses an all-zero request, so the trial asks for one byte of memory instead.
    trainable = tune.with_resources(
        tune.with_parameters(_pipeline_trial, base=config.to_dict(), runs_dir=str(output_dir / "runs")),
        tune.PlacementGroupFactory([{"memory": 1}]))
    metric = pipeline_metric(config)
    tuner = _tuner(trainable, config, output_dir / "tune", f"pipeline_{config.name}", metric, "max", param_space)
    results = tuner.fit()
    report_pipeline_sweep(results, list(config.sweep.grid), config, output_dir / "sweep")
    return results


def _check_same_sweep(config: ExperimentConfig, output_dir: Path) -> None:
    """Write <output>/sweep.json once; refuse to resume a pipeline sweep whose grid or settings changed (Tune would
    keep the old trials and mix their results with new ones in one table)."""
    import json

    from dicp_ray.config.schema import ConfigError
    from dicp_ray.runtime import write_text_atomic

    data = config.to_dict()
    data.pop("resources")
    for key in ("max_concurrent_trials", "cpus_per_trial"):  # may change between runs
        data["sweep"].pop(key)
    current = json.loads(json.dumps(data, default=list))
    path = output_dir / "sweep.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != current:
            def flat(data: dict) -> dict:
                return {f"{k}.{sub}" if isinstance(v, dict) else k: value for k, v in data.items()
                        for sub, value in (v.items() if isinstance(v, dict) else [(None, v)])}

            before, after = flat(previous), flat(current)
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            raise ConfigError(f"--output {output_dir} holds a pipeline sweep with other settings ({', '.join(changed)}"
                              f"; {path}): use a new --output directory, or the same config to resume it")
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(current, indent=2, sort_keys=True))


def run_sweep(config: ExperimentConfig, output_dir: str | Path, checkpoint: str | None = None) -> Any:
    """Entry point of `dicp-ray sweep`: a planning, training or pipeline sweep, per ``sweep.kind``."""
    from dicp_ray.pipeline import collect_stage, record_run, train_stage
    from dicp_ray.runtime import init_ray

    output_dir = Path(output_dir).resolve()
    if config.sweep.kind == "pipeline" and checkpoint is not None:
        raise ValueError("--checkpoint does not apply to a pipeline sweep (each trial trains its own models)")
    init_ray(config.resources)
    if config.sweep.kind == "pipeline":
        return run_pipeline_sweep(config, output_dir)
    if config.sweep.kind == "train":
        # Only the dataset is shared with a pipeline run here; the trials' model/train settings vary.
        return run_train_sweep(config, output_dir, collect_stage(config, output_dir))
    if checkpoint is not None:
        from dicp_ray.models.checkpoints import load_checkpoint

        _, payload = load_checkpoint(checkpoint)
        checkpoints = {int(payload.get("split_seed", config.env.split_seeds[0])): str(Path(checkpoint).resolve())}
    else:
        record_run(config, output_dir)
        collect_stage(config, output_dir)
        checkpoints = train_stage(config, output_dir)
    return run_plan_sweep(config, output_dir, checkpoints)
