"""The RLlib learner of the collect stage: one RLlib PPO (or SAC) learner per task, each a Ray task writing its shard.

Used on Meta-World (PPO, SAC) and on the grid worlds with ``collect.learner: rllib`` (the reference the population
learner, `dicp_ray.collect.population_learner`, is measured against). `dicp_ray.collect` drives it.

Each learner steps ``collect.num_streams`` copies of its task in lockstep (the batched ``GridVectorEnv`` plugged into
RLlib through ``gym_env_vectorize_mode="vector_entry_point"``), updates PPO every ``collect.rollout_steps`` steps per
stream, and records every finished episode of every stream, in order, with ``HistoryRecorder`` (an
``on_episode_end`` callback). When its ``env_steps_per_task`` are done it writes ``shards/task_XXXXX.arrow`` +
sidecar itself (the driver never holds histories) and returns the sidecar, which carries a per-update mean-return
curve. Learners are seeded (``collect.seed + task_id``) and RLlib with no remote EnvRunners is bit-reproducible, so
a resumed dataset equals an uninterrupted one.

Meta-World (``env.name`` ML1 / ML10, `dicp_ray.envs.meta_world`): the same loop with continuous actions. PPO uses a
state-independent log-std Gaussian (SB3's ``MlpPolicy``, ``free_log_std``); ``collect.algorithm: sac`` runs RLlib
SAC with SB3's defaults and the release's ``collect.sac_*`` settings (one ``sample()`` of ``sac_train_freq`` steps
per stream, then ``sac_gradient_steps`` updates of ``sac_batch_size``; docs/fidelity.md row 15). Shards store the
executed (float32, clipped) action from the env's ``info["action"]`` and ``info["success"]``. The learner observes what
``collect.source_obs`` says: ``full`` (default, the authors' release) Meta-World's 39 numbers, whose previous frame
gives it velocities, ``model`` the 11 / 18-dim model observation; the shards' ``obs`` / ``next_obs`` are the model
observation in both cases.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import gymnasium as gym
import numpy as np
import ray
import torch
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.algorithms.sac import SACConfig
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.tune.registry import register_env

from dicp_ray import envs
from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.data import shards
from dicp_ray.envs import meta_world_tasks

logger = logging.getLogger(__name__)

_EPISODES_ATTR = "dicp_ray_episodes"      # where HistoryRecorder leaves episodes on its EnvRunner
_SAMPLES_ATTR = "dicp_ray_sample_steps"   # env steps of every sample() call, for the alignment check
# (tasks_per_population: a task's shard bytes do not depend on its population, tests/unit/test_population.py)


# ----------------------------------------------------------------------------------------------------------
# RLlib side: env creator, PPO config, history-recording callback
# ----------------------------------------------------------------------------------------------------------

HORIZON_TERMINAL_KEY = "dicp_ray_horizon_terminal"  # info flag: terminated=True was added at the horizon


class HorizonAsTerminal(gym.Wrapper):
    """The learner's view of the release's grid envs: an episode that truncates also reports terminated=True.

    The release's envs return ``(terminated, truncated) = (True, True)`` at the horizon, so its SB3 PPO never
    bootstraps V(s_T) there; RLlib (like SB3) bootstraps at a pure truncation. This wrapper sits between
    our (correctly truncating) env and RLlib and reports the release's flags, marking the step with
    ``info[HORIZON_TERMINAL_KEY]`` so that `HistoryRecorder` records the episode as truncated, not terminated.
    """

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if truncated and not terminated:
            info = {**info, HORIZON_TERMINAL_KEY: True}
        return obs, reward, terminated or truncated, truncated, info


class VectorHorizonAsTerminal(gym.vector.VectorWrapper):
    """`HorizonAsTerminal` for a vector env (infos are a dict of arrays with ``_key`` masks)."""

    def step(self, actions):
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        at_horizon = np.asarray(truncated) & ~np.asarray(terminated)
        if at_horizon.any():
            infos = {**infos, HORIZON_TERMINAL_KEY: at_horizon, f"_{HORIZON_TERMINAL_KEY}": at_horizon}
        return obs, rewards, np.asarray(terminated) | at_horizon, truncated, infos


def _learner_view(env: gym.Env | gym.vector.VectorEnv, horizon_terminal: bool) -> gym.Env | gym.vector.VectorEnv:
    if not horizon_terminal:
        return env
    return VectorHorizonAsTerminal(env) if isinstance(env, gym.vector.VectorEnv) else HorizonAsTerminal(env)


class _GridEnvCreator:
    """RLlib env creator: the batched GridVectorEnv when RLlib asks for ``num_envs``, else a single env.

    Observations are cast to float32 for the RLModule; the values (cells 0..8) stay exact. With
    ``horizon_terminal`` the learner sees the horizon as terminal (`HorizonAsTerminal`).
    """

    def __init__(self, env_id: str, horizon_terminal: bool = False):
        self.env_id, self.horizon_terminal = env_id, horizon_terminal

    def __call__(self, ctx: dict) -> gym.Env | gym.vector.VectorEnv:
        if "num_envs" in ctx:  # gym_env_vectorize_mode="vector_entry_point"
            vector_env = gym.make_vec(self.env_id, num_envs=ctx["num_envs"], task_id=ctx["task_id"],
                                      vectorization_mode="vector_entry_point")
            env = gym.wrappers.vector.DtypeObservation(vector_env, np.float32)
        else:
            env = gym.wrappers.DtypeObservation(gym.make(self.env_id, task_id=ctx["task_id"]), np.float32)
        return _learner_view(env, self.horizon_terminal)


class _MetaWorldEnvCreator:
    """RLlib env creator for ML1 / ML10: ``MetaWorldVectorEnv`` streams (float32 obs already), or one env.

    ``ctx["observation"]`` is what the learner observes ("full": Meta-World's 39 numbers, "model": 11 / 18).
    """

    def __init__(self, name: str, task: str | None, horizon_terminal: bool = False):
        self.name, self.task, self.horizon_terminal = name, task, horizon_terminal

    def __call__(self, ctx: dict) -> gym.Env | gym.vector.VectorEnv:
        env_id = envs.meta_world.env_id(self.name)
        observation = ctx.get("observation", "model")
        if "num_envs" in ctx:
            env = gym.make_vec(env_id, num_envs=ctx["num_envs"], task_id=ctx["task_id"], task=self.task,
                               observation=observation, vectorization_mode="vector_entry_point")
        else:
            env = gym.make(env_id, task_id=ctx["task_id"], task=self.task, observation=observation)
        return _learner_view(env, self.horizon_terminal)


def _env_config(config: ExperimentConfig, task_id: int) -> dict[str, Any]:
    """RLlib ``env_config`` of a learner. Meta-World adds what the learner observes (``collect.source_obs``)
    and ``record_obs_dim``, the model observation's size that ``HistoryRecorder`` keeps of it."""
    env_config: dict[str, Any] = {"task_id": int(task_id)}
    if config.env.is_meta_world:
        env_config.update(observation=config.collect.source_obs,
                          record_obs_dim=meta_world_tasks.observation_dim(config.env.name, config.env.task))
    return env_config


def _register_rllib_env(config: ExperimentConfig) -> str:
    """Register this config's env creator with RLlib under a name unique per env (and ML1 task) and horizon rule."""
    env, horizon_terminal = config.env, not config.bootstraps_at_horizon
    suffix = "_horizon_terminal" if horizon_terminal else ""
    if env.is_meta_world:
        name = (f"dicp_ray_{env.name}_{env.task}" if env.task else f"dicp_ray_{env.name}") + suffix
        register_env(name, _MetaWorldEnvCreator(env.name, env.task, horizon_terminal))
        return name
    spec = envs.grid_spec(env.name)
    register_env(f"dicp_ray_grid_{spec.name}{suffix}", _GridEnvCreator(spec.env_id, horizon_terminal))
    return f"dicp_ray_grid_{spec.name}{suffix}"


class SB3InitPPOModule(DefaultPPOTorchRLModule):
    """RLlib's default PPO module (separate actor and critic MLPs) initialised like SB3's ``MlpPolicy``.

    Orthogonal weights with gain sqrt(2) in the hidden layers, 0.01 for the policy logits and 1 for the
    value output, zero biases. RLlib's default (torch's) init gives a visibly non-uniform first policy
    (e.g. 0.27 vs 0.15 per action) that drifts every stream the same way. Measured on the four Darkroom
    corner goals (tasks 0, 8, 72, 80; paper settings, 100K steps, seed 0): default init never saw a reward
    on 2 of 4, this init reached the maximum return 13 on 4 of 4 (SB3 itself: 3 of 4 above 10).
    """

    def setup(self) -> None:
        super().setup()
        for net, gain in ((self.encoder, math.sqrt(2)), (self.pi, 0.01), (getattr(self, "vf", None), 1.0)):
            for layer in net.modules() if net is not None else ():
                if isinstance(layer, torch.nn.Linear):
                    torch.nn.init.orthogonal_(layer.weight, gain)
                    torch.nn.init.zeros_(layer.bias)


def build_learner_config(config: ExperimentConfig, task_id: int, *,
                         vectorize_mode: str = "vector_entry_point") -> AlgorithmConfig:
    """RLlib config of ``collect.algorithm`` (PPO, or SAC on Meta-World) for the learner of ``task_id``.

    PPO learns like the paper's SB3 PPO (SPEC §3 mapping): one update = one ``sample()`` of
    ``rollout_steps`` steps of every stream (the streams run in lockstep and never terminate early),
    checked per learner by ``_updates_aligned``. Known difference from SB3: RLlib normalises advantages
    over the whole train batch, SB3 per minibatch. Continuous actions: a Gaussian with a state-independent
    log-std (initial std 1), actions clipped to [-1, 1] for the env (SB3's PPO ``MlpPolicy``).
    ``vectorize_mode``: "vector_entry_point" (the numpy-batched GridVectorEnv / MetaWorldVectorEnv, default;
    grid sampling is ~1.3-2x faster) or "sync" (Gymnasium's SyncVectorEnv over single envs); both give
    identical histories.
    """
    c = config.collect
    if c.algorithm == "sac":
        return build_sac_config(config, task_id, vectorize_mode=vectorize_mode)
    if c.algorithm != "ppo":
        raise ValueError(f"unknown collect.algorithm {c.algorithm!r}: use ppo or sac")
    continuous = config.env.is_meta_world
    rllib_env = _register_rllib_env(config)
    return (
        PPOConfig()
        .environment(rllib_env, env_config=_env_config(config, task_id),
                     **({"normalize_actions": False, "clip_actions": True} if continuous else {}))
        .env_runners(num_env_runners=0, num_envs_per_env_runner=c.num_streams,
                     rollout_fragment_length=c.rollout_steps, batch_mode="truncate_episodes",
                     gym_env_vectorize_mode=vectorize_mode)
        .learners(num_learners=0)
        .training(lr=c.lr, gamma=c.gamma, lambda_=c.gae_lambda, clip_param=c.clip_param,
                  vf_clip_param=float("inf"), vf_loss_coeff=c.vf_loss_coeff, entropy_coeff=c.entropy_coeff,
                  grad_clip=c.grad_clip, grad_clip_by="global_norm", use_kl_loss=False,
                  num_epochs=c.num_epochs, minibatch_size=c.minibatch_size,
                  train_batch_size_per_learner=c.rollout_steps * c.num_streams)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=SB3InitPPOModule),
                   model_config=DefaultModelConfig(fcnet_hiddens=list(c.hidden_sizes),
                                                   fcnet_activation="tanh", vf_share_layers=False,
                                                   free_log_std=continuous))
        .callbacks(HistoryRecorder)
        .debugging(seed=c.seed + int(task_id), log_level="WARN")
    )


def build_sac_config(config: ExperimentConfig, task_id: int, *,
                     vectorize_mode: str = "vector_entry_point") -> SACConfig:
    """RLlib SAC as SB3's SAC with the release's settings (``cfg/alg/sac_ml1.yaml``) on Meta-World task ``task_id``.

    Each ``train()`` samples ``sac_train_freq`` steps of every stream, then runs ``sac_gradient_steps``
    updates of ``sac_batch_size`` transitions from a uniform replay buffer of ``sac_buffer_size`` once
    ``sac_learning_starts`` env steps (all streams) exist: SB3's ``train_freq`` / ``gradient_steps`` per
    vector step, so with N streams the updates per env step are 1/N of a 1-env SB3 run (raise
    ``sac_gradient_steps`` to N to keep SB3's ratio). SB3 defaults kept: one lr for actor, critics and
    entropy, tau 0.005, target update every step, entropy coefficient auto from 1.0, target entropy
    -dim(A), twin Q, 256x256 ReLU MLPs, tanh-squashed Gaussian. Differences: before learning starts RLlib
    acts with the untrained policy (SB3 samples uniform actions), and RLlib's own iteration minimums
    (SAC: 1 s and 100 steps per ``train()``) are switched off so one ``train()`` is one sample + update.
    """
    c = config.collect
    if not config.env.is_meta_world:
        raise ValueError(f"collect.algorithm = 'sac' needs continuous actions (Meta-World), not "
                         f"{config.env.name}")
    # RLlib's replay-ratio knob: native ratio = batch / (fragment * envs); g * native gives g updates.
    intensity = c.sac_gradient_steps * c.sac_batch_size / (c.sac_train_freq * c.num_streams)
    return (
        SACConfig()
        .environment(_register_rllib_env(config), env_config=_env_config(config, task_id),
                     normalize_actions=False, clip_actions=True)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=c.num_streams,
                     rollout_fragment_length=c.sac_train_freq, batch_mode="truncate_episodes",
                     gym_env_vectorize_mode=vectorize_mode)
        .learners(num_learners=0)
        .training(actor_lr=c.lr, critic_lr=c.lr, alpha_lr=c.lr, gamma=c.gamma, tau=0.005, initial_alpha=1.0,
                  target_entropy="auto", twin_q=True, n_step=1, target_network_update_freq=0,
                  train_batch_size_per_learner=c.sac_batch_size,
                  num_steps_sampled_before_learning_starts=c.sac_learning_starts,
                  replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": c.sac_buffer_size},
                  training_intensity=intensity if c.sac_gradient_steps != 1 else None)
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=list(c.sac_hidden_sizes),
                                                   fcnet_activation="relu"))
        .reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=0,
                   min_train_timesteps_per_iteration=0)
        .callbacks(HistoryRecorder)
        .debugging(seed=c.seed + int(task_id), log_level="WARN")
    )


class HistoryRecorder(RLlibCallback):
    """Keeps every finished episode of every stream (``env_index``), in the order the episodes ended.

    ``on_episode_end`` fires once per episode, inside the EnvRunner, before RLlib numpy-izes and drops it,
    with the earlier chunks of an episode that spanned several ``sample()`` calls. Observations include the
    true final observation RLlib logs at truncation (not the reset observation of the next episode).
    Envs that report ``info["action"]`` (Meta-World: the clipped float32 action it executed) have that
    stored instead of the policy's raw sample, plus ``info["success"]``. With ``record_obs_dim`` in the
    env_config (Meta-World) only the first that many observation numbers are stored: the learner may see
    Meta-World's 39-dim observation (``collect.source_obs: full``), the histories keep the model's 11 / 18.
    """

    def on_episode_end(self, *, episode, prev_episode_chunks=None, env_runner=None, env_index: int,
                       **kwargs) -> None:
        chunks = [*(prev_episode_chunks or []), episode]
        # With num_learners=0 the learner got the SAME chunk objects, and PPO's GAE connector appended an
        # artificial bootstrap step to each: keep only a chunk's real steps, up to where the next one starts.
        lengths = [b.t_started - a.t_started for a, b in zip(chunks, chunks[1:])] + [len(episode)]

        def steps(getter, dtype=None) -> np.ndarray:
            return np.concatenate([np.asarray(getter(ch), dtype)[:n] for ch, n in zip(chunks, lengths)])

        keep = env_runner.config.env_config.get("record_obs_dim")              # None: the whole observation
        obs = steps(lambda ch: ch.get_observations(), np.float32)[:, :keep]
        final_obs = np.asarray(episode.get_observations(-1), np.float32)[:keep]  # the true last one, not a reset
        record = {
            "obs": obs, "next_obs": np.concatenate([obs[1:], final_obs[None]]),
            "action": steps(lambda ch: ch.get_actions()),
            "reward": steps(lambda ch: ch.get_rewards(), np.float32),
            "policy_version": steps(lambda ch: ch.get_extra_model_outputs("weights_seq_no"), np.int64),
            # HorizonAsTerminal's terminated=True is for the learner only: the data keep the env's truncation.
            "terminated": bool(episode.is_terminated) and not episode.get_infos(-1).get(HORIZON_TERMINAL_KEY, False),
            "truncated": bool(episode.is_truncated),
        }
        # infos[0] of a chunk is its reset (or carried-over) info; infos[t + 1] comes from step t.
        infos = [info for ch, n in zip(chunks, lengths) for info in list(ch.get_infos())[1:n + 1]]
        if infos and "action" in infos[0]:
            if len(infos) != len(record["reward"]):
                raise RuntimeError(f"{len(infos)} step infos for {len(record['reward'])} steps")
            record["action"] = np.stack([info["action"] for info in infos]).astype(np.float32)
            record["success"] = np.array([info["success"] for info in infos], np.float32)
        env_runner.__dict__.setdefault(_EPISODES_ATTR, []).append((int(env_index), record))

    def on_sample_end(self, *, env_runner=None, samples=(), **kwargs) -> None:
        env_runner.__dict__.setdefault(_SAMPLES_ATTR, []).append(int(sum(len(ep) for ep in samples)))


def _drain(env_runner: Any, attr: str) -> list:
    items = env_runner.__dict__.get(attr, [])
    env_runner.__dict__[attr] = []
    return items


# ----------------------------------------------------------------------------------------------------------
# One learner: train, check update alignment, turn episodes into shard columns, write the shard
# ----------------------------------------------------------------------------------------------------------

def _episodes_to_columns(env_name: str, task_id: int, streams: list[list[dict]]) -> dict[str, np.ndarray]:
    from dicp_ray.collect.fingerprint import oracle_labels  # the driver module; imported here, not at import time

    continuous = "success" in streams[0][0]                       # Meta-World records
    parts: dict[str, list] = {k: [] for k in ("stream", "episode", "step", "obs", "action", "reward",
                                               "next_obs", "terminated", "truncated")}
    if continuous:
        parts["success"] = []
    for stream, episodes in enumerate(streams):
        for index, ep in enumerate(episodes):
            n = len(ep["reward"])
            last = np.arange(n) == n - 1
            parts["stream"].append(np.full(n, stream, np.int32))
            parts["episode"].append(np.full(n, index, np.int32))
            parts["step"].append(np.arange(n, dtype=np.int32))
            parts["terminated"].append(last & ep["terminated"])
            parts["truncated"].append(last & ep["truncated"])
            for key in ("obs", "action", "reward", "next_obs", *(("success",) if continuous else ())):
                parts[key].append(ep[key])
    columns = {k: np.concatenate(v) for k, v in parts.items()}
    if continuous:
        columns["action"] = columns["action"].astype(np.float32)
        return columns
    columns["action"] = columns["action"].astype(np.int64)
    columns["optimal_action"] = oracle_labels(env_name, task_id, columns)
    return columns




def _keep_budget(streams: list[list[dict]], steps_per_stream: int) -> list[list[dict]]:
    """Drop episodes beyond ``steps_per_stream`` steps (the last update may overshoot the budget)."""
    kept = []
    for episodes in streams:
        lengths = np.cumsum([len(ep["reward"]) for ep in episodes])
        kept.append(episodes[:int(np.searchsorted(lengths, steps_per_stream, side="right"))])
    return kept


def _updates_aligned(streams: list[list[dict]], sample_steps: list[int], rollout_steps: int,
                     num_streams: int, check_versions: bool = True) -> bool:
    """Every update sampled exactly ``rollout_steps`` consecutive steps of every stream.

    Step t of a stream must have been taken by policy version t // rollout_steps (RLlib's weights_seq_no
    grows by one per update; PPO only, ``check_versions``), and every ``sample()`` call must have returned
    rollout_steps * num_streams.
    """
    if any(steps != rollout_steps * num_streams for steps in sample_steps):
        return False
    if not check_versions:
        return True
    for episodes in streams:
        versions = np.concatenate([ep["policy_version"] for ep in episodes])
        if not np.array_equal(versions, np.arange(versions.size) // rollout_steps):
            return False
    return True


def _success_summary(streams: list[list[dict]]) -> dict[str, float]:
    """Meta-World: fraction of episodes with a success at any step, overall and in each stream's last 10%."""
    solved = [[float(ep["success"].max()) for ep in episodes] for episodes in streams]
    last = [s for per_stream in solved for s in per_stream[-math.ceil(0.1 * len(per_stream)):]]
    return {"episode_success_rate": float(np.mean([s for per_stream in solved for s in per_stream])),
            "last_10pct_success_rate": float(np.mean(last))}


def learn_task(config: ExperimentConfig, task_id: int, dataset_dir: str) -> dict:
    """Train one learner on ``task_id``, write its shard + sidecar, return the sidecar (in-process)."""
    from dicp_ray.collect.fingerprint import data_fingerprint  # the driver module; imported here, not at import time

    torch.set_num_threads(1)
    c = config.collect
    ppo = c.algorithm == "ppo"
    steps_per_stream = c.env_steps_per_task // c.num_streams
    steps_per_update = c.rollout_steps if ppo else c.sac_train_freq
    num_updates = math.ceil(steps_per_stream / steps_per_update)
    start = time.perf_counter()
    algo = build_learner_config(config, task_id).build_algo()
    try:
        streams: list[list[dict]] = [[] for _ in range(c.num_streams)]
        curve: dict[str, list] = {"env_steps": [], "return_mean": []}
        for update in range(num_updates):
            algo.train()
            finished = _drain(algo.env_runner, _EPISODES_ATTR)
            for stream, record in finished:
                streams[stream].append(record)
            returns = [float(record["reward"].sum()) for _, record in finished]
            curve["env_steps"].append((update + 1) * steps_per_update * c.num_streams)
            curve["return_mean"].append(float(np.mean(returns)) if returns else None)
        streams = _keep_budget(streams, steps_per_stream)
        aligned = _updates_aligned(streams, _drain(algo.env_runner, _SAMPLES_ATTR), steps_per_update,
                                   c.num_streams, check_versions=ppo)
        if not aligned:
            logger.warning("task %d: %s updates did not hold exactly %d consecutive steps of every stream",
                           task_id, c.algorithm.upper(), steps_per_update)
        columns = _episodes_to_columns(config.env.name, task_id, streams)
        extra = {"fingerprint": data_fingerprint(config), "env_name": config.env.name,
                 "seed": c.seed + task_id, "num_updates": num_updates, "updates_aligned": aligned,
                 "env_steps": int(columns["reward"].size), "curve": curve,
                 "wall_s": round(time.perf_counter() - start, 3)}
        if "success" in columns:
            extra.update(env_task=config.env.task, algorithm=c.algorithm, success=_success_summary(streams))
        return shards.write_shard(dataset_dir, task_id, columns, extra)
    finally:
        algo.stop()


@ray.remote
def _learn_task_remote(config: ExperimentConfig, task_id: int, dataset_dir: str) -> dict:
    return learn_task(config, task_id, dataset_dir)


# ----------------------------------------------------------------------------------------------------------
