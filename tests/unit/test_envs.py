"""Unit tests of dicp_ray.envs: grid dynamics, rewards, horizons, oracles, splits and the batched env."""

from __future__ import annotations

import itertools
import random
import warnings

import gymnasium as gym
import numpy as np
import pytest

import dicp_ray.envs as E
from dicp_ray.envs import GRID_SPECS, MOVES, cell_index, cell_obs, make_tasks, split_tasks, transition

NAMES = list(GRID_SPECS)
CENTRE = np.array([4, 4])


def kd_id(key: tuple[int, int], door: tuple[int, int]) -> int:
    """Key-to-Door task id of a (key cell, door cell) pair."""
    return (key[0] * 9 + key[1]) * 81 + door[0] * 9 + door[1]


def make(name: str, task_id: int) -> gym.Env:
    return gym.make(GRID_SPECS[name].env_id, task_id=task_id)


def run_actions(env: gym.Env, actions) -> list[float]:
    env.reset(seed=0)
    return [env.step(a)[1] for a in actions]


def rollout_oracle(env: E.GridEnv) -> float:
    """Follow the env's own oracle for one full episode; return the episode return."""
    env.reset()
    total, truncated = 0.0, False
    while not truncated:
        _, reward, terminated, truncated, _ = env.step(env.optimal_action())
        assert not terminated
        total += reward
    return total


# ----------------------------------------------------------------------------------------- dynamics


@pytest.mark.parametrize("action, expected",
                         [(0, (5, 4)), (1, (3, 4)), (2, (4, 5)), (3, (4, 3)), (4, (4, 4))])
def test_each_action_from_centre(action, expected):
    env = make("Darkroom", 0)
    obs, _ = env.reset(seed=1)
    assert obs.dtype == np.int64 and obs.shape == (2,) and tuple(obs) == (4, 4)
    obs, *_ = env.step(action)
    assert tuple(obs) == expected and env.observation_space.contains(obs)


def test_walls_clip_every_move():
    corners = [(0, 0), (0, 8), (8, 0), (8, 8)]
    for name in NAMES:
        tasks = make_tasks(name, np.zeros(20, dtype=np.int64))
        pos = np.array([c for c in corners for _ in range(5)], dtype=np.int64)
        actions = np.tile(np.arange(5), 4)
        moves = tasks.perm[np.arange(20), actions]
        new_pos, *_ = transition(tasks, pos, np.zeros(20, bool), np.zeros(20, bool), actions)
        np.testing.assert_array_equal(new_pos, np.clip(pos + MOVES[moves], 0, 8))
    env = make("Darkroom", 0)
    env.reset()
    for _ in range(6):
        obs, *_ = env.step(0)
    assert tuple(obs) == (8, 4)  # four steps reach the wall, the rest stay put


def test_observation_and_action_spaces():
    for name in NAMES:
        env = make(name, 3)
        assert env.observation_space == gym.spaces.Box(0, 8, (2,), np.int64)
        assert env.action_space == gym.spaces.Discrete(5)


def test_cell_index_roundtrip():
    cells = np.arange(81)
    obs = cell_obs(cells)
    assert obs.shape == (81, 2) and obs.dtype == np.int64
    np.testing.assert_array_equal(cell_index(obs), cells)
    np.testing.assert_array_equal(cell_index(obs.astype(np.float32)), cells)
    assert cell_index(np.array([2, 7])) == 25 and isinstance(cell_index([2, 7]), int)
    assert tuple(cell_obs(25)) == (2, 7)
    with pytest.raises(ValueError):
        cell_obs(81)


# ------------------------------------------------------------------------------------------ rewards


def test_darkroom_rewards_every_step_on_goal():
    env = make("Darkroom", 4 * 9 + 5)  # goal (4, 5), one +y step from the start
    assert run_actions(env, [2, 4, 4, 3, 2, 0]) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    env = make("Darkroom", 40)  # goal at the start cell: staying pays on every step
    assert sum(run_actions(env, [4] * 20)) == 20.0


def test_key_to_door_order_and_max_two():
    env = make("DarkKeyToDoor", kd_id(key=(4, 6), door=(4, 5)))
    # door first (nothing), key (+1), back to door (+1), then nothing ever again
    rewards = run_actions(env, [2, 2, 3, 4, 2, 3, 3, 2])
    assert rewards == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert env.unwrapped.has_key


def test_key_to_door_key_equals_door():
    env = make("DarkKeyToDoor", kd_id(key=(4, 5), door=(4, 5)))
    # landing on the cell pays the key; the door pays on the next step spent there, once
    assert run_actions(env, [2, 4, 4, 3, 2]) == [1.0, 1.0, 0.0, 0.0, 0.0]
    env = make("DarkKeyToDoor", kd_id(key=(4, 4), door=(4, 4)))  # both at the start cell
    obs, info = env.reset()
    assert info == {"has_key": False}
    assert [env.step(4)[1] for _ in range(3)] == [1.0, 1.0, 0.0]


def test_key_to_door_passing_key_twice_pays_once():
    env = make("DarkKeyToDoor", kd_id(key=(4, 5), door=(0, 0)))
    assert sum(run_actions(env, [2, 3, 2, 3, 2] + [4] * 10)) == 1.0


def test_permuted_action_mapping():
    perms = list(itertools.permutations(range(5)))
    for task_id in (0, 1, 57, 119):
        env = make("DarkroomPermuted", task_id)
        for action in range(5):
            obs, _ = env.reset()
            assert tuple(obs) == (0, 0)
            obs, *_ = env.step(action)
            np.testing.assert_array_equal(obs, np.clip(MOVES[perms[task_id][action]], 0, 8))
    tasks = make_tasks("DarkroomPermuted", np.repeat(np.arange(120), 5))
    actions = np.tile(np.arange(5), 120)
    pos = np.full((600, 2), 4)
    new_pos, *_ = transition(tasks, pos, np.zeros(600, bool), np.zeros(600, bool), actions)
    expected = 4 + MOVES[np.array(perms)[np.repeat(np.arange(120), 5), actions]]
    np.testing.assert_array_equal(new_pos, expected)


def test_permuted_goal_pays_every_step():
    env = make("DarkroomPermuted", 0)  # identity permutation
    rewards = run_actions(env, [0] * 8 + [2] * 8 + [4, 4, 1])
    assert rewards[:15] == [0.0] * 15 and rewards[15:] == [1.0, 1.0, 1.0, 0.0]


# --------------------------------------------------------------------------------- horizons


@pytest.mark.parametrize("name", NAMES)
def test_truncates_exactly_at_horizon(name):
    env = make(name, 7)
    horizon = GRID_SPECS[name].horizon
    env.reset()
    flags = [env.step(env.action_space.sample())[2:4] for _ in range(horizon)]
    assert all(t is False for t, _ in flags)
    assert [tr for _, tr in flags] == [False] * (horizon - 1) + [True]
    with pytest.raises(RuntimeError):
        env.unwrapped.step(0)
    env.reset(seed=3)
    assert env.unwrapped.elapsed_steps == 0


def test_reset_seed_seeds_np_random():
    env = make("Darkroom", 5)
    env.reset(seed=123)
    a = env.unwrapped.np_random.integers(1 << 30)
    env.reset(seed=123)
    assert env.unwrapped.np_random.integers(1 << 30) == a


# ----------------------------------------------------------------------------------- oracles


def test_darkroom_oracle_all_tasks():
    for task_id in range(81):
        env = E.Darkroom(task_id=task_id)
        goal = np.array([task_id // 9, task_id % 9])
        expected = float(np.clip(21 - np.abs(goal - CENTRE).sum(), 0, 20))
        assert env.max_return() == expected == E.max_return("Darkroom", task_id)
        assert rollout_oracle(env) == expected


def test_permuted_oracle_all_tasks():
    for task_id in range(120):
        env = E.DarkroomPermuted(task_id=task_id)
        assert env.max_return() == 35.0
        assert rollout_oracle(env) == 35.0


def test_key_to_door_oracle_sample():
    rng = np.random.default_rng(0)
    special = [kd_id((4, 4), (4, 4)), kd_id((4, 4), (0, 0)), kd_id((0, 0), (0, 0)), kd_id((0, 0), (8, 8))]
    for task_id in list(rng.choice(6561, 200, replace=False)) + special:
        env = E.DarkKeyToDoor(task_id=int(task_id))
        assert env.max_return() == 2.0
        assert rollout_oracle(env) == 2.0
    np.testing.assert_array_equal(E.max_return("DarkKeyToDoor", np.arange(6561)), 2.0)


def test_oracle_tie_break_and_functional_helper():
    # the release's labels and tie-break: x gap closed before y gap; stay (4) when on the goal
    assert E.optimal_action("Darkroom", 0, [4, 4]) == 1       # -x
    assert E.optimal_action("Darkroom", 0, [0, 4]) == 3       # -y
    assert E.optimal_action("Darkroom", 0, [0, 0]) == 4       # stay
    assert E.optimal_action("Darkroom", 80, [4, 4]) == 0      # +x before +y
    assert E.optimal_action("Darkroom", 8, [0, 4]) == 2       # +y
    key_door = kd_id((8, 4), (4, 0))
    assert E.optimal_action("DarkKeyToDoor", key_door, [4, 4]) == 0
    # with the key (also after the door has paid) the oracle points to the door and stays on it, as the release's
    assert E.optimal_action("DarkKeyToDoor", key_door, [4, 4], has_key=True) == 3
    assert E.optimal_action("DarkKeyToDoor", key_door, [4, 0], has_key=True) == 4
    # vectorised: broadcast ids over states, agree with the per-state scalar calls
    ids = np.arange(120)
    obs = cell_obs(np.arange(81))[:, None, :]
    batch = E.optimal_action("DarkroomPermuted", ids, obs)
    assert batch.shape == (81, 120)
    for c, t in [(0, 0), (80, 119), (40, 7), (13, 64)]:
        assert batch[c, t] == E.optimal_action("DarkroomPermuted", t, cell_obs(c))


# ------------------------------------------------------------------------------------ splits


@pytest.mark.parametrize("name, sizes", [("Darkroom", (73, 8)), ("DarkKeyToDoor", (6233, 328)),
                                         ("DarkroomPermuted", (108, 12))])
def test_split_sizes_disjoint_covering(name, sizes):
    for seed in range(5):
        train, test = split_tasks(name, seed)
        assert (len(train), len(test)) == sizes
        assert not set(train) & set(test)
        assert sorted(train + test) == list(range(GRID_SPECS[name].num_tasks))
        assert train == sorted(train) and all(type(i) is int for i in train + test)


def release_split(name: str, seed: int) -> tuple[list[int], list[int]]:
    """Independent restatement of the release's samplers (``sample_darkroom``, ``sample_dark_key_to_door``,
    ``sample_darkroom_permuted``): shuffle the goals / (key, door) quadruples / permutation indices with the
    GLOBAL `random` seeded by the split seed, take the first round(N * ratio), map them back to our ids."""
    if name == "Darkroom":
        items, ratio = [(i, j) for i in range(9) for j in range(9)], 0.9
    elif name == "DarkKeyToDoor":
        items, ratio = [(i, j, k, l) for i in range(9) for j in range(9) for k in range(9) for l in range(9)], 0.95
    else:
        items, ratio = list(range(120)), 0.9
    state = random.getstate()
    random.seed(seed)
    random.shuffle(items)
    random.setstate(state)
    n_train = round(len(items) * ratio)

    def task_id(item) -> int:
        if name == "Darkroom":
            return item[0] * 9 + item[1]
        if name == "DarkKeyToDoor":
            return kd_id((item[0], item[1]), (item[2], item[3]))
        return item

    return sorted(map(task_id, items[:n_train])), sorted(map(task_id, items[n_train:]))


@pytest.mark.parametrize("name, seeds", [("Darkroom", (0, 1, 2, 3, 4, 17)), ("DarkKeyToDoor", (0, 4)),
                                         ("DarkroomPermuted", (0, 3, 4))])
def test_split_is_the_releases_partition(name, seeds):
    for seed in seeds:
        before = random.getstate()
        assert split_tasks(name, seed) == release_split(name, seed)
        assert random.getstate() == before  # a local Random instance: the global RNG is not touched


def test_split_paper_seed_test_sets():
    # the test tasks of the paper's splits (release env_split_seed: Darkroom 0, Permuted 4), written out once:
    # Darkroom goals (0,5) (3,6) (4,2) (5,4) (5,6) (5,8) (6,8) (7,2)
    assert split_tasks("Darkroom", 0)[1] == [5, 33, 38, 49, 51, 53, 62, 65]
    assert split_tasks("DarkroomPermuted", 4)[1] == [2, 8, 11, 13, 19, 30, 38, 50, 51, 61, 70, 92]


def test_split_is_deterministic_and_seed_dependent():
    assert split_tasks("DarkKeyToDoor", 1) == split_tasks("DarkKeyToDoor", 1)
    tests = {tuple(split_tasks(name, s)[1]) for name in NAMES for s in range(5)}
    assert len(tests) == 15  # every (env, seed) pair gives a different test set
    assert len(split_tasks("Darkroom", 0, train_ratio=0.5)[0]) == 40  # round(40.5) -> 40 (banker's)


@pytest.mark.parametrize("kwargs", [{"name": "Nope"}, {"train_ratio": 0.0}, {"train_ratio": 1.0},
                                    {"train_ratio": 1.5}, {"split_seed": -1}, {"split_seed": 1.5}])
def test_split_invalid_arguments(kwargs):
    args = {"name": "Darkroom", "split_seed": 0, **kwargs}
    with pytest.raises(ValueError):
        split_tasks(args.pop("name"), **args)


def test_spec_table():
    assert [GRID_SPECS[n].default_plan_depth for n in NAMES] == [8, 16, 16]
    assert [GRID_SPECS[n].horizon for n in NAMES] == [20, 50, 50]
    assert [GRID_SPECS[n].num_tasks for n in NAMES] == [81, 6561, 120]
    with pytest.raises(AttributeError):
        GRID_SPECS["Darkroom"].horizon = 3  # frozen


# ---------------------------------------------------------------------------------- batched env


BATCH_TASKS = {
    "Darkroom": [0, 40, 41, 41, 80, 13, 13, 5],
    # keys next to the start (some == door, some == start) so random-ish play picks them up
    "DarkKeyToDoor": [kd_id((4, 5), (4, 3)), kd_id((4, 5), (4, 5)), kd_id((4, 4), (4, 4)),
                      kd_id((5, 4), (3, 4)), kd_id((5, 4), (3, 4)), 0, 6560, kd_id((3, 4), (4, 4))],
    "DarkroomPermuted": [0, 1, 1, 119, 64, 33, 33, 100],
}


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_single_with_autoreset(name):
    ids = BATCH_TASKS[name]
    env_id = GRID_SPECS[name].env_id
    batched = gym.make_vec(env_id, num_envs=len(ids), vectorization_mode="vector_entry_point", task_ids=ids)
    assert isinstance(batched, E.GridVectorEnv)
    reference = gym.vector.SyncVectorEnv([lambda t=t: gym.make(env_id, task_id=t) for t in ids])
    rng = np.random.default_rng(0)
    obs_b, info_b = batched.reset(seed=0)
    obs_r, info_r = reference.reset(seed=0)
    np.testing.assert_array_equal(obs_b, obs_r)
    num_truncations = 0
    for _ in range(3 * (GRID_SPECS[name].horizon + 1) + 4):
        oracle = batched.optimal_actions()
        np.testing.assert_array_equal(oracle, reference.call("optimal_action"))
        # half oracle, half random actions, so rewards and key pick-ups actually happen
        actions = np.where(rng.random(len(ids)) < 0.5, oracle, rng.integers(0, 5, len(ids)))
        out_b, out_r = batched.step(actions), reference.step(actions)
        for got, want in zip(out_b[:4], out_r[:4]):
            np.testing.assert_array_equal(got, want)
        if name == "DarkKeyToDoor":
            np.testing.assert_array_equal(out_b[4]["has_key"], out_r[4]["has_key"])
            np.testing.assert_array_equal(batched.has_key, out_r[4]["has_key"])
        num_truncations += int(out_b[3].sum())
    assert num_truncations == 3 * len(ids)
    np.testing.assert_array_equal(batched.max_returns(), [E.max_return(name, t) for t in ids])
    np.testing.assert_array_equal(batched.task_ids, ids)


def test_batched_autoreset_ignores_actions_and_reset_mask():
    env = E.DarkroomVectorEnv(num_envs=2, task_id=41)
    env.reset()
    for _ in range(20):
        _, rewards, _, truncated, _ = env.step(np.array([3, 0]))
    assert truncated.all()
    obs, rewards, terminated, truncated, _ = env.step(np.array([-1, 99]))  # ignored actions are not checked
    np.testing.assert_array_equal(obs, [[4, 4], [4, 4]])
    assert not rewards.any() and not terminated.any() and not truncated.any()
    env.step(np.array([2, 0]))  # +y, +x
    obs, _ = env.reset(options={"reset_mask": np.array([False, True])})
    np.testing.assert_array_equal(obs, [[4, 5], [4, 4]])
    np.testing.assert_array_equal(env.elapsed_steps, [1, 0])


def test_make_vec_modes_and_metadata():
    vec = gym.make_vec("dicp_ray/Darkroom-v0", num_envs=4, task_id=7)
    assert isinstance(vec, E.GridVectorEnv)
    assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    np.testing.assert_array_equal(vec.task_ids, [7] * 4)
    assert vec.observation_space.shape == (4, 2) and vec.single_action_space == gym.spaces.Discrete(5)
    obs, _ = vec.reset(seed=0)
    assert obs.dtype == np.int64 and vec.observation_space.contains(obs)
    sync = gym.make_vec("dicp_ray/DarkroomPermuted-v0", num_envs=2, vectorization_mode="sync", task_id=3)
    assert sync.reset(seed=0)[0].shape == (2, 2)


def test_register_is_idempotent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E.register_envs()


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name, bad", [("Darkroom", 81), ("Darkroom", -1), ("Darkroom", 1.0),
                                       ("Darkroom", "3"), ("Darkroom", True), ("Darkroom", [1]),
                                       ("DarkKeyToDoor", 6561), ("DarkroomPermuted", 120)])
def test_invalid_task_id_raises(name, bad):
    with pytest.raises(ValueError, match=str(GRID_SPECS[name].num_tasks - 1)):
        make(name, bad)
    if not isinstance(bad, list):  # the functional helpers are vectorised: a list of valid ids is fine
        with pytest.raises(ValueError):
            E.max_return(name, bad)


@pytest.mark.parametrize("bad", [5, -1, 1.0, "1", None, [1, 2]])
def test_invalid_action_raises(bad):
    env = make("DarkKeyToDoor", 0)
    env.reset()
    with pytest.raises(ValueError, match="0..4"):
        env.step(bad)


def test_vector_invalid_arguments_raise():
    cls = E.DarkroomVectorEnv
    for kwargs in [{"num_envs": 3, "task_ids": [0, 1]}, {"num_envs": 2, "task_ids": [0, 81]}, {"num_envs": 2},
                   {"num_envs": 2, "task_id": 1, "task_ids": [1, 1]}, {"num_envs": 0, "task_id": 1}]:
        with pytest.raises(ValueError):
            cls(**kwargs)
    env = cls(num_envs=2, task_ids=[0, 1])
    env.reset()
    for bad in [np.array([0, 5]), np.array([0]), np.array([0.0, 1.0])]:
        with pytest.raises(ValueError):
            env.step(bad)
