"""Grid-world collection with population PPO learners (`dicp_ray.collect.population_ppo`): one process, many tasks.

The driver runs ``learn_population`` as a Ray task (collect.backend ray) or as a job of a local process pool
(local); this module never imports Ray.

``learn_population(config, task_ids, dataset_dir)`` trains one PPO learner per task id, all in one process
as a single stacked network, and writes each task's shard + sidecar exactly as the RLlib path does
(`dicp_ray.collect.learn_task`): same columns, same sidecar keys (incl. the per-update return curve).

Rollouts: the ``N x num_streams`` copies step as ONE batch through the grid env's own ``transition``
function (so action labels and dynamics are the env module's), SB3 ``DummyVecEnv`` style: a copy that ends
its episode is reset in the same step and the next rollout step starts from the start cell. Grid
observations are cells, so each update first evaluates every learner's policy and value on all cells once
(the weights are fixed during a rollout) and a step is a table lookup. Episodes end only at the horizon;
with ``collect.bootstrap_at_horizon`` False (the release) the horizon is terminal for PPO (no bootstrap of
V(s_T)), with True SB3's truncation bootstrap ``r_T += gamma * V(s_T)`` is applied. The stored shard keeps
the env's own flags (``truncated`` on the horizon step, never ``terminated``), like the RLlib path.

Determinism per task, not per population: learner i's init comes from its own torch Generator and its
action-sampling uniforms and minibatch permutations from its own ``numpy`` Generator, all seeded with
``collect.seed + task_id``, and its arithmetic is row-local (see `dicp_ray.collect.population_ppo`). So a task's shard
bytes do not depend on which or how many other tasks shared its population (tested), and a resumed or
re-split run writes the same bytes.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from dicp_ray import envs
from dicp_ray.collect.population_ppo import Layout, PPOSettings, forward, gae, init_params, make_optimizer, ppo_update
from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.console import ProgressFile
from dicp_ray.data import shards
from dicp_ray.envs.grid import make_tasks, transition
from dicp_ray.envs.splits import GRID_SIZE

MAX_TASKS_PER_POPULATION = 81
"""Auto population size cap: beyond ~81 learners a population's update stops getting cheaper per learner."""


def population_sizes(num_tasks: int, num_cpus: float, tasks_per_population: int,
                     max_size: int = MAX_TASKS_PER_POPULATION) -> list[int]:
    """Sizes of the populations that ``num_tasks`` tasks are split into, in task order.

    ``tasks_per_population`` > 0 fixes the size; 0 spreads the tasks evenly over the CPUs (every core busy,
    one population per core), capped at ``max_size`` (grid worlds 81, Meta-World 4).
    """
    if num_tasks == 0:
        return []
    size = tasks_per_population or min(max_size, math.ceil(num_tasks / max(1, int(num_cpus))))
    return [min(size, num_tasks - start) for start in range(0, num_tasks, size)]


class _Histories:
    """Per-update rollout records of every learner x stream, joined into shard columns at the end."""

    def __init__(self):
        self.pos, self.action, self.reward, self.next_pos = [], [], [], []

    def add(self, pos, action, reward, next_pos) -> None:                 # each (N, S, T, ...)
        self.pos.append(pos.astype(np.int8))
        self.action.append(action.astype(np.int8))
        self.reward.append(reward.astype(np.float32))
        self.next_pos.append(next_pos.astype(np.int8))

    def columns(self, row: int, env_name: str, task_id: int, steps_per_stream: int,
                horizon: int) -> dict[str, np.ndarray]:
        """Shard columns of learner ``row``: complete episodes within ``steps_per_stream`` of every stream."""
        from dicp_ray.collect.fingerprint import oracle_labels

        keep = steps_per_stream // horizon * horizon
        pos, action, reward, next_pos = (np.concatenate([chunk[row] for chunk in parts], axis=1)[:, :keep]
                                         for parts in (self.pos, self.action, self.reward, self.next_pos))
        streams = pos.shape[0]
        step = np.tile(np.arange(keep, dtype=np.int32) % horizon, streams)
        columns = {
            "stream": np.repeat(np.arange(streams, dtype=np.int32), keep),
            "episode": np.tile(np.arange(keep, dtype=np.int32) // horizon, streams), "step": step,
            "obs": pos.reshape(-1, 2).astype(np.float32), "action": action.reshape(-1).astype(np.int64),
            "reward": reward.reshape(-1), "next_obs": next_pos.reshape(-1, 2).astype(np.float32),
            "terminated": np.zeros(step.size, bool), "truncated": step == horizon - 1,
        }
        columns["optimal_action"] = oracle_labels(env_name, task_id, columns)
        return columns


def progress_path(dataset_dir: str, task_ids: list[int]) -> Path:
    """Where the population of `task_ids` counts its env steps for the driver's progress bar."""
    return Path(dataset_dir) / ".progress" / f"population_{task_ids[0]:05d}.json"


def learn_population(config: ExperimentConfig, task_ids: list[int], dataset_dir: str) -> list[dict]:
    """Train one PPO learner per task of ``task_ids`` as one population, write their shards, return sidecars."""
    from dicp_ray.collect.fingerprint import data_fingerprint

    torch.set_num_threads(1)  # one core per population: measured 6x slower on 2 threads (issue #16)
    start_time, start_cpu = time.perf_counter(), time.process_time()
    c, name = config.collect, config.env.name
    spec = envs.grid_spec(name)
    n, streams, steps, horizon = len(task_ids), c.num_streams, c.rollout_steps, spec.horizon
    steps_per_stream = c.env_steps_per_task // streams
    num_updates = math.ceil(steps_per_stream / steps)
    seeds = [c.seed + int(t) for t in task_ids]
    layout = Layout.build(spec.obs_dim, spec.num_actions, tuple(c.hidden_sizes))
    params = init_params(layout, seeds).requires_grad_()
    optimizer = make_optimizer(params, c.lr)
    ppo = PPOSettings(c.num_epochs, c.minibatch_size, c.clip_param, c.vf_loss_coeff, c.entropy_coeff,
                      c.grad_clip)
    rngs = [np.random.default_rng(seed) for seed in seeds]

    tasks = make_tasks(name, np.repeat(np.asarray(task_ids, np.int64), streams))
    pos, has_key = tasks.start.copy(), np.zeros(n * streams, bool)
    door_done, elapsed = np.zeros(n * streams, bool), np.zeros(n * streams, np.int64)
    starts = np.ones((n, streams), bool)                       # SB3: the first step starts an episode
    running = np.zeros((n, streams))
    cells = torch.tensor([[x, y] for x in range(GRID_SIZE) for y in range(GRID_SIZE)], dtype=torch.float32)
    rows = np.arange(n)[:, None]
    histories, curves = _Histories(), [{"env_steps": [], "return_mean": []} for _ in task_ids]
    update_cpu = 0.0                                                       # CPU seconds inside ppo_update
    local = "://" not in dataset_dir                                       # remote storage: no progress file
    progress = ProgressFile(progress_path(dataset_dir, task_ids) if local else None,
                            num_updates * steps * streams * n)              # the driver's progress bar

    for update in range(num_updates):
        with torch.no_grad():
            logits, values = forward(params, layout, cells.expand(n, -1, -1))
            log_table = torch.log_softmax(logits, -1).numpy()                 # (N, 81, A)
            value_table = values.numpy()                                       # (N, 81)
        cdf = np.cumsum(np.exp(log_table.astype(np.float64)), -1)[..., :-1]
        uniforms = np.stack([rng.random((steps, streams)) for rng in rngs])   # (N, T, S)
        rec = {k: np.zeros((n, streams, steps), dtype) for k, dtype in (
            ("action", np.int64), ("reward", np.float32), ("gae_reward", np.float32), ("value", np.float32),
            ("log_prob", np.float32), ("start", bool))}
        rec_pos, rec_next = (np.zeros((n, streams, steps, 2), np.int64) for _ in range(2))
        finished: list[list[float]] = [[] for _ in task_ids]
        for t in range(steps):
            cell = (pos[:, 0] * GRID_SIZE + pos[:, 1]).reshape(n, streams)
            action = (uniforms[:, t, :, None] > cdf[rows, cell]).sum(-1)
            rec_pos[:, :, t] = pos.reshape(n, streams, 2)
            rec["action"][:, :, t], rec["start"][:, :, t] = action, starts
            rec["value"][:, :, t] = value_table[rows, cell]
            rec["log_prob"][:, :, t] = log_table[rows, cell, action]
            pos, has_key, door_done, reward = transition(tasks, pos, has_key, door_done, action.reshape(-1))
            elapsed += 1
            done = elapsed >= horizon
            rec_next[:, :, t] = pos.reshape(n, streams, 2)
            reward = reward.reshape(n, streams)
            rec["reward"][:, :, t] = reward
            gae_reward = reward.astype(np.float32)
            if config.bootstraps_at_horizon:                               # SB3's truncation bootstrap
                next_cell = (pos[:, 0] * GRID_SIZE + pos[:, 1]).reshape(n, streams)
                gae_reward = gae_reward + np.float32(c.gamma) * value_table[rows, next_cell] * done.reshape(
                    n, streams)
            rec["gae_reward"][:, :, t] = gae_reward
            running += reward
            starts = done.reshape(n, streams)
            for i, s in zip(*np.nonzero(starts)):
                finished[i].append(float(running[i, s]))
            running[starts] = 0.0
            if done.any():                                                 # DummyVecEnv: reset at once
                pos[done], has_key[done], door_done[done], elapsed[done] = tasks.start[done], False, False, 0
        last_cell = (pos[:, 0] * GRID_SIZE + pos[:, 1]).reshape(n, streams)
        advantages, returns = gae(rec["gae_reward"], rec["value"], rec["start"], value_table[rows, last_cell],
                                  starts, c.gamma, c.gae_lambda)
        histories.add(rec_pos, rec["action"], rec["reward"], rec_next)
        size = streams * steps                                             # SB3 order: stream * T + step
        perms = np.stack([np.stack([rng.permutation(size) for _ in range(c.num_epochs)]) for rng in rngs])
        batch = {"obs": torch.from_numpy(rec_pos.reshape(n, size, 2).astype(np.float32)),
                 "actions": torch.from_numpy(rec["action"].reshape(n, size)),
                 "log_probs": torch.from_numpy(rec["log_prob"].reshape(n, size)),
                 "advantages": torch.from_numpy(advantages.reshape(n, size)),
                 "returns": torch.from_numpy(returns.reshape(n, size))}
        update_start = time.process_time()
        ppo_update(params, optimizer, layout, ppo, batch, torch.from_numpy(perms))
        update_cpu += time.process_time() - update_start
        progress.update((update + 1) * steps * streams * n)
        for i, curve in enumerate(curves):
            curve["env_steps"].append((update + 1) * size)
            curve["return_mean"].append(float(np.mean(finished[i])) if finished[i] else None)

    fingerprint, wall = data_fingerprint(config), round(time.perf_counter() - start_time, 3)
    cpu = round(time.process_time() - start_cpu, 3)
    sidecars = []
    for i, task_id in enumerate(task_ids):
        columns = histories.columns(i, name, int(task_id), steps_per_stream, horizon)
        extra = {"fingerprint": fingerprint, "env_name": name, "seed": seeds[i], "num_updates": num_updates,
                 "updates_aligned": True, "env_steps": int(columns["reward"].size), "curve": curves[i],
                 "learner": "population", "population_size": n, "wall_s": wall, "cpu_s": cpu,
                 "update_cpu_s": round(update_cpu, 3)}
        sidecars.append(shards.write_shard(dataset_dir, int(task_id), columns, extra))
    return sidecars

