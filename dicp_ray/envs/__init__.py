"""Environments of dicp_ray; importing this package registers them with Gymnasium.

Registered ids (``gymnasium.make(id, task_id=i)``, ``gymnasium.make_vec(id, num_envs=N, task_ids=[...])``):
``dicp_ray/Darkroom-v0``, ``dicp_ray/DarkKeyToDoor-v0``, ``dicp_ray/DarkroomPermuted-v0``, and Meta-World's
``dicp_ray/ML1-v0`` (also ``task="reach-v3"``) and ``dicp_ray/ML10-v0`` (`meta_world`; metaworld itself is
imported only when one is built). The envs truncate themselves at the horizon, so they are registered
without a TimeLimit wrapper (``max_episode_steps=None``); ``make_vec`` uses the numpy-batched
`GridVectorEnv` (grid worlds) or `MetaWorldVectorEnv` by default.
"""

from __future__ import annotations

import gymnasium

from dicp_ray.envs import meta_world
from dicp_ray.envs.grid import (
    MOVES,
    NUM_ACTIONS,
    PERMUTATIONS,
    DarkKeyToDoor,
    DarkKeyToDoorVectorEnv,
    Darkroom,
    DarkroomPermuted,
    DarkroomPermutedVectorEnv,
    DarkroomVectorEnv,
    GridEnv,
    GridTasks,
    GridVectorEnv,
    check_actions,
    check_task_ids,
    make_tasks,
    max_return,
    max_returns,
    optimal_action,
    oracle_actions,
    transition,
)
from dicp_ray.envs.splits import (
    GRID_SIZE,
    GRID_SPECS,
    GridSpec,
    cell_index,
    cell_obs,
    grid_spec,
    is_meta_world,
    split_tasks,
)

__all__ = [
    "GRID_SIZE", "GRID_SPECS", "MOVES", "NUM_ACTIONS", "PERMUTATIONS", "DarkKeyToDoor",
    "DarkKeyToDoorVectorEnv", "Darkroom", "DarkroomPermuted", "DarkroomPermutedVectorEnv",
    "DarkroomVectorEnv",
    "GridEnv", "GridSpec", "GridTasks", "GridVectorEnv", "cell_index", "cell_obs",
    "check_actions", "check_task_ids", "grid_spec", "is_meta_world",
    "make_tasks", "meta_world", "max_return", "max_returns",
    "optimal_action", "oracle_actions", "register_envs", "split_tasks", "transition",
]


def register_envs() -> None:
    """Register the grid worlds with Gymnasium; a no-op for ids that are already registered."""
    for spec in GRID_SPECS.values():
        # Guard: re-registering warns in Gymnasium, and Ray workers / test reloads import this repeatedly.
        if spec.env_id in gymnasium.registry:
            continue
        gymnasium.register(
            id=spec.env_id,
            entry_point=f"dicp_ray.envs.grid:{spec.name}",
            vector_entry_point=f"dicp_ray.envs.grid:{spec.name}VectorEnv",
            max_episode_steps=None,
        )
    meta_world.register_envs()


register_envs()
