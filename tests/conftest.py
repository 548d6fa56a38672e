"""Shared pytest fixtures: one local Ray instance for every integration test of the session, tiny Meta-World
checkpoints trained in process."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs (no dashboard, worker logs silenced), started once and shut down at the end.

    Code under test that calls ``dicp_ray.runtime.init_ray`` joins it instead of starting its own.
    If Ray is already running in this process (started elsewhere), it is reused and left running.
    """
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


@pytest.fixture
def one_thread():
    """Single-threaded torch, as in a Ray worker: 2 threads on 2 busy cores can be 50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_meta_world_dataset(tmp_path_factory):
    """A tiny ML1 reach-v3 dataset: random-policy histories of train tasks 0 and 1 (1 stream x 2 episodes of
    100 steps each) from our own env, without Ray or RLlib."""
    import numpy as np

    from dicp_ray.data import shards
    from dicp_ray.envs.meta_world import ML1Env

    root = tmp_path_factory.mktemp("tiny_meta_world_data")
    dataset, rng, sidecars = str(root / "dataset"), np.random.default_rng(0), []
    for task_id in (0, 1):
        env, rows = ML1Env(task_id, task="reach-v3"), []
        for episode in range(2):
            obs, _ = env.reset()
            for step in range(env.horizon):
                next_obs, reward, terminated, truncated, info = env.step(rng.uniform(-1.2, 1.2, 4))
                rows.append((episode, step, obs, info["action"], reward, next_obs, terminated, truncated,
                             info["success"]))
                obs = next_obs
        cols = dict(zip(("episode", "step", "obs", "action", "reward", "next_obs", "terminated", "truncated",
                         "success"), (np.asarray(c) for c in zip(*rows))))
        cols = {**cols, "stream": np.zeros(len(rows), np.int32), "episode": cols["episode"].astype(np.int32),
                "step": cols["step"].astype(np.int32), "reward": cols["reward"].astype(np.float32),
                "success": cols["success"].astype(np.float32)}
        sidecars.append(shards.write_shard(dataset, task_id, cols, {}))
    shards.write_manifest(dataset, env_name="ML1", obs_dim=11, num_actions=None, action_type="continuous",
                        action_dim=4, env_task="reach-v3", task_ids=[0, 1], shards=sidecars, collect_config={},
                        seeds={}, provenance={}, fingerprint="tiny-random", complete=True)
    return dataset


def _train_tiny_meta_world(dataset: str, root, variant: str) -> dict:
    """{"world_model": path, "no_world_model": path, "world_model_next_obs": path}: tune_configs/ml1_smoke.yaml's
    model (2-episode context), 20 steps of `train_in_process` on `dataset` with model.variant = `variant`; the
    world models predict rewards only (Meta-World's default) or also next observations (model.next_obs_loss)."""
    from dicp_ray.config.load import load_config
    from dicp_ray.train.launch import train_in_process

    paths = {}
    for key, world_model, next_obs in (("world_model", "true", "null"), ("no_world_model", "false", "null"),
                                       ("world_model_next_obs", "true", "true")):
        config = load_config(Path(__file__).resolve().parents[1] / "tune_configs" / "ml1_smoke.yaml",
                             ["train.num_steps=20", f"model.world_model={world_model}", "eval.modes=[policy]",
                              f"model.variant={variant}", f"model.next_obs_loss={next_obs}"])
        paths[key] = train_in_process(config, dataset, str(root / key), split_seed=0, device="cpu")
    return paths


@pytest.fixture(scope="session")
def tiny_meta_world_checkpoints(tmp_path_factory, tiny_meta_world_dataset):
    """{"world_model": path, "no_world_model": path, "world_model_next_obs": path}: tiny ML1 reach-v3 AD (tune_configs/
    ml1_smoke.yaml's model, 20 steps) trained in process, without Ray or RLlib, on `tiny_meta_world_dataset`
    (random-policy histories of train tasks 0 and 1, 1 stream x 2 episodes each). Seconds on one core."""
    return _train_tiny_meta_world(tiny_meta_world_dataset, tmp_path_factory.mktemp("tiny_meta_world"), "ad")


@pytest.fixture(scope="session")
def tiny_meta_world_idt_checkpoints(tmp_path_factory, tiny_meta_world_dataset):
    """The same as `tiny_meta_world_checkpoints` with model.variant=idt: tiny continuous IDT checkpoints
    (1 layer per module, block length 10, context of 2 episodes = 200 steps; return target = the best episode
    return of the dataset)."""
    return _train_tiny_meta_world(tiny_meta_world_dataset, tmp_path_factory.mktemp("tiny_meta_world_idt"), "idt")


UNAVAILABLE_ON_A_BARE_GPU_BOX = ("ray", "metaworld", "mujoco")
"""Packages the bare GPU box (issue #25) does not have: PyTorch, numpy, pyarrow, pyyaml, tqdm, tensorboard and
matplotlib are there, gymnasium is carried as wheels (make gpu-wheels)."""


def without_packages(root: Path, names=UNAVAILABLE_ON_A_BARE_GPU_BOX) -> dict[str, str]:
    """The environment of a subprocess in which `names` cannot be imported: a shadow package per name, whose
    ``__init__`` raises ImportError, first on PYTHONPATH (before the venv's site-packages)."""
    for name in names:
        package = root / name
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed here (a shadow package of the test: this code path "
            f"must run without {name})')\n")
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([str(root), repo, *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": path}
