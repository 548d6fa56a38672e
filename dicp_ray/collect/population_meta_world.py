"""Meta-World collection with population PPO learners (`dicp_ray.collect.population_ppo`): one Ray task, many tasks.

``learn_meta_world_population(config, task_ids, dataset_dir)`` trains one SB3-equal PPO learner (diagonal
Gaussian, state-independent log-std) per Meta-World task id, all in one process as a single stacked network,
and writes each task's shard + sidecar as the RLlib path does (`dicp_ray.collect.rllib_learner.learn_task`):
the same columns (model-view ``obs`` / true ``next_obs``, the float32 action actually sent to the env,
``success``), the same sidecar keys (curve, ``success`` summary, ``algorithm``, ``env_task``) plus the
population's own (``learner``, ``population_size``, CPU seconds).

Rollouts, SB3's ``PPO.collect_rollouts`` with ``DummyVecEnv`` per learner: the ``N x num_streams`` envs are the
streams of one ``MetaWorldVectorEnv`` (streams of a task share its MuJoCo model, tasks do not), stepped one by one;
a stream that truncates at the horizon is reset in the same step. The learner observes ``collect.source_obs``
(``full``: Meta-World's 39 numbers, the release's), the shard keeps the first ``obs_dim`` of them (the model
view). Actions are ``mean + exp(log_std) * noise`` with the noise from the learner's own numpy Generator; the
env gets them clipped to [-1, 1], the PPO buffer keeps the unclipped sample and its log-prob (as SB3). With
``collect.bootstrap_at_horizon`` true (Meta-World's default, the release's ``TimeLimit``) the truncation step's
reward for GAE is ``r + gamma * V(s_T)`` with V of the true final observation (SB3's ``terminal_observation``
bootstrap); false treats the horizon as terminal. Shards keep the env's flags either way.

Determinism per task, not per population: init, action noise and minibatch permutations come from generators
seeded with ``collect.seed + task_id`` and the arithmetic is row-local, so a task's shard does not depend on the
other tasks in its population (tested in tests/integration/test_population_meta_world.py).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from dicp_ray.collect.population_learner import progress_path
from dicp_ray.collect.population_ppo import (
    Layout,
    PPOSettings,
    forward,
    gae,
    gaussian_log_prob,
    init_params,
    make_optimizer,
    ppo_update,
)
from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.console import ProgressFile
from dicp_ray.data import shards
from dicp_ray.envs import meta_world_tasks
from dicp_ray.envs.meta_world import ML1VectorEnv, ML10VectorEnv

MAX_TASKS_PER_POPULATION = 4
"""Auto population size cap on Meta-World: Meta-World's own step and reset dominate there (at N = 4 the PPO
update is 8-16% of the CPU, benchmarks/bench_meta_world_ppo.py), so bigger populations gain nothing measurable,
while each task's histories (~110 MB per 1M steps) stay in memory until the end and a retry redoes them all."""

_VECTOR_ENVS = {"ML1": ML1VectorEnv, "ML10": ML10VectorEnv}


class MetaWorldPopulation:
    """N Meta-World PPO learners and their ``N x num_streams`` envs; ``update()`` = one rollout + one PPO update."""

    def __init__(self, config: ExperimentConfig, task_ids: list[int]):
        c = self.c = config.collect
        self.config, self.task_ids = config, [int(t) for t in task_ids]
        self.n, self.streams, self.steps = len(task_ids), c.num_streams, c.rollout_steps
        self.seeds = [c.seed + t for t in self.task_ids]
        self.venv = _VECTOR_ENVS[config.env.name](task_ids=np.repeat(self.task_ids, self.streams),
                                                  task=config.env.task, observation=c.source_obs)
        self.envs = self.venv.envs
        self.horizon = self.venv.horizon
        self.obs_dim = meta_world_tasks.observation_dim(config.env.name, config.env.task)   # the shard's view
        self.layout = Layout.build(self.envs[0].observation_space.shape[0], meta_world_tasks.ACTION_DIM,
                                   tuple(c.hidden_sizes), continuous=True)
        self.params = init_params(self.layout, self.seeds).requires_grad_()
        self.optimizer = make_optimizer(self.params, c.lr)
        self.ppo = PPOSettings(c.num_epochs, c.minibatch_size, c.clip_param, c.vf_loss_coeff, c.entropy_coeff,
                               c.grad_clip)
        self.rngs = [np.random.default_rng(seed) for seed in self.seeds]
        self.obs = np.stack([env.reset()[0] for env in self.envs]).reshape(self.n, self.streams, -1)
        self.starts = np.ones((self.n, self.streams), bool)          # SB3: the first step starts an episode
        self.running = np.zeros((self.n, self.streams))
        self.records: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "action", "reward", "next_obs",
                                                                     "success")}
        self.curves = [{"env_steps": [], "return_mean": []} for _ in self.task_ids]
        self.num_updates, self.update_cpu = 0, 0.0
        self.last_batch: dict[str, torch.Tensor] = {}

    def update(self) -> None:
        """One rollout of ``rollout_steps`` steps of every stream, then one PPO update of every learner."""
        n, s, steps, act_dim = self.n, self.streams, self.steps, self.layout.num_actions
        shape = (n, s, steps)
        full_obs = np.zeros((*shape, self.obs.shape[-1]), np.float32)
        next_obs = np.zeros((*shape, self.obs_dim), np.float32)
        actions, sent = np.zeros((*shape, act_dim), np.float32), np.zeros((*shape, act_dim), np.float32)
        rec = {k: np.zeros(shape, np.float32) for k in ("reward", "gae_reward", "value", "log_prob", "success")}
        episode_starts = np.zeros(shape, bool)
        noise = torch.from_numpy(np.stack([rng.standard_normal((steps, s, act_dim), np.float32)
                                           for rng in self.rngs]))                       # (N, T, S, A)
        log_std = self.layout.log_std_of(self.params).detach().unsqueeze(1)              # (N, 1, A)
        finished: list[list[float]] = [[] for _ in self.task_ids]
        for t in range(steps):
            with torch.no_grad():
                mean, values = forward(self.params, self.layout, torch.from_numpy(self.obs))
                action = mean + log_std.exp() * noise[:, t]
                rec["log_prob"][:, :, t] = gaussian_log_prob(mean, log_std, action).numpy()
            full_obs[:, :, t], episode_starts[:, :, t] = self.obs, self.starts
            rec["value"][:, :, t], actions[:, :, t] = values.numpy(), action.numpy()
            clipped = np.clip(actions[:, :, t], -1.0, 1.0).reshape(n * s, act_dim)
            final = np.zeros((n * s, self.obs.shape[-1]), np.float32)
            done = np.zeros(n * s, bool)
            flat = self.obs.reshape(n * s, -1).copy()
            for e, env in enumerate(self.envs):
                obs, reward, terminated, truncated, info = env.step(clipped[e])
                i, j = divmod(e, s)
                rec["reward"][i, j, t], rec["success"][i, j, t] = reward, info["success"]
                sent[i, j, t], final[e] = info["action"], obs
                done[e] = terminated or truncated
                flat[e] = env.reset()[0] if done[e] else obs                # DummyVecEnv: reset at once
            next_obs[:, :, t] = final.reshape(n, s, -1)[..., :self.obs_dim]
            reward = rec["reward"][:, :, t]
            gae_reward = reward.copy()
            if self.config.bootstraps_at_horizon and done.any():           # SB3's truncation bootstrap
                with torch.no_grad():
                    _, final_values = forward(self.params, self.layout, torch.from_numpy(final.reshape(n, s, -1)))
                gae_reward += np.float32(self.c.gamma) * final_values.numpy() * done.reshape(n, s)
            rec["gae_reward"][:, :, t] = gae_reward
            self.running += reward
            self.starts = done.reshape(n, s)
            for i, j in zip(*np.nonzero(self.starts)):
                finished[i].append(float(self.running[i, j]))
            self.running[self.starts] = 0.0
            self.obs = flat.reshape(n, s, -1)
        with torch.no_grad():
            _, last_values = forward(self.params, self.layout, torch.from_numpy(self.obs))
        advantages, returns = gae(rec["gae_reward"], rec["value"], episode_starts, last_values.numpy(),
                                  self.starts, self.c.gamma, self.c.gae_lambda)
        model_obs = np.ascontiguousarray(full_obs[..., :self.obs_dim])      # not a view: full_obs is freed
        for key, value in (("obs", model_obs), ("action", sent), ("reward", rec["reward"]),
                           ("next_obs", next_obs), ("success", rec["success"])):
            self.records[key].append(value)
        size = s * steps                                                    # SB3 order: stream * T + step
        perms = np.stack([np.stack([rng.permutation(size) for _ in range(self.c.num_epochs)])
                          for rng in self.rngs])
        batch = {"obs": torch.from_numpy(full_obs.reshape(n, size, -1)),
                 "actions": torch.from_numpy(actions.reshape(n, size, act_dim)),
                 "log_probs": torch.from_numpy(rec["log_prob"].reshape(n, size)),
                 "advantages": torch.from_numpy(advantages.reshape(n, size)),
                 "returns": torch.from_numpy(returns.reshape(n, size))}
        self.last_batch = batch                     # what the update saw (tests check it against SB3's buffer)
        update_start = time.process_time()
        ppo_update(self.params, self.optimizer, self.layout, self.ppo, batch, torch.from_numpy(perms))
        self.update_cpu += time.process_time() - update_start
        self.num_updates += 1
        for i, curve in enumerate(self.curves):
            curve["env_steps"].append(self.num_updates * size)
            curve["return_mean"].append(float(np.mean(finished[i])) if finished[i] else None)

    def columns(self, row: int, steps_per_stream: int) -> dict[str, np.ndarray]:
        """Shard columns of learner ``row``: its complete episodes within ``steps_per_stream`` of every stream."""
        keep = steps_per_stream // self.horizon * self.horizon
        obs, action, reward, next_obs, success = (np.concatenate([chunk[row] for chunk in self.records[k]], 1)[
            :, :keep] for k in ("obs", "action", "reward", "next_obs", "success"))
        step = np.tile(np.arange(keep, dtype=np.int32) % self.horizon, self.streams)
        return {"stream": np.repeat(np.arange(self.streams, dtype=np.int32), keep),
                "episode": np.tile(np.arange(keep, dtype=np.int32) // self.horizon, self.streams), "step": step,
                "obs": obs.reshape(-1, self.obs_dim), "action": action.reshape(-1, action.shape[-1]),
                "reward": reward.reshape(-1), "next_obs": next_obs.reshape(-1, self.obs_dim),
                "terminated": np.zeros(step.size, bool), "truncated": step == self.horizon - 1,
                "success": success.reshape(-1)}

    def close(self) -> None:
        self.venv.close()


def success_summary(columns: dict[str, np.ndarray], horizon: int, streams: int) -> dict[str, float]:
    """The RLlib path's summary: fraction of episodes with a success at any step, overall and in each stream's
    last 10% of episodes (``rllib_learner._success_summary``)."""
    solved = columns["success"].reshape(streams, -1, horizon).max(-1)             # (S, episodes)
    last = solved[:, -math.ceil(0.1 * solved.shape[1]):]
    return {"episode_success_rate": float(solved.mean()), "last_10pct_success_rate": float(last.mean())}


def learn_meta_world_population(config: ExperimentConfig, task_ids: list[int], dataset_dir: str) -> list[dict]:
    """Train one PPO learner per Meta-World task of ``task_ids`` as one population; write shards, return sidecars."""
    from dicp_ray.collect.fingerprint import data_fingerprint

    torch.set_num_threads(1)  # one core per population, as on the grid worlds
    start_time, start_cpu = time.perf_counter(), time.process_time()
    c = config.collect
    steps_per_stream = c.env_steps_per_task // c.num_streams
    num_updates = math.ceil(steps_per_stream / c.rollout_steps)
    population = MetaWorldPopulation(config, task_ids)
    local = "://" not in dataset_dir                                       # remote storage: no progress file
    progress = ProgressFile(progress_path(dataset_dir, task_ids) if local else None,
                            num_updates * c.rollout_steps * c.num_streams * len(task_ids))
    try:
        for update in range(num_updates):
            population.update()
            progress.update((update + 1) * c.rollout_steps * c.num_streams * len(task_ids))
    finally:
        population.close()
    fingerprint, wall = data_fingerprint(config), round(time.perf_counter() - start_time, 3)
    cpu = round(time.process_time() - start_cpu, 3)
    sidecars = []
    for i, task_id in enumerate(population.task_ids):
        columns = population.columns(i, steps_per_stream)
        extra = {"fingerprint": fingerprint, "env_name": config.env.name, "seed": population.seeds[i],
                 "num_updates": num_updates, "updates_aligned": True, "env_steps": int(columns["reward"].size),
                 "curve": population.curves[i], "wall_s": wall, "env_task": config.env.task, "algorithm": "ppo",
                 "success": success_summary(columns, population.horizon, c.num_streams),
                 "learner": "population", "population_size": len(task_ids), "cpu_s": cpu,
                 "update_cpu_s": round(population.update_cpu, 3)}
        sidecars.append(shards.write_shard(dataset_dir, task_id, columns, extra))
    return sidecars

