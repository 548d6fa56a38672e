"""Meta-World ML1 and ML10 (the ``metaworld`` 3.1 package, v3 tasks) as dicp_ray environments.

    env = gymnasium.make("dicp_ray/ML1-v0", task="reach-v3", task_id=3)     # one task, 11-dim obs
    venv = gymnasium.make_vec("dicp_ray/ML10-v0", num_envs=8, task_id=512, # 8 streams of one task
                              vectorization_mode="vector_entry_point")

Task ids. A split seed ``s`` is the seed Meta-World builds its benchmark with
(``metaworld.ML1(task, seed=s)``, ``metaworld.ML10(seed=s)``), so different split seeds are different goal
variations. Task ids are global, ``task_id = s * num_tasks(name) + index``:

* ML1 (``num_tasks`` 100): index 0..49 = the benchmark's 50 train goal variations, 50..99 = its 50 test ones.
* ML10 (``num_tasks`` 750): index ``i*50 + j`` = variation j of train task type i (Meta-World's ML10 train
  order: reach, push, pick-place, door-open, drawer-close, button-press-topdown, peg-insert-side,
  window-open, sweep, basketball), ``500 + i*50 + j`` = variation j of test task type i (drawer-open,
  door-close, shelf-place, sweep-into, lever-pull).

For split seed 0 the ids are exactly 0..99 / 0..749; the offset lets one dataset hold the tasks of several
split seeds without collisions, and (env, ML1 task, task id) alone rebuilds a task. ``split_tasks`` returns
the train and test ids of one split seed (Meta-World's own split; there is no train ratio).

Observation (the paper's): hand xyz, gripper opening, then position (3) + quaternion (4) of each object:
11 dims with one object, 18 with two. The count is read from the environment (``_get_pos_objects``),
not from a list: among the 50 v3 tasks only hammer, stick-push and stick-pull have a second object, and
all 15 ML10 task types have one (ML10 is 11-dim). The goal is hidden (Meta-World zeroes it in ML mode; we
drop those dims and the frame-stacked previous observation). ``observation="full"`` returns Meta-World's
own 39 numbers instead (current frame 18, previous frame 18, zeroed goal 3; at a reset the previous frame
is the current one): what the authors' source learners see (``release:metaworld/collect_data.py:59``, no
observation wrapper). Collection feeds it to the source PPO / SAC with ``collect.source_obs: full`` and
records the first ``obs_dim`` numbers, which are exactly the model observation.

Actions are ``Box(-1, 1, (4,), float32)``; each action is cast to float32 and clipped before stepping and
returned as ``info["action"]``, so a recorder stores the action actually executed. ``info["success"]`` is
a float (0.0 / 1.0). Episodes never terminate (success does not end them) and truncate at step 100
(Meta-World's own limit is 500).

Seeding traps in metaworld 3.1.1 (1, 2 and 4 are checked by tests/unit/test_meta_world_envs.py):

1. ``SawyerXYZEnv.reset(seed=...)`` ignores ``seed``; ``env.seed(s)`` seeds ``env.np_random``, which is
   only used when ``seeded_rand_vec`` is True and the placement is not frozen.
2. The placement is the task. A benchmark ``Task`` carries ``rand_vec`` (object start + goal);
   ``set_task`` stores it in ``_last_rand_vec`` and sets ``_freeze_rand_vec = True``, so every reset
   restores the same object and goal positions, whatever the seed. Meta-World does not randomise per
   reset in ML1/ML10; only an unfrozen env (``_freeze_rand_vec = False``, as in ``_make_tasks`` and
   MT1's random task selection) draws a new ``rand_vec``, from the GLOBAL ``np.random`` unless
   ``seeded_rand_vec`` is set. So here the reset seed only seeds this wrapper's ``np_random`` and the
   same (env, task, task id) gives bit-identical episodes for the same actions in any process, before or
   after other episodes (checked once on all 50 tasks; the unit tests check reach).
3. The goal variations are drawn from the global ``np.random`` seeded with the benchmark seed (state
   saved and restored). ``seed=None`` gives different tasks in every process.
4. ``ML1(task, seed=s)`` draws its TEST goals with seed ``s + 1``: they are exactly the TRAIN goals of
   ``ML1(task, seed=s + 1)``. Split seeds 0 and 1 therefore share 50 goals (test of 0 = train of 1).
   That does not leak within a split; it only means such goals get collected twice (different ids and
   learner seeds). ML10 draws train and test types with the same seed (they are disjoint types).
5. ``set_task`` is required before ``reset`` and ``step`` (RuntimeError), stepping past
   ``max_path_length`` (500) raises ValueError, and ``reset`` runs ``reset_model`` twice (before and after
   ``mj_resetData``): a reset costs ~8 ms, 14-36 env steps, i.e. 14-36% on top of a 100-step episode.
6. Building the benchmark samples goals by constructing and resetting envs: ML1 ~2 s, ML10 8-15 s. It is
   memoised per process and pickled under the user cache dir (``$DICP_RAY_CACHE_DIR``, else
   ``$XDG_CACHE_HOME/dicp_ray``, else ``~/.cache/dicp_ray``; ``DICP_RAY_CACHE_DIR=off`` disables it),
   keyed by the metaworld version because ``Task.data`` pickles the env class by reference.

Memory: every Meta-World env compiles its own MuJoCo model (~0.1 s and ~20 MB resident), i.e. ~2 GB for a
learner's 100 streams. ``MetaWorldVectorEnv`` therefore lets streams of the SAME task id share one ``MjModel``
(each keeps its own ``MjData``) by overriding Gymnasium's ``MujocoEnv._initialize_simulation`` hook: ~0.01 s
and well under 1 MB per extra stream. This is safe only within one task: Meta-World writes the task's
placement into the model at every reset (``model.body("box").pos = ...``, goal sites), always the same
values for one task. Sharing among different tasks would mix placements, so it is refused. Shared and
independent streams gave bit-identical trajectories on all 50 tasks (3 streams, different actions, resets
at different times; checked once), and the unit tests repeat that on two tasks.

Task ids, splits, the benchmark cache and observation sizes live in `dicp_ray.envs.meta_world_tasks`. metaworld is imported lazily: importing this module (done by ``import dicp_ray.envs``) costs
nothing until an env or benchmark is built.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from dicp_ray.envs.meta_world_tasks import (
    ACTION_DIM,
    ENV_NAMES,
    HAND_DIMS,
    HORIZON,
    check_env_name,
    check_int,
    check_task_arg,
    decode_task_id,
    load_tasks,
    num_train_tasks,
    observation_dim,
)

__all__ = [
    "EpisodeTally", "ML10Env", "ML10VectorEnv", "ML1Env", "ML1VectorEnv", "MetaWorldEnv", "MetaWorldVectorEnv",
    "env_id", "register_envs",
]


# ----------------------------------------------------------------------------------------------------------
# The Gymnasium envs
# ----------------------------------------------------------------------------------------------------------

def _observation_space(obs_dim: int) -> spaces.Box:
    from metaworld.sawyer_xyz_env import SawyerXYZEnv

    hand = SawyerXYZEnv._HAND_SPACE
    low = np.concatenate([hand.low, [-1.0], np.full(obs_dim - HAND_DIMS, -np.inf)])
    high = np.concatenate([hand.high, [1.0], np.full(obs_dim - HAND_DIMS, np.inf)])
    return spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)


def _with_model(env_class: type, model: Any) -> type:
    """A subclass of Meta-World's `env_class` whose instances use `model` (and a fresh MjData of it)."""
    import mujoco

    def initialize_simulation(self):
        return model, mujoco.MjData(model)

    return type(env_class.__name__, (env_class,), {"_initialize_simulation": initialize_simulation,
                                                   "__module__": env_class.__module__})


def touching_object(self, object_geom_id: int) -> bool:
    """``SawyerXYZEnv.touching_object`` (metaworld 3.x) read from MjData's contact arrays: the same answer (is the
    summed constraint force of the contacts between each gripper pad and the object positive, summed in the same
    order), without building a Python object per contact, which was ~25 % of a pick-place step under cProfile
    (tests/unit/test_meta_world_envs.py checks both agree along scripted grasps)."""
    data = self.data
    geom = data.contact.geom                                                   # (ncon, 2)
    on_object = (geom == object_geom_id).any(axis=1)
    forces = data.efc_force

    def force(pad: str) -> float:
        rows = on_object & (geom == data.geom(pad).id).any(axis=1)
        return sum(forces[address] for address in data.contact.efc_address[rows])

    return 0 < force("leftpad_geom") and 0 < force("rightpad_geom")


def _with_fast_contacts(env_class: type) -> type:
    """A subclass of Meta-World's `env_class` whose grasp check is `touching_object` above."""
    return type(env_class.__name__, (env_class,), {"touching_object": touching_object,
                                                   "__module__": env_class.__module__})


class MetaWorldEnv(gym.Env):
    """One Meta-World task with the paper's observation and horizon (abstract: subclasses set ENV_NAME).

    Construct with ``task_id`` (global id, see the module docstring) and, for ML1, ``task`` (a v3 name).
    ``full_info=True`` adds Meta-World's own info keys (near_object, grasp_success, ...) as floats.
    Attributes: ``split_seed``, ``index``, ``task_type``, ``is_train``, ``obs_dim``, ``horizon``,
    ``elapsed_steps`` and ``meta_world_env`` (the raw ``SawyerXYZEnv``).
    """

    ENV_NAME = ""
    OBSERVATIONS = ("model", "full")
    metadata = {"render_modes": []}

    def __init__(self, task_id: int, task: str | None = None, horizon: int = HORIZON,
                 full_info: bool = False, render_mode: str | None = None,
                 share_model_with: MetaWorldEnv | None = None, observation: str = "model",
                 fast_contacts: bool = True):
        """``share_model_with``: another env of the same benchmark and task id whose MuJoCo model this one
        reuses instead of compiling its own (see the module docstring; ``MetaWorldVectorEnv`` does this).
        ``observation``: "model" (the paper's 11 / 18 dims) or "full" (Meta-World's 39, module docstring).
        ``fast_contacts``: Meta-World's grasp check read from MjData's arrays (`touching_object`, same rewards);
        False runs Meta-World's own code, as the release's SB3 learners do (benchmarks)."""
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        if render_mode is not None:
            raise ValueError(f"these Meta-World envs run headless: render_mode must be None, not "
                             f"{render_mode!r}")
        if observation not in self.OBSERVATIONS:
            raise ValueError(f"observation must be one of {self.OBSERVATIONS}, got {observation!r}")
        self.task = check_task_arg(self.ENV_NAME, task)
        self.task_id = check_int(task_id, f"{self.ENV_NAME} task id")
        self.split_seed, self.index = decode_task_id(self.ENV_NAME, self.task_id)
        self.horizon = check_int(horizon, "horizon")
        if not 1 <= self.horizon <= 500:
            raise ValueError(f"horizon must be in 1..500 (Meta-World never steps past 500), got {horizon}")
        mw_task = load_tasks(self.ENV_NAME, self.task, self.split_seed).tasks[self.index]
        self.task_type: str = mw_task.env_name
        self.is_train = self.index < num_train_tasks(self.ENV_NAME)
        env_class = ALL_V3_ENVIRONMENTS[self.task_type]
        if share_model_with is not None:
            same = (type(share_model_with).ENV_NAME, share_model_with.task, share_model_with.task_id)
            if same != (self.ENV_NAME, self.task, self.task_id):
                raise ValueError(f"share_model_with must be an env of the same task ({self.ENV_NAME}, "
                                 f"{self.task}, {self.task_id}), got {same}: tasks write their placement "
                                 "into the model")
            env_class = _with_model(env_class, share_model_with.meta_world_env.model)
        if fast_contacts:
            env_class = _with_fast_contacts(env_class)
        self.meta_world_env = env_class()
        self.meta_world_env.set_task(mw_task)
        self.obs_dim = observation_dim(self.ENV_NAME, self.task)
        self.observation = observation
        if observation == "full":
            full = self.meta_world_env.observation_space
            self.observation_space = spaces.Box(full.low.astype(np.float32), full.high.astype(np.float32),
                                                dtype=np.float32)
        else:
            self.observation_space = _observation_space(self.obs_dim)
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self.full_info = bool(full_info)
        self.render_mode = None
        self._t = 0
        self._needs_reset = True

    @property
    def elapsed_steps(self) -> int:
        return self._t

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode. The object and goal placement is fixed by the task (trap 2 of the module
        docstring); `seed` seeds ``np_random`` and ``action_space`` only."""
        super().reset(seed=seed)
        if seed is not None:
            self.action_space.seed(seed)
        raw, _ = self.meta_world_env.reset()
        self._t, self._needs_reset = 0, False
        return self._observe(raw), {}

    def step(self, action: Any):
        """Clip `action` to [-1, 1] (float32) and step -> (obs, reward, False, truncated, info)."""
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (and again after the episode truncated)")
        act = np.asarray(action, dtype=np.float32).reshape(-1)
        if act.shape != (ACTION_DIM,) or not np.all(np.isfinite(act)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers, got {action!r}")
        act = np.clip(act, -1.0, 1.0)
        raw, reward, _, _, mw_info = self.meta_world_env.step(act)
        self._t += 1
        truncated = self._t >= self.horizon
        self._needs_reset = truncated
        info = {"success": float(mw_info["success"]), "action": act}
        if self.full_info:
            info.update({k: float(v) for k, v in mw_info.items() if k != "success"})
        return self._observe(raw), float(reward), False, truncated, info

    def _observe(self, raw: np.ndarray) -> np.ndarray:
        return (raw if self.observation == "full" else raw[:self.obs_dim]).astype(np.float32)

    def close(self) -> None:
        self.meta_world_env.close()


class MetaWorldVectorEnv(SyncVectorEnv):
    """``num_envs`` streams (copies) of Meta-World tasks stepped in a loop (subclasses set ENV_NAME).

    ``task_id`` (every stream the same task, the collection case) or ``task_ids`` (one per stream). A
    ``SyncVectorEnv`` with NEXT_STEP autoreset; its per-step overhead is ~0-3% of the MuJoCo step
    (benchmarks/bench_meta_world.py), so a hand-batched env would not pay. Streams of the same task id
    share one MuJoCo model unless ``share_model=False`` (module docstring). Infos are batched:
    ``success (N,)``, ``action (N, 4)``. ``observation`` and ``fast_contacts`` as for `MetaWorldEnv`.
    """

    ENV_NAME = ""
    SINGLE_ENV: type[MetaWorldEnv] = MetaWorldEnv

    def __init__(self, num_envs: int | None = None, task_id: int | None = None, task_ids: Any = None,
                 task: str | None = None, horizon: int = HORIZON, full_info: bool = False,
                 share_model: bool = True, max_episode_steps: int | None = None,
                 render_mode: str | None = None, observation: str = "model", fast_contacts: bool = True):
        if (task_ids is None) == (task_id is None):
            raise ValueError("pass exactly one of task_ids (one per env) or task_id (shared by all envs)")
        if max_episode_steps not in (None, horizon):
            raise ValueError(f"{self.ENV_NAME} truncates at horizon={horizon}; use horizon=, got "
                             f"max_episode_steps={max_episode_steps}")
        if num_envs is not None and (isinstance(num_envs, bool) or not isinstance(num_envs, numbers.Integral)
                                     or num_envs < 1):
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        ids = [task_id] * (num_envs or 1) if task_ids is None else list(task_ids)
        if not ids or (num_envs is not None and len(ids) != num_envs):
            raise ValueError(f"task_ids must hold num_envs={num_envs} ids, got {len(ids)}")
        self.task_ids = tuple(check_int(t, f"{self.ENV_NAME} task id") for t in ids)
        first_of_task: dict[int, MetaWorldEnv] = {}

        def make_stream(task_id: int) -> MetaWorldEnv:
            env = self.SINGLE_ENV(task_id, task=task, horizon=horizon, full_info=full_info,
                                  render_mode=render_mode, observation=observation, fast_contacts=fast_contacts,
                                  share_model_with=first_of_task.get(task_id) if share_model else None)
            first_of_task.setdefault(task_id, env)
            return env

        # SyncVectorEnv calls these in order, so each task's first stream exists before its others.
        super().__init__([functools.partial(make_stream, t) for t in self.task_ids],
                         autoreset_mode=AutoresetMode.NEXT_STEP)
        self.horizon = horizon
        self.obs_dim = observation_dim(self.ENV_NAME, task)     # the model view's size, whatever is observed
        self.observation = observation


class ML1Env(MetaWorldEnv):
    """Meta-World ML1: goal variations of one v3 task (``task="reach-v3"``, ...); 100 ids per split seed."""

    ENV_NAME = "ML1"


class ML10Env(MetaWorldEnv):
    """Meta-World ML10: 10 train task types x 50 goals, 5 test types x 50 goals; 750 ids per split seed."""

    ENV_NAME = "ML10"


class ML1VectorEnv(MetaWorldVectorEnv):
    """Streams of `ML1Env`."""

    ENV_NAME = "ML1"
    SINGLE_ENV = ML1Env


class ML10VectorEnv(MetaWorldVectorEnv):
    """Streams of `ML10Env`."""

    ENV_NAME = "ML10"
    SINGLE_ENV = ML10Env


class EpisodeTally:
    """Each stream's finished episodes of a vector env as (return, success at any step), Meta-World's episode
    success. ``sb3_callback`` feeds it from Stable-Baselines3's ``learn(callback=...)`` loop (benchmarks and
    scripts that run SB3 on these envs); ``array()`` is (streams, episodes, 2) once every stream has as many."""

    def __init__(self, num_streams: int):
        self.episodes: list[list[tuple[float, float]]] = [[] for _ in range(num_streams)]
        self._running = np.zeros((num_streams, 2))

    def update(self, rewards, successes, dones) -> None:
        self._running[:, 0] += rewards
        self._running[:, 1] = np.maximum(self._running[:, 1], successes)
        for j in np.flatnonzero(dones):
            self.episodes[j].append((float(self._running[j, 0]), float(self._running[j, 1])))
            self._running[j] = 0.0

    def sb3_callback(self, locals_: dict, _globals: dict) -> bool:
        self.update(locals_["rewards"], [info["success"] for info in locals_["infos"]], locals_["dones"])
        return True

    def array(self) -> np.ndarray:
        return np.array(self.episodes)


def env_id(name: str) -> str:
    """The Gymnasium id registered for benchmark `name` (``dicp_ray/ML1-v0``, ``dicp_ray/ML10-v0``)."""
    return f"dicp_ray/{check_env_name(name)}-v0"


def register_envs() -> None:
    """Register ``dicp_ray/ML1-v0`` and ``dicp_ray/ML10-v0`` (string entry points: nothing is imported)."""
    for name in ENV_NAMES:
        if env_id(name) in gym.registry:
            continue
        gym.register(id=env_id(name), entry_point=f"{__name__}:{name}Env",
                     vector_entry_point=f"{__name__}:{name}VectorEnv", max_episode_steps=None)
