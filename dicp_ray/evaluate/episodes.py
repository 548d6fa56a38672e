"""In-context evaluation: a trained model acts on every unseen test task, episode after episode, no gradients.

What it does
    ``evaluate_in_context`` loads a checkpoint, builds ONE batched vector env holding every test task of the
    checkpoint's split, and runs the in-context loop from an empty context for ``eval.num_episodes``
    episodes: at each step the context is the last k-1 real transitions of that task's history (across
    episode boundaries) and the query is the current observation. Mode "policy" samples the distilled
    policy (AD, DPT; IDT acts hierarchically); mode "plan" runs DICP beam search once the context is full
    (before that it samples) for AD, DPT and grid IDT checkpoints (IDT: inside Decisions-to-Go,
    ``dicp_ray.agents.idt_grid``), and on Meta-World the depth-1 sampled search for AD and IDT checkpoints. The
    model acts through ``dicp_ray.agents.agent`` (one in-context agent for every layout); this module runs the
    episodes and checks the checkpoint against the config; ``dicp_ray.evaluate.launch.run_evaluations`` runs
    every (split seed x mode) on Ray or in this process and aggregates over split seeds
    (``dicp_ray.evaluate.results``: files, summary, plots, tables).

How to run it
    dicp-ray evaluate --checkpoint runs/demo/train/split_0/model.pt --set eval.num_episodes=50

    from dicp_ray.evaluate.episodes import evaluate_in_context
    from dicp_ray.evaluate.launch import run_evaluations
    from dicp_ray.evaluate.results import format_results_table
    result = evaluate_in_context("model.pt", output_dir="eval/split_0/plan", mode="plan")
    print(format_results_table(run_evaluations(config, {0: "model.pt"}, "eval")))

What to expect
    ``<dir>/results.json`` (written last, atomically: its presence marks a finished run), ``returns.csv``
    (episode, mean, ci_low, ci_high, oracle) and TensorBoard scalars ``eval/<mode>/return_mean`` per episode
    index. ``launch.run_evaluations`` adds ``summary.json``, ``summary.csv`` and ``learning_curves.png`` and skips a
    (split seed, mode) whose results.json matches the checkpoint and settings. Runs are deterministic for
    ``eval.seed``. On Darkroom the paper's AD reaches about 13.3 (policy) and DICP-AD about 15.3 (plan) after
    50 episodes; the oracle maximum over the 8 test goals is 16-17 for split seeds 0-4.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dicp_ray.agents.agent import MODES, InContextAgent, make_agent
from dicp_ray.agents.plan import PlannerSettings
from dicp_ray.config.load import config_from_dict
from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.envs import GRID_SPECS, cell_obs, split_tasks
from dicp_ray.evaluate.results import (
    RESULTS_SCHEMA_VERSION,
    mean_ci95,
    method_label,
    success_metrics,
    write_run_outputs,
)
from dicp_ray.models.checkpoints import load_checkpoint
from dicp_ray.runtime import provenance

logger = logging.getLogger(__name__)

_MALLOC_TUNED = False


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
    _check_action_labels(payload, config, path)
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
    if mode == "plan" and spec.world_model and not spec.has_next_obs_head and config.plan_depth > 1:
        raise ValueError(f"plan.depth = {config.plan_depth} needs a next-observation head, but checkpoint {path} "
                         "predicts rewards only (model.next_obs_loss off, Meta-World's default): --set plan.depth=1, "
                         "or train with --set model.next_obs_loss=true")


def _check_action_labels(payload: dict, config: ExperimentConfig, path: str) -> None:
    """A grid model trained by `dicp-ray train` on a dataset of another schema (before version 2: other action
    labels, 0 = stay) would act with the wrong moves in today's envs: refuse it rather than score it."""
    from dicp_ray.data.shards import SCHEMA_VERSION

    if config.env.is_meta_world or "dataset_id" not in payload:  # hand-built checkpoints carry no dataset
        return
    trained = payload.get("data_schema_version", 1)
    if trained != SCHEMA_VERSION:
        raise ValueError(f"checkpoint {path} was trained on a dataset of schema version {trained}, whose grid "
                         f"actions are labelled differently (today: 0 +x, 1 -x, 2 +y, 3 -y, 4 stay, schema "
                         f"{SCHEMA_VERSION}; docs/fidelity.md): re-collect and retrain it with this dicp_ray")


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
@torch.no_grad()
def run_episodes(agent: InContextAgent, env, num_episodes: int, desc: str = "eval",
                 progress: Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """`agent` acts on all of `env`'s tasks at once for `num_episodes` episodes -> returns (N, E), and for
    continuous actions (Meta-World) per-episode success (N, E), else None.

    Every task truncates at the same step, so all reset together. The agent gets back the executed action: for
    continuous actions the env's clipped ``info["action"]``, what the training data stores. An episode counts as
    a success when ``info["success"]`` is 1 at any of its steps (Meta-World's own convention). `progress`: a
    `dicp_ray.console.ProgressFile` path where the finished episodes are counted for the driver's progress bar.
    """
    from tqdm.auto import tqdm

    from dicp_ray.console import ProgressFile, is_verbose

    bar = ProgressFile(progress, num_episodes) if progress is not None else None
    returns = np.zeros((env.num_envs, num_episodes))
    successes = None if agent.discrete else np.zeros((env.num_envs, num_episodes))
    episodes = tqdm(range(num_episodes), desc=desc, unit="episode", leave=False,
                    disable=None if bar is None or is_verbose() else True)
    for episode in episodes:
        if bar is not None:
            bar.update(episode)
        obs, _ = env.reset()
        for t in range(env.horizon):
            action = agent.act(obs)
            next_obs, reward, _, _, info = env.step(action.cpu().numpy())
            executed = action if agent.discrete else np.asarray(info["action"])
            agent.observe(executed, np.asarray(reward), np.asarray(next_obs), episode_end=t == env.horizon - 1)
            returns[:, episode] += reward
            if successes is not None:
                successes[:, episode] = np.maximum(successes[:, episode], info["success"])
            obs = next_obs
    if bar is not None:
        bar.update(num_episodes)
    return returns, successes


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
    if config.env.is_meta_world:
        from dicp_ray.envs import meta_world

        env = gymnasium.make_vec(meta_world.env_id(config.env.name), num_envs=len(task_ids),
                                 vectorization_mode="vector_entry_point", task_ids=task_ids, task=config.env.task)
        oracle, target, obs_table = None, None, None  # no oracle return for Meta-World; success is the metric
    else:
        env = gymnasium.make_vec(GRID_SPECS[config.env.name].env_id, num_envs=len(task_ids),
                                 vectorization_mode="vector_entry_point", task_ids=task_ids)
        oracle = np.asarray(env.max_returns(), dtype=np.float64)
        # IDT's episodes start at the task's maximum achievable return, as in the authors' release (idt.py).
        target = torch.as_tensor(oracle.astype(np.float32), device=device) if model.spec.layout == "idt" else None
        obs_table = torch.as_tensor(np.stack([cell_obs(c) for c in range(model.spec.num_obs_classes or 81)]),
                                    dtype=torch.float32, device=device)                  # (81, D)
    agent = make_agent(model, env.num_envs, mode=mode, horizon=env.horizon, settings=settings, generator=generator,
                       obs_table=obs_table, return_target=target)
    loop_start = time.perf_counter()
    progress = Path(output_dir) / "progress.json" if output_dir else None
    returns, successes = run_episodes(agent, env, config.eval.num_episodes, f"eval {mode} split {split_seed}",
                                      progress)
    num_planned = agent.num_planned
    loop_s = time.perf_counter() - loop_start
    env.close()
    mean, low, high = mean_ci95(returns)
    num_decisions = int(returns.size * env.horizon)
    result = {
        "format": "dicp_ray.evaluate.results", "schema_version": RESULTS_SCHEMA_VERSION,
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
        "checkpoint_num_steps": ((payload.get("config") or {}).get("train") or {}).get("num_steps"),
        "checkpoint_stopped_at_deadline": bool(payload.get("stopped_at_deadline", False)),
        "fingerprint": _fingerprint(config, file_sha256(path), mode, split_seed),
        "config": config.to_dict(), "provenance": provenance(),
    }
    if successes is not None:
        result.update(success_metrics(successes))
    result["timing"]["wall_s"] = time.perf_counter() - wall_start
    if output_dir is not None:
        write_run_outputs(Path(output_dir), result)
    logger.info("%s split %d: return %.2f after episode 1, %.2f after episode %d (oracle %s), %.0f "
                "decisions/s", result["label"], split_seed, mean[0], mean[-1], len(mean),
                "-" if oracle is None else f"{oracle.mean():.2f}", result["timing"]["decisions_per_s"])
    return result


def _idt_return_target(spec) -> str | float:
    """What IDT's episodes start at: the task's max return (grid worlds) or the stored model_spec.return_target (Meta-World: 10 x horizon)."""
    return "task max return" if spec.discrete_actions else float(spec.return_target)


__all__ = ["evaluate_in_context", "run_episodes", "eval_task_ids", "planner_settings", "file_sha256"]
