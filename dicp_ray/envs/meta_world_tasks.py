"""What a Meta-World task id means: ids, splits, benchmark construction (cached) and observation sizes.

The facts and the seeding traps behind them are in the docstring of `dicp_ray.envs.meta_world`. The id arithmetic imports nothing heavy; metaworld is imported on first use.
"""
from __future__ import annotations

import difflib
import functools
import importlib.metadata
import logging
import numbers
import os
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "ACTION_DIM", "CACHE_ENV_VAR", "ENV_NAMES", "HAND_DIMS", "HORIZON", "MetaWorldTasks", "OBJECT_DIMS",
    "VARIATIONS_PER_TYPE", "cache_dir", "check_task_arg", "check_task_name", "decode_task_id", "load_tasks",
    "num_objects", "num_tasks", "num_train_tasks", "observation_dim", "split_tasks", "task_names", "task_type",
]

ENV_NAMES = ("ML1", "ML10")
HORIZON = 100                   # the paper's episode length (Meta-World's own is 500)
ACTION_DIM = 4                  # xyz displacement of the hand + gripper effort, each in [-1, 1]
VARIATIONS_PER_TYPE = 50        # goal variations Meta-World draws per task type and split
HAND_DIMS = 4                   # hand xyz + gripper opening
OBJECT_DIMS = 7                 # position (3) + quaternion (4) of one object
_NUM_TRAIN_TYPES = {"ML1": 1, "ML10": 10}
_NUM_TEST_TYPES = {"ML1": 1, "ML10": 5}
CACHE_ENV_VAR = "DICP_RAY_CACHE_DIR"


# ----------------------------------------------------------------------------------------------------------
# Task ids and splits (pure arithmetic, no metaworld import)
# ----------------------------------------------------------------------------------------------------------

def check_env_name(name: str) -> str:
    """`name` if it is a Meta-World benchmark of dicp_ray (ML1, ML10), else a ValueError."""
    if name not in ENV_NAMES:
        raise ValueError(f"unknown Meta-World benchmark {name!r}; valid names are {list(ENV_NAMES)}")
    return name


def check_int(value: Any, what: str) -> int:
    """`value` as an int if it is a non-negative integer (not a bool), else a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def num_train_tasks(name: str) -> int:
    """Train task ids per split seed (ML1 50, ML10 500)."""
    return _NUM_TRAIN_TYPES[check_env_name(name)] * VARIATIONS_PER_TYPE


def num_tasks(name: str) -> int:
    """Task ids per split seed, train then test (ML1 100, ML10 750)."""
    name = check_env_name(name)
    return (_NUM_TRAIN_TYPES[name] + _NUM_TEST_TYPES[name]) * VARIATIONS_PER_TYPE


def decode_task_id(name: str, task_id: int) -> tuple[int, int]:
    """Global task id -> (split seed = benchmark seed, index within that benchmark's train + test tasks)."""
    task_id = check_int(task_id, f"{name} task id")
    return divmod(task_id, num_tasks(name))


def split_tasks(name: str, split_seed: int, train_ratio: float | None = None) -> tuple[list[int], list[int]]:
    """(train_ids, test_ids) of Meta-World benchmark `name` built with seed `split_seed`, as global ids.

    The split is Meta-World's own (train goals / test goals, ML10 train / test task types), so
    ``train_ratio`` must be None. Both lists are sorted plain ints; see the module docstring for the ids.
    """
    split_seed = check_int(split_seed, "split_seed")
    if train_ratio is not None:
        raise ValueError(f"{name} uses Meta-World's own train/test split: train_ratio must be None, "
                         f"got {train_ratio!r}")
    base, num_train = split_seed * num_tasks(name), num_train_tasks(name)
    return list(range(base, base + num_train)), list(range(base + num_train, base + num_tasks(name)))


# ----------------------------------------------------------------------------------------------------------
# Task names and benchmark construction (memoised + pickled under the user cache dir)
# ----------------------------------------------------------------------------------------------------------

@functools.cache
def task_names() -> tuple[str, ...]:
    """Meta-World's v3 task names, in its own order (``metaworld.env_dict.ALL_V3_ENVIRONMENTS``)."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return tuple(ALL_V3_ENVIRONMENTS)


def check_task_name(task: Any) -> str:
    """Return `task` if it is a v3 task name, else raise a ValueError suggesting the nearest names."""
    names = task_names()
    if isinstance(task, str) and task in names:
        return task
    close = difflib.get_close_matches(str(task), names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(f"unknown Meta-World task {task!r}: {hint}valid v3 task names include "
                     f"{', '.join(names[:5])}, ... ({len(names)} in all)")


def check_task_arg(name: str, task: str | None) -> str | None:
    if name == "ML1":
        if task is None:
            raise ValueError("ML1 needs a Meta-World v3 task name, e.g. task='reach-v3'")
        return check_task_name(task)
    if task is not None:
        raise ValueError(f"{name} fixes its own task types: task must be None, got {task!r}")
    return None


@dataclass(frozen=True)
class MetaWorldTasks:
    """The train and test ``metaworld.Task`` lists of one benchmark seed, in Meta-World's order.

    ``tasks[index]`` is the task of index ``index`` (train tasks first); ``types[index]`` its v3 task name.
    """

    name: str
    task: str | None
    seed: int
    tasks: tuple          # metaworld.types.Task (env_name, pickled data), train then test
    train_types: tuple[str, ...]
    test_types: tuple[str, ...]

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(t.env_name for t in self.tasks)


def cache_dir() -> Path | None:
    """Directory of the benchmark pickles, or None when disabled (``DICP_RAY_CACHE_DIR=off``)."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured is not None:
        return None if configured.strip().lower() in ("", "0", "off", "none") else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dicp_ray"


def _metaworld_cache_file(stem: str) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    return root / f"metaworld-{importlib.metadata.version('metaworld')}" / f"{stem}.pkl"


def _write_cache(path: Path, payload: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, path)                           # atomic: concurrent workers never read half a file
    except OSError as err:                              # a read-only home must not stop collection
        logger.warning("cannot write the Meta-World cache %s: %s", path, err)


def _read_cache(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return pickle.loads(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - a stale or corrupt cache is rebuilt, never fatal
        logger.warning("ignoring unreadable Meta-World cache %s: %s", path, err)
        return None


def _build_tasks(name: str, task: str | None, seed: int) -> MetaWorldTasks:
    import metaworld

    bench = metaworld.ML1(task, seed=seed) if name == "ML1" else metaworld.ML10(seed=seed)
    train_types, test_types = tuple(bench.train_classes), tuple(bench.test_classes)
    tasks = (*bench.train_tasks, *bench.test_tasks)
    return MetaWorldTasks(name, task, seed, tasks, train_types, test_types)


def _check_layout(tasks: MetaWorldTasks) -> bool:
    """Tasks come in blocks of 50 variations per type, train types then test types (the id layout)."""
    blocks = [*tasks.train_types, *tasks.test_types]
    return (len(tasks.tasks) == num_tasks(tasks.name)
            and list(tasks.types) == [t for t in blocks for _ in range(VARIATIONS_PER_TYPE)])


def _to_payload(tasks: MetaWorldTasks) -> dict:
    # Plain data only, so a change of MetaWorldTasks never makes an old cache file unreadable.
    return {"format": 1, "name": tasks.name, "task": tasks.task, "seed": tasks.seed,
            "tasks": [(t.env_name, t.data) for t in tasks.tasks],
            "train_types": list(tasks.train_types), "test_types": list(tasks.test_types)}


def _from_payload(payload: Any, name: str, task: str | None, seed: int) -> MetaWorldTasks | None:
    try:
        from metaworld.types import Task

        key = (payload["name"], payload["task"], payload["seed"])
        if payload["format"] != 1 or key != (name, task, seed):
            return None
        tasks = MetaWorldTasks(name, task, seed, tuple(Task(env_name=str(n), data=bytes(d))
                                                       for n, d in payload["tasks"]),
                               tuple(payload["train_types"]), tuple(payload["test_types"]))
    except (KeyError, TypeError, ValueError):
        return None
    return tasks if _check_layout(tasks) else None


@functools.lru_cache(maxsize=64)
def load_tasks(name: str, task: str | None, seed: int) -> MetaWorldTasks:
    """The Meta-World benchmark `name` (ML1 of `task`, or ML10) built with `seed`: memo, disk cache, build."""
    name, seed = check_env_name(name), check_int(seed, "Meta-World benchmark seed")
    task = check_task_arg(name, task)
    path = _metaworld_cache_file(f"{name}-{task}-seed{seed}" if task else f"{name}-seed{seed}")
    cached = _read_cache(path)
    if cached is not None:
        tasks = _from_payload(cached, name, task, seed)
        if tasks is not None:
            return tasks
    tasks = _build_tasks(name, task, seed)
    if not _check_layout(tasks):
        raise RuntimeError(f"metaworld {name}(seed={seed}) does not have 50 variations per task type in "
                           "type order; this dicp_ray version expects metaworld 3.1's layout")
    if path is not None:
        _write_cache(path, _to_payload(tasks))
    return tasks


def task_type(name: str, task_id: int, task: str | None = None) -> str:
    """The v3 task name of a task id (ML1: `task` itself; ML10: from Meta-World's type order)."""
    if check_task_arg(name, task) is not None:
        decode_task_id(name, task_id)
        return task
    from metaworld.env_dict import ML10_V3

    index = decode_task_id(name, task_id)[1] // VARIATIONS_PER_TYPE
    return [*ML10_V3["train"], *ML10_V3["test"]][index]


@functools.cache
def num_objects(task: str) -> int:
    """Objects in the observation of v3 task `task` (1 or 2), read from a freshly built env of it."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    env = ALL_V3_ENVIRONMENTS[check_task_name(task)]()
    try:
        positions = np.asarray(env._get_pos_objects())        # 3 numbers per object, task set or not
    finally:
        env.close()
    return int(positions.size // 3)


def observation_dim(name: str, task: str | None = None) -> int:
    """Observation length of benchmark `name`: 4 + 7 per object, the maximum over its task types.

    ML1: 11, or 18 for hammer / stick-push / stick-pull. ML10: 11. Task types with fewer objects than the
    maximum carry Meta-World's zero padding in the extra dims.
    """
    if check_task_arg(check_env_name(name), task) is not None:
        types = (task,)
    else:
        from metaworld.env_dict import ML10_V3

        types = (*ML10_V3["train"], *ML10_V3["test"])
    return HAND_DIMS + OBJECT_DIMS * max(num_objects(t) for t in types)
