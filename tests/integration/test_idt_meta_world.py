"""Continuous (Meta-World, the release's layout) IDT end to end on real MuJoCo at a tiny scale: ML1 reach-v3 histories -> training -> evaluation.

The dataset holds train goals 0 and 1 of split seed 0 x 2 streams x 3 episodes of 100 steps, acted by a random
Gaussian source (not a learner: the point is the data path, recorded like dicp_ray.collect records PPO, with the
executed clipped action and the success flag). `train_in_process` distils a 1-layer IDT + world model for a few
steps without Ray (the Ray Train loop shares every IDT-specific piece: tests/integration/test_idt_pipeline.py runs
it on Darkroom), then `evaluate_in_context` acts on the first 2 test goals for 3 episodes in policy mode and with
DICP-IDT's sampled search. ~15-25 s on one core (most of it MuJoCo and the Meta-World benchmark build).
"""
from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import dicp_ray.envs  # noqa: F401  (registers the gymnasium ids)
from dicp_ray.config.load import config_from_dict
from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.data import history, shards
from dicp_ray.envs import split_tasks
from dicp_ray.evaluate.episodes import evaluate_in_context
from dicp_ray.models.checkpoints import load_checkpoint
from dicp_ray.models.idt_continuous import IDTTransformer
from dicp_ray.train.launch import train_in_process

TRAIN_IDS, TEST_IDS = split_tasks("ML1", 0)
STREAMS, EPISODES, HORIZON = 2, 3, 100


def _config() -> ExperimentConfig:
    return config_from_dict({
        "env": {"name": "ML1", "task": "reach-v3", "split_seeds": [0], "max_train_tasks": 2, "max_test_tasks": 2},
        "collect": {"num_streams": STREAMS, "rollout_steps": 100, "minibatch_size": 100, "num_epochs": 2,
                    "env_steps_per_task": STREAMS * EPISODES * HORIZON},
        "model": {"variant": "idt", "world_model": True, "context_episodes": 2, "num_layers": 1, "num_heads": 2,
                  "embed_dim": 16, "mlp_dim": 32},
        "train": {"num_steps": 6, "batch_size": 8, "lr": 1e-3, "log_every_steps": 3, "checkpoint_every_steps": 6,
                  "eval_batches": 1},
        "plan": {"num_samples": 4, "depth": 1, "second_half_only": True},
        "eval": {"num_episodes": 3, "modes": ["policy", "plan"], "device": "cpu"},
        "resources": {"num_cpus": 2}})


def _random_histories(task_id: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Columns of STREAMS x EPISODES random-Gaussian episodes of one goal, rows sorted by (stream, episode, step)."""
    env = gym.make_vec("dicp_ray/ML1-v0", num_envs=STREAMS, vectorization_mode="vector_entry_point",
                       task_id=task_id, task="reach-v3")
    rows = {k: [] for k in ("episode", "step", "obs", "action", "reward", "next_obs", "success")}
    for episode in range(EPISODES):
        obs, _ = env.reset()
        for step in range(HORIZON):
            next_obs, reward, _, _, info = env.step(rng.normal(0.0, 0.7, (STREAMS, 4)).astype(np.float32))
            values = (np.full(STREAMS, episode), np.full(STREAMS, step), obs, info["action"], reward, next_obs,
                      info["success"])
            for key, value in zip(rows, values):
                rows[key].append(np.asarray(value))
            obs = next_obs
    env.close()
    n = STREAMS * EPISODES * HORIZON
    cols = {k: np.stack(v, axis=1).reshape(n, *np.shape(v[0])[1:]) for k, v in rows.items()}  # stream-major
    cols.update(stream=np.repeat(np.arange(STREAMS), n // STREAMS), terminated=np.zeros(n, bool),
                truncated=cols["step"] == HORIZON - 1)
    cols["action"] = cols["action"].astype(np.float32)
    cols["success"] = cols["success"].astype(np.float32)
    return cols


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("idt_ml1")
        dataset_dir, rng = str(root / "dataset"), np.random.default_rng(0)
        task_ids = TRAIN_IDS[:2]
        sidecars = [shards.write_shard(dataset_dir, t, _random_histories(t, rng), {}) for t in task_ids]
        shards.write_manifest(dataset_dir, env_name="ML1", obs_dim=11, num_actions=None, action_type="continuous",
                            action_dim=4, env_task="reach-v3", task_ids=task_ids, shards=sidecars, collect_config={},
                            seeds={}, provenance={}, fingerprint="idt-ml1-test", complete=True)
        path = train_in_process(_config(), dataset_dir, str(root / "train" / "split_0"), split_seed=0, device="cpu")
        yield root, dataset_dir, path
    finally:
        torch.set_num_threads(threads)


def test_checkpoint_is_the_release_layout_continuous_idt_with_return_target_1000(trained):
    _, dataset_dir, path = trained
    model, payload = load_checkpoint(path)
    spec = model.spec
    assert isinstance(model, IDTTransformer) and payload["variant"] == "idt" and payload["step"] == 6
    assert not spec.discrete_actions and (spec.num_actions, spec.obs_dim, spec.context_len) == (4, 11, 200)
    assert spec.reward_classes is None and spec.num_obs_classes is None and spec.world_model
    assert spec.return_scale == 1.0 and spec.return_target == 10 * HORIZON == 1000.0  # release:.../idt.py:90
    assert spec.backbone == "release" and hasattr(model, "md_return") and not hasattr(model, "embed_decision")
    assert history.HistoryDataset.open(dataset_dir).task_ids == payload["train_task_ids"] == TRAIN_IDS[:2]


@pytest.mark.parametrize("mode", ["policy", "plan"])
def test_evaluation_records_returns_and_success_like_continuous_ad(trained, mode):
    root, _, path = trained
    out = root / "eval" / mode
    result = evaluate_in_context(path, output_dir=str(out), mode=mode)
    returns, successes = np.array(result["returns"]), np.array(result["successes"])
    assert returns.shape == successes.shape == (2, 3) and np.all(returns >= 0) and np.all(returns <= 1000)
    assert set(np.unique(successes)) <= {0.0, 1.0}
    np.testing.assert_allclose(result["success_mean"], successes.mean(axis=0))
    np.testing.assert_allclose(result["success_once_so_far_mean"],
                               np.maximum.accumulate(successes, axis=1).mean(axis=0))
    assert result["task_ids"] == TEST_IDS[:2] and result["oracle_max_returns"] is None
    assert result["settings"]["idt_return_target"] == load_checkpoint(path)[0].spec.return_target
    # plan (release:metaworld/model/idt.py:103): blocks starting once k = 200 steps were taken (episode 3) and
    # after step 50 (blocks 60, 70, 80, 90): 40 steps x 2 goals
    assert result["timing"]["planned_decisions"] == (80 if mode == "plan" else 0)
    assert result["label"] == ("DICP-IDT (plan)" if mode == "plan" else "IDT + world model (policy)")
    written = json.loads((out / "results.json").read_text())
    assert written["returns"] == result["returns"] and "success_once_so_far_mean" in written
    if mode == "policy":
        again = evaluate_in_context(path, mode=mode)                # deterministic for eval.seed
        assert again["returns"] == result["returns"] and again["successes"] == result["successes"]
