"""Meta-World collection with population PPO (dicp_ray/collect/population_meta_world.py), real MuJoCo (reach-v3).

Tiny scale: train task 0 and test task 50, 2 streams x 400 env steps per task (2 updates of 100 steps per stream).
Checks that the shards have the RLlib path's Meta-World schema and sidecar keys, replay exactly in a fresh env
(the executed clipped action, true terminal next_obs, reward, success, flags), do not depend on the population
they were learnt in (byte-identical alone and in a pair), that the horizon bootstrap changes the learner but not
the format, and that the driver picks this learner for ``collect.learner: population`` on Meta-World.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from meta_world_replay import replay_mismatches

import dicp_ray.envs  # noqa: F401  (registers the gymnasium ids)
from dicp_ray.collect.driver import collect_histories
from dicp_ray.collect.fingerprint import data_fingerprint, resolved_learner
from dicp_ray.collect.population_meta_world import learn_meta_world_population
from dicp_ray.config.load import config_from_dict
from dicp_ray.data import history as data_history
from dicp_ray.data import shards as data_shards

pytest.importorskip("metaworld")

STREAMS, STEPS = 2, 400
TINY = {"env": {"name": "ML1", "task": "reach-v3", "max_train_tasks": 1, "max_test_tasks": 1},
        "collect": {"learner": "population", "num_streams": STREAMS, "rollout_steps": 100, "minibatch_size": 100,
                    "num_epochs": 2, "env_steps_per_task": STEPS},
        "model": {"context_episodes": 2}, "resources": {"num_cpus": 2}}
# what the RLlib path's Meta-World sidecar holds (rllib_learner.learn_task + data.shards.write_shard)
RLLIB_SIDECAR_KEYS = {"fingerprint", "env_name", "seed", "num_updates", "updates_aligned", "env_steps", "curve",
                      "wall_s", "env_task", "algorithm", "success", "task_id", "num_rows", "sha256", "columns"}


def tiny_config(**collect):
    return config_from_dict({**TINY, "collect": {**TINY["collect"], **collect}})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mw_population") / "pair")
    return path, learn_meta_world_population(tiny_config(), [0, 50], path)


def test_shards_have_the_meta_world_schema_and_replay_exactly(pair):
    path, sidecars = pair
    data_shards.write_manifest(path, env_name="ML1", obs_dim=11, num_actions=None, action_type="continuous",
                               action_dim=4, env_task="reach-v3", task_ids=[0, 50], shards=sidecars,
                               collect_config={}, seeds={}, provenance={}, fingerprint=sidecars[0]["fingerprint"],
                               complete=True)
    ds = data_history.HistoryDataset.open(path)
    assert ds.is_continuous and ds.action_dim == 4 and ds.has_success
    schema = ds._tables[0].schema
    assert schema.field("action").type == pa.list_(pa.float32(), 4)
    assert schema.field("obs").type == pa.list_(pa.float32(), 11)
    assert schema.field("success").type == pa.float32() and "optimal_action" not in schema.names
    assert ds.num_histories == 2 * STREAMS and ds.index["length"].tolist() == [STEPS // STREAMS] * 4
    for i in range(ds.num_histories):
        history = ds.history(i)
        assert history["episode"].tolist() == np.repeat([0, 1], 100).tolist()
        assert np.all(np.abs(history["action"]) <= 1.0) and np.any(np.abs(history["action"]) == 1.0)
        assert replay_mismatches(history, int(history["task_id"][0])) == 0
    for sidecar in sidecars:
        assert RLLIB_SIDECAR_KEYS <= set(sidecar), RLLIB_SIDECAR_KEYS - set(sidecar)
        assert sidecar["learner"] == "population" and sidecar["population_size"] == 2
        assert sidecar["updates_aligned"] and sidecar["algorithm"] == "ppo" and sidecar["env_task"] == "reach-v3"
        assert sidecar["num_updates"] == 2 and sidecar["curve"]["env_steps"] == [200, 400]
        assert 0.0 <= sidecar["success"]["episode_success_rate"] <= 1.0
        assert sidecar["fingerprint"] == data_fingerprint(tiny_config())


def test_shard_bytes_do_not_depend_on_the_population(pair, tmp_path):
    _, sidecars = pair
    alone = learn_meta_world_population(tiny_config(), [50], str(tmp_path))[0]
    assert alone["sha256"] == sidecars[1]["sha256"]


def test_horizon_bootstrap_changes_the_learner_not_the_format(pair, tmp_path):
    _, sidecars = pair
    assert tiny_config().bootstraps_at_horizon                      # Meta-World's default: the release's
    terminal = learn_meta_world_population(tiny_config(bootstrap_at_horizon=False), [0], str(tmp_path))[0]
    assert terminal["sha256"] != sidecars[0]["sha256"] and terminal["columns"] == sidecars[0]["columns"]
    assert data_fingerprint(tiny_config()) != data_fingerprint(tiny_config(bootstrap_at_horizon=False))


def test_the_driver_runs_the_meta_world_population(ray_local, pair, tmp_path):
    _, sidecars = pair
    config = tiny_config(tasks_per_population=1)
    assert resolved_learner(config) == "population"
    path = collect_histories(config, str(tmp_path / "dataset"), progress=False)
    manifest = data_shards.read_manifest(path)
    assert manifest["complete"] and manifest["collect_config"]["learner"] == "population"
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in sidecars]


def test_rollout_buffer_equals_sb3s_for_the_same_trajectories():
    """The learner's PPO batch of one rollout == SB3's RolloutBuffer filled by SB3's rules with the same weights.

    SB3 (``collect_rollouts``): log-probs of the UNclipped samples, values, ``r + gamma * V(terminal_observation)``
    at the truncation (the true final 39-number observation, recovered by replaying the executed actions),
    then ``compute_returns_and_advantage``.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.buffers import RolloutBuffer
    from stable_baselines3.common.vec_env import DummyVecEnv

    from dicp_ray.collect.population_meta_world import MetaWorldPopulation
    from dicp_ray.envs.meta_world import ML1Env

    config = tiny_config()                                                        # one update: 100 steps
    population = MetaWorldPopulation(config, [0])
    start = population.params.detach().clone()
    population.update()
    batch = {k: v[0].numpy() for k, v in population.last_batch.items()}          # learner 0, (S * T, ...)
    sent = population.records["action"][0][0]                                     # (S, T, 4) executed
    population.close()
    streams, steps = STREAMS, 100
    make = [lambda: ML1Env(0, task="reach-v3", observation="full")] * streams
    model = PPO("MlpPolicy", DummyVecEnv(make), n_steps=steps, batch_size=100, device="cpu", seed=0)
    policy, layout = model.policy, population.layout
    actor = [policy.mlp_extractor.policy_net[0], policy.mlp_extractor.policy_net[2], policy.action_net]
    critic = [policy.mlp_extractor.value_net[0], policy.mlp_extractor.value_net[2], policy.value_net]
    with torch.no_grad():
        for linears, layers in ((actor, layout.actor), (critic, layout.critic)):
            for linear, layer in zip(linears, layers):
                linear.weight.copy_(layout.weight(start, layer)[0].t())
                linear.bias.copy_(layout.bias(start, layer)[0])
        policy.log_std.copy_(layout.log_std_of(start)[0])
    obs = batch["obs"].reshape(streams, steps, -1)
    actions = batch["actions"].reshape(streams, steps, -1)
    np.testing.assert_array_equal(sent, np.clip(actions, -1, 1))                  # the env got the clipped sample
    assert (np.abs(actions) > 1).any()
    rewards, finals = np.zeros((streams, steps), np.float32), []
    for j in range(streams):                                                      # replay: rewards, final obs
        env = ML1Env(0, task="reach-v3", observation="full")
        assert np.array_equal(env.reset()[0], obs[j, 0])
        for t in range(steps):
            final, rewards[j, t], *_ = env.step(sent[j, t])
        finals.append(final)
    buffer = RolloutBuffer(steps, model.observation_space, model.action_space, gamma=0.99, gae_lambda=0.95,
                           n_envs=streams)
    with torch.no_grad():
        terminal = policy.predict_values(torch.as_tensor(np.stack(finals))).numpy()[:, 0]
        for t in range(steps):
            o, a = torch.as_tensor(obs[:, t]), torch.as_tensor(actions[:, t])
            values, log_prob, _ = policy.evaluate_actions(o, a)
            reward = rewards[:, t] + (0.99 * terminal if t == steps - 1 else 0.0)
            buffer.add(obs[:, t], actions[:, t], reward, np.full(streams, t == 0), values, log_prob)
        buffer.compute_returns_and_advantage(last_values=torch.zeros(streams), dones=np.ones(streams))
    flat = lambda a: a.swapaxes(0, 1).reshape(-1)                                  # noqa: E731 (T, S) -> S * T
    np.testing.assert_allclose(batch["log_probs"], flat(buffer.log_probs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["advantages"], flat(buffer.advantages), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["returns"], flat(buffer.returns), rtol=1e-5, atol=1e-5)
