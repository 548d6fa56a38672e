"""In-context evaluation: a trained model acts on every unseen test task, episode after episode, no gradients.

What it does
    ``evaluate_in_context`` loads a checkpoint, builds ONE batched vector env holding every test task of the
    checkpoint's split, and runs the in-context loop from an empty context for ``eval.num_episodes``
    episodes: at each step the context is the last k-1 real transitions of that task's history (across
    episode boundaries) and the query is the current observation. Mode "policy" samples the distilled
    policy (AD / DPT; IDT acts hierarchically through ``dicp_ray.idt_grid_agent.GridIDTAgent`` on the grid
    worlds and ``dicp_ray.idt.IDTAgent`` on Meta-World, see `_rollout_idt` and `_rollout_idt_continuous`);
    mode "plan" runs DICP beam search once the context is full (before that it samples), for AD and grid IDT
    checkpoints (IDT: inside Decisions-to-Go), and on Meta-World the depth-1 sampled search for AD and IDT.
    ``run_evaluations`` fans (split seed x mode) out as Ray tasks and aggregates over split seeds.

How to run it
    dicp-ray evaluate --checkpoint runs/demo/train/split_0/model.pt --set eval.num_episodes=50

    from dicp_ray.evaluate import evaluate_in_context, run_evaluations, format_results_table
    result = evaluate_in_context("model.pt", output_dir="eval/split_0/plan", mode="plan")
    print(format_results_table(run_evaluations(config, {0: "model.pt"}, "eval")))

What to expect
    ``<dir>/results.json`` (written last, atomically: its presence marks a finished run), ``returns.csv``
    (episode, mean, ci_low, ci_high, oracle) and TensorBoard scalars ``eval/<mode>/return_mean`` per episode
    index. ``run_evaluations`` adds ``summary.json``, ``summary.csv`` and ``learning_curves.png`` and skips a
    (split seed, mode) whose results.json matches the checkpoint and settings. Runs are deterministic for
    ``eval.seed``. On Darkroom the paper's AD reaches about 13.3 (policy) and DICP-AD about 15.3 (plan) after
    50 episodes; the oracle maximum over the 8 test goals is 16-17 for split seeds 0-4.
"""
from __future__ import annotations

import csv
import ctypes
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dicp_ray.config import ExperimentConfig, config_from_dict
from dicp_ray.envs import GRID_SPECS, cell_obs, split_tasks
from dicp_ray.idt import IDTAgent
from dicp_ray.idt_grid_agent import GridIDTAgent
from dicp_ray.model import load_checkpoint
from dicp_ray.plan import (Context, PlannerSettings, plan_continuous, plan_discrete, sample_policy_action,
                           should_plan)
from dicp_ray.runtime import init_ray, provenance, write_text_atomic

logger = logging.getLogger(__name__)

MODES = ("policy", "plan")
RESULTS_FILE, RETURNS_CSV, TB_DIR = "results.json", "returns.csv", "tb"
SUMMARY_JSON, SUMMARY_CSV, CURVES_PNG = "summary.json", "summary.csv", "learning_curves.png"
RESULTS_SCHEMA_VERSION = 1
TABLE_EPISODES = (1, 5, 10, 25, 50)
# Two-sided 95% Student-t critical values for 1..9 degrees of freedom; from 10 on the Cornish-Fisher
# expansion below is within 1e-5 of the exact quantile.
_T975_SMALL_DF = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622)
_MALLOC_TUNED = False


def metric_tag(mode: str) -> str:
    """TensorBoard tag of the mean return per episode index for `mode`."""
    return f"eval/{mode}/return_mean"


def method_label(variant: str, mode: str, world_model: bool = False) -> str:
    """'AD (policy)', 'AD + world model (policy)' (a DICP checkpoint acting without planning), 'DICP-AD (plan)'."""
    if mode == "plan":
        return f"DICP-{variant.upper()} (plan)"
    return f"{variant.upper()}{' + world model' if world_model else ''} (policy)"


# ----------------------------------------------------------------------------- statistics
def t_critical_95(df: int) -> float:
    """Two-sided 95% critical value of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975_SMALL_DF):
        return _T975_SMALL_DF[df - 1]
    z, v = 1.959963984540054, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def mean_ci95(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, ...) samples -> mean, low, high of a t-interval over axis 0 (zero width when n < 2)."""
    samples = np.asarray(samples, dtype=np.float64)
    n, mean = samples.shape[0], samples.mean(axis=0)
    if n < 2:
        return mean, mean.copy(), mean.copy()
    half = t_critical_95(n - 1) * samples.std(axis=0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------- checks and setup
def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not known: choose one of {', '.join(MODES)}")


def _resolve_config(payload: dict, config: ExperimentConfig | None, path: str) -> ExperimentConfig:
    if config is not None:
        return config
    if not isinstance(payload.get("config"), dict):
        raise ValueError(f"checkpoint {path} stores no experiment config: pass config=")
    return config_from_dict(payload["config"])


def _check_compatible(payload: dict, spec, config: ExperimentConfig, mode: str, path: str) -> None:
    """Refuse a config whose env or variant disagree with the checkpoint, and planning without world model."""
    _check_mode(mode)
    trained_env = payload.get("env_name")
    if trained_env is not None and trained_env != config.env.name:
        raise ValueError(f"checkpoint {path} was trained on {trained_env} but config.env.name = "
                         f"{config.env.name!r}: evaluate it with --set env.name={trained_env}")
    trained_task = (payload.get("config") or {}).get("env", {}).get("task")
    if trained_task != config.env.task:
        raise ValueError(f"checkpoint {path} was trained on Meta-World task {trained_task!r} but config.env.task = "
                         f"{config.env.task!r}: evaluate it with --set env.task={trained_task}")
    variant = payload.get("variant", spec.layout)
    if variant != config.model.variant:
        raise ValueError(f"checkpoint {path} is variant {variant!r} but config.model.variant = "
                         f"{config.model.variant!r}: use --set model.variant={variant}")
    if mode == "plan" and spec.layout == "idt" and not spec.discrete_actions and config.plan_depth != 1:
        raise ValueError(f"mode 'plan': IDT's sampled search is depth 1 only, plan.depth = {config.plan_depth} "
                         "(--set plan.depth=1)")
    if mode == "plan" and not spec.world_model:
        raise ValueError(f"mode 'plan' needs a world model, but checkpoint {path} was trained with "
                         "model.world_model=false: evaluate it in mode 'policy' (--set eval.modes=[policy])")
    if mode == "plan" and spec.layout not in ("ad", "idt"):
        raise ValueError(f"mode 'plan' supports the 'ad' and 'idt' layouts only, checkpoint {path} "
                         f"has {spec.layout!r}")


def _resolve_split_seed(payload: dict, split_seed: int | None, config: ExperimentConfig, path: str) -> int:
    stored = payload.get("split_seed")
    if split_seed is None:
        return int(stored) if stored is not None else int(config.env.split_seeds[0])
    if stored is not None and int(stored) != int(split_seed):
        raise ValueError(f"checkpoint {path} was trained on split seed {stored}, asked to evaluate split "
                         f"seed {split_seed}: its test tasks could be that model's training tasks")
    return int(split_seed)


def _keep_freed_memory() -> None:
    """Let glibc reuse freed blocks instead of returning them to the kernel after every planning step.

    Beam search allocates and frees multi-MB key/value copies at every depth level; with glibc's defaults
    each one is a fresh mmap and the process spends as much time in page faults as in arithmetic (measured:
    a paper-size Darkroom plan step 0.53 s -> 0.28 s, 115K -> ~0 minor faults). Process-wide and harmless
    elsewhere (up to a few hundred MB stay reserved); a no-op off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_TRIM_THRESHOLD = -1, M_TOP_PAD = -2, M_MMAP_THRESHOLD = -3 (32 MiB is glibc's maximum).
        libc.mallopt(-1, 256 << 20), libc.mallopt(-2, 64 << 20), libc.mallopt(-3, 32 << 20)
    except (OSError, AttributeError):
        logger.debug("glibc mallopt is not available; keeping the default allocator settings")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("eval.device = 'cuda' but no CUDA device is visible: use --set eval.device=auto")
    return torch.device(name)


def eval_task_ids(config: ExperimentConfig, split_seed: int) -> list[int]:
    """The test tasks of `split_seed`, capped by env.max_test_tasks."""
    _, test_ids = split_tasks(config.env.name, split_seed, config.env.train_ratio)
    return test_ids[: config.env.max_test_tasks] if config.env.max_test_tasks else test_ids


def planner_settings(config: ExperimentConfig) -> PlannerSettings:
    p = config.plan
    return PlannerSettings(beam_width=p.beam_width, depth=config.plan_depth, use_cache=p.use_cache,
                           num_samples=p.num_samples, second_half_only=p.second_half_only)


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(config: ExperimentConfig, checkpoint_sha256: str, mode: str, split_seed: int) -> dict:
    """Everything that decides the numbers of a run: an equal fingerprint means a finished run is reusable."""
    fp = {"checkpoint_sha256": checkpoint_sha256, "mode": mode, "split_seed": split_seed,
          "env": config.env.name, **({"task": config.env.task} if config.env.task else {}),
          "train_ratio": config.env.train_ratio,
          "max_test_tasks": config.env.max_test_tasks, "num_episodes": config.eval.num_episodes,
          "seed": config.eval.seed}
    if mode == "plan":
        fp["plan"] = {**config.to_dict()["plan"], "depth": config.plan_depth}
    return fp


# ----------------------------------------------------------------------------- the in-context loop
def _rollout(model, env, num_episodes: int, mode: str, settings: PlannerSettings,
             generator: torch.Generator, device: torch.device, desc: str) -> tuple[np.ndarray, int]:
    """Act on all of `env`'s tasks at once -> returns (num_tasks, num_episodes) and the planned decisions."""
    from tqdm.auto import tqdm

    if model.spec.layout == "idt":
        return _rollout_idt(model, env, num_episodes, mode, settings, generator, device, desc)
    num_tasks, horizon, k = env.num_envs, env.horizon, model.spec.context_len
    obs_dim, total_steps = model.spec.obs_dim, num_episodes * horizon
    # Whole histories (N, total_steps, ...): the context is a view of the last k-1 rows, so it runs on
    # across episode boundaries exactly like a training window.
    hist = Context(torch.zeros(num_tasks, total_steps, obs_dim, device=device),
                   torch.zeros(num_tasks, total_steps, dtype=torch.long, device=device),
                   torch.zeros(num_tasks, total_steps, device=device),
                   torch.zeros(num_tasks, total_steps, obs_dim, device=device))
    obs_table = torch.as_tensor(np.stack([cell_obs(c) for c in range(model.spec.num_obs_classes or 81)]),
                                dtype=torch.float32, device=device)                      # (81, D)
    returns, num_planned, step = np.zeros((num_tasks, num_episodes)), 0, 0
    for episode in tqdm(range(num_episodes), desc=desc, unit="episode", leave=False, disable=None):
        obs, _ = env.reset()  # every task truncates at the same step, so all reset together
        for t in range(horizon):
            start = max(0, step - (k - 1))
            context = hist.map(lambda x: x[:, start:step])                               # (N, T, ...)
            query = torch.as_tensor(obs, dtype=torch.float32, device=device)             # (N, D)
            if mode == "plan" and should_plan(settings, k, step - start, t, horizon):
                steps_left = torch.full((num_tasks,), horizon - t, dtype=torch.long, device=device)
                action = plan_discrete(model, context, query, steps_left, obs_table, settings, generator)
                num_planned += num_tasks
            else:
                action = sample_policy_action(model, context, query, generator)          # (N,)
            next_obs, reward, _, _, _ = env.step(action.cpu().numpy())
            for column, value in zip(hist.tensors(), (obs, action, reward, next_obs)):
                column[:, step] = torch.as_tensor(value, device=device).to(column.dtype)
            returns[:, episode] += reward
            obs, step = next_obs, step + 1
    return returns, num_planned


def _rollout_idt(model, env, num_episodes: int, mode: str, settings: PlannerSettings, generator: torch.Generator,
                 device: torch.device, desc: str) -> tuple[np.ndarray, int]:
    """Grid IDT (dicp_ray/idt_grid_agent.py): a decision every block_len steps, actions sampled from
    Decisions-to-Go; mode "plan" (DICP-IDT) searches inside Decisions-to-Go once the agent has taken context_len
    steps. Every episode's return-to-go starts at the task's maximum achievable return, as in the release."""
    from tqdm.auto import tqdm

    target = torch.as_tensor(np.asarray(env.max_returns(), dtype=np.float32), device=device)
    agent = GridIDTAgent(model, env.horizon, target, generator)
    returns, num_planned = np.zeros((env.num_envs, num_episodes)), 0
    for episode in tqdm(range(num_episodes), desc=desc, unit="episode", leave=False, disable=None):
        obs, _ = env.reset()  # every task truncates at the same step, so all reset together
        agent.start_episode()
        for _ in range(env.horizon):
            query = torch.as_tensor(obs, dtype=torch.float32, device=device)
            if mode == "plan" and agent.plan_ready:
                action = agent.plan_action(query, settings.beam_width, settings.use_cache)
                num_planned += env.num_envs
            else:
                action = agent.act(query)
            next_obs, reward, _, _, _ = env.step(action.cpu().numpy())
            agent.observe(action, torch.as_tensor(reward), torch.as_tensor(next_obs))
            returns[:, episode] += reward
            obs = next_obs
    return returns, num_planned


def _rollout_continuous(model, env, num_episodes: int, mode: str, settings: PlannerSettings,
                        generator: torch.Generator, device: torch.device,
                        desc: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Meta-World: act on all test tasks at once -> returns, per-episode success (N, E) and planned decisions.

    An episode counts as a success when ``info["success"]`` is 1 at any of its steps (Meta-World's own
    convention). The context stores the executed (clipped) action, as the training data does. Plan mode is
    the sampled search of `plan_continuous` (L = plan.num_samples candidates, depth plan.depth).
    """
    from tqdm.auto import tqdm

    if model.spec.layout == "idt":
        return _rollout_idt_continuous(model, env, num_episodes, mode, settings, generator, device, desc)
    num_tasks, horizon, k = env.num_envs, env.horizon, model.spec.context_len
    obs_dim, act_dim, total_steps = model.spec.obs_dim, model.spec.num_actions, num_episodes * horizon
    hist = Context(torch.zeros(num_tasks, total_steps, obs_dim, device=device),
                   torch.zeros(num_tasks, total_steps, act_dim, device=device),
                   torch.zeros(num_tasks, total_steps, device=device),
                   torch.zeros(num_tasks, total_steps, obs_dim, device=device))
    returns, successes = np.zeros((num_tasks, num_episodes)), np.zeros((num_tasks, num_episodes))
    num_planned, step = 0, 0
    for episode in tqdm(range(num_episodes), desc=desc, unit="episode", leave=False, disable=None):
        obs, _ = env.reset()
        for t in range(horizon):
            start = max(0, step - (k - 1))
            context = hist.map(lambda x: x[:, start:step])
            query = torch.as_tensor(obs, dtype=torch.float32, device=device)
            if mode == "plan" and should_plan(settings, k, step - start, t, horizon):
                action = plan_continuous(model, context, query, settings, generator)
                num_planned += num_tasks
            else:
                action = sample_policy_action(model, context, query, generator)           # (N, A)
            next_obs, reward, _, _, info = env.step(action.float().cpu().numpy())
            executed = info["action"]                                                     # clipped (N, A)
            for column, value in zip(hist.tensors(), (obs, executed, reward, next_obs)):
                column[:, step] = torch.as_tensor(np.asarray(value), device=device).to(column.dtype)
            returns[:, episode] += reward
            successes[:, episode] = np.maximum(successes[:, episode], info["success"])
            obs, step = next_obs, step + 1
    return returns, successes, num_planned


def _rollout_idt_continuous(model, env, num_episodes: int, mode: str, settings: PlannerSettings,
                            generator: torch.Generator, device: torch.device,
                            desc: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Meta-World IDT: returns, per-episode success (N, E) and planned decisions, recorded as `_rollout_continuous`
    does (success at any step; the context stores the executed, clipped ``info["action"]``). Every episode's
    return-to-go starts at ``spec.return_target``, the best episode return of the training data. Plan mode:
    ``IDTAgent.plan_action`` (L = plan.num_samples, depth 1) once the context holds E-1 finished episodes (should_plan
    in episode units), with plan.second_half_only from the middle of each episode; the policy samples before."""
    from tqdm.auto import tqdm

    if model.spec.return_target is None:
        raise ValueError("this continuous IDT checkpoint has no model_spec.return_target (the best training "
                         "return): retrain it with this version of dicp_ray")
    num_tasks, horizon = env.num_envs, env.horizon
    target = torch.full((num_tasks,), float(model.spec.return_target), device=device)
    agent = IDTAgent(model, horizon, target, generator)
    returns, successes = np.zeros((num_tasks, num_episodes)), np.zeros((num_tasks, num_episodes))
    num_planned = 0
    for episode in tqdm(range(num_episodes), desc=desc, unit="episode", leave=False, disable=None):
        obs, _ = env.reset()
        agent.start_episode()
        for t in range(horizon):
            query = torch.as_tensor(obs, dtype=torch.float32, device=device)
            if mode == "plan" and should_plan(settings, agent.context_episodes, agent.num_finished, t, horizon):
                action = agent.plan_action(query, settings.num_samples)
                num_planned += num_tasks
            else:
                action = agent.act(query)                                                 # (N, A)
            next_obs, reward, _, _, info = env.step(action.float().cpu().numpy())
            executed = np.asarray(info["action"])                                         # clipped (N, A)
            agent.observe(torch.as_tensor(executed), torch.as_tensor(np.asarray(reward)),
                          torch.as_tensor(np.asarray(next_obs)))
            returns[:, episode] += reward
            successes[:, episode] = np.maximum(successes[:, episode], info["success"])
            obs = next_obs
    return returns, successes, num_planned


def success_metrics(successes: np.ndarray) -> dict:
    """(tasks, episodes) 0/1 -> per-episode success rate and the "succeeded at least once so far" rate (the
    authors' release reports the latter), each with a 95% t-interval over tasks."""
    once = np.maximum.accumulate(successes, axis=1)
    out = {"successes": successes.tolist()}
    for name, values in (("success", successes), ("success_once_so_far", once)):
        mean, low, high = mean_ci95(values)
        low, high = np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)  # a t-interval of 0/1 data can leave [0, 1]
        out.update({f"{name}_mean": mean.tolist(), f"{name}_ci_low": low.tolist(),
                    f"{name}_ci_high": high.tolist()})
    return out


def evaluate_in_context(checkpoint_path: str, config: ExperimentConfig | None = None,
                        output_dir: str | None = None, mode: str = "plan", split_seed: int | None = None,
                        *, num_threads: int | None = 1) -> dict:
    """Run the in-context loop on every test task of the split at once; returns (and writes) the results.

    `config` defaults to the one stored in the checkpoint; `split_seed` to the checkpoint's. On CPU the run
    uses `num_threads` torch threads (None = leave torch's setting) and restores the setting afterwards:
    one thread is fastest for these small batched calls, and several contend badly on a shared machine
    (a plan step of the paper-size model took 0.5 s with 1 thread and 4-6 s with 2 on a busy 2-core box).
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _evaluate(os.fspath(checkpoint_path), config, output_dir, mode, split_seed)
    finally:
        torch.set_num_threads(previous_threads)


def _load_for_eval(path: str, config: ExperimentConfig | None, mode: str, split_seed: int | None):
    """Load the checkpoint, check it against the config -> (model, payload, config, split seed, task ids)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (pass a model.pt written by `dicp-ray train`)")
    _check_mode(mode)
    model, payload = load_checkpoint(path, map_location="cpu")
    config = _resolve_config(payload, config, path)
    _check_compatible(payload, model.spec, config, mode, path)
    if model.spec.context_len != config.context_len:
        logger.warning("checkpoint context k=%d differs from config.context_len=%d; using the checkpoint's",
                       model.spec.context_len, config.context_len)
    split_seed = _resolve_split_seed(payload, split_seed, config, path)
    task_ids = eval_task_ids(config, split_seed)
    leaked = set(task_ids) & set(payload.get("train_task_ids") or ())
    if leaked:
        raise ValueError(f"test tasks {sorted(leaked)} of split seed {split_seed} are training tasks of "
                         f"checkpoint {path}: check env.train_ratio against the one it was trained with")
    return model.eval(), payload, config, split_seed, task_ids


def _evaluate(path: str, config: ExperimentConfig | None, output_dir: str | None, mode: str,
              split_seed: int | None) -> dict:
    import gymnasium

    wall_start = time.perf_counter()
    model, payload, config, split_seed, task_ids = _load_for_eval(path, config, mode, split_seed)
    device = _resolve_device(config.eval.device)
    if device.type == "cpu":
        _keep_freed_memory()
    model = model.to(device)
    settings = planner_settings(config)
    generator = torch.Generator(device="cpu").manual_seed(config.eval.seed)
    desc = f"eval {mode} split {split_seed}"
    successes = None
    if config.env.is_meta_world:
        from dicp_ray.envs import meta_world

        env = gymnasium.make_vec(meta_world.env_id(config.env.name), num_envs=len(task_ids),
                                 vectorization_mode="vector_entry_point", task_ids=task_ids, task=config.env.task)
        loop_start = time.perf_counter()
        with torch.no_grad():
            returns, successes, num_planned = _rollout_continuous(model, env, config.eval.num_episodes, mode,
                                                                  settings, generator, device, desc)
        oracle = None  # no oracle return for Meta-World; success is the metric
    else:
        env = gymnasium.make_vec(GRID_SPECS[config.env.name].env_id, num_envs=len(task_ids),
                                 vectorization_mode="vector_entry_point", task_ids=task_ids)
        loop_start = time.perf_counter()
        with torch.no_grad():
            returns, num_planned = _rollout(model, env, config.eval.num_episodes, mode, settings, generator,
                                            device, desc=desc)
        oracle = np.asarray(env.max_returns(), dtype=np.float64)
    loop_s = time.perf_counter() - loop_start
    env.close()
    mean, low, high = mean_ci95(returns)
    num_decisions = int(returns.size * env.horizon)
    result = {
        "format": "dicp_ray.eval_results", "schema_version": RESULTS_SCHEMA_VERSION,
        "env": config.env.name, "variant": config.model.variant, "world_model": model.spec.world_model,
        "mode": mode, "label": method_label(config.model.variant, mode, model.spec.world_model), "split_seed": split_seed,
        "task_ids": [int(i) for i in task_ids], "num_episodes": config.eval.num_episodes,
        "horizon": int(env.horizon), "context_len": model.spec.context_len,
        "return_mean": mean.tolist(), "return_ci_low": low.tolist(), "return_ci_high": high.tolist(),
        "ci": "95% t-interval over test tasks", "returns": returns.tolist(),
        "oracle_max_return_mean": None if oracle is None else float(oracle.mean()),
        "oracle_max_returns": None if oracle is None else oracle.tolist(),
        "settings": {"mode": mode, "seed": config.eval.seed, "device": str(device),
                     "torch_threads": torch.get_num_threads(),
                     "planner": vars(settings) if mode == "plan" else None,
                     **({"idt_return_target": _idt_return_target(model.spec)} if model.spec.layout == "idt"
                        else {})},
        "timing": {"wall_s": None, "rollout_s": loop_s, "decisions": num_decisions,
                   "planned_decisions": num_planned, "decisions_per_s": num_decisions / max(loop_s, 1e-9)},
        "checkpoint": os.path.abspath(path), "checkpoint_step": payload.get("step"),
        "fingerprint": _fingerprint(config, file_sha256(path), mode, split_seed),
        "config": config.to_dict(), "provenance": provenance(),
    }
    if successes is not None:
        result.update(success_metrics(successes))
    result["timing"]["wall_s"] = time.perf_counter() - wall_start
    if output_dir is not None:
        _write_run_outputs(Path(output_dir), result)
    logger.info("%s split %d: return %.2f after episode 1, %.2f after episode %d (oracle %s), %.0f "
                "decisions/s", result["label"], split_seed, mean[0], mean[-1], len(mean),
                "-" if oracle is None else f"{oracle.mean():.2f}", result["timing"]["decisions_per_s"])
    return result


def _idt_return_target(spec) -> str | float:
    """What IDT's episodes start at: the task's max return (grid worlds) or the stored best training return."""
    return "task max return" if spec.discrete_actions else float(spec.return_target)


# ----------------------------------------------------------------------------- writing
def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_run_outputs(out: Path, result: dict) -> None:
    """returns.csv and TensorBoard first, results.json last (its presence marks a finished run)."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    oracle = result["oracle_max_return_mean"]
    rows = [[e + 1, m, lo, hi, "" if oracle is None else oracle] for e, (m, lo, hi) in
            enumerate(zip(result["return_mean"], result["return_ci_low"], result["return_ci_high"]))]
    write_text_atomic(out / RETURNS_CSV, _csv_text(["episode", "mean", "ci_low", "ci_high", "oracle"], rows))
    shutil.rmtree(out / TB_DIR, ignore_errors=True)  # a re-run replaces, never appends to, the curve
    writer = SummaryWriter(log_dir=str(out / TB_DIR))
    for episode, value in enumerate(result["return_mean"], start=1):
        writer.add_scalar(metric_tag(result["mode"]), value, episode)
    if oracle is not None:
        writer.add_scalar(f"eval/{result['mode']}/oracle_max_return", oracle, 1)
    for episode, value in enumerate(result.get("success_mean") or (), start=1):
        writer.add_scalar(f"eval/{result['mode']}/success", value, episode)
    writer.close()
    write_text_atomic(out / RESULTS_FILE,
                      json.dumps(result, indent=1, sort_keys=True, default=str, allow_nan=False))


# ----------------------------------------------------------------------------- fan-out over Ray
def _finished_result(out: Path, fingerprint: dict) -> dict | None:
    try:
        result = json.loads((out / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("fingerprint") == fingerprint else None


def _precheck(config: ExperimentConfig, checkpoints: dict[int, str], modes: tuple[str, ...]) -> dict:
    """Fail before Ray starts: missing checkpoints, env/variant mismatches, planning without world model."""
    if not checkpoints:
        raise ValueError("run_evaluations needs at least one {split_seed: checkpoint_path}")
    digests = {}
    for seed, path in checkpoints.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint for split seed {seed} not found: {path}")
        model, payload = load_checkpoint(path)
        for mode in modes:
            _check_compatible(payload, model.spec, config, mode, path)
        _resolve_split_seed(payload, int(seed), config, path)
        digests[seed] = file_sha256(path)
    return digests


def run_evaluations(config: ExperimentConfig, checkpoints: dict[int, str], output_dir: str,
                    modes: tuple[str, ...] | list[str] | None = None) -> dict:
    """Evaluate every (split seed, mode) as a Ray task, then aggregate; writes summary.{json,csv} + PNG."""
    import ray

    modes = tuple(config.eval.modes if modes is None else modes)
    for mode in modes:
        _check_mode(mode)
    out = Path(output_dir).resolve()
    digests = _precheck(config, checkpoints, modes)
    results: dict[tuple[int, str], dict] = {}
    pending = {}
    for seed, path in sorted(checkpoints.items()):
        for mode in modes:
            run_dir = out / f"split_{seed}" / mode
            done = _finished_result(run_dir, _fingerprint(config, digests[seed], mode, int(seed)))
            if done is not None:
                logger.info("evaluate: split %d %s already finished in %s, reusing it", seed, mode, run_dir)
                results[(seed, mode)] = done
                continue
            pending[(seed, mode)] = (os.path.abspath(path), str(run_dir))
    if pending:
        init_ray(config.resources)
        task = ray.remote(num_cpus=1)(evaluate_in_context).options(num_gpus=_gpus_per_task(config))
        refs = {task.remote(path, config, run_dir, mode, int(seed)): (seed, mode)
                for (seed, mode), (path, run_dir) in pending.items()}
        remaining = list(refs)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            results[refs[ready[0]]] = ray.get(ready[0])
            logger.info("evaluate: split %d %s finished (%d/%d)", *refs[ready[0]], len(refs) - len(remaining),
                        len(refs))
    summary = aggregate_results(config, results, modes)
    write_summary(out, summary)
    return summary


def _gpus_per_task(config: ExperimentConfig) -> float:
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if config.eval.device == "cuda" and not has_gpu:
        raise ValueError("eval.device = 'cuda' but the Ray cluster has no GPUs: use --set eval.device=auto")
    return 0.5 if has_gpu and config.eval.device != "cpu" else 0


# ----------------------------------------------------------------------------- aggregation and reports
def aggregate_results(config: ExperimentConfig, results: dict[tuple[int, str], dict],
                      modes: tuple[str, ...]) -> dict:
    """Per mode: mean return per episode over split seeds, 95% CI across seeds (over tasks with one seed)."""
    seeds = sorted({seed for seed, _ in results})
    methods = {}
    for mode in modes:
        runs = [results[(seed, mode)] for seed in seeds]
        curves = np.array([run["return_mean"] for run in runs])                        # (S, E)
        if len(runs) > 1:
            mean, low, high = mean_ci95(curves)
            ci_over = "split_seeds"
        else:
            mean, low, high = (np.asarray(runs[0][key]) for key in
                               ("return_mean", "return_ci_low", "return_ci_high"))
            ci_over = "tasks"
        methods[mode] = {
            "label": method_label(config.model.variant, mode, config.model.world_model),
            "return_mean": mean.tolist(),
            "ci_low": low.tolist(), "ci_high": high.tolist(), "ci_over": ci_over,
            "per_split_return_mean": {str(s): run["return_mean"] for s, run in zip(seeds, runs)},
            "decisions_per_s": float(np.mean([run["timing"]["decisions_per_s"] for run in runs])),
            "num_test_tasks": {str(s): len(run["task_ids"]) for s, run in zip(seeds, runs)},
        }
        for metric in ("success", "success_once_so_far"):  # Meta-World
            if f"{metric}_mean" in runs[0]:
                methods[mode].update(_aggregate_curves(runs, seeds, metric))
    oracles = [results[(seed, modes[0])]["oracle_max_return_mean"] for seed in seeds]
    oracle = None if None in oracles else float(np.mean(oracles))
    return {"format": "dicp_ray.eval_summary", "schema_version": RESULTS_SCHEMA_VERSION,
            "env": config.env.name, "variant": config.model.variant, "split_seeds": seeds,
            "num_episodes": config.eval.num_episodes, "oracle_max_return_mean": oracle, "methods": methods,
            "ci": "95% t-interval", "config": config.to_dict(), "provenance": provenance()}


def _aggregate_curves(runs: list[dict], seeds: list[int], metric: str) -> dict:
    """`metric`'s per-episode mean with a 95% CI over split seeds (over tasks when there is one seed)."""
    curves = np.array([run[f"{metric}_mean"] for run in runs])
    if len(runs) > 1:
        mean, low, high = mean_ci95(curves)
        low, high = np.clip(low, 0.0, 1.0), np.clip(high, 0.0, 1.0)
    else:
        mean, low, high = (np.asarray(runs[0][f"{metric}_{key}"]) for key in ("mean", "ci_low", "ci_high"))
    return {f"{metric}_mean": mean.tolist(), f"{metric}_ci_low": low.tolist(), f"{metric}_ci_high": high.tolist(),
            f"per_split_{metric}_mean": {str(s): run[f"{metric}_mean"] for s, run in zip(seeds, runs)}}


def write_summary(out: Path, summary: dict) -> None:
    rows = []
    for mode, method in summary["methods"].items():
        for e, values in enumerate(zip(method["return_mean"], method["ci_low"], method["ci_high"])):
            oracle = summary["oracle_max_return_mean"]
            rows.append([method["label"], mode, e + 1, *values, "" if oracle is None else oracle])
    header = ["method", "mode", "episode", "mean", "ci_low", "ci_high", "oracle"]
    write_text_atomic(out / SUMMARY_CSV, _csv_text(header, rows))
    plot_learning_curves(summary, out / CURVES_PNG)
    write_text_atomic(out / SUMMARY_JSON,
                      json.dumps(summary, indent=1, sort_keys=True, default=str, allow_nan=False))


def plot_learning_curves(summary: dict, path: Path) -> None:
    """Return vs episode: one line and shaded 95% CI per method, dashed oracle line (headless Agg canvas).
    Meta-World adds a success panel: per-episode success (solid) and succeeded-at-least-once-so-far (dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(summary["methods"].values())
    with_success = any("success_mean" in m for m in methods)
    fig = Figure(figsize=(12.0 if with_success else 6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if with_success else 1, squeeze=False)[0]
    ax = axes[0]
    for method in methods:
        episodes = np.arange(1, len(method["return_mean"]) + 1)
        line, = ax.plot(episodes, method["return_mean"], label=method["label"])
        ax.fill_between(episodes, method["ci_low"], method["ci_high"], color=line.get_color(), alpha=0.2)
        if with_success:
            for metric, style, name in (("success", "-", "success"), ("success_once_so_far", "--", "once so far")):
                axes[1].plot(episodes, method[f"{metric}_mean"], style, color=line.get_color(),
                             label=f"{method['label']}: {name}")
                axes[1].fill_between(episodes, method[f"{metric}_ci_low"], method[f"{metric}_ci_high"],
                                     color=line.get_color(), alpha=0.12)
    if summary["oracle_max_return_mean"] is not None:
        ax.axhline(summary["oracle_max_return_mean"], color="black", linestyle="--", linewidth=1,
                   label="oracle max")
    seeds = ", ".join(str(s) for s in summary["split_seeds"])
    ax.set(xlabel="episode", ylabel="mean return over test tasks",
           title=f"{summary['env']}: in-context evaluation (split seeds {seeds})")
    if with_success:
        axes[1].set(xlabel="episode", ylabel="success rate over test tasks", ylim=(-0.02, 1.02),
                    title="success: per episode / succeeded at least once so far")
    for a in axes:
        a.xaxis.get_major_locator().set_params(integer=True)
        a.legend(loc="best", fontsize="small")
        a.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def format_results_table(summary: dict) -> str:
    """Plain-text table: method x mean return (± 95% CI) after episodes 1, 5, 10, 25, 50 (and the last)."""
    num_episodes = summary["num_episodes"]
    episodes = [e for e in TABLE_EPISODES if e <= num_episodes]
    if num_episodes not in episodes:
        episodes.append(num_episodes)
    rows = [["method", *(f"ep {e}" for e in episodes)]]
    for method in summary["methods"].values():
        mean, low, high = (np.asarray(method[key]) for key in ("return_mean", "ci_low", "ci_high"))
        cells = [f"{mean[e - 1]:.2f} ± {(high[e - 1] - low[e - 1]) / 2:.2f}" for e in episodes]
        rows.append([method["label"], *cells])
    for method in summary["methods"].values():  # Meta-World: success rates, the paper's metric
        for metric, name in (("success", "success rate"), ("success_once_so_far", "succeeded at least once")):
            if f"{metric}_mean" in method:
                mean, low, high = (np.asarray(method[f"{metric}_{key}"]) for key in ("mean", "ci_low", "ci_high"))
                rows.append([f"{method['label']}: {name}",
                             *(f"{100 * mean[e - 1]:.0f}% ± {50 * (high[e - 1] - low[e - 1]):.0f}" for e in episodes)])
    if summary["oracle_max_return_mean"] is not None:
        rows.append(["oracle (max)", *(f"{summary['oracle_max_return_mean']:.2f}" for _ in episodes)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in rows]
    seeds = ", ".join(str(s) for s in summary["split_seeds"])
    title = (f"{summary['env']}: mean return over test tasks after episode n, ± 95% CI "
             f"(split seeds {seeds})")
    return "\n".join([title, *lines])


__all__ = ["evaluate_in_context", "run_evaluations", "format_results_table", "aggregate_results",
           "plot_learning_curves", "mean_ci95", "t_critical_95", "eval_task_ids", "planner_settings",
           "metric_tag", "method_label"]
