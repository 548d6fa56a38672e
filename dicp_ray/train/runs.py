"""What a training run is on disk: its identity, name, split, checks of its dataset, and its checkpoints.

A run's checkpoints depend on the keys of ``_RUN_KEYS``; continuing or reusing them under another identity is
refused (``checkpoint_steps``). ``loop_config`` is the plain-dict description of one run that the loop receives.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from dicp_ray.config.schema import META_WORLD_ENVS, ConfigError, ExperimentConfig
from dicp_ray.envs import GRID_SPECS, split_tasks
from dicp_ray.models.checkpoints import load_checkpoint
from dicp_ray.train.batches import make_window_sampler, model_spec_from_config

logger = logging.getLogger(__name__)
CRASH_ENV_VAR = "DICP_RAY_TEST_CRASH_AT_STEP"  # tests only: every rank raises once at this step


# What a run's checkpoints depend on (None = the whole section). A re-run in the same output directory may
# raise train.num_steps and change runtime settings (workers, GPUs, intervals), nothing in here.
_RUN_KEYS = {"env": ("name", "task", "train_ratio", "max_train_tasks"), "model": None,
             "train": ("seed", "batch_size", "lr", "weight_decay", "beta1", "beta2", "grad_clip",
                       "world_model_weight")}


def run_identity(config_dict: dict[str, Any], split_seed: int, dataset_id: str) -> dict[str, Any]:
    """What a run's checkpoints depend on: continuing or reusing them under another identity is refused."""
    picked = {section: {k: v for k, v in config_dict[section].items() if keys is None or k in keys}
              for section, keys in _RUN_KEYS.items()}
    if picked["env"].get("task") is None:  # grid worlds have no task: keep their identities as before
        picked["env"].pop("task", None)
    if picked["model"].get("reward_loss_weight", 1.0) == 1.0:  # the default keeps older runs' identities
        picked["model"].pop("reward_loss_weight", None)
    next_obs_loss = picked["model"].pop("next_obs_loss", None)  # grid worlds: always on, identities as before
    if config_dict["env"]["name"] in META_WORLD_ENVS:  # issue #14 changed the continuous loss: refuse older runs
        picked["model"].update(next_obs_loss=bool(next_obs_loss), action_nll="mean")
    if picked["model"].get("variant") == "idt" and picked["env"].get("name") in GRID_SPECS:
        picked["idt_format"] = "release-history-windows-v1"  # idt_grid.py: other windows and model than before
    if config_dict["env"]["name"] in META_WORLD_ENVS:
        if picked["model"].get("backbone", "auto") == "auto":  # auto meant gpt2 there before issue #24
            picked["model"]["backbone"] = "auto=release"
        if picked["model"].get("variant") == "idt":  # idt_continuous.py: the release's layout since issue #24
            picked["idt_format"] = "release-metaworld-v1"
    return json.loads(json.dumps({**picked, "split_seed": split_seed, "dataset_id": dataset_id}))


def dataset_id(dataset) -> str:
    """sha256 of the dataset's manifest (canonical JSON; it holds the sha256 of every shard)."""
    return hashlib.sha256(json.dumps(dataset.manifest, sort_keys=True).encode()).hexdigest()


def run_name(output_dir: str | Path) -> str:
    """Ray Train run name: a function of the output directory only, so a re-run finds (and resumes) it."""
    return "train_" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(output_dir).resolve().name)


def split_task_ids(config: ExperimentConfig, split_seed: int,
                   dataset) -> tuple[list[int], list[int], list[int]]:
    """(train ids used, all test ids, test ids in the data for held-out metrics)."""
    train_ids, test_ids = split_tasks(config.env.name, split_seed, config.env.train_ratio)
    if config.env.max_train_tasks is not None:
        train_ids = train_ids[: config.env.max_train_tasks]
    present = {int(i) for i in dataset.task_ids}
    used = [i for i in train_ids if i in present]
    if not used:
        raise ConfigError(f"the dataset holds none of the {len(train_ids)} train tasks of split seed "
                          f"{split_seed} ({config.env.name}): collect it with the same env.* settings")
    if len(used) < len(train_ids):
        logger.warning("the dataset holds %d of the %d train tasks of split seed %d; training on those",
                       len(used), len(train_ids), split_seed)
    return used, test_ids, [i for i in test_ids if i in present]


def _check_dataset(config: ExperimentConfig, dataset) -> None:
    if dataset.env_name != config.env.name:
        raise ConfigError(f"env.name = {config.env.name!r} but the dataset holds {dataset.env_name!r} "
                          f"histories: --set env.name={dataset.env_name} or use a {config.env.name} dataset")
    if config.env.is_meta_world:
        if dataset.env_task != config.env.task:
            raise ConfigError(f"env.task = {config.env.task!r} but the dataset holds {dataset.env_task!r} "
                              f"histories: --set env.task={dataset.env_task} or use a {config.env.task} dataset")
        if not dataset.is_continuous:
            raise ConfigError(f"the {config.env.name} dataset has discrete actions: it was not written by "
                              "dicp_ray's Meta-World collection")
        return
    grid = GRID_SPECS[config.env.name]
    if (dataset.obs_dim, dataset.num_actions) != (grid.obs_dim, grid.num_actions):
        raise ConfigError(f"dataset obs_dim/num_actions {dataset.obs_dim}/{dataset.num_actions} do not match "
                          f"{config.env.name} ({grid.obs_dim}/{grid.num_actions})")
    if config.model.variant == "dpt" and "optimal_action" not in dataset.column_names:
        raise ConfigError("model.variant = 'dpt' needs oracle labels but the dataset has no optimal_action "
                          "column: --set model.variant=ad")


def _check_windows(config: ExperimentConfig, dataset, train_ids: list[int]) -> None:
    from dicp_ray.data.history import HistoryDataset

    try:  # raises when no train history holds a whole window
        train_data = HistoryDataset.open(dataset.path, task_ids=train_ids, verify=False)
        make_window_sampler(config, train_data, seed=0)
    except ValueError as err:
        raise ConfigError(f"model.context_episodes = {config.model.context_episodes}: {err}") from None
    model_spec_from_config(config, dataset)  # ModelSpec checks the remaining shapes


def loop_config(config: ExperimentConfig, dataset_dir: str, output_dir: Path, split_seed: int) -> dict:
    """Check the dataset against the config (before Ray starts) and build the ranks' loop config."""
    from dicp_ray.data.history import HistoryDataset
    from dicp_ray.runtime import provenance

    dataset = HistoryDataset.open(dataset_dir, verify=False)  # shards are hashed only before training
    _check_dataset(config, dataset)
    train_ids, test_ids, heldout_ids = split_task_ids(config, split_seed, dataset)
    _check_windows(config, dataset, train_ids)
    ds_id, crash = dataset_id(dataset), os.environ.get(CRASH_ENV_VAR)
    return {"config": config, "output_dir": str(output_dir), "split_seed": split_seed, "dataset_id": ds_id,
            "dataset_dir": dataset_dir if "://" in dataset_dir else str(Path(dataset_dir).resolve()),
            "train_task_ids": train_ids, "test_task_ids": test_ids, "heldout_task_ids": heldout_ids,
            "run_identity": run_identity(config.to_dict(), split_seed, ds_id), "provenance": provenance(),
            "crash_at_step": int(crash) if crash else None}


def _is_finished_model(path: Path, identity: dict, num_steps: int) -> bool:
    try:
        _, payload = load_checkpoint(str(path))
    except (ValueError, FileNotFoundError) as err:
        logger.warning("ignoring %s: %s", path, err)
        return False
    return payload.get("run_identity") == identity and payload.get("step") == num_steps


def checkpoint_steps(run_dir: Path, identity: dict, num_steps: int, member: str = "") -> dict[int, Path]:
    """{step: checkpoint directory} of an earlier run in `run_dir` (``member``: a group's sub-directory);
    refused (ConfigError) if it belongs to another run identity or is past num_steps."""
    found = {}
    for meta_path in sorted(run_dir.glob(f"checkpoint_*/{member}/meta.json" if member else "checkpoint_*/meta.json")):
        meta = json.loads(meta_path.read_text())
        if meta["run_identity"] != identity:
            raise ConfigError(f"{run_dir} holds a training run of a different config, split seed or dataset "
                              f"({meta_path}); use a new --output directory or delete that one")
        if meta["step"] > num_steps:
            raise ConfigError(f"train.num_steps = {num_steps} but {run_dir} already holds a run at step "
                              f"{meta['step']}: raise train.num_steps or use a new --output directory")
        found[int(meta["step"])] = meta_path.parent
    return found


def member_name(loop_config: dict) -> str:
    """A member's sub-directory inside a group's Ray checkpoint: its output directory's name (split_<s>)."""
    return Path(loop_config["output_dir"]).name


def member_dir(root: Path, loop_configs: list[dict], index: int) -> Path:
    """Where member `index` lives in a checkpoint directory: the root for a lone run (today's layout)."""
    return root if len(loop_configs) == 1 else root / member_name(loop_configs[index])
