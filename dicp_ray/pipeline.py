"""The whole DICP pipeline, laptop to cluster: collect -> train (one model per split seed) -> evaluate.

    dicp-ray pipeline --config tune_configs/demo.yaml --output runs/demo
    dicp-ray pipeline --config tune_configs/darkroom.yaml --address auto      # on a Ray cluster

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

from dicp_ray.config import ConfigError, ExperimentConfig
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


def collect_stage(config: ExperimentConfig, output_dir: Path) -> Path:
    """Collect histories into <output>/dataset; collect_histories returns at once (without starting Ray)
    when the dataset is complete for this config, and otherwise re-collects only missing or corrupt shards."""
    from dicp_ray.collect import collect_histories

    dataset_dir = output_dir / "dataset"
    collect_histories(config, str(dataset_dir))
    return dataset_dir


def train_stage(config: ExperimentConfig, output_dir: Path) -> dict[int, str]:
    """One model per split seed; train_model returns an existing valid model.pt without retraining."""
    from dicp_ray.train import train_model

    dataset_dir = output_dir / "dataset"
    return {seed: train_model(config, str(dataset_dir), str(output_dir / "train" / f"split_{seed}"), seed)
            for seed in config.env.split_seeds}


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


def _run_pipeline(config: ExperimentConfig, output_dir: Path) -> dict[str, Any]:
    from dicp_ray.eval_results import format_results_table
    from dicp_ray.evaluate import run_evaluations
    from dicp_ray.runtime import init_ray

    record_run(config, output_dir)
    init_ray(config.resources)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    collect_stage(config, output_dir)
    timings["collect_s"] = time.perf_counter() - start

    start = time.perf_counter()
    checkpoints = train_stage(config, output_dir)
    timings["train_s"] = time.perf_counter() - start

    start = time.perf_counter()
    summary = run_evaluations(config, checkpoints, str(output_dir / "eval"))
    timings["evaluate_s"] = time.perf_counter() - start

    write_json_atomic(output_dir / "timings.json", timings)
    print(format_results_table(summary))
    print(f"\nplot: {output_dir / 'eval' / 'learning_curves.png'}   stage wall times: "
          + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()))
    return summary
