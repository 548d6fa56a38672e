"""Score a dicp_ray Meta-World checkpoint with Meta-World's own evaluation code (``metaworld.evaluation``).

What it does
    ``score_checkpoint`` wraps a trained continuous AD or IDT checkpoint (with or without world model) in
    Meta-World's ``MetaLearningAgent`` protocol (``dicp_ray.evaluate.metaworld_adapter``), builds the test envs with
    ``metaworld.make_ml_envs(..., split="test", task_select="pseudorandom")`` and runs
    ``metaworld.evaluation.metalearning_evaluation`` on it: per round, every env samples its next test goal,
    the agent acts for ``adaptation_episodes`` episodes and sees their rewards (its in-context phase), then
    ``adapt()`` freezes that context and ``evaluation`` runs ``evaluation_episodes`` episodes per task name
    that end at success (``terminate_on_success``) and give the agent no rewards.

How to run it
    dicp-ray mw-eval --checkpoint runs/ml1/train/split_0/model.pt --mode plan --output mw_eval.json

    from dicp_ray.evaluate.metaworld import score_checkpoint
    result = score_checkpoint("model.pt", mode="policy", num_evals=10)   # result["success_mean"], ...

The agent (``dicp_ray.evaluate.metaworld_adapter``: ``MetaWorldAgent`` for AD, ``MetaWorldIDTAgent`` for IDT, ``make_agent``
picks by layout) drives the checkpoint through ``dicp_ray.agents.agent``, the in-context agent of ``dicp-ray evaluate``;
its module docstring lists the two deviations from ``dicp-ray evaluate`` that the protocol forces (the final
observation of an episode, no rewards in evaluation episodes). A third one is the scoring:

**Scoring.** Evaluation episodes end at success, so success = success at the episode's end and returns
   are those of shortened episodes; goals come in Meta-World's pseudorandom order (a shuffle per env, seeded
   by the split seed). ``evaluation`` counts episodes per TASK NAME, not per env: with more than one env per
   task class (``meta_batch_size`` > 1 for ML1, > 5 for ML10) it keeps the first ``evaluation_episodes``
   episodes to END, and episodes that succeed end first, so the success rate is biased upwards. The default
   ``meta_batch_size`` is therefore one env per test class (1 for ML1, 5 for ML10), which counts every
   episode; a larger one logs a warning and records it in the result's ``notes``.

The split seed means what it means everywhere in dicp_ray (Meta-World's benchmark seed): the goals Meta-World
evaluates for split seed s are our ML1 test ids 50..99 (ML10: 500..749) of split s. ``score_checkpoint``
checks that for every goal it is given, and records each round's task ids in the result.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch

from dicp_ray.agents.agent import MODES
from dicp_ray.envs.meta_world_tasks import HORIZON, VARIATIONS_PER_TYPE, num_tasks, num_train_tasks
from dicp_ray.evaluate.metaworld_adapter import make_agent

logger = logging.getLogger(__name__)

NUM_TEST_CLASSES = {"ML1": 1, "ML10": 5}
RESULT_FORMAT = "dicp_ray.mw_eval"


# ----------------------------------------------------------------------------- checkpoint and envs
def load_checkpoint_for_metaworld(path: str, mode: str):
    """Load and check a checkpoint for scoring -> (model, payload, config); clear errors for what cannot be
    scored (missing file, not a dicp_ray checkpoint, not Meta-World, DPT, planning without world model, IDT
    planning deeper than 1, IDT without a stored return target)."""
    from dicp_ray.config.load import config_from_dict
    from dicp_ray.envs.meta_world_tasks import observation_dim
    from dicp_ray.models.checkpoints import load_checkpoint

    path = os.fspath(path)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not known: choose one of {', '.join(MODES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (pass a model.pt written by `dicp-ray train`)")
    model, payload = load_checkpoint(path, map_location="cpu")
    spec = model.spec
    if not isinstance(payload.get("config"), dict):
        raise ValueError(f"checkpoint {path} stores no experiment config, so its benchmark is unknown")
    config = config_from_dict(payload["config"])
    if not config.env.is_meta_world or spec.discrete_actions:
        raise ValueError(f"checkpoint {path} was trained on {config.env.name}, not Meta-World (ML1 / ML10): "
                         "score it with `dicp-ray evaluate`")
    if spec.layout not in ("ad", "idt"):
        raise ValueError(f"checkpoint {path} has layout {spec.layout!r}: only the AD and IDT layouts are supported")
    if mode == "plan" and not spec.world_model:
        raise ValueError(f"mode 'plan' needs a world model, but checkpoint {path} was trained with "
                         "model.world_model=false: score it with mode 'policy'")
    if spec.layout == "idt" and mode == "plan" and config.plan_depth != 1:
        raise ValueError(f"mode 'plan': IDT's sampled search is depth 1 only, checkpoint {path} has plan.depth = "
                         f"{config.plan_depth}")
    if spec.layout == "idt" and spec.return_target is None:
        raise ValueError(f"checkpoint {path} is a continuous IDT without model_spec.return_target (the best "
                         "training return): retrain it with this version of dicp_ray")
    expected = observation_dim(config.env.name, config.env.task)
    if spec.obs_dim != expected:
        raise ValueError(f"checkpoint {path} has obs_dim {spec.obs_dim}, {config.env.name} "
                         f"{config.env.task or ''} observations have {expected}")
    return model, payload, config


def benchmark_name(config) -> str:
    """What ``metaworld.make_ml_envs`` calls the checkpoint's benchmark: the ML1 task name, or "ML10"."""
    return config.env.task if config.env.name == "ML1" else config.env.name


def check_meta_batch_size(env_name: str, meta_batch_size: int) -> int:
    """``meta_batch_size`` if Meta-World can split its test goals over that many envs, else a ValueError."""
    classes = NUM_TEST_CLASSES[env_name]
    if isinstance(meta_batch_size, bool) or not isinstance(meta_batch_size, int) or meta_batch_size < 1:
        raise ValueError(f"meta_batch_size must be a positive int, got {meta_batch_size!r}")
    if meta_batch_size % classes:
        raise ValueError(f"meta_batch_size = {meta_batch_size} must be a multiple of the {classes} test task "
                         f"classes of {env_name} (one env per class or more), e.g. {classes}")
    per_class = meta_batch_size // classes
    if VARIATIONS_PER_TYPE % per_class:
        raise ValueError(f"meta_batch_size = {meta_batch_size} gives {per_class} envs per test class, which must "
                         f"divide its {VARIATIONS_PER_TYPE} goals: use {classes} x one of 1, 2, 5, 10, 25, 50")
    return meta_batch_size


def current_task_ids(envs, env_name: str, task: str | None, split_seed: int) -> list[int]:
    """Our global task id of the goal each env of a (sync) ``make_ml_envs(split="test")`` vector env is set to;
    a RuntimeError if one is not a test task of `split_seed` (it would not be the split we think it is)."""
    import pickle

    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    from dicp_ray.envs.meta_world_tasks import load_tasks

    tasks = load_tasks(env_name, task, split_seed)
    base, first_test = split_seed * num_tasks(env_name), num_train_tasks(env_name)
    lookup = {(t.env_name, np.asarray(pickle.loads(t.data)["rand_vec"], np.float64).tobytes()): base + index
              for index, t in enumerate(tasks.tasks) if index >= first_test}
    names = {cls.__name__: name for name, cls in ALL_V3_ENVIRONMENTS.items()}
    ids = []
    for i, env in enumerate(envs.envs):
        raw = env.unwrapped
        key = (names[type(raw).__name__], np.asarray(raw._last_rand_vec, np.float64).tobytes())
        if key not in lookup:
            raise RuntimeError(f"env {i} is set to a {key[0]} goal that is not a test task of {env_name} "
                               f"split seed {split_seed}")
        ids.append(lookup[key])
    return ids


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def score_checkpoint(checkpoint_path: str, *, mode: str = "policy", split_seed: int | None = None,
                     meta_batch_size: int | None = None, num_evals: int = 10, adaptation_episodes: int = 10,
                     evaluation_episodes: int = 3, max_episode_steps: int = HORIZON, device: str = "cpu",
                     seed: int = 0, eval_reward: str | None = None, num_threads: int | None = 1) -> dict:
    """Run ``metaworld.evaluation.metalearning_evaluation`` on a checkpoint's test goals -> result dict.

    Defaults: Meta-World's own (10 rounds, 10 adaptation and 3 evaluation episodes) with one env per test
    class (``meta_batch_size`` 1 for ML1, 5 for ML10: unbiased counting, see the module docstring), 100-step
    episodes as in training. ``split_seed`` defaults to the checkpoint's. Keys: ``success_mean``,
    ``return_mean``, ``success_per_task``, ``task_ids_per_round``, ``settings``, ``notes``, ``timing``.
    """
    import metaworld
    from metaworld.evaluation import metalearning_evaluation

    from dicp_ray.evaluate.episodes import _resolve_split_seed, file_sha256, planner_settings
    from dicp_ray.runtime import provenance

    wall_start = time.perf_counter()
    path = os.fspath(checkpoint_path)
    model, payload, config = load_checkpoint_for_metaworld(path, mode)
    split_seed = _resolve_split_seed(payload, split_seed, config, path)
    env_name, name = config.env.name, benchmark_name(config)
    classes = NUM_TEST_CLASSES[env_name]
    meta_batch_size = check_meta_batch_size(env_name, classes if meta_batch_size is None else meta_batch_size)
    for key, value in (("num_evals", num_evals), ("adaptation_episodes", adaptation_episodes),
                       ("evaluation_episodes", evaluation_episodes), ("max_episode_steps", max_episode_steps)):
        _check_positive(key, value)
    if max_episode_steps > 500:
        raise ValueError(f"max_episode_steps = {max_episode_steps}: Meta-World never steps past 500")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' but no CUDA device is visible: use --device cpu")
    settings = planner_settings(config)
    agent = make_agent(model, mode=mode, settings=settings, horizon=max_episode_steps,
                       eval_reward=eval_reward, seed=seed, device=device)
    notes = []
    if meta_batch_size > classes:
        notes.append(f"{meta_batch_size // classes} envs per test class: metaworld.evaluation keeps the first "
                     f"{evaluation_episodes} evaluation episodes to end per task name, and successful episodes "
                     "end first, so the success rate is biased upwards")
        logger.warning("mw-eval: %s", notes[-1])
    if max_episode_steps != config.env.horizon:
        notes.append(f"max_episode_steps = {max_episode_steps}, the model was trained on {config.env.horizon}-step "
                     "episodes")

    envs = metaworld.make_ml_envs(name, seed=split_seed, meta_batch_size=meta_batch_size, split="test",
                                  max_episode_steps=max_episode_steps, terminate_on_success=False,
                                  task_select="pseudorandom")
    rounds: list[list[int]] = []
    agent.on_init = lambda: rounds.append(current_task_ids(envs, env_name, config.env.task, split_seed))
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    loop_start = time.perf_counter()
    try:
        success, mean_return, per_task = metalearning_evaluation(
            agent, envs, num_evals=num_evals, adaptation_steps=1, adaptation_episodes=adaptation_episodes,
            evaluation_episodes=evaluation_episodes)
    finally:
        torch.set_num_threads(previous_threads)
        envs.close()
    loop_s = time.perf_counter() - loop_start
    leaked = {i for ids in rounds for i in ids} & set(payload.get("train_task_ids") or ())
    if leaked:
        raise RuntimeError(f"Meta-World evaluated goals {sorted(leaked)} that checkpoint {path} was trained on")
    result = {
        "format": RESULT_FORMAT, "evaluator": "metaworld.evaluation.metalearning_evaluation",
        "env": env_name, "task": config.env.task, "benchmark": name, "mode": mode, "split_seed": split_seed,
        "success_mean": float(success), "return_mean": float(mean_return),
        "success_per_task": {str(k): float(v) for k, v in sorted(per_task.items())},
        "task_ids_per_round": rounds, "world_model": bool(model.spec.world_model),
        "variant": model.spec.layout,
        **({"idt_return_target": float(model.spec.return_target)} if model.spec.layout == "idt" else {}),
        "settings": {"meta_batch_size": meta_batch_size, "num_evals": num_evals, "adaptation_steps": 1,
                     "adaptation_episodes": adaptation_episodes, "evaluation_episodes": evaluation_episodes,
                     "max_episode_steps": max_episode_steps, "task_select": "pseudorandom",
                     "terminate_on_success_in_evaluation": True, "eval_reward": agent.eval_reward,
                     "final_obs": "world-model prediction" if agent.has_next_obs_head else "repeated obs",
                     "context_len": model.spec.context_len, "device": device, "seed": seed,
                     "torch_threads": num_threads, "planner": _continuous_planner(settings) if mode == "plan" else None},
        "notes": notes,
        "timing": {"wall_s": None, "evaluation_s": loop_s, "decisions": agent.num_decisions,
                   "planned_decisions": agent.num_planned,
                   "decisions_per_s": agent.num_decisions / max(loop_s, 1e-9)},
        "checkpoint": os.path.abspath(path), "checkpoint_sha256": file_sha256(path),
        "checkpoint_step": payload.get("step"), "provenance": provenance(),
    }
    for key in ("success_mean", "return_mean"):
        if not math.isfinite(result[key]):
            raise RuntimeError(f"metalearning_evaluation returned {key} = {result[key]}")
    result["timing"]["wall_s"] = time.perf_counter() - wall_start
    return result


def _continuous_planner(settings) -> dict:
    """The planner settings Meta-World's sampled search uses (beam_width is the grid worlds' beam search only)."""
    return {k: v for k, v in vars(settings).items() if k != "beam_width"}


def format_table(result: dict) -> str:
    """A few lines: what was scored, how, and the success rate / return overall and per task."""
    s = result["settings"]
    lines = [f"Meta-World {result['env']} {result['task'] or ''} test goals, split seed {result['split_seed']}, "
             f"mode {result['mode']} ({result['evaluator']})".replace("  ", " "),
             f"{s['num_evals']} rounds x {s['meta_batch_size']} envs: {s['adaptation_episodes']} adaptation "
             f"episodes, then {s['evaluation_episodes']} evaluation episodes per task (end at success; reward "
             f"tokens: {s['eval_reward']})"]
    width = max(len("mean over tasks"), *(len(t) for t in result["success_per_task"]))
    lines.append(f"{'task'.ljust(width)}  success")
    lines += [f"{task.ljust(width)}  {value:7.3f}" for task, value in result["success_per_task"].items()]
    lines.append(f"{'mean over tasks'.ljust(width)}  {result['success_mean']:7.3f}   "
                 f"(mean return {result['return_mean']:.2f}, {result['timing']['wall_s']:.0f} s)")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


__all__ = ["score_checkpoint", "format_table", "load_checkpoint_for_metaworld", "check_meta_batch_size",
           "current_task_ids", "benchmark_name"]
