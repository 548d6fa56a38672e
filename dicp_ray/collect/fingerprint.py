"""What makes a task's shard what it is, for every source learner: the dataset fingerprint and the oracle labels.

Both learners (``collect.rllib_learner``, ``collect.population_learner``) stamp each shard with
``data_fingerprint(config)`` and label every row with ``oracle_labels``; the driver (``collect.driver``) compares the
fingerprint of a dataset on disk with the config's before resuming it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from dicp_ray import envs
from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.data.shards import SCHEMA_VERSION

# Collect settings that change which tasks run or how, but never the content of a task's shard.
_NOT_IN_FINGERPRINT = ("include_test_tasks", "num_cpus_per_learner", "max_retries", "tasks_per_population")
# Settings of where learners run, not of what they write: left out of the manifest too (same bytes either way).
_RUNTIME_ONLY = ("backend",)


def oracle_labels(env_name: str, task_id: int, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Oracle action in every ``obs``; the Key-to-Door key/door state comes from the episode's rewards."""
    reward = columns["reward"].astype(np.float64)
    earned_before = np.cumsum(reward) - reward                      # return up to, excluding, each step
    first_row = np.flatnonzero(columns["step"] == 0)
    earned_before -= np.repeat(earned_before[first_row], np.diff(np.r_[first_row, reward.size]))
    key_game = env_name == "DarkKeyToDoor"                          # +1 key, then +1 door: 2 = both paid
    has_key = key_game & (earned_before > 0.5)
    return np.asarray(envs.optimal_action(env_name, task_id, columns["obs"].astype(np.int64), has_key), np.int64)


def resolved_learner(config: ExperimentConfig) -> str:
    """``collect.learner`` with ``auto`` resolved: population for PPO (grid worlds and Meta-World), rllib for SAC."""
    learner = config.collect.learner
    if learner == "auto":
        return "population" if config.collect.algorithm == "ppo" else "rllib"
    return learner


def _collect_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The collect section as stored and hashed: the ``sac_*`` keys only when collecting with SAC,
    ``source_obs`` only on Meta-World (a grid learner sees the model's observation either way), and the
    learner resolved (so ``auto`` and its explicit value give the same dataset identity)."""
    sac, meta_world = config.collect.algorithm == "sac", config.env.is_meta_world
    settings = {k: v for k, v in dataclasses.asdict(config.collect).items()
                if (sac or not k.startswith("sac_")) and (meta_world or k != "source_obs") and k not in _RUNTIME_ONLY}
    return {**settings, "learner": resolved_learner(config)}


def _env_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The env section as stored in the manifest: ``task`` only when set (ML1)."""
    return {k: v for k, v in dataclasses.asdict(config.env).items() if k != "task" or v is not None}


def data_fingerprint(config: ExperimentConfig) -> str:
    """Hash of everything that determines a task's shard (env, collect settings, schema version).

    The SAC settings count only for SAC and the ML1 task only when set, so fingerprints of grid-world
    datasets collected before those keys existed stayed valid. ``source_obs: model`` is hashed as absent.
    Datasets from before issue #14 (dataset schema 1: other grid action labels, bootstrapped source PPO, the
    11-dim Meta-World learner) no longer match and are refused with a clear message.
    """
    collect = {k: v for k, v in _collect_settings(config).items() if k not in _NOT_IN_FINGERPRINT}
    collect["bootstrap_at_horizon"] = config.bootstraps_at_horizon  # None and its resolved value are the same data
    if collect.get("source_obs") == "model":
        del collect["source_obs"]
    identity = {"env": config.env.name, "collect": collect, "schema": SCHEMA_VERSION}
    if config.env.task is not None:
        identity["task"] = config.env.task
    text = json.dumps(identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
