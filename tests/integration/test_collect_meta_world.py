"""Integration tests of Meta-World collection: real RLlib PPO and SAC learners on ML1 reach-v3 (real MuJoCo).

``collect.learner: rllib`` throughout (Meta-World PPO's default is the population learner, tested in
tests/integration/test_population_meta_world.py): the RLlib path stays covered as the reference and for SAC.

Tiny scale: one train task (id 0) and one test task (id 50) x 2 streams x 400 env steps per task, for each
algorithm. Checks the continuous shard schema, that every history replays exactly in a fresh env (executed
clipped actions, true terminal next_obs, rewards, success), the RLlib settings of both algorithms, and that
grid-world fingerprints did not change when the Meta-World / SAC keys were added.
"""
from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pytest
import torch
from meta_world_replay import replay_mismatches

import dicp_ray.envs  # noqa: F401  (registers the gymnasium ids)
from dicp_ray.collect.driver import collect_histories, collection_task_ids
from dicp_ray.collect.fingerprint import data_fingerprint
from dicp_ray.collect.rllib_learner import build_learner_config
from dicp_ray.config.load import config_from_dict, load_config
from dicp_ray.config.schema import ConfigError
from dicp_ray.data import history as data_history
from dicp_ray.data import shards as data_shards

pytestmark = pytest.mark.filterwarnings("ignore:.*Overriding environment rllib-single-agent-env-v0")

STREAMS, STEPS = 2, 400
# SAC updates every 10 steps per stream, once (the paper's Table 4): 20 gradient steps here, where the release's
# 1 / 10 (the default) would make 2,000 at 2 streams; the settings themselves are checked below.
TINY = {"env": {"name": "ML1", "task": "reach-v3", "max_train_tasks": 1, "max_test_tasks": 1},
        "collect": {"learner": "rllib", "num_streams": STREAMS, "rollout_steps": 100, "minibatch_size": 100,
                    "num_epochs": 2, "env_steps_per_task": STEPS, "sac_batch_size": 32, "sac_learning_starts": 100,
                    "sac_train_freq": 10, "sac_gradient_steps": 1},
        "model": {"context_episodes": 2}, "resources": {"num_cpus": 2}}


def tiny_config(**collect):
    return config_from_dict({**TINY, "collect": {**TINY["collect"], **collect}})


@pytest.fixture(scope="module", params=["ppo", "sac"])
def collected(request, ray_local, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"mw_{request.param}") / "dataset")
    collect_histories(tiny_config(algorithm=request.param), path, progress=False)
    return request.param, path


def test_shards_have_the_continuous_schema_and_replay_exactly(collected):
    algorithm, path = collected
    config = tiny_config(algorithm=algorithm)
    assert collection_task_ids(config) == [0, 50]
    manifest = data_shards.read_manifest(path)
    assert (manifest["action_type"], manifest["action_dim"], manifest["num_actions"]) == (
        "continuous", 4, None)
    assert (manifest["obs_dim"], manifest["env_task"], manifest["env_name"]) == (11, "reach-v3", "ML1")
    ds = data_history.HistoryDataset.open(path)
    assert ds.is_continuous and ds.action_dim == 4 and ds.has_success and ds.num_actions is None
    schema = ds._tables[0].schema
    assert schema.field("action").type == pa.list_(pa.float32(), 4)
    assert schema.field("obs").type == pa.list_(pa.float32(), 11)
    assert schema.field("success").type == pa.float32()
    assert "optimal_action" not in schema.names
    assert ds.num_histories == 2 * STREAMS and ds.index["length"].tolist() == [STEPS // STREAMS] * 4
    for i in range(ds.num_histories):
        history = ds.history(i)
        assert history["episode"].tolist() == np.repeat([0, 1], 100).tolist()
        assert np.all(np.abs(history["action"]) <= 1.0)
        assert replay_mismatches(history, int(history["task_id"][0])) == 0
    for task_id in ds.task_ids:
        sidecar = data_shards.read_sidecar(path, task_id)
        assert sidecar["updates_aligned"] and sidecar["algorithm"] == algorithm
        assert 0.0 <= sidecar["success"]["episode_success_rate"] <= 1.0
    batch = data_history.WindowSampler(ds, window_len=150, seed=0).sample(8)
    assert batch["action"].shape == (8, 150, 4) and batch["action"].dtype == np.float32
    assert batch["obs"].shape == (8, 150, 11) and batch["success"].shape == (8, 150)


def test_ppo_settings_are_the_papers_meta_world_ones():
    config = load_config("tune_configs/ml1_reach.yaml")
    ppo = build_learner_config(config, task_id=3)
    assert (ppo.lr, ppo.minibatch_size, ppo.num_epochs, ppo.gamma) == (3e-4, 200, 20, 0.99)
    assert ppo.train_batch_size_per_learner == 100 * 100 and ppo.rollout_fragment_length == 100
    assert (ppo.clip_actions, ppo.normalize_actions) == (True, False)
    model = ppo.model_config
    assert (list(model["fcnet_hiddens"]), model["fcnet_activation"]) == ([64, 64], "tanh")
    assert model["free_log_std"] and not model["vf_share_layers"]
    module = dataclasses.replace(ppo.rl_module_spec, observation_space=gym.spaces.Box(-np.inf, np.inf, (11,)),
                                 action_space=gym.spaces.Box(-1, 1, (4,)), model_config=model).build()
    with torch.no_grad():
        dist_inputs = module.forward_inference({"obs": torch.randn(5, 11)})["action_dist_inputs"]
    mean, log_std = dist_inputs.chunk(2, dim=-1)
    assert mean.abs().max() < 0.1 and torch.all(log_std == 0)        # SB3: ~zero mean, std 1 at the start


def test_sac_settings_are_the_releases():
    from ray.rllib.algorithms.dqn.dqn import calculate_rr_weights

    # the defaults: release:metaworld/cfg/alg/sac_ml1.yaml (100 streams, train_freq 1, gradient_steps 10)
    release = config_from_dict({"env": {"name": "ML1", "task": "reach-v3"}, "collect": {"algorithm": "sac"}})
    c = release.collect
    assert (c.num_streams, c.sac_train_freq, c.sac_gradient_steps, c.sac_batch_size, c.sac_learning_starts,
            c.sac_buffer_size, c.lr) == (100, 1, 10, 128, 100, 1_000_000, 3e-4)
    sac = build_learner_config(release, 0)
    assert (sac.actor_lr, sac.critic_lr, sac.alpha_lr, sac.gamma, sac.tau) == (3e-4, 3e-4, 3e-4, 0.99, 0.005)
    assert (sac.train_batch_size_per_learner, sac.num_steps_sampled_before_learning_starts) == (128, 100)
    assert sac.replay_buffer_config["type"] == "EpisodeReplayBuffer"
    assert sac.replay_buffer_config["capacity"] == 1_000_000 and sac.rollout_fragment_length == 1
    assert (sac.clip_actions, sac.normalize_actions, sac.min_time_s_per_iteration) == (True, False, 0)
    assert calculate_rr_weights(sac) == [1, 10]                                     # 10 gradient steps a sample
    tiny = build_learner_config(tiny_config(algorithm="sac"), 0)                    # Table 4: 10 steps, 1 update
    assert tiny.rollout_fragment_length == 10 and calculate_rr_weights(tiny) == [1, 1]


def test_fingerprints_of_grid_datasets_ignore_source_obs_and_meta_world_ones_are_distinct():
    # Grid datasets of the old schema (other action labels, bootstrapped source PPO, issue #14) are refused:
    # the values the code before it computed no longer match. A grid learner sees its cell either way, so
    # collect.source_obs does not enter a grid fingerprint.
    smoke = load_config("tune_configs/smoke.yaml")
    assert data_fingerprint(smoke) != "06e4d1f2993a3933"
    assert data_fingerprint(load_config("tune_configs/darkroom.yaml")) != "f4b470e160196fa1"
    assert data_fingerprint(load_config("tune_configs/smoke.yaml", ["collect.source_obs=model"])) == \
        data_fingerprint(smoke)
    reach, sac = tiny_config(), tiny_config(algorithm="sac")
    push = config_from_dict({**TINY, "env": {**TINY["env"], "task": "push-v3"}})
    assert len({data_fingerprint(reach), data_fingerprint(push), data_fingerprint(sac)}) == 3
    assert data_fingerprint(tiny_config(sac_batch_size=64)) == data_fingerprint(reach)   # SAC keys: SAC only


def test_the_learner_sees_metaworlds_39_dims_and_the_history_keeps_the_model_view(ray_local):
    # Release: PPO / SAC observe the raw 39-dim obs (release:metaworld/collect_data.py:59) and the history stores
    # the state part (release:metaworld/alg/utils.py:25). Ours: the learner sees the same 39 numbers (current 18,
    # previous frame 18, zeroed goal 3), the recorder keeps the first 11 (the model observation).
    from dicp_ray.collect.rllib_learner import _EPISODES_ATTR

    assert tiny_config().collect.source_obs == "full"                       # the release's is the default
    for algorithm in ("ppo", "sac"):
        algo = build_learner_config(tiny_config(algorithm=algorithm), task_id=0).build_algo()
        try:
            runner = algo.env_runner
            assert runner.env.single_observation_space.shape == (39,)
            first = next(m for m in runner.module.modules() if isinstance(m, torch.nn.Linear))
            assert first.in_features == 39                                  # the policy's input layer
            seen = [ep for ep in runner.sample(num_timesteps=STREAMS * 100) if ep.is_done]
            recorded = runner.__dict__[_EPISODES_ATTR]
            assert len(seen) == len(recorded) == STREAMS
            for episode, (_, record) in zip(seen, recorded):
                obs = np.asarray(episode.get_observations(), np.float32)   # (101, 39): what the learner saw
                assert obs.shape == (101, 39)
                np.testing.assert_array_equal(obs[1:, 18:36], obs[:-1, :18])   # the previous frame
                np.testing.assert_array_equal(obs[0, 18:36], obs[0, :18])      # a reset repeats the frame
                assert np.all(obs[:, 36:] == 0) and np.all(obs[:, 11:18] == 0)  # hidden goal, no 2nd object
                assert record["obs"].shape == record["next_obs"].shape == (100, 11)
                np.testing.assert_array_equal(record["obs"], obs[:-1, :11])
                np.testing.assert_array_equal(record["next_obs"], obs[1:, :11])
        finally:
            algo.stop()
    model_view = build_learner_config(tiny_config(source_obs="model"), task_id=0).build_algo()
    try:
        assert model_view.env_runner.env.single_observation_space.shape == (11,)
    finally:
        model_view.stop()


def test_source_obs_is_part_of_the_meta_world_fingerprint_only():
    full, model = tiny_config(), tiny_config(source_obs="model")
    assert data_fingerprint(full) != data_fingerprint(model)
    # Datasets from before issue #14 are refused either way: the dataset schema went to 2 (grid action labels).
    assert data_fingerprint(model) != "b482af240230369c"
    grid = load_config("tune_configs/smoke.yaml", ["collect.source_obs=model"])
    assert data_fingerprint(grid) == data_fingerprint(load_config("tune_configs/smoke.yaml"))
    with pytest.raises(ConfigError, match="collect.source_obs"):
        tiny_config(source_obs="raw")
