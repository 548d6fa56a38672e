"""Static facts about the three grid worlds (specs, cell encoding) and their train/test task splits.

`GRID_SPECS` is the single table other stages read (horizon, task count, default planning depth, ...), so
nothing downstream hard-codes these numbers. `split_tasks` turns a split seed into disjoint, covering
train/test task-id lists exactly as the authors' release does (``release:gridworld/dataset.py:25-34``):
shuffle the list 0..N-1 with Python's `random` seeded with the split seed and take the first
`round(N * ratio)` as train. The release's `sample_darkroom`, `sample_dark_key_to_door` and
`sample_darkroom_permuted` shuffle goals, (key, door) pairs and permutations listed in the same order as
our task ids (Key-to-Door id ``key * 81 + door``), so split seed s here is the release's ``env_split_seed``
s. The paper's curves use seed 0 on Darkroom and 4 on Key-to-Door and Permuted (release
``gridworld/cfg/env/*.yaml``). This module imports only numpy and the stdlib, so config validation and
data code can use it without gymnasium.
"""

from __future__ import annotations

import numbers
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GRID_SIZE", "GridSpec", "GRID_SPECS", "cell_index", "cell_obs", "grid_spec", "is_meta_world",
           "split_tasks"]

GRID_SIZE = 9  # every grid world is GRID_SIZE x GRID_SIZE; cell (x, y) has index x * GRID_SIZE + y


@dataclass(frozen=True)
class GridSpec:
    """Static description of one grid-world family.

    Attributes:
        name: short name used in configs (``"Darkroom"``, ...).
        env_id: the Gymnasium id registered by ``import dicp_ray.envs``.
        num_tasks: number of task ids (valid ids are ``0 .. num_tasks - 1``).
        horizon: episode length; episodes always end by truncation at this step.
        train_ratio: default fraction of tasks used for training.
        obs_dim: observation length (the agent cell ``(x, y)``).
        num_actions: size of the discrete action space.
        num_cells: number of grid cells, i.e. classes of the next-observation target.
        default_plan_depth: default beam-search depth of the planner for this env.
    """

    name: str
    env_id: str
    num_tasks: int
    horizon: int
    train_ratio: float
    obs_dim: int = 2
    num_actions: int = 5
    num_cells: int = 81
    default_plan_depth: int = 8


GRID_SPECS: dict[str, GridSpec] = {
    "Darkroom": GridSpec("Darkroom", "dicp_ray/Darkroom-v0", 81, 20, 0.9, default_plan_depth=8),
    "DarkKeyToDoor": GridSpec(
        "DarkKeyToDoor", "dicp_ray/DarkKeyToDoor-v0", 81 * 81, 50, 0.95, default_plan_depth=16
    ),
    "DarkroomPermuted": GridSpec(
        "DarkroomPermuted", "dicp_ray/DarkroomPermuted-v0", 120, 50, 0.9, default_plan_depth=16
    ),
}


def cell_index(obs: Any) -> int | np.ndarray:
    """Map cell(s) ``(x, y)`` (shape ``(..., 2)``) to index ``x * 9 + y``; an int for a single cell."""
    arr = np.asarray(obs)
    if arr.shape[-1:] != (2,):
        raise ValueError(f"cell_index expects shape (..., 2), got {arr.shape}")
    if arr.dtype.kind == "f":  # dataset observations are float32 copies of integer cells
        arr = np.rint(arr)
    idx = arr[..., 0].astype(np.int64) * GRID_SIZE + arr[..., 1].astype(np.int64)
    return int(idx) if idx.ndim == 0 else idx


def cell_obs(cell: Any) -> np.ndarray:
    """Inverse of `cell_index`: index(es) ``c`` -> int64 array ``(..., 2)`` of ``(c // 9, c % 9)``."""
    c = np.asarray(cell)
    if c.dtype.kind not in "iu" or np.any(c < 0) or np.any(c >= GRID_SIZE * GRID_SIZE):
        raise ValueError(f"cell index must be an integer in 0..{GRID_SIZE ** 2 - 1}, got {cell!r}")
    c = c.astype(np.int64)
    return np.stack([c // GRID_SIZE, c % GRID_SIZE], axis=-1)


def grid_spec(name: str) -> GridSpec:
    """Return the `GridSpec` for `name`, raising a ValueError that lists the valid names otherwise."""
    try:
        return GRID_SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown grid world {name!r}; valid names are {sorted(GRID_SPECS)}"
        ) from None


def is_meta_world(name: str) -> bool:
    """True for the Meta-World benchmarks (``"ML1"``, ``"ML10"``), whose facts live in `meta_world`."""
    return name in ("ML1", "ML10")


def split_tasks(
    name: str, split_seed: int, train_ratio: float | None = None
) -> tuple[list[int], list[int]]:
    """Split the task ids of environment `name` into (train_ids, test_ids).

    Grid worlds: the list of ids 0..N-1 is shuffled with ``random.Random(split_seed).shuffle`` (the same
    order as the release's ``random.seed(split_seed); random.shuffle(...)``, without touching the global
    RNG) and the first ``round(N * train_ratio)`` become train ids, the rest test ids. Both lists are
    returned sorted, as plain Python ints. The result depends only on (name, split_seed, train_ratio).
    Meta-World (``"ML1"``, ``"ML10"``): Meta-World's own split of the benchmark built with seed
    `split_seed`, as global ids (`dicp_ray.envs.meta_world_tasks.split_tasks`); `train_ratio` must be None.

    Args:
        name: one of ``GRID_SPECS`` (``"Darkroom"``, ``"DarkKeyToDoor"``, ``"DarkroomPermuted"``), ``"ML1"``
            or ``"ML10"``.
        split_seed: non-negative integer seed of the shuffle.
        train_ratio: fraction of train tasks in the open interval (0, 1); defaults to the spec's ratio.

    Raises:
        ValueError: unknown name, invalid seed, a ratio outside (0, 1), or one leaving a side empty.
    """
    if is_meta_world(name):
        import dicp_ray.envs.meta_world_tasks as meta_world_tasks  # numpy only; it never imports splits

        return meta_world_tasks.split_tasks(name, split_seed, train_ratio)
    spec = grid_spec(name)
    if isinstance(split_seed, bool) or not isinstance(split_seed, numbers.Integral) or split_seed < 0:
        raise ValueError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    ratio = spec.train_ratio if train_ratio is None else train_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"train_ratio must be a number in the open interval (0, 1), got {ratio!r}")
    order = list(range(spec.num_tasks))
    random.Random(int(split_seed)).shuffle(order)
    num_train = int(round(spec.num_tasks * float(ratio)))
    if not 0 < num_train < spec.num_tasks:
        raise ValueError(
            f"train_ratio={ratio!r} leaves an empty train or test split for {name} ({spec.num_tasks} tasks)"
        )
    train = sorted(int(i) for i in order[:num_train])
    test = sorted(int(i) for i in order[num_train:])
    return train, test
