"""Unit tests of dicp_ray.envs.meta_world on real MuJoCo: observation layout, info, horizon, seeding, ids.

Benchmarks come from the user cache (built once, ~2 s per ML1 task and ~15 s for ML10, then ~0 s); the cache
test itself uses a temporary directory.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest

import dicp_ray.envs as E
from dicp_ray.config.load import config_from_dict
from dicp_ray.config.schema import META_WORLD_TASKS, ConfigError
from dicp_ray.envs import meta_world as M
from dicp_ray.envs import meta_world_tasks

RNG_ACTIONS = np.random.default_rng(0).uniform(-1.5, 1.5, size=(meta_world_tasks.HORIZON, meta_world_tasks.ACTION_DIM)).astype(np.float32)


def make(task_id: int, task: str = "reach-v3", name: str = "ML1", **kwargs) -> M.MetaWorldEnv:
    env_kwargs = {"task": task} if name == "ML1" else {}
    return gym.make(M.env_id(name), task_id=task_id, **env_kwargs, **kwargs).unwrapped


def rollout(env: M.MetaWorldEnv, actions: np.ndarray, seed: int | None = None) -> np.ndarray:
    obs = [env.reset(seed=seed)[0]]
    obs += [env.step(a)[0] for a in actions]
    return np.stack(obs)


def test_static_task_names_equal_metaworlds_own_list():
    import metaworld

    assert META_WORLD_TASKS == meta_world_tasks.task_names() == tuple(metaworld.ML1.ENV_NAMES)


def test_observation_has_11_dims_for_one_object_and_18_for_two():
    # Decided from the env (number of object positions), not from a list.
    tasks = ("reach-v3", "pick-place-v3", "hammer-v3", "stick-pull-v3")
    assert [meta_world_tasks.num_objects(t) for t in tasks] == [1, 1, 2, 2]
    assert meta_world_tasks.observation_dim("ML1", "reach-v3") == 11 and meta_world_tasks.observation_dim("ML1", "hammer-v3") == 18
    assert meta_world_tasks.observation_dim("ML10") == 11                    # all 15 ML10 types have one object
    reach, hammer = make(0, "reach-v3"), make(0, "hammer-v3")
    for env, dim in ((reach, 11), (hammer, 18)):
        obs, _ = env.reset(seed=0)
        raw = env.meta_world_env._get_obs()                   # 39 dims: 18 now, 18 previous, goal
        assert obs.shape == env.observation_space.shape == (dim,) and obs.dtype == np.float32
        assert env.observation_space.contains(obs)
        np.testing.assert_array_equal(obs, raw[:dim].astype(np.float32))
        assert np.all(raw[-3:] == 0)                          # goal hidden by Meta-World's ML mode
    assert np.all(reach.meta_world_env._get_obs()[11:18] == 0)   # what reach drops is only padding
    assert np.any(hammer.reset()[0][11:14] != 0)                 # hammer's second object (the nail) is there


@pytest.mark.parametrize("task, dim", [("reach-v3", 11), ("hammer-v3", 18)])
def test_full_observation_is_metaworlds_39_numbers_with_the_previous_frame(task, dim):
    # What the release's source learners see (release:metaworld/collect_data.py:59): the model view is its head.
    full, model = make(2, task, observation="full"), make(2, task)
    first = full.reset(seed=0)[0]
    assert first.shape == full.observation_space.shape == (39,) and first.dtype == np.float32
    np.testing.assert_array_equal(first[18:36], first[:18])               # a reset repeats the frame
    np.testing.assert_array_equal(first[:dim], model.reset(seed=0)[0])
    previous = first
    for action in RNG_ACTIONS[:20]:
        obs, reward, _, _, info = full.step(action)
        model_obs, model_reward, _, _, model_info = model.step(action)
        assert full.observation_space.contains(obs)
        np.testing.assert_array_equal(obs[18:36], previous[:18])          # the previous frame: velocities
        np.testing.assert_array_equal(obs[:dim], model_obs)                # the model observation, exactly
        assert np.all(obs[36:] == 0) and (reward, info["success"]) == (model_reward, model_info["success"])
        previous = obs
    venv = M.ML1VectorEnv(num_envs=2, task_id=2, task=task, observation="full")
    assert venv.reset(seed=0)[0].shape == (2, 39) and venv.obs_dim == dim
    with pytest.raises(ValueError, match="observation must be one of"):
        make(2, task, observation="raw")


def test_step_info_action_clipping_and_truncation_at_100():
    env = make(3)
    env.reset(seed=1)
    for t, action in enumerate(RNG_ACTIONS, start=1):
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(info["success"], float) and info["success"] in (0.0, 1.0)
        assert info["action"].dtype == np.float32
        np.testing.assert_array_equal(info["action"], np.clip(action, -1, 1))
        assert isinstance(reward, float) and 0.0 <= reward <= 10.0
        assert terminated is False and truncated == (t == 100)
    assert env.elapsed_steps == 100
    with pytest.raises(RuntimeError, match="reset"):
        env.step(RNG_ACTIONS[0])
    with pytest.raises(ValueError, match="finite"):
        env.reset()
        env.step([0.0, np.nan, 0.0, 0.0])
    full = make(3, full_info=True)
    full.reset()
    assert {"success", "action", "near_object", "grasp_success"} <= set(full.step(RNG_ACTIONS[0])[4])


def test_resets_are_reproducible_and_the_placement_is_the_task():
    first, second = make(7), make(7)
    trajectory = rollout(first, RNG_ACTIONS[:30], seed=0)
    # Another process-independent instance, another reset seed, and a used env all replay it bit for bit.
    np.testing.assert_array_equal(rollout(second, RNG_ACTIONS[:30], seed=123), trajectory)
    np.testing.assert_array_equal(rollout(first, RNG_ACTIONS[:30], seed=None), trajectory)
    # Other variations (and the same index under another split seed) place the object and goal elsewhere.
    others = [make(8).reset(seed=0)[0], make(7 + 100).reset(seed=0)[0]]
    for obs in others:
        assert not np.allclose(obs[4:7], trajectory[0][4:7])
    assert not np.array_equal(first.meta_world_env._target_pos, make(8).meta_world_env._target_pos)


def test_metaworld_seeding_traps_documented_in_the_module():
    import metaworld

    raw = metaworld.ML1("reach-v3", seed=0)
    env = raw.train_classes["reach-v3"]()
    env.set_task(raw.train_tasks[0])
    assert env._freeze_rand_vec                                           # trap 2: placement frozen
    np.testing.assert_array_equal(env.reset(seed=1)[0], env.reset(seed=2)[0])  # trap 1: seed ignored
    # Trap 4: ML1 test goals of seed s are the train goals of seed s + 1.
    test_0 = [pickle.loads(t.data)["rand_vec"] for t in meta_world_tasks.load_tasks("ML1", "reach-v3", 0).tasks[50:]]
    train_1 = [pickle.loads(t.data)["rand_vec"] for t in meta_world_tasks.load_tasks("ML1", "reach-v3", 1).tasks[:50]]
    np.testing.assert_array_equal(test_0, train_1)


def test_split_ids_are_metaworlds_split_offset_by_the_split_seed():
    assert meta_world_tasks.split_tasks("ML1", 0) == (list(range(50)), list(range(50, 100)))
    assert E.split_tasks("ML1", 2) == (list(range(200, 250)), list(range(250, 300)))
    train, test = E.split_tasks("ML10", 1)
    assert (train[0], train[-1], test[0], test[-1]) == (750, 1249, 1250, 1499)
    assert meta_world_tasks.decode_task_id("ML10", 1250 + 103) == (1, 603)
    assert meta_world_tasks.num_tasks("ML1") == config_from_dict({"env": {"name": "ML1", "task": "push-v3"}}).env.num_tasks
    with pytest.raises(ValueError, match="train_ratio must be None"):
        E.split_tasks("ML1", 0, 0.9)
    from metaworld.env_dict import ML10_V3

    order = [*ML10_V3["train"], *ML10_V3["test"]]
    assert [meta_world_tasks.task_type("ML10", i * 50 + 7) for i in range(15)] == order
    assert meta_world_tasks.task_type("ML10", 500 + 2 * 50 + 3) == "shelf-place-v3"
    assert meta_world_tasks.task_type("ML1", 5, "push-v3") == "push-v3"
    assert make(49).is_train and not make(50).is_train


def test_ml10_env_ids_follow_metaworlds_type_order():
    tasks = meta_world_tasks.load_tasks("ML10", None, 0)                   # ~15 s the first time, then the cache
    assert tasks.train_types[:3] == ("reach-v3", "push-v3", "pick-place-v3") and len(tasks.test_types) == 5
    env = make(500 + 2 * 50 + 3, name="ML10")
    assert (env.task_type, env.is_train, env.obs_dim) == ("shelf-place-v3", False, 11)
    rand_vec = pickle.loads(tasks.tasks[603].data)["rand_vec"]
    assert rand_vec.tolist() == env.meta_world_env._last_rand_vec.tolist()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (11,) and env.step(RNG_ACTIONS[0])[0].shape == (11,)


def test_misspelt_or_missing_task_names_suggest_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'pick-place-v3'"):
        config_from_dict({"env": {"name": "ML1", "task": "pick-plase-v3"}})
    with pytest.raises(ConfigError, match="needs a Meta-World v3 task"):
        config_from_dict({"env": {"name": "ML1"}})
    with pytest.raises(ConfigError, match="only used by ML1"):
        config_from_dict({"env": {"name": "ML10", "task": "reach-v3"}})
    with pytest.raises(ValueError, match="did you mean 'peg-insert-side-v3'"):
        meta_world_tasks.check_task_name("peg-insert-sid-v3")
    with pytest.raises(ValueError, match="did you mean"):
        gym.make("dicp_ray/ML1-v0", task="reach-v2", task_id=0)


def test_vector_env_streams_autoreset_and_batched_infos():
    venv = gym.make_vec("dicp_ray/ML1-v0", num_envs=3, task="reach-v3", task_id=4,
                        vectorization_mode="vector_entry_point")
    assert isinstance(venv, M.ML1VectorEnv) and venv.task_ids == (4, 4, 4)
    first, _ = venv.reset(seed=0)
    assert first.shape == (3, 11) and np.all(first == first[0])  # streams of one task start alike
    for t in range(1, 101):
        obs, reward, terminated, truncated, info = venv.step(np.tile(RNG_ACTIONS[t - 1], (3, 1)))
        assert info["success"].shape == (3,) and info["action"].shape == (3, 4)
        assert truncated.all() == (t == 100) and not terminated.any()
    obs, reward, _, truncated, _ = venv.step(np.zeros((3, 4), np.float32))  # NEXT_STEP autoreset
    np.testing.assert_array_equal(obs, first)
    assert not truncated.any() and np.all(reward == 0)
    with pytest.raises(ValueError, match="exactly one"):
        M.ML1VectorEnv(num_envs=2, task="reach-v3")


def test_benchmark_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv(meta_world_tasks.CACHE_ENV_VAR, str(tmp_path))
    meta_world_tasks.load_tasks.cache_clear()
    try:
        built = meta_world_tasks.load_tasks("ML1", "reach-v3", 5)
        files = list(tmp_path.rglob("*.pkl"))
        assert len(files) == 1 and "ML1-reach-v3-seed5" in files[0].name
        meta_world_tasks.load_tasks.cache_clear()
        monkeypatch.setattr(meta_world_tasks, "_build_tasks", lambda *a: pytest.fail("rebuilt from a valid cache"))
        assert meta_world_tasks.load_tasks("ML1", "reach-v3", 5) == built
        files[0].write_bytes(b"garbage")                     # a corrupt cache is rebuilt, not fatal
        meta_world_tasks.load_tasks.cache_clear()
        monkeypatch.undo()
        monkeypatch.setenv(meta_world_tasks.CACHE_ENV_VAR, str(tmp_path))
        assert meta_world_tasks.load_tasks("ML1", "reach-v3", 5) == built
        monkeypatch.setenv(meta_world_tasks.CACHE_ENV_VAR, "off")
        assert meta_world_tasks.cache_dir() is None
    finally:
        meta_world_tasks.load_tasks.cache_clear()


def test_registration_is_lazy_and_checker_clean():
    code = "import sys, dicp_ray.envs, gymnasium; assert 'dicp_ray/ML10-v0' in gymnasium.registry; " \
           "print('metaworld' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # gymnasium's passive checker stays silent
        env = gym.make("dicp_ray/ML1-v0", task="reach-v3", task_id=0)
        env.reset(seed=0)
        env.step(env.action_space.sample())


@pytest.mark.parametrize("task", ["pick-place-v3", "hammer-v3"])
def test_streams_sharing_one_mujoco_model_match_independent_streams(task):
    # (checked once on all 50 tasks, with streams resetting at different times; two tasks here for speed)
    actions = np.random.default_rng(1).uniform(-1, 1, size=(2 * meta_world_tasks.HORIZON + 5, 3, meta_world_tasks.ACTION_DIM))
    runs = []
    for share in (True, False):
        venv = M.ML1VectorEnv(task_ids=[11, 11, 12], task=task, share_model=share)
        models = [env.meta_world_env.model for env in venv.envs]
        assert (models[0] is models[1]) == share and models[0] is not models[2]
        steps = [venv.reset(seed=0)[0]]
        for step_actions in actions:
            obs, reward, _, _, info = venv.step(step_actions)
            steps.append(np.concatenate([obs, reward[:, None], info.get("success", np.zeros(3))[:, None]], 1))
        runs.append(np.concatenate(steps[1:]))
    np.testing.assert_array_equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="same task"):
        M.ML1Env(12, task=task, share_model_with=venv.envs[0])


def test_run_directories_recorded_before_the_meta_world_keys_still_resume(tmp_path):
    import json

    from dicp_ray.pipeline import record_run

    config = config_from_dict({"name": "old"})
    stored = config.to_dict()
    del stored["env"]["task"], stored["collect"]["sac_batch_size"]      # a run.json from before these keys
    (tmp_path / "run.json").write_text(json.dumps({"config": stored}))
    assert record_run(config, tmp_path)["config"] == json.loads(json.dumps(stored))   # kept, not refused
    with pytest.raises(ConfigError, match="different"):
        record_run(config_from_dict({"name": "old", "collect": {"sac_batch_size": 64}}), tmp_path)


def test_config_meta_world_table_agrees_with_the_envs():
    from dicp_ray.config.schema import META_WORLD_ENVS

    for name, (num_tasks, horizon, ratio, depth) in META_WORLD_ENVS.items():
        train, test = meta_world_tasks.split_tasks(name, 0)
        assert (num_tasks, horizon, depth) == (meta_world_tasks.num_tasks(name), meta_world_tasks.HORIZON, 1)
        assert ratio == len(train) / (len(train) + len(test)) and not set(train) & set(test)


@pytest.mark.parametrize("task", ["pick-place-v3", "push-v3"])
def test_fast_grasp_check_agrees_with_metaworlds_along_scripted_grasps(task):
    """`touching_object` from MjData's arrays vs Meta-World's own loop, step by step along its scripted policy's
    grasps (noisy, so some steps touch with one pad only), with the same rewards and observations."""
    from metaworld.policies import ENV_POLICY_MAP

    from dicp_ray.envs.meta_world import touching_object

    policy = ENV_POLICY_MAP[task]()
    rng = np.random.default_rng(0)
    ours, stock = (M.ML1Env(3, task=task, observation="full", fast_contacts=fast) for fast in (True, False))
    assert type(ours.meta_world_env).touching_object is touching_object
    assert type(stock.meta_world_env).touching_object is not touching_object
    touched = set()
    for episode in range(2):
        obs, _ = ours.reset(seed=episode)
        np.testing.assert_array_equal(obs, stock.reset(seed=episode)[0])
        for _ in range(meta_world_tasks.HORIZON):
            action = np.clip(policy.get_action(obs.astype(np.float64)) + rng.normal(0, 0.3 * episode, 4), -1, 1)
            obs, reward, _, _, _ = ours.step(action)
            stock_obs, stock_reward, _, _, _ = stock.step(action)
            np.testing.assert_array_equal(obs, stock_obs)
            assert reward == stock_reward
            geom = ours.meta_world_env._get_id_main_object()
            fast = ours.meta_world_env.touching_object(geom)
            assert fast == stock.meta_world_env.touching_object(geom)
            touched.add(bool(fast))
    assert touched == {True, False}                                   # both answers were exercised


def test_episode_tally_keeps_each_streams_return_and_success_at_any_step():
    from dicp_ray.envs.meta_world import EpisodeTally

    tally = EpisodeTally(2)
    steps = [([1.0, 2.0], [0.0, 1.0], [False, False]),     # stream 1 succeeds mid-episode ...
             ([3.0, 4.0], [1.0, 0.0], [True, True]),       # ... and success is kept at the episode end
             ([5.0, 6.0], [0.0, 0.0], [True, False]),
             ([1.0, 1.0], [0.0, 0.0], [False, True])]
    for rewards, successes, dones in steps[:2]:
        tally.sb3_callback({"rewards": np.array(rewards), "infos": [{"success": s} for s in successes],
                            "dones": np.array(dones)}, {})
    for rewards, successes, dones in steps[2:]:
        tally.update(np.array(rewards), successes, np.array(dones))
    assert tally.episodes == [[(4.0, 1.0), (5.0, 0.0)], [(6.0, 1.0), (7.0, 0.0)]]
    assert tally.array().shape == (2, 2, 2)
