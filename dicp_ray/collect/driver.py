"""Stage 1: learning histories. PPO (or SAC) learners as Ray tasks (or local processes), each writing its tasks' shards.

``collect.learner`` picks the learner: for PPO (default ``auto``) a *population* of task learners per Ray task, one
stacked network per core, equal to SB3's PPO per learner: `dicp_ray.collect.population_learner` on the grid worlds
(at N = 81 14-16x SB3's and 21-33x the RLlib learner's steps per CPU-second, bench_collect.py),
`dicp_ray.collect.population_meta_world` on Meta-World (1.5-1.9x SB3 on reach and pick-place,
bench_meta_world_ppo.py); for SAC, and with ``learner: rllib``, one RLlib learner per task
(`dicp_ray.collect.rllib_learner`, the reference).

Run it with ``dicp-ray collect --config tune_configs/<env>.yaml --output DIR`` or from Python::

    collect_histories(load_config("tune_configs/smoke.yaml"), "runs/smoke/dataset")

This module is the driver: which tasks, the dataset fingerprint, resume, a bounded fan-out of learners over Ray
(``collect.backend: ray``) or over a local process pool without Ray (``local``: one process per core,
population learners only) with one progress bar, ``collect/*`` scalars in ``DIR/tb``, ``DIR/source_returns.png`` and the manifest, written
last. Re-running the same command resumes: shards whose sidecar and sha256 check out are kept, anything else is
deleted and re-collected; a task's shard does not depend on which learner process ran it.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Iterator

import numpy as np

from dicp_ray import envs
from dicp_ray.collect.fingerprint import _collect_settings, _env_settings, data_fingerprint, resolved_learner
from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.data import shards
from dicp_ray.envs import meta_world_tasks
from dicp_ray.runtime import provenance

logger = logging.getLogger(__name__)


# Driver: which tasks, resume, bounded fan-out over Ray, curves, manifest
# ----------------------------------------------------------------------------------------------------------

def collection_task_ids(config: ExperimentConfig) -> list[int]:
    """Sorted union over split seeds of the (capped) train ids, plus the (capped) test ids if requested."""
    env = config.env
    ids: set[int] = set()
    for split_seed in env.split_seeds:
        train, test = envs.split_tasks(env.name, split_seed, env.train_ratio)
        ids.update(train[:env.max_train_tasks])
        if config.collect.include_test_tasks:
            ids.update(test[:env.max_test_tasks])
    return sorted(ids)


def _check_existing(dataset_dir: str, fingerprint: str) -> None:
    try:
        manifest = shards.read_manifest(dataset_dir)
    except FileNotFoundError:
        return
    if manifest.get("fingerprint") != fingerprint:
        raise ValueError(f"{dataset_dir} holds a dataset collected with different env/collect settings "
                         f"(fingerprint {manifest.get('fingerprint')} != {fingerprint}); use another "
                         "--output or delete that directory")


def _action_facts(config: ExperimentConfig) -> dict[str, Any]:
    """obs_dim and the action description of the manifest, from the env (Meta-World: 11 or 18 dims)."""
    env = config.env
    if env.is_meta_world:
        return {"obs_dim": meta_world_tasks.observation_dim(env.name, env.task), "num_actions": None,
                "action_type": "continuous", "action_dim": meta_world_tasks.ACTION_DIM, "env_task": env.task}
    spec = envs.grid_spec(env.name)
    return {"obs_dim": spec.obs_dim, "num_actions": spec.num_actions, "action_type": "discrete"}


def _write_manifest(config: ExperimentConfig, dataset_dir: str, task_ids: list[int], sidecars: list[dict],
                    complete: bool) -> dict:
    return shards.write_manifest(
        dataset_dir, env_name=config.env.name, **_action_facts(config), task_ids=task_ids, shards=sidecars,
        collect_config=_collect_settings(config),
        seeds={"collect_seed": config.collect.seed, "learner_seed": "collect.seed + task_id",
               "split_seeds": list(config.env.split_seeds), "env": _env_settings(config)},
        provenance=provenance(), fingerprint=data_fingerprint(config), complete=complete)


def _run_learners(config: ExperimentConfig, dataset_dir: str, todo: list[int], writer: Any,
                  progress: bool, done_before: int, total: int) -> list[dict]:
    """Run the learners of `todo` on collect.backend -> the sidecars of the shards they wrote.

    Population learners (grid worlds): the tasks are split into populations, one per CPU, each a Ray task with
    at most ~2x cluster CPUs in flight (ray) or a job of a process pool of one process per core (local). RLlib
    learners (Ray only): one Ray task per task.
    """
    from dicp_ray.collect.population_learner import population_sizes

    c = config.collect
    if c.backend == "local":
        cpus = config.resources.num_cpus or os.cpu_count() or 1
    else:
        import ray

        from dicp_ray.runtime import init_ray

        init_ray(config.resources)
        cpus = ray.cluster_resources().get("CPU", 1)
    if resolved_learner(config) == "population":
        cap = None
        if config.env.is_meta_world:
            from dicp_ray.collect.population_meta_world import MAX_TASKS_PER_POPULATION as cap
        sizes = population_sizes(len(todo), cpus / c.num_cpus_per_learner, c.tasks_per_population,
                                 **({"max_size": cap} if cap else {}))
        bounds = np.cumsum([0, *sizes])
        queue = [todo[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        if c.backend == "local":
            results = _in_pool(queue, config, dataset_dir, max(1, int(cpus)))
        else:
            results = _in_flight(_population_remote(config), queue, config, dataset_dir, _max_in_flight(cpus, c))
        # one bar over env steps, fed by every population as it learns
        return _run_populations(results, queue, config, dataset_dir, writer, progress)
    from tqdm.auto import tqdm

    from dicp_ray.collect.rllib_learner import _learn_task_remote

    remote = _learn_task_remote.options(**_ray_options(c))
    sidecars, start, env_steps = [], math.inf, 0
    with tqdm(total=total, initial=done_before, desc="collect learners", unit="learner",
              disable=not progress) as bar:
        for sidecar in _in_flight(remote, list(todo), config, dataset_dir, _max_in_flight(cpus, c)):
            sidecars.append(sidecar)
            env_steps += sidecar["env_steps"]
            start = learning_start(start, sidecar, time.perf_counter())
            bar.set_postfix(env_steps_per_s=f"{_log_rate(writer, env_steps, start):,.0f}")
            bar.update(1)
    return sidecars


def _ray_options(c) -> dict:
    return {"num_cpus": c.num_cpus_per_learner, "max_retries": c.max_retries, "retry_exceptions": False}


def _max_in_flight(cpus: float, c) -> int:
    return max(1, int(2 * cpus / c.num_cpus_per_learner))


def _population_remote(config: ExperimentConfig):
    """The env's population learner as a Ray task (made here, so importing a learner module never imports Ray):
    `learn_population` (grid worlds) or `learn_meta_world_population`."""
    import ray

    if config.env.is_meta_world:
        from dicp_ray.collect.population_meta_world import learn_meta_world_population as learn
    else:
        from dicp_ray.collect.population_learner import learn_population as learn
    return ray.remote(learn).options(**_ray_options(config.collect))


def _in_flight(remote, queue: list, config: ExperimentConfig, dataset_dir: str, max_in_flight: int) -> Iterator[dict]:
    """Run every item of `queue` (a task id, or a population's task ids) as a Ray task, at most `max_in_flight` at
    once; yields the sidecar of every shard written, as its task finishes."""
    import ray

    queue, pending = list(queue), {}
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            item = queue.pop(0)
            pending[remote.remote(config, item, dataset_dir)] = item
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            del pending[ref]
            result = ray.get(ref)
            yield from (result if isinstance(result, list) else [result])


def _in_pool(queue: list[list[int]], config: ExperimentConfig, dataset_dir: str, workers: int) -> Iterator[dict]:
    """Run every population of `queue` in a local process pool of `workers` processes (no Ray); yields the
    sidecar of every shard written, as its population finishes. Processes are spawned (fresh interpreters: no
    fork of a threaded parent); a population that raises stops the collection with its error, and a re-run
    resumes from the shards already written."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from dicp_ray.collect.population_learner import learn_population

    workers = max(1, min(workers, len(queue)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(learn_population, config, ids, dataset_dir) for ids in queue}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield from future.result()
        finally:
            for future in pending:
                future.cancel()


def learning_start(start: float, sidecar: dict, now: float) -> float:
    """The earliest moment a learner began learning: its sidecar arrived at `now` after ``wall_s`` seconds of its own
    work, so Ray's start-up and worker processes' imports (which made the rate read 5-20x low) are not counted."""
    return min(start, now - float(sidecar.get("wall_s", 0.0)))


def _log_rate(writer: Any, env_steps: int, start: float) -> float:
    """Env steps per second since `start` (`learning_start`), also logged to TensorBoard as collect/env_steps_per_s."""
    rate = env_steps / max(time.perf_counter() - start, 1e-9)
    if writer is not None:
        writer.add_scalar("collect/env_steps_per_s", rate, env_steps)
    return rate


def _run_populations(results: Iterator[dict], queue: list[list[int]], config: ExperimentConfig, dataset_dir: str,
                     writer: Any, progress: bool) -> list[dict]:
    """Drain `results` (the sidecars of the populations of `queue`, as they finish); one progress bar over all
    their env steps, fed by the populations' progress files."""
    from dicp_ray.collect.population_learner import progress_path
    from dicp_ray.console import watch_progress

    files = [progress_path(dataset_dir, ids) for ids in queue] if "://" not in dataset_dir else []
    total = sum(len(ids) for ids in queue) * config.collect.env_steps_per_task
    sidecars, start, env_steps = [], math.inf, 0
    with watch_progress(files if progress else [], total, "collect", "env step", unit_scale=True):
        for sidecar in results:
            sidecars.append(sidecar)
            env_steps += sidecar["env_steps"]
            start = learning_start(start, sidecar, time.perf_counter())
            _log_rate(writer, env_steps, start)
    for f in files:
        f.unlink(missing_ok=True)
    return sidecars


def _log_curves(sidecars: list[dict], dataset_dir: str, writer: Any) -> None:
    """Mean +- std over tasks of each task's per-update mean return: TensorBoard scalars and a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_updates = min(len(s["curve"]["env_steps"]) for s in sidecars)
    steps = np.asarray(sidecars[0]["curve"]["env_steps"][:num_updates])
    returns = np.array([[np.nan if r is None else r for r in s["curve"]["return_mean"][:num_updates]]
                        for s in sidecars], dtype=np.float64)                    # (tasks, updates)
    have = ~np.isnan(returns).all(axis=0)
    steps, mean, std = steps[have], np.nanmean(returns[:, have], 0), np.nanstd(returns[:, have], 0)
    for step, m, s in zip(steps, mean, std):
        writer.add_scalar("collect/return_mean", m, int(step))
        writer.add_scalar("collect/return_std", s, int(step))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, mean, label=f"mean over {len(sidecars)} tasks")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.3, label="± std over tasks")
    ax.set(xlabel="env steps per task", ylabel="episode return", title="Source PPO learning curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(dataset_dir, "source_returns.png"), dpi=120)
    plt.close(fig)


def collect_histories(config: ExperimentConfig, dataset_dir: str, progress: bool = True) -> str:
    """Collect (or finish collecting) the learning histories of every task into ``dataset_dir``."""
    local = "://" not in dataset_dir or dataset_dir.startswith("file://")
    if local:
        dataset_dir = os.path.abspath(dataset_dir.removeprefix("file://"))  # Ray workers may run elsewhere
    task_ids = collection_task_ids(config)
    fingerprint = data_fingerprint(config)
    _check_existing(dataset_dir, fingerprint)
    if shards.dataset_is_complete(dataset_dir) and shards.read_manifest(dataset_dir)["task_ids"] == task_ids:
        logger.info("%s is already a complete dataset of %d tasks: nothing to collect", dataset_dir,
                    len(task_ids))
        return dataset_dir
    shards.remove_temp_files(dataset_dir)  # left by writers killed mid-write
    kept = {t: shards.read_sidecar(dataset_dir, t) for t in task_ids
            if shards.shard_is_valid(dataset_dir, t, fingerprint)}
    todo = [t for t in task_ids if t not in kept]
    for task_id in todo:
        shards.remove_shard(dataset_dir, task_id)  # partial, corrupt or stale leftovers of an earlier run
    _write_manifest(config, dataset_dir, task_ids, list(kept.values()), complete=False)
    logger.info("collecting %d of %d tasks (%d already valid) into %s (%s)", len(todo), len(task_ids), len(kept),
                dataset_dir, "local process pool" if config.collect.backend == "local" else "Ray")
    writer = None
    if local:
        from torch.utils.tensorboard import SummaryWriter

        tb_dir = os.path.join(dataset_dir, "tb")
        for name in os.listdir(tb_dir) if os.path.isdir(tb_dir) else []:
            os.remove(os.path.join(tb_dir, name))  # the curves below are rewritten over all tasks
        writer = SummaryWriter(tb_dir)
    try:
        if todo:
            for sidecar in _run_learners(config, dataset_dir, todo, writer, progress, len(kept),
                                         len(task_ids)):
                kept[sidecar["task_id"]] = sidecar
        sidecars = [kept[t] for t in task_ids]
        if writer is not None:
            _log_curves(sidecars, dataset_dir, writer)
    finally:
        if writer is not None:
            writer.close()
    _write_manifest(config, dataset_dir, task_ids, sidecars, complete=True)
    logger.info("dataset complete: %d tasks, %d transitions", len(task_ids),
                sum(s["num_rows"] for s in sidecars))
    return dataset_dir
