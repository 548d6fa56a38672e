"""Typed, frozen configuration for every dicp_ray stage, loaded from YAML and validated before Ray starts.

One frozen dataclass per stage (env, collect, model, train, plan, eval, sweep, resources) is composed into an
:class:`ExperimentConfig`. ``load_config(path, overrides)`` reads a YAML file from ``tune_configs/``, applies
``--set section.key=value`` overrides, type-checks every field and runs the cross-stage rules. Every problem
raises :class:`ConfigError` naming the key, the bad value and the fix, e.g.::

    plan.beam_width = 0 is out of range: must be >= 1 (e.g. --set plan.beam_width=10)

This module imports only the standard library (PyYAML lazily), so validation is instant and runs anywhere.
Values derived from the environment (horizon, observation size, default planning depth) are computed by the
properties below, never written back into the config.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

GRID_ENVS = {  # name -> (num_tasks, horizon, train_ratio, default planning depth)
    "Darkroom": (81, 20, 0.9, 8),
    "DarkKeyToDoor": (6561, 50, 0.95, 16),
    "DarkroomPermuted": (120, 50, 0.9, 16),
}
# Meta-World: name -> (task ids per split seed, horizon, train fraction (Meta-World's), planning depth).
META_WORLD_ENVS = {"ML1": (100, 100, 0.5, 1), "ML10": (750, 100, 500 / 750, 1)}
# Meta-World's v3 task names (metaworld 3.1.1, ALL_V3_ENVIRONMENTS order); a unit test checks this copy.
META_WORLD_TASKS = (
    "assembly-v3", "basketball-v3", "bin-picking-v3", "box-close-v3", "button-press-topdown-v3",
    "button-press-topdown-wall-v3", "button-press-v3", "button-press-wall-v3", "coffee-button-v3",
    "coffee-pull-v3", "coffee-push-v3", "dial-turn-v3", "disassemble-v3", "door-close-v3", "door-lock-v3",
    "door-open-v3", "door-unlock-v3", "hand-insert-v3", "drawer-close-v3", "drawer-open-v3", "faucet-open-v3",
    "faucet-close-v3", "hammer-v3", "handle-press-side-v3", "handle-press-v3", "handle-pull-side-v3",
    "handle-pull-v3", "lever-pull-v3", "pick-place-wall-v3", "pick-out-of-hole-v3", "pick-place-v3",
    "plate-slide-v3", "plate-slide-side-v3", "plate-slide-back-v3", "plate-slide-back-side-v3",
    "peg-insert-side-v3", "peg-unplug-side-v3", "soccer-v3", "stick-push-v3", "stick-pull-v3", "push-v3",
    "push-wall-v3", "push-back-v3", "reach-v3", "reach-wall-v3", "shelf-place-v3", "sweep-into-v3",
    "sweep-v3", "window-open-v3", "window-close-v3",
)
_ENV_TABLE = {**GRID_ENVS, **META_WORLD_ENVS}


class ConfigError(ValueError):
    """A configuration problem, with the key, the value and how to fix it in the message."""


@dataclass(frozen=True)
class EnvConfig:
    name: str = "Darkroom"
    """Environment family: Darkroom | DarkKeyToDoor | DarkroomPermuted | ML1 | ML10 (Meta-World)."""
    task: str | None = None
    """ML1 only: the Meta-World v3 task, e.g. reach-v3 (None for every other env)."""
    split_seeds: tuple[int, ...] = (0,)
    """Train/test task splits to run (the paper averages 5 for grid worlds, 3 for Meta-World); one model per
    split seed. Meta-World: the seed its benchmark is built with, i.e. which goal variations exist."""
    train_ratio: float | None = None
    """Fraction of tasks used for training; None = the paper's (0.9 / 0.95 / 0.9). Must be None for
    Meta-World, whose train/test split is its own."""
    max_train_tasks: int | None = None
    """Reduced scale: use only the first N train tasks of each split (None = all)."""
    max_test_tasks: int | None = None
    """Reduced scale: evaluate only the first N test tasks of each split (None = all)."""

    @property
    def horizon(self) -> int:
        return _ENV_TABLE[self.name][1]

    @property
    def num_tasks(self) -> int:
        """Task ids per split seed (Meta-World ids of split seed s are s * num_tasks + 0..num_tasks-1)."""
        return _ENV_TABLE[self.name][0]

    @property
    def default_plan_depth(self) -> int:
        return _ENV_TABLE[self.name][3]

    @property
    def effective_train_ratio(self) -> float:
        """Fraction of each split's tasks that are train tasks (Meta-World: fixed, ML1 0.5, ML10 2/3)."""
        return self.train_ratio if self.train_ratio is not None else _ENV_TABLE[self.name][2]

    @property
    def is_meta_world(self) -> bool:
        """Continuous-action Meta-World benchmark (ML1 / ML10) rather than a discrete grid world."""
        return self.name in META_WORLD_ENVS


@dataclass(frozen=True)
class CollectConfig:
    algorithm: str = "ppo"
    """Source RL algorithm: ppo (grid worlds, Meta-World) | sac (Meta-World)."""
    source_obs: str = "full"
    """Meta-World: what the source learner observes. full = Meta-World's 39 numbers (current frame, previous
    frame, zeroed goal), as the authors' release (release:metaworld/collect_data.py:59); model = the 11 / 18-dim
    model observation. The recorded histories are the model observation either way. Grid worlds: ignored."""
    num_streams: int = 100
    """Parallel copies of the task per learner; each stream's episodes form one learning history."""
    rollout_steps: int = 20
    """PPO n_steps per stream per update (paper: 20 Darkroom, 50 Key-to-Door / Permuted, 100 Meta-World)."""
    minibatch_size: int = 50
    """PPO minibatch size (paper: 50 / 100 / 50 / 200)."""
    num_epochs: int = 20
    """PPO epochs per update (paper: 20 / 10 / 20 / 20)."""
    lr: float = 3e-4
    """Source learner learning rate."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda (SB3 default)."""
    clip_param: float = 0.2
    """PPO clip range (SB3 default)."""
    vf_loss_coeff: float = 0.5
    """Value-loss coefficient (SB3 default)."""
    entropy_coeff: float = 0.0
    """Entropy bonus (SB3 default 0)."""
    grad_clip: float = 0.5
    """Global grad-norm clip (SB3 default)."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Separate actor and critic MLPs (tanh), SB3 MlpPolicy."""
    env_steps_per_task: int = 100_000
    """Total env steps per learner, all streams together (paper: 100K grid, 1M Meta-World)."""
    seed: int = 0
    """Base seed; learner for task i uses seed + i."""
    bootstrap_at_horizon: bool | None = None
    """Whether the source learner bootstraps V(s_T) when an episode ends at the horizon. None = the authors'
    release for the env: False on grid worlds (its envs report terminated=True at the horizon, so SB3 PPO
    never bootstraps there), True on Meta-World (TimeLimit truncation, which SB3 bootstraps). Our envs
    always truncate; with False the collector shows the learner the horizon as terminal and the recorded
    histories stay truncated (docs/fidelity.md, row 3). Resolve it with `ExperimentConfig.bootstraps_at_horizon`."""
    include_test_tasks: bool = True
    """Also collect histories of test tasks (never trained on; used for held-out world-model metrics)."""
    num_cpus_per_learner: float = 1.0
    """Ray CPUs reserved per learner task."""
    max_retries: int = 3
    """Ray retries of a learner whose process died."""
    learner: str = "auto"
    """PPO implementation: population (one process trains many task learners as one stacked network,
    dicp_ray/population.py; grid worlds only) | rllib (one RLlib learner per task) | auto = population on the
    grid worlds, rllib on Meta-World (and for SAC)."""
    tasks_per_population: int = 0
    """population learner: task learners per population (one Ray task on one core); 0 = spread the tasks
    evenly over the cluster's CPUs, at most 81 per population. Shards do not depend on it."""
    sac_learning_starts: int = 100
    """SAC: env steps (all streams) of the untrained policy before the first update (paper: 100)."""
    sac_batch_size: int = 128
    """SAC: transitions per gradient step (paper: 128)."""
    sac_train_freq: int = 10
    """SAC: env steps per stream between updates (paper: 10, i.e. SB3 train_freq)."""
    sac_gradient_steps: int = 1
    """SAC: gradient steps per update (paper: 1)."""
    sac_buffer_size: int = 1_000_000
    """SAC: replay buffer capacity in transitions (paper: 1M)."""
    sac_hidden_sizes: tuple[int, ...] = (256, 256)
    """SAC: actor and twin-critic MLPs (ReLU), SB3's SAC default."""


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "ad"
    """In-context algorithm: ad | dpt | idt. idt is hierarchical: on the grid worlds the release's IDT
    (dicp_ray/idt_grid.py; plan mode = DICP-IDT beam search to the end of each 10-step block, plan.depth unused;
    release lr/batch: Darkroom 1e-2/1024, Key-to-Door 1e-3/2048, Permuted 1e-3/512, see
    tune_configs/darkroom_idt.yaml), on Meta-World dicp_ray/idt.py (plan: depth-1 sampled search)."""
    world_model: bool = True
    """True = DICP (reward and next-observation heads + planning); False = the model-free baseline."""
    context_episodes: int = 4
    """Episodes of context; k = context_episodes * horizon transitions (paper: 4 grid, 10 Meta-World)."""
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 32
    mlp_dim: int = 128
    dropout: float = 0.1
    attn_dropout: float = 0.1
    obs_embedding: str = "auto"
    """Query-observation token (AD, DPT): auto | cell | transition | linear. auto = the authors' release: a learned
    table over the 81 cells for AD on the grid worlds (cell), the shared transition embedding of the zero-padded
    query for DPT (transition), a linear map on Meta-World (linear). docs/fidelity.md, rows 7 and 11."""
    backbone: str = "auto"
    """Transformer details (AD, DPT): auto | release | gpt2. release = the authors' TinyLlama blocks (no final norm,
    dropout on each sublayer's input, attention bias, PyTorch default init, raw grid coordinates); gpt2 = our
    earlier choice (final RMSNorm, dropout on embeddings and residual branches, normal(0.02) init, coordinates
    scaled to [0, 1]). auto = release on the grid worlds, gpt2 on Meta-World (not yet measured there). IDT: gpt2."""
    reward_loss_weight: float = 1.0
    """Meta-World: weight of the reward-regression MSE inside the world-model loss. Rewards lie in [0, 10], so
    their MSE is up to ~100x the action NLL early in training; 0.01 is the MSE of reward / 10 (see
    docs/results.md, "Reward loss scale"). 1.0 (the default) is the plain MSE of SPEC §4."""
    next_obs_loss: bool | None = None
    """World model: also predict (and train on) the next observation. None = the release's per env: on for the
    grid worlds (81-class next cell, which their beam search needs), off for Meta-World (release
    learn_transition: False; its depth-1 search ranks by predicted reward only)."""


@dataclass(frozen=True)
class TrainConfig:
    num_steps: int = 50_000
    """Optimiser steps (paper: 50K)."""
    batch_size: int = 512
    """Windows per step across all workers (paper: 512, 4096 on Key-to-Door)."""
    lr: float = 1e-2
    """AdamW peak learning rate with cosine decay, no warm-up (paper: 1e-2 AD/DPT, 1e-3 IDT; the release's
    grid IDT: 1e-2 on Darkroom, 1e-3 on Key-to-Door and Permuted)."""
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    world_model_weight: float = 1.0
    """lambda in L = L_action + lambda * (L_reward + L_next_obs)."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker."""
    mixed_precision: bool = False
    """bf16 autocast on CUDA. Off by default: for the paper's small models it is slower on an H100
    (benchmarks/bench_train.py --device cuda: 23.0K vs 31.8K windows/s fp32), and CPUs never use it."""
    cpus_per_worker: int = 1
    checkpoint_every_steps: int = 1000
    """Also the reporting interval to Ray Train (each report costs ~0.2-2 s of controller latency)."""
    log_every_steps: int = 100
    """TensorBoard / progress-line interval."""
    eval_batches: int = 4
    """Held-out batches (test-task histories) per checkpoint for world-model accuracy."""
    seed: int = 0
    backend: str = "ray"
    """ray = a Ray Train TorchTrainer (train.num_workers DDP ranks, fault tolerance); local = this process, no Ray
    (a PyTorch-only box). The same loop (dicp_ray/train_loop.py), checkpoints and run identities either way."""
    models_per_process: int = 1
    """Train up to this many split seeds of the config together in one process (or one Ray Train worker group)
    with stacked weights (dicp_ray/model_group.py): each its own data, optimizer state and checkpoint."""
    device: str = "auto"
    """local backend: auto (cuda when train.use_gpu) | cpu | cuda."""
    compile: bool = False
    """torch.compile the training forward/backward (CUDA: mode reduce-overhead, i.e. CUDA graphs). Off by default:
    on CPU it measured 0.96x."""


@dataclass(frozen=True)
class PlanConfig:
    beam_width: int = 10
    """K: beams kept per depth level (paper: 10)."""
    depth: int | None = None
    """H: planning depth; None = the paper's per-env default (8 Darkroom, 16 Key-to-Door / Permuted)."""
    num_samples: int = 10
    """L: candidates for continuous sampled search (mean + L-1 samples)."""
    use_cache: bool = True
    """Reuse a key-value cache of the real context (False = the release's full re-encoding; same actions)."""
    second_half_only: bool = False
    """Plan only in the second half of each episode, as the authors' release does for Meta-World (continuous AD:
    at steps after horizon // 2, the release's rule, see plan.should_plan_continuous)."""


@dataclass(frozen=True)
class EvalConfig:
    num_episodes: int = 50
    """In-context episodes per test task, starting from an empty context."""
    modes: tuple[str, ...] = ("policy", "plan")
    """policy = sample the distilled policy (AD); plan = DICP beam search (needs model.world_model)."""
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda."""


@dataclass(frozen=True)
class SweepConfig:
    kind: str = "plan"
    """plan = grid over planner settings on a trained checkpoint; train = training hyper-parameters + ASHA;
    pipeline = one whole pipeline (collect -> train -> evaluate) per grid point, e.g. over env.task for ML1."""
    grid: dict[str, tuple] = field(default_factory=dict)
    """Dotted key -> values, e.g. {"plan.depth": [1, 2, 4, 8], "plan.beam_width": [1, 5, 10]}."""
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    paper_eval_budget: bool = False
    """Pipeline sweeps on Meta-World: each trial evaluates for the paper's per-task step budget (reach 10K, push
    30K, pick-place and peg-insert-side 200K, every other task 20K steps) instead of eval.num_episodes."""


@dataclass(frozen=True)
class ResourcesConfig:
    address: str | None = None
    """Ray cluster address; None = start an embedded local Ray (RAY_ADDRESS is honoured too)."""
    num_cpus: int | None = None
    """CPUs for the embedded local Ray (None = all of this machine's)."""
    num_gpus: int | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    env: EnvConfig = field(default_factory=EnvConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    @property
    def context_len(self) -> int:
        """k: transitions per training window (context_episodes * horizon)."""
        return self.model.context_episodes * self.env.horizon

    @property
    def plan_depth(self) -> int:
        return self.plan.depth if self.plan.depth is not None else self.env.default_plan_depth

    @property
    def bootstraps_at_horizon(self) -> bool:
        """collect.bootstrap_at_horizon resolved: None = the release's behaviour for this env (grid worlds
        no bootstrap, Meta-World bootstrap)."""
        setting = self.collect.bootstrap_at_horizon
        return self.env.is_meta_world if setting is None else setting

    @property
    def next_obs_loss(self) -> bool:
        """model.next_obs_loss resolved: None = on for grid worlds, off for Meta-World (as the release)."""
        return self.model.next_obs_loss if self.model.next_obs_loss is not None else not self.env.is_meta_world

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_CLASSES = {
    "env": EnvConfig, "collect": CollectConfig, "model": ModelConfig, "train": TrainConfig,
    "plan": PlanConfig, "eval": EvalConfig, "sweep": SweepConfig, "resources": ResourcesConfig,
}


# ----------------------------------------------------------------------------------------------------------
# Building from plain data (YAML + overrides), with type checks that name the key.
# ----------------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (from YAML); convert lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a list of {_type_name(item_tp)}, "
                              f"e.g. [{'1, 2' if item_tp is int else 'a, b'}]")
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a mapping")
        return {str(k): tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input


def _unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ConfigError(f"unknown key '{key}': {hint}valid keys here are {', '.join(sorted(valid))}")


def _build_section(name: str, cls: type, data: Any) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"section '{name}' must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key_error(f"{name}.{key}", valid)
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from nested plain data (as read from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(data).__name__}")
    valid = ["name", *_SECTION_CLASSES]
    for key in data:
        if key not in valid:
            raise _unknown_key_error(str(key), valid)
    name = data.get("name", "experiment")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name = {name!r} must be a non-empty string")
    sections = {s: _build_section(s, cls, data.get(s)) for s, cls in _SECTION_CLASSES.items()}
    config = ExperimentConfig(name=name, **sections)
    validate(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value``; the value is parsed as YAML (``3``, ``1e-3``, ``[1, 2]``, ``true``)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. --set plan.depth=4")
    dotted, raw = text.split("=", 1)
    path = [p for p in dotted.strip().split(".") if p]
    if len(path) not in (1, 2):
        raise ConfigError(f"override key '{dotted}' must be 'section.key' (or 'name'), e.g. plan.beam_width")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': cannot parse the value: {err}") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each ``section.key=value`` override applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1:
            out[path[0]] = value
            continue
        section = out.setdefault(path[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': section '{path[0]}' is not a mapping")
        section[path[1]] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config; a top-level ``base: other.yaml`` (relative to this file) is loaded first and
    this file's sections are merged over it key by key, so sweep configs can extend a pipeline config."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: pass --config with a YAML from tune_configs/")
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / str(base), (*seen, path.resolve()))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment config, apply overrides, validate; raises ConfigError on any problem."""
    return config_from_dict(apply_overrides(_read_yaml(Path(path)), list(overrides)))


# The paper's in-context step budgets per ML1 task (SPEC §6); every other task gets META_WORLD_DEFAULT_EVAL_STEPS.
META_WORLD_EVAL_STEPS = {"reach-v3": 10_000, "push-v3": 30_000, "pick-place-v3": 200_000,
                         "peg-insert-side-v3": 200_000}
META_WORLD_DEFAULT_EVAL_STEPS = 20_000


def sweep_points(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a sweep grid's values, e.g. {"env.task": ["reach-v3", "push-v3"]} -> 2 points."""
    import itertools

    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(grid[k]) for k in keys))]


def point_slug(point: dict[str, Any]) -> str:
    """A run-directory name for a sweep grid point, e.g. {"env.task": "reach-v3"} -> "task=reach-v3"."""
    import re

    text = ",".join(f"{key.rpartition('.')[2]}={value}" for key, value in point.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:200] or "default"


def trial_config(config: ExperimentConfig, point: dict[str, Any]) -> ExperimentConfig:
    """The config one pipeline-sweep trial runs: the grid point applied (with sweep.paper_eval_budget, also the
    paper's in-context step budget of the trial's ML1 task), the sweep itself removed."""
    # The trial's child pipeline joins the sweep's cluster through RAY_ADDRESS (dicp_ray.tune), not a client address.
    overrides = {**point, "sweep.kind": "plan", "sweep.grid": {}, "sweep.paper_eval_budget": False,
                 "resources.address": None}
    if config.sweep.paper_eval_budget:
        task = point.get("env.task", config.env.task)
        steps = META_WORLD_EVAL_STEPS.get(task, META_WORLD_DEFAULT_EVAL_STEPS)
        overrides["eval.num_episodes"] = steps // config.env.horizon
    return replace(config, overrides)


def replace(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A validated copy of `config` with dotted-key overrides, e.g. {"plan.depth": 4} (used by sweeps)."""
    data = config.to_dict()
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in data or not isinstance(data[section], dict):
            raise _unknown_key_error(dotted, list(_SECTION_CLASSES))
        data[section][key] = list(value) if isinstance(value, tuple) else value
    return config_from_dict(data)


# ----------------------------------------------------------------------------------------------------------
# Validation: ranges and cross-stage rules. Runs on every load, before anything distributed starts.
# ----------------------------------------------------------------------------------------------------------

def _require(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is out of range: {rule} (e.g. --set {key}={fix})")


def _check_choice(key: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{key} = {value!r} is not known: {hint}choose one of {', '.join(choices)}")


def _validate_env(env: EnvConfig) -> None:
    _check_choice("env.name", env.name, list(_ENV_TABLE))
    if env.name == "ML1":
        if env.task is None:
            raise ConfigError("env.task is missing: ML1 needs a Meta-World v3 task "
                              "(e.g. --set env.task=reach-v3)")
        if env.task not in META_WORLD_TASKS:
            close = difflib.get_close_matches(env.task, META_WORLD_TASKS, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise ConfigError(f"env.task = {env.task!r} is not a Meta-World v3 task: {hint}choose one of "
                              f"{', '.join(META_WORLD_TASKS)}")
    elif env.task is not None:
        raise ConfigError(f"env.task = {env.task!r} is only used by ML1; {env.name} has no task: remove it "
                          "(--set env.task=null)")
    if env.is_meta_world and env.train_ratio is not None:
        raise ConfigError(f"env.train_ratio = {env.train_ratio!r}: {env.name} uses Meta-World's own "
                          "train/test split, so leave it unset (--set env.train_ratio=null)")
    _require(len(env.split_seeds) > 0, "env.split_seeds", list(env.split_seeds), "needs at least one seed", "[0]")
    _require(all(s >= 0 for s in env.split_seeds), "env.split_seeds", list(env.split_seeds),
             "seeds must be >= 0", "[0,1,2]")
    _require(len(set(env.split_seeds)) == len(env.split_seeds), "env.split_seeds", list(env.split_seeds),
             "seeds must be distinct", "[0,1,2]")
    if env.train_ratio is not None:
        _require(0.0 < env.train_ratio < 1.0, "env.train_ratio", env.train_ratio, "must be in (0, 1)", "0.9")
    for key in ("max_train_tasks", "max_test_tasks"):
        value = getattr(env, key)
        if value is not None:
            _require(value >= 1, f"env.{key}", value, "must be >= 1 or null for all tasks", "8")


def _validate_collect(c: CollectConfig) -> None:
    _check_choice("collect.algorithm", c.algorithm, ["ppo", "sac"])
    for key in ("num_streams", "rollout_steps", "minibatch_size", "num_epochs", "env_steps_per_task",
                "sac_batch_size", "sac_train_freq", "sac_gradient_steps", "sac_buffer_size"):
        _require(getattr(c, key) >= 1, f"collect.{key}", getattr(c, key), "must be >= 1", "10")
    _require(c.sac_learning_starts >= 0, "collect.sac_learning_starts", c.sac_learning_starts, "must be >= 0",
             "100")
    _require(len(c.sac_hidden_sizes) > 0 and all(h >= 1 for h in c.sac_hidden_sizes),
             "collect.sac_hidden_sizes", list(c.sac_hidden_sizes), "needs positive layer sizes", "[256,256]")
    for key in ("lr", "grad_clip", "num_cpus_per_learner"):
        _require(getattr(c, key) > 0, f"collect.{key}", getattr(c, key), "must be > 0", "0.5")
    for key in ("gamma", "gae_lambda"):
        _require(0.0 < getattr(c, key) <= 1.0, f"collect.{key}", getattr(c, key), "must be in (0, 1]", "0.99")
    _require(c.clip_param > 0, "collect.clip_param", c.clip_param, "must be > 0", "0.2")
    _require(c.vf_loss_coeff >= 0 and c.entropy_coeff >= 0, "collect.vf_loss_coeff",
             (c.vf_loss_coeff, c.entropy_coeff), "coefficients must be >= 0", "0.5")
    _require(len(c.hidden_sizes) > 0 and all(h >= 1 for h in c.hidden_sizes), "collect.hidden_sizes",
             list(c.hidden_sizes), "needs positive layer sizes", "[64,64]")
    _require(c.seed >= 0, "collect.seed", c.seed, "must be >= 0", "0")
    _require(c.max_retries >= 0, "collect.max_retries", c.max_retries, "must be >= 0", "3")
    _check_choice("collect.learner", c.learner, ["auto", "population", "rllib"])
    _require(c.tasks_per_population >= 0, "collect.tasks_per_population", c.tasks_per_population,
             "must be >= 0 (0 = spread over the CPUs)", "0")
    if c.algorithm != "ppo":
        return
    batch = c.rollout_steps * c.num_streams
    _require(c.minibatch_size <= batch, "collect.minibatch_size", c.minibatch_size,
             f"must be <= rollout_steps * num_streams = {batch}", str(batch))
    _require(c.env_steps_per_task >= batch, "collect.env_steps_per_task", c.env_steps_per_task,
             f"must cover at least one update of rollout_steps * num_streams = {batch} steps", str(batch * 10))


def _validate_model(m: ModelConfig) -> None:
    _check_choice("model.variant", m.variant, ["ad", "dpt", "idt"])
    _check_choice("model.obs_embedding", m.obs_embedding, ["auto", "cell", "transition", "linear"])
    _check_choice("model.backbone", m.backbone, ["auto", "release", "gpt2"])
    if m.variant == "idt":
        _require(m.obs_embedding in ("auto", "linear") and m.backbone in ("auto", "gpt2"), "model.obs_embedding",
                 m.obs_embedding, f"(and model.backbone = {m.backbone!r}) must be auto for variant idt, which "
                 "embeds observations itself", "auto")
    _require(m.reward_loss_weight > 0, "model.reward_loss_weight", m.reward_loss_weight, "must be > 0", "1.0")
    for key in ("context_episodes", "num_layers", "num_heads", "embed_dim", "mlp_dim"):
        _require(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "must be >= 1", "4")
    for key in ("dropout", "attn_dropout"):
        _require(0.0 <= getattr(m, key) < 1.0, f"model.{key}", getattr(m, key), "must be in [0, 1)", "0.1")
    head_dim = m.embed_dim // m.num_heads
    _require(m.embed_dim % m.num_heads == 0 and head_dim % 2 == 0, "model.embed_dim", m.embed_dim,
             f"must be divisible by model.num_heads = {m.num_heads} with an even head size (rotary embedding)",
             str(8 * m.num_heads))


def _validate_train(t: TrainConfig) -> None:
    for key in ("num_steps", "batch_size", "num_workers", "cpus_per_worker", "checkpoint_every_steps",
                "log_every_steps", "eval_batches"):
        _require(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1", "100")
    _require(t.lr > 0, "train.lr", t.lr, "must be > 0", "1e-3")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0", "0.01")
    for key in ("beta1", "beta2"):
        _require(0.0 <= getattr(t, key) < 1.0, f"train.{key}", getattr(t, key), "must be in [0, 1)", "0.9")
    _require(t.grad_clip > 0, "train.grad_clip", t.grad_clip, "must be > 0", "1.0")
    _require(t.world_model_weight >= 0, "train.world_model_weight", t.world_model_weight, "must be >= 0", "1.0")
    _require(t.batch_size % t.num_workers == 0, "train.batch_size", t.batch_size,
             f"must be divisible by train.num_workers = {t.num_workers}", str(t.num_workers * 64))
    _require(t.seed >= 0, "train.seed", t.seed, "must be >= 0", "0")
    _check_choice("train.backend", t.backend, ["ray", "local"])
    _check_choice("train.device", t.device, ["auto", "cpu", "cuda"])
    _require(t.models_per_process >= 1, "train.models_per_process", t.models_per_process, "must be >= 1", "5")
    if t.backend == "local":
        _require(t.num_workers == 1, "train.num_workers", t.num_workers,
                 "must be 1 with train.backend = local (one process; use train.backend=ray for DDP)", "1")


def _validate_plan_eval(config: ExperimentConfig) -> None:
    p, e = config.plan, config.eval
    _require(p.beam_width >= 1, "plan.beam_width", p.beam_width, "must be >= 1", "10")
    _require(p.beam_width <= 1000, "plan.beam_width", p.beam_width, "must be <= 1000", "10")
    if p.depth is not None:
        _require(1 <= p.depth <= config.env.horizon, "plan.depth", p.depth,
                 f"must be in [1, horizon = {config.env.horizon}] or null for the paper's default", "8")
    _require(p.num_samples >= 1, "plan.num_samples", p.num_samples, "must be >= 1", "10")
    _require(e.num_episodes >= 1, "eval.num_episodes", e.num_episodes, "must be >= 1", "50")
    _require(len(e.modes) > 0, "eval.modes", list(e.modes), "needs at least one mode", "[policy,plan]")
    for mode in e.modes:
        _check_choice("eval.modes", mode, ["policy", "plan"])
    if ("plan" in e.modes and config.model.variant == "idt" and config.env.is_meta_world
            and config.plan_depth != 1):
        raise ConfigError(f"plan.depth = {config.plan_depth}: IDT's sampled search (Meta-World) is depth 1 only "
                          "(--set plan.depth=1)")
    if "plan" in e.modes and not config.model.world_model:
        raise ConfigError("eval.modes contains 'plan' but model.world_model = false: planning needs the world "
                          "model (--set model.world_model=true, or --set eval.modes=[policy])")
    _check_choice("eval.device", e.device, ["auto", "cpu", "cuda"])
    _require(e.seed >= 0, "eval.seed", e.seed, "must be >= 0", "0")


def _validate_sweep_resources(config: ExperimentConfig) -> None:
    s, r = config.sweep, config.resources
    _check_choice("sweep.kind", s.kind, ["plan", "train", "pipeline"])
    _require(s.max_concurrent_trials >= 1, "sweep.max_concurrent_trials", s.max_concurrent_trials,
             "must be >= 1", "2")
    _require(s.cpus_per_trial > 0, "sweep.cpus_per_trial", s.cpus_per_trial, "must be > 0", "1")
    for dotted, values in s.grid.items():
        section, _, key = dotted.partition(".")
        cls = _SECTION_CLASSES.get(section)
        if cls is None or key not in {f.name for f in fields(cls)}:
            raise _unknown_key_error(f"sweep.grid.{dotted}", [f"{n}.{f.name}" for n, c in
                                                             _SECTION_CLASSES.items() for f in fields(c)])
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"sweep.grid.{dotted} = {values!r} must be a non-empty list of values")
    if s.kind == "train" and config.model.variant == "idt":
        raise ConfigError("sweep.kind = 'train' is implemented for AD/DPT only (its trials build the AD/DPT "
                          "model and window sampler); train IDT with `dicp-ray train` or a pipeline sweep")
    if s.paper_eval_budget and not (s.kind == "pipeline" and config.env.name == "ML1"):
        raise ConfigError("sweep.paper_eval_budget = true applies to ML1 pipeline sweeps only (sweep.kind: "
                          "pipeline, env.name: ML1): SPEC §6 gives per-task budgets for ML1 tasks only")
    if s.paper_eval_budget and "eval.num_episodes" in s.grid:
        raise ConfigError("sweep.grid has eval.num_episodes but sweep.paper_eval_budget = true sets it per task: "
                          "drop one of them")
    if s.kind == "pipeline":
        if not s.grid:
            raise ConfigError("sweep.kind = 'pipeline' needs sweep.grid, e.g. {env.task: [reach-v3, push-v3]}")
        slugs: dict[str, dict] = {}
        for point in sweep_points(s.grid):  # every trial's config must be valid before anything starts
            try:
                trial_config(config, point)
            except ConfigError as err:
                raise ConfigError(f"sweep trial {point}: {err}") from None
            slug = point_slug(point)
            if slug in slugs:
                raise ConfigError(f"sweep trials {slugs[slug]} and {point} would share the run directory "
                                  f"runs/{slug}: make the grid values distinct")
            slugs[slug] = point
    if r.num_cpus is not None:
        _require(r.num_cpus >= 1, "resources.num_cpus", r.num_cpus, "must be >= 1 or null", "2")
    if r.num_gpus is not None:
        _require(r.num_gpus >= 0, "resources.num_gpus", r.num_gpus, "must be >= 0 or null", "0")


def validate(config: ExperimentConfig) -> None:
    """Check ranges and cross-stage rules; raise ConfigError naming the key, the value and the fix."""
    _validate_env(config.env)
    _validate_collect(config.collect)
    _validate_model(config.model)
    _validate_train(config.train)
    _validate_plan_eval(config)
    _validate_sweep_resources(config)
    horizon = config.env.horizon
    _require(config.context_len >= horizon, "model.context_episodes", config.model.context_episodes,
             f"the context (context_episodes * horizon = {config.context_len}) must hold at least one "
             f"episode of {horizon} steps", "4")
    if config.model.reward_loss_weight != 1.0 and not config.env.is_meta_world:
        raise ConfigError(f"model.reward_loss_weight = {config.model.reward_loss_weight} applies to Meta-World's "
                          f"reward regression only; {config.env.name}'s reward is a 2-class prediction: drop it")
    if config.model.obs_embedding == "cell" and config.env.is_meta_world:
        raise ConfigError(f"model.obs_embedding = 'cell' needs grid cells; {config.env.name} observations are "
                          "continuous: use auto or linear")
    _check_choice("collect.source_obs", config.collect.source_obs, ["full", "model"])
    if config.model.next_obs_loss is False and not config.env.is_meta_world:
        raise ConfigError(f"model.next_obs_loss = false: {config.env.name}'s beam search needs the next-cell "
                          "prediction: drop it (--set model.next_obs_loss=null)")
    if (config.env.is_meta_world and "plan" in config.eval.modes and config.plan_depth > 1
            and not config.next_obs_loss):
        raise ConfigError(f"plan.depth = {config.plan_depth}: continuous search deeper than 1 step rolls on through "
                          "predicted next observations, which needs --set model.next_obs_loss=true (or "
                          "--set plan.depth=1, the paper's)")
    if config.collect.algorithm == "sac" and not config.env.is_meta_world:
        raise ConfigError("collect.algorithm = 'sac' needs a continuous-action env (Meta-World); "
                          f"{config.env.name} is discrete: use --set collect.algorithm=ppo")
    population_ok = not config.env.is_meta_world and config.collect.algorithm == "ppo"
    if config.collect.learner == "population" and not population_ok:
        raise ConfigError(f"collect.learner = 'population' runs PPO on the grid worlds only, not "
                          f"{config.collect.algorithm.upper()} on {config.env.name}: use --set "
                          "collect.learner=auto (or rllib)")
    if config.model.variant == "dpt" and config.env.is_meta_world:
        raise ConfigError(f"model.variant = 'dpt' needs optimal-action labels, which only the grid worlds "
                          f"have; {config.env.name} is Meta-World: use --set model.variant=ad (continuous "
                          "training is implemented for AD and IDT)")
    steps_per_stream = config.collect.env_steps_per_task // config.collect.num_streams
    _require(steps_per_stream >= config.context_len, "collect.env_steps_per_task",
             config.collect.env_steps_per_task,
             f"each stream's history ({steps_per_stream} steps) must be at least one training window "
             f"(k = {config.context_len})", str(config.context_len * config.collect.num_streams * 10))
    if steps_per_stream % horizon != 0:
        raise ConfigError(f"collect.env_steps_per_task = {config.collect.env_steps_per_task} gives "
                          f"{steps_per_stream} steps per stream, not whole episodes of {horizon}: make it a "
                          f"multiple of num_streams * horizon = {config.collect.num_streams * horizon}")
