"""The whole DICP pipeline, laptop to cluster: collect -> train (one model per split seed) -> evaluate.

    dicp-ray pipeline --config tune_configs/demo.yaml --output runs/demo
    dicp-ray pipeline --config tune_configs/darkroom.yaml --address auto      # on a Ray cluster
    dicp-ray pipeline --config tune_configs/smoke.yaml --backend local        # no Ray at all (uses_ray: False)

Ray is started only when a stage's backend (collect.backend, train.backend, eval.backend) is ray.

Each stage is skipped when its valid output already exists (complete dataset manifest, model.pt for the
config, evaluation summary for the checkpoints), so re-running after a crash continues where it stopped.
The resolved config and provenance are written once to ``<output>/run.json``; re-using an output directory
with a different config is refused (so results never mix). Output layout::

    <output>/run.json                      resolved config, seeds, versions, git revision
    <output>/dataset/                      Arrow shards + manifest.json + source_returns.png + tb/
    <output>/train/split_<s>/model.pt      self-describing checkpoint (+ tb/, ray_train/)
    <output>/eval/summary.{json,csv}       per-episode returns with 95% CIs; learning_curves.png
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from dicp_ray.config.schema import ConfigError, ExperimentConfig
from dicp_ray.runtime import write_text_atomic

logger = logging.getLogger(__name__)

# The sections that decide what the collect and train stages store; a run directory is tied to them, while
# planner, evaluation, sweep and resource settings may change between re-runs on the same directory.
_ARTIFACT_SECTIONS = ("env", "collect", "model", "train")


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def _comparable(config_dict: dict[str, Any]) -> dict[str, Any]:
    # More split seeds only add models over the same data, so a run directory may grow its seed list.
    # Keys a stored config lacks (added to dicp_ray after it was written, e.g. env.task) get today's defaults.
    defaults = ExperimentConfig().to_dict()
    picked = {k: {**defaults[k], **config_dict[k]} for k in _ARTIFACT_SECTIONS}
    picked["env"].pop("split_seeds", None)
    picked["collect"].pop("backend", None)          # where learners run, not what they write
    picked["train"].pop("deadline_unix_s", None)    # a re-run may continue a deadline-stopped run
    picked["train"].pop("sample_on_device", None)   # the same windows either way
    return json.loads(json.dumps(picked, default=str))


def record_run(config: ExperimentConfig, output_dir: Path) -> dict[str, Any]:
    """Write run.json once; refuse an output directory that holds a run of a different config."""
    from dicp_ray.runtime import provenance

    path = output_dir / "run.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if _comparable(previous["config"]) != _comparable(config.to_dict()):
            raise ConfigError(f"--output {output_dir} holds a run with a different env/collect/model/train config ({path}); use a new "
                              "--output directory, or the same config to resume that run")
        return previous
    run = {"config": config.to_dict(), "provenance": provenance(), "started_at": time.time()}
    write_json_atomic(path, run)
    return run


def stage_summary(config: ExperimentConfig, stage: str, output_dir: Path) -> str:
    """One line saying what a stage will do at this config's scale, for the stage's banner."""
    env, c, t = config.env, config.collect, config.train
    if stage == "collect":
        from dicp_ray.collect.driver import collection_task_ids

        tasks = len(collection_task_ids(config))
        what = f"{c.algorithm.upper()} on {tasks} {env.name}{'/' + env.task if env.task else ''} tasks"
        return (f"{what}, {c.num_streams} streams x {c.env_steps_per_task // c.num_streams:,} steps each "
                f"-> {output_dir / 'dataset'}")
    if stage == "train":
        kind = f"{config.model.variant.upper()}{' + world model' if config.model.world_model else ''}"
        seeds = len(env.split_seeds)
        return (f"{kind}, {seeds} model{'s' if seeds > 1 else ''} (split seed{'s' if seeds > 1 else ''} "
                f"{', '.join(map(str, env.split_seeds))}), context k = {config.context_len}, {t.num_steps:,} steps "
                f"of batch {t.batch_size} -> {output_dir / 'train'}")
    modes = " and ".join(config.eval.modes)
    return f"{modes} on the held-out tasks, {config.eval.num_episodes} in-context episodes -> {output_dir / 'eval'}"


def collect_stage(config: ExperimentConfig, output_dir: Path) -> Path:
    """Collect histories into <output>/dataset; collect_histories returns at once (without starting Ray)
    when the dataset is complete for this config, and otherwise re-collects only missing or corrupt shards."""
    from dicp_ray.collect.driver import collect_histories

    dataset_dir = output_dir / "dataset"
    collect_histories(config, str(dataset_dir))
    return dataset_dir


def train_stage(config: ExperimentConfig, output_dir: Path) -> dict[int, str]:
    """One model per split seed (train.models_per_process of them at once); an existing valid model.pt is reused."""
    from dicp_ray.train.launch import train_models

    seeds = list(config.env.split_seeds)
    runs = [(str(output_dir / "train" / f"split_{seed}"), seed) for seed in seeds]
    return dict(zip(seeds, train_models(config, str(output_dir / "dataset"), runs)))


@contextlib.contextmanager
def exclusive_output(output_dir: Path):
    """Hold an exclusive lock on <output>/.pipeline.lock: a second pipeline on the same directory (a re-run while
    the first still runs, or a sweep trial's orphaned child) fails at once instead of writing the same files."""
    import fcntl

    with open(output_dir / ".pipeline.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"--output {output_dir} is in use by another dicp-ray pipeline (it holds "
                              f"{output_dir / '.pipeline.lock'}): wait for it to finish or stop it") from None
        yield


def run_pipeline(config: ExperimentConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run collect -> train -> evaluate, skipping finished stages; returns the evaluation summary."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_output(output_dir):
        return _run_pipeline(config, output_dir)


def uses_ray(config: ExperimentConfig) -> bool:
    """Whether any stage runs on Ray (collect.backend, train.backend, eval.backend); all local = Ray is never
    imported (a PyTorch-only box)."""
    return "ray" in (config.collect.backend, config.train.backend, config.eval.backend)


def _run_pipeline(config: ExperimentConfig, output_dir: Path) -> dict[str, Any]:
    from dicp_ray.console import banner
    from dicp_ray.evaluate.launch import run_evaluations
    from dicp_ray.evaluate.results import format_results_table

    record_run(config, output_dir)
    if uses_ray(config):
        from dicp_ray.runtime import init_ray

        init_ray(config.resources)
    timings: dict[str, float] = {}

    banner(1, 3, "collect", stage_summary(config, "collect", output_dir))
    start = time.perf_counter()
    collect_stage(config, output_dir)
    timings["collect_s"] = time.perf_counter() - start

    banner(2, 3, "train", stage_summary(config, "train", output_dir))
    start = time.perf_counter()
    checkpoints = train_stage(config, output_dir)
    timings["train_s"] = time.perf_counter() - start

    banner(3, 3, "evaluate", stage_summary(config, "evaluate", output_dir))
    start = time.perf_counter()
    summary = run_evaluations(config, checkpoints, str(output_dir / "eval"))
    timings["evaluate_s"] = time.perf_counter() - start

    write_json_atomic(output_dir / "timings.json", timings)
    print()
    print(format_results_table(summary))
    print("\nstage wall times: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()))
    print(f"plot:    {output_dir / 'eval' / 'learning_curves.png'}")
    print(f"results: {output_dir / 'eval' / 'summary.json'} (and .csv); TensorBoard: tensorboard --logdir "
          f"{output_dir}")
    return summary
