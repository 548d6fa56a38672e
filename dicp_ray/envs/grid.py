"""The three 9x9 grid worlds (Darkroom, Dark Key-to-Door, Darkroom-Permuted): single and batched envs.

The dynamics, rewards and oracles are written ONCE as numpy functions over a batch of N copies
(`transition`, `oracle_actions`, `max_returns`). The single `gymnasium.Env` classes run them with N = 1
and `GridVectorEnv` with N = num_envs, so the two cannot drift apart.

Conventions (see docs/architecture.md): observation = agent cell ``(x, y)`` as int64, actions
0 +x, 1 -x, 2 +y, 3 -y, 4 stay (the authors' release's labels, ``release:gridworld/env/darkroom.py:85``),
moves into a wall leave the agent in place. Permuted: action ``a`` executes move ``perm[a]``, with
``perm = itertools.permutations(range(5))[task_id]``, so task i is the release's permutation i.
A cell counts as *reached* on a step whose resulting position is that cell, staying on it included; the start cell at reset is not "reached" until a step lands on it. Episodes
never terminate; they truncate on the horizon-th step.

Key-to-Door rule, also for key == door: the key reward is paid on the first step that lands on the key
cell; the door reward on the first step that lands on the door cell while the key was already held
*before* that step. With key == door the agent therefore collects the key on arrival and the door on
the next step it stays there.

Oracle tie-break (deterministic, the release's ``get_optimal_action``): close the x gap first (+x, then
-x), then the y gap (+y, then -y), else stay. Key-to-Door targets the key until it is held, then the door,
also after the door has paid (the release's oracle points back to the door and stays on it; DPT's a* labels
come from this oracle).
"""

from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from dicp_ray.envs.splits import GRID_SIZE, cell_obs, grid_spec

NUM_ACTIONS = 5
# Row m is the displacement of move m: 0 +x, 1 -x, 2 +y, 3 -y, 4 stay (the release's order).
MOVES = np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [0, 0]], dtype=np.int64)
STAY = 4
# Row i is the action -> executed-move map of DarkroomPermuted task i.
PERMUTATIONS = np.array(list(itertools.permutations(range(NUM_ACTIONS))), dtype=np.int64)
_INVERSE_PERMUTATIONS = np.argsort(PERMUTATIONS, axis=1)
_IDENTITY = np.arange(NUM_ACTIONS, dtype=np.int64)
CENTRE = (4, 4)
PERMUTED_GOAL = (8, 8)
_STARTS = {"Darkroom": CENTRE, "DarkKeyToDoor": CENTRE, "DarkroomPermuted": (0, 0)}


def check_task_ids(name: str, task_ids: Any, scalar: bool = False) -> np.ndarray:
    """Validate task id(s) of grid world `name` (one int if `scalar`) -> int64 array of the input's shape."""
    num = grid_spec(name).num_tasks
    arr = np.asarray(task_ids)
    bad_type = isinstance(task_ids, bool) or arr.dtype.kind not in "iu" or (scalar and arr.ndim != 0)
    if bad_type or arr.size == 0 or np.any(arr < 0) or np.any(arr >= num):
        want = "an int" if scalar else "integers"
        raise ValueError(f"invalid {name} task id(s) {task_ids!r}: expected {want} in 0..{num - 1}")
    return arr.astype(np.int64)


def check_actions(actions: Any, size: int | None = None) -> np.ndarray:
    """Validate action(s): integers in 0..4, exactly one if `size` is None else shape (size,) -> int64."""
    if size is None and type(actions) in (int, np.int64) and 0 <= actions < NUM_ACTIONS:
        return np.array(actions, dtype=np.int64)  # fast path for the common single-env call
    arr = np.asarray(actions)
    ok = not isinstance(actions, bool) and arr.dtype.kind in "iu"
    ok = ok and (arr.size == 1 if size is None else arr.shape == (size,))
    if not ok or np.any(arr < 0) or np.any(arr >= NUM_ACTIONS):
        want = "an integer" if size is None else f"{size} integers"
        raise ValueError(f"invalid action(s) {actions!r}: expected {want} in 0..{NUM_ACTIONS - 1}")
    return arr.astype(np.int64)


@dataclass(frozen=True)
class GridTasks:
    """Per-copy task parameters of a batch of N grid-world copies (all arrays have leading dim N).

    ``goal`` is the Darkroom/Permuted goal or the Key-to-Door key cell; ``door`` is the Key-to-Door door
    (equal to ``goal`` otherwise); ``perm``/``inv_perm`` map action <-> executed move.
    """

    name: str
    horizon: int
    task_ids: np.ndarray
    start: np.ndarray
    goal: np.ndarray
    door: np.ndarray
    perm: np.ndarray
    inv_perm: np.ndarray


def make_tasks(name: str, task_ids: Any) -> GridTasks:
    """Build the `GridTasks` of a 1-D sequence of (validated) task ids of grid world `name`."""
    ids = check_task_ids(name, task_ids).reshape(-1)
    n = ids.shape[0]
    start = np.tile(np.array(_STARTS[name], dtype=np.int64), (n, 1))
    perm, inv_perm = np.tile(_IDENTITY, (n, 1)), np.tile(_IDENTITY, (n, 1))
    if name == "Darkroom":
        goal = door = cell_obs(ids)
    elif name == "DarkKeyToDoor":
        goal, door = cell_obs(ids // (GRID_SIZE * GRID_SIZE)), cell_obs(ids % (GRID_SIZE * GRID_SIZE))
    else:
        goal = door = np.tile(np.array(PERMUTED_GOAL, dtype=np.int64), (n, 1))
        perm, inv_perm = PERMUTATIONS[ids], _INVERSE_PERMUTATIONS[ids]
    return GridTasks(name, grid_spec(name).horizon, ids, start, goal, door, perm, inv_perm)


def transition(
    tasks: GridTasks, pos: np.ndarray, has_key: np.ndarray, door_done: np.ndarray, actions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One step of N copies -> (next_pos, next_has_key, next_door_done, reward float64). Pure function."""
    # (np.minimum/np.maximum and explicit column compares: np.clip and .all(axis) cost µs at N = 1)
    moves = tasks.perm[np.arange(actions.shape[0]), actions] if tasks.name == "DarkroomPermuted" else actions
    new_pos = np.minimum(np.maximum(pos + MOVES[moves], 0), GRID_SIZE - 1)
    on_goal = (new_pos[:, 0] == tasks.goal[:, 0]) & (new_pos[:, 1] == tasks.goal[:, 1])
    if tasks.name != "DarkKeyToDoor":
        return new_pos, has_key, door_done, on_goal.astype(np.float64)
    on_door = (new_pos[:, 0] == tasks.door[:, 0]) & (new_pos[:, 1] == tasks.door[:, 1])
    key_reward = on_goal & ~has_key
    # `has_key` is the state BEFORE this step, so with key == door the door pays one step after the key.
    door_reward = on_door & has_key & ~door_done
    reward = key_reward.astype(np.float64) + door_reward
    return new_pos, has_key | on_goal, door_done | door_reward, reward


def oracle_actions(tasks: GridTasks, pos: np.ndarray, has_key: np.ndarray) -> np.ndarray:
    """Optimal action of each copy (int64, shape (N,)), using the module's documented tie-break.

    Key-to-Door needs only whether the key is held: after the door has paid the oracle still heads for
    the door (and stays on it), as the release's does.
    """
    target = tasks.goal
    if tasks.name == "DarkKeyToDoor":
        target = np.where(has_key[:, None], tasks.door, tasks.goal)
    dx, dy = (target - pos).T
    moves = np.select([dx > 0, dx < 0, dy > 0, dy < 0], [0, 1, 2, 3], default=STAY)
    return tasks.inv_perm[np.arange(moves.shape[0]), moves]


def max_returns(tasks: GridTasks) -> np.ndarray:
    """Maximum achievable return of each copy's task (float64, shape (N,))."""
    horizon = tasks.horizon
    to_goal = np.abs(tasks.goal - tasks.start).sum(axis=1)
    if tasks.name != "DarkKeyToDoor":
        return np.clip(horizon + 1 - to_goal, 0, horizon).astype(np.float64)
    # A cell pays only on a step that lands on it: at least one step each, even at distance 0.
    key_step = np.maximum(to_goal, 1)
    door_step = key_step + np.maximum(np.abs(tasks.door - tasks.goal).sum(axis=1), 1)
    return (key_step <= horizon).astype(np.float64) + (door_step <= horizon)


def max_return(name: str, task_id: Any) -> float | np.ndarray:
    """Maximum achievable return of task(s) `task_id` of grid world `name`; a float for one id."""
    ids = check_task_ids(name, task_id)
    returns = max_returns(make_tasks(name, ids.reshape(-1))).reshape(ids.shape)
    return float(returns) if returns.ndim == 0 else returns


def optimal_action(name: str, task_id: Any, obs: Any, has_key: Any = False) -> int | np.ndarray:
    """Oracle action(s) in cell(s) `obs` ``(..., 2)``; all arguments broadcast. An int for one state."""
    ids = check_task_ids(name, task_id)
    pos = np.asarray(obs)
    if pos.shape[-1:] != (2,) or pos.dtype.kind not in "iu" or np.any((pos < 0) | (pos >= GRID_SIZE)):
        raise ValueError(f"obs must be integer cells (..., 2) with values in 0..{GRID_SIZE - 1}, got {obs!r}")
    shape = np.broadcast_shapes(ids.shape, pos.shape[:-1], np.shape(has_key))
    tasks = make_tasks(name, np.broadcast_to(ids, shape).reshape(-1))
    flat_pos = np.broadcast_to(pos, (*shape, 2)).reshape(-1, 2).astype(np.int64)
    keys = np.broadcast_to(np.asarray(has_key, dtype=bool), shape).reshape(-1)
    actions = oracle_actions(tasks, flat_pos, keys).reshape(shape)
    return int(actions) if actions.ndim == 0 else actions


class _GridState:
    """Mutable state of N copies plus the shared reset/step logic used by both env classes."""

    def __init__(self, name: str, task_ids: Any):
        self.tasks = make_tasks(name, task_ids)
        n = self.tasks.task_ids.shape[0]
        self.pos = self.tasks.start.copy()
        self.has_key = np.zeros(n, dtype=bool)
        self.door_done = np.zeros(n, dtype=bool)
        self.t = np.zeros(n, dtype=np.int64)

    def reset(self, mask: np.ndarray | slice = slice(None)) -> None:
        """Put the selected copies back at their start state."""
        self.pos[mask] = self.tasks.start[mask]
        self.has_key[mask] = False
        self.door_done[mask] = False
        self.t[mask] = 0

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Advance every copy by one validated action -> (rewards, truncated)."""
        self.pos, self.has_key, self.door_done, reward = transition(
            self.tasks, self.pos, self.has_key, self.door_done, actions
        )
        self.t += 1
        return reward, self.t >= self.tasks.horizon

    def optimal_actions(self) -> np.ndarray:
        """Oracle action of every copy in its current state."""
        return oracle_actions(self.tasks, self.pos, self.has_key)


class GridEnv(gym.Env):
    """Single grid-world task (abstract: subclasses set ENV_NAME). Construct with ``task_id=i``."""

    ENV_NAME = ""
    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, task_id: int, render_mode: str | None = None):
        self.task_id = int(check_task_ids(self.ENV_NAME, task_id, scalar=True))
        self._state = _GridState(self.ENV_NAME, [self.task_id])
        self.horizon = self._state.tasks.horizon
        self.observation_space = spaces.Box(0, GRID_SIZE - 1, (2,), np.int64)
        self.action_space = spaces.Discrete(NUM_ACTIONS)
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.render_mode = render_mode

    @property
    def has_key(self) -> bool:
        """Whether the key is held (always False outside Key-to-Door)."""
        return bool(self._state.has_key[0])

    @property
    def elapsed_steps(self) -> int:
        """Steps taken in the current episode."""
        return int(self._state.t[0])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start a new episode; `seed` only seeds ``np_random`` (the dynamics are deterministic)."""
        super().reset(seed=seed)
        self._state.reset()
        return self._state.pos[0].copy(), self._info()

    def step(self, action: Any):
        """Apply `action`; returns (obs, reward, terminated=False, truncated, info)."""
        if self._state.t[0] >= self.horizon:
            raise RuntimeError(f"episode already truncated after {self.horizon} steps; call reset()")
        act = check_actions(action).reshape(1)
        reward, truncated = self._state.step(act)
        return self._state.pos[0].copy(), float(reward[0]), False, bool(truncated[0]), self._info()

    def optimal_action(self) -> int:
        """Oracle action in the current state (see module docstring for the tie-break)."""
        return int(self._state.optimal_actions()[0])

    def max_return(self) -> float:
        """Maximum achievable return of this task."""
        return float(max_returns(self._state.tasks)[0])

    def render(self) -> str | None:
        """ASCII picture: A agent, G goal, K key, D door, . empty; rows are x, columns y."""
        if self.render_mode != "ansi":
            return None
        tasks, rows = self._state.tasks, [["."] * GRID_SIZE for _ in range(GRID_SIZE)]
        if self.ENV_NAME == "DarkKeyToDoor":
            rows[tasks.door[0, 0]][tasks.door[0, 1]] = "D"
        rows[tasks.goal[0, 0]][tasks.goal[0, 1]] = "K" if self.ENV_NAME == "DarkKeyToDoor" else "G"
        rows[self._state.pos[0, 0]][self._state.pos[0, 1]] = "A"
        return "\n".join("".join(r) for r in rows)

    def _info(self) -> dict[str, Any]:
        return {"has_key": self.has_key} if self.ENV_NAME == "DarkKeyToDoor" else {}


class GridVectorEnv(VectorEnv):
    """numpy-batched copies of one grid world, possibly with a different task per copy.

    ``task_ids`` (length ``num_envs``; repeats allowed = several streams of one task) or ``task_id``
    (all copies the same task). NEXT_STEP autoreset exactly like ``SyncVectorEnv``: the step after a
    truncation resets those copies, ignores (and does not validate) their actions, and returns reward
    0, truncated False and the start observation. ``make_vec`` defaults to num_envs=1, so pass it.
    """

    ENV_NAME = ""
    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int | None = None, task_ids: Any = None, task_id: int | None = None,
                 max_episode_steps: int | None = None, render_mode: str | None = None):
        ids = _vector_task_ids(self.ENV_NAME, num_envs, task_ids, task_id)
        self._state = _GridState(self.ENV_NAME, ids)
        self.task_ids = self._state.tasks.task_ids
        self.task_ids.flags.writeable = False
        self.horizon = self._state.tasks.horizon
        if max_episode_steps not in (None, self.horizon):
            raise ValueError(f"{self.ENV_NAME} has a fixed horizon {self.horizon}, got {max_episode_steps}")
        if render_mode is not None:
            raise ValueError(f"GridVectorEnv does not render, got render_mode={render_mode!r}")
        self.num_envs = int(ids.shape[0])
        self.single_observation_space = spaces.Box(0, GRID_SIZE - 1, (2,), np.int64)
        self.single_action_space = spaces.Discrete(NUM_ACTIONS)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)

    has_key = property(lambda self: self._state.has_key.copy(), doc="(N,) key held (Key-to-Door).")
    door_done = property(lambda self: self._state.door_done.copy(), doc="(N,) door reward paid.")
    elapsed_steps = property(lambda self: self._state.t.copy(), doc="(N,) steps in current episode.")

    def reset(self, *, seed: int | list | None = None, options: dict | None = None):
        """Reset all copies, or those in ``options["reset_mask"]``; `seed` only seeds ``np_random``."""
        if seed is not None:
            first = seed[0] if isinstance(seed, (list, tuple)) else seed
            self._np_random, self._np_random_seed = seeding.np_random(first)
        mask = (options or {}).get("reset_mask")
        if mask is None:
            mask = np.ones(self.num_envs, dtype=bool)
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (self.num_envs,):
            raise ValueError(f"reset_mask must be a bool array of shape ({self.num_envs},)")
        self._state.reset(mask)
        self._autoreset[mask] = False
        return self._state.pos.copy(), self._info()

    def step(self, actions: Any):
        """Step all copies at once -> (obs, rewards, terminations, truncations, infos)."""
        resetting = self._autoreset.copy()
        acts = np.asarray(actions)
        if resetting.any() and acts.shape == (self.num_envs,) and acts.dtype.kind in "iu":
            acts = np.where(resetting, 0, acts)  # these actions are ignored, so never reject them
        acts = check_actions(acts, self.num_envs)
        rewards, truncated = self._state.step(acts)
        if resetting.any():
            self._state.reset(resetting)
            rewards[resetting] = 0.0
            truncated = truncated & ~resetting
        self._autoreset = truncated.copy()
        terminated = np.zeros(self.num_envs, dtype=bool)
        return self._state.pos.copy(), rewards, terminated, truncated, self._info()

    def optimal_actions(self) -> np.ndarray:
        """(N,) oracle action of every copy in its current state."""
        return self._state.optimal_actions()

    def max_returns(self) -> np.ndarray:
        """(N,) maximum achievable return of every copy's task."""
        return max_returns(self._state.tasks)

    def _info(self) -> dict[str, Any]:
        if self.ENV_NAME != "DarkKeyToDoor":
            return {}
        return {"has_key": self._state.has_key.copy(), "_has_key": np.ones(self.num_envs, dtype=bool)}


def _vector_task_ids(name: str, num_envs: int | None, task_ids: Any, task_id: Any) -> np.ndarray:
    """Resolve the (num_envs, task_ids, task_id) constructor arguments into a 1-D task-id array."""
    if (task_ids is None) == (task_id is None):
        raise ValueError("pass exactly one of task_ids (one per env) or task_id (shared by all envs)")
    if num_envs is not None and (isinstance(num_envs, bool) or not isinstance(num_envs, numbers.Integral)
                                 or num_envs < 1):
        raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
    if task_ids is None:
        return np.full(1 if num_envs is None else num_envs, check_task_ids(name, task_id, True), np.int64)
    ids = check_task_ids(name, task_ids)
    if ids.ndim != 1 or (num_envs is not None and ids.shape[0] != num_envs):
        raise ValueError(f"task_ids must be a 1-D sequence of length num_envs={num_envs}, got {ids.shape}")
    return ids


class Darkroom(GridEnv):
    """Darkroom: reach the hidden goal ``(i // 9, i % 9)`` from the centre; +1 every step on it; H = 20."""

    ENV_NAME = "Darkroom"


class DarkKeyToDoor(GridEnv):
    """Dark Key-to-Door: key cell ``i // 81``, door cell ``i % 81``; +1 key, then +1 door; H = 50."""

    ENV_NAME = "DarkKeyToDoor"


class DarkroomPermuted(GridEnv):
    """Darkroom-Permuted: (0,0) -> (8,8) with actions remapped by permutation ``i``; H = 50."""

    ENV_NAME = "DarkroomPermuted"


class DarkroomVectorEnv(GridVectorEnv):
    """Batched `Darkroom`."""

    ENV_NAME = "Darkroom"


class DarkKeyToDoorVectorEnv(GridVectorEnv):
    """Batched `DarkKeyToDoor`."""

    ENV_NAME = "DarkKeyToDoor"


class DarkroomPermutedVectorEnv(GridVectorEnv):
    """Batched `DarkroomPermuted`."""

    ENV_NAME = "DarkroomPermuted"
