"""Train, resume or reuse the models of a config's split seeds: `train_models` (and `train_model` for one seed).

    train_models(config, "runs/x/dataset", [("runs/x/train/split_0", 0), ("runs/x/train/split_1", 1)])
    dicp-ray train --config FILE --set train.backend=local train.models_per_process=5   # the same, from the CLI

Each run is checked against the dataset before anything starts (`dicp_ray.train.loop_config`). A run whose
``<output>/model.pt`` already holds this config's finished model is skipped; one whose last checkpoint is
finished gets that model copied; the rest are trained in groups of ``train.models_per_process`` by the one
loop (`dicp_ray.train.loop`), on the backend ``train.backend`` names:

  * ray (default): a Ray Train ``TorchTrainer`` with ``train.num_workers`` ranks and
    ``FailureConfig(max_failures=3)``. Its run name and storage depend only on the output directories
    (a lone run: ``<output>/ray_train/train_<name>``; a group: ``<parent>/ray_train/train_group_<names>``), and
    Ray Train V2 reloads a run it finds there, so re-running the same command continues from the last checkpoint.
  * local: this process, no Ray (``train.device``: auto = cuda when train.use_gpu); checkpoints in each
    run's ``<output>/checkpoints``, resumed the same way.

With ``train.deadline_unix_s`` the loop may stop early: ``model.pt`` is then the newest checkpoint's (``step`` <
num_steps, ``stopped_at_deadline``), evaluable, and not taken for finished, so the next call continues it.
Raising ``train.num_steps`` continues a finished run (the cosine schedule then spans the new num_steps). Anything
else that changes the checkpoints' meaning (model, data, split, optimiser: `dicp_ray.train.run_identity`) is
refused for an existing output directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from dicp_ray.config.schema import ConfigError, ExperimentConfig
from dicp_ray.console import watch_progress
from dicp_ray.train.runs import _is_finished_model, checkpoint_steps, loop_config, run_name

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- finished runs


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------------- entry points
def train_model(config: ExperimentConfig, dataset_dir: str, output_dir: str, split_seed: int) -> str:
    """Train, resume or reuse the model of one split seed; returns the path of ``<output_dir>/model.pt``."""
    return train_models(config, dataset_dir, [(output_dir, split_seed)])[0]


def train_models(config: ExperimentConfig, dataset_dir: str, runs: list[tuple[str, int]]) -> list[str]:
    """Train, resume or reuse one model per (output_dir, split_seed); returns their ``model.pt`` paths."""
    train = config.train
    loop_configs = [loop_config(config, str(dataset_dir), Path(out).resolve(), seed) for out, seed in runs]
    names = [Path(lc["output_dir"]).name for lc in loop_configs]
    if len(set(names)) < len(names):
        raise ConfigError(f"the output directories of one train call need distinct names, got {names}")
    finals = [Path(lc["output_dir"]) / "model.pt" for lc in loop_configs]
    pending = []
    for lc, final in zip(loop_configs, finals):
        if final.exists() and _is_finished_model(final, lc["run_identity"], train.num_steps):
            logger.info("train: %s already holds this config's model, skipping", final)
        else:
            pending.append(lc)
    device = _check_device(config)
    size = train.models_per_process
    for group in (pending[i:i + size] for i in range(0, len(pending), size)):
        progress = Path(group[0]["output_dir"]) / "progress.json"   # written by rank 0 of the training loop
        label = "train" if len(group) == 1 else f"train ({len(group)} models)"
        with watch_progress([progress], train.num_steps, label, "step"):
            dirs = _run_local(group, device) if train.backend == "local" else _run_ray(config, group)
        for lc, ckpt in zip(group, dirs):
            _copy_atomic(ckpt / "model.pt", Path(lc["output_dir"]) / "model.pt")
            step = json.loads((ckpt / "meta.json").read_text())["step"]
            partial = "" if step == train.num_steps else (
                f" at step {step} of {train.num_steps} (train.deadline_unix_s passed; a re-run continues it)")
            logger.info("train: wrote %s%s", Path(lc["output_dir"]) / "model.pt", partial)
    return [str(f) for f in finals]


def train_in_process(config: ExperimentConfig, dataset_dir: str, output_dir: str, split_seed: int,
                     device: str = "cuda") -> str:
    """`train_model` with train.backend = local on `device` (for machines with PyTorch but no Ray)."""
    local = dataclasses.replace(config.train, backend="local", device=device, num_workers=1,
                                use_gpu=device == "cuda")
    return train_model(dataclasses.replace(config, train=local), dataset_dir, output_dir, split_seed)


def _check_device(config: ExperimentConfig) -> str:
    train = config.train
    if train.backend == "local":
        device = train.device if train.device != "auto" else ("cuda" if train.use_gpu else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device / train.use_gpu ask for CUDA but torch sees no CUDA device here: --set "
                              "train.device=cpu train.use_gpu=false, or run on a GPU machine")
        return device
    if train.use_gpu and not (config.resources.address or os.environ.get("RAY_ADDRESS")) \
            and not torch.cuda.is_available():
        raise ConfigError("train.use_gpu = true but torch sees no CUDA device here: --set "
                          "train.use_gpu=false, or run on a GPU machine or cluster (--address)")
    return "ray"


def _verify_shards(loop_configs: list[dict]) -> None:
    from dicp_ray.data.history import HistoryDataset

    used = sorted(set().union(*(lc["train_task_ids"] + lc["heldout_task_ids"] for lc in loop_configs)))
    HistoryDataset.open(loop_configs[0]["dataset_dir"], task_ids=used, verify=True)  # sha256 vs the manifest


# ------------------------------------------------------------------------------------------- backends
def _run_local(group: list[dict], device: str) -> list[Path]:
    """Train (or resume) `group` in this process -> each member's final checkpoint directory."""
    from dicp_ray.train.backends import LocalBackend, latest_local_checkpoints
    from dicp_ray.train.loop import run_loop

    num_steps = group[0]["config"].train.num_steps
    finished = [checkpoint_steps(Path(lc["output_dir"]) / "checkpoints", lc["run_identity"], num_steps)
                .get(num_steps) for lc in group]
    if all(finished):
        logger.info("train: the local runs of %s are finished, copying their models",
                    [Path(lc["output_dir"]).name for lc in group])
        return finished
    _verify_shards(group)
    trainer = f"dicp_ray.train.loop local on {device}, {len(group)} model(s) per process"
    group = [{**lc, "provenance": {**lc["provenance"], "trainer": trainer}} for lc in group]
    run_loop(group, LocalBackend(device))
    return latest_local_checkpoints(group)  # num_steps, or the step train.deadline_unix_s stopped the loop at


def _ray_run_location(group: list[dict]) -> tuple[Path, str]:
    """(storage, name) of the Ray Train run of `group`: a function of the output directories only."""
    if len(group) == 1:
        out = Path(group[0]["output_dir"])
        return out / "ray_train", run_name(out)
    outs = [Path(lc["output_dir"]) for lc in group]
    parent = Path(os.path.commonpath([str(o.parent) for o in outs]))
    name = "train_group_" + "_".join(re.sub(r"[^A-Za-z0-9_.-]", "_", o.name) for o in outs)
    return parent / "ray_train", name[:200]


def _run_ray(config: ExperimentConfig, group: list[dict]) -> list[Path]:
    """Run (or resume) the Ray Train run of `group` -> each member's final checkpoint directory."""
    from dicp_ray.train.runs import member_name

    storage, name = _ray_run_location(group)
    num_steps = config.train.num_steps
    members = [member_name(lc) if len(group) > 1 else "" for lc in group]
    done = [checkpoint_steps(storage / name, lc["run_identity"], num_steps, m).get(num_steps)
            for lc, m in zip(group, members)]
    if all(done):
        logger.info("train: the run in %s is finished, copying its model(s)", storage / name)
        return done
    root = _fit(config, group, storage, name)
    return [root / m if m else root for m in members]


def _fit(config: ExperimentConfig, group: list[dict], storage: Path, name: str) -> Path:
    """Verify the shards it reads, run (or resume) the Ray Train run; returns its final checkpoint dir."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from dicp_ray.runtime import init_ray
    from dicp_ray.train.loop import train_loop_per_worker

    train = config.train
    _verify_shards(group)
    init_ray(config.resources)
    if train.use_gpu and ray.cluster_resources().get("GPU", 0) < train.num_workers:
        logger.warning("train.use_gpu: the cluster has %s GPUs for %d workers now; waiting for the "
                       "autoscaler", ray.cluster_resources().get("GPU", 0), train.num_workers)
    loop_config = group[0] if len(group) == 1 else {"members": group}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                               resources_per_worker={"CPU": train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=3)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training in {storage / name} finished without a checkpoint")
    return Path(result.checkpoint.path)
