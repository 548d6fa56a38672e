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
from dataclasses import dataclass, field
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
    """PPO implementation: population (one process trains many task learners as one stacked network, each equal
    to SB3's PPO, dicp_ray/collect/population_ppo.py; grid worlds and Meta-World PPO) | rllib (one RLlib learner per
    task, the reference; the only SAC learner) | auto = population for PPO, rllib for SAC. The resolved learner is
    part of the dataset fingerprint: a Meta-World dataset collected with auto before issue #24 (RLlib then) resumes
    with --set collect.learner=rllib."""
    tasks_per_population: int = 0
    """population learner: task learners per population (one Ray task on one core); 0 = spread the tasks
    evenly over the cluster's CPUs, at most 81 per population (Meta-World: 4). Shards do not depend on it."""
    backend: str = "ray"
    """Where the learners run: ray = Ray tasks (a laptop or a cluster, retried when a worker dies) | local = a
    process pool on this machine, one process per core (resources.num_cpus, default all cores), without Ray
    (a bare GPU box). local runs population learners only (grid worlds, PPO). Same shards, sidecars, manifest,
    fingerprint and resume either way; not part of the dataset fingerprint."""
    sac_learning_starts: int = 100
    """SAC: env steps (all streams) of the untrained policy before the first update (paper: 100)."""
    sac_batch_size: int = 128
    """SAC: transitions per gradient step (paper: 128)."""
    sac_train_freq: int = 1
    """SAC: env steps per stream between updates, i.e. SB3's train_freq over the vector env (the release's
    cfg/alg/sac_ml1.yaml: 1; the paper's Table 4 says 10, which did not learn in 100K steps where 1 did: docs/fidelity.md row 15)."""
    sac_gradient_steps: int = 10
    """SAC: gradient steps per update (the release: 10, i.e. 0.1 per env step with its 100 streams; Table 4: 1)."""
    sac_buffer_size: int = 1_000_000
    """SAC: replay buffer capacity in transitions (paper: 1M)."""
    sac_hidden_sizes: tuple[int, ...] = (256, 256)
    """SAC: actor and twin-critic MLPs (ReLU), SB3's SAC default."""


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "ad"
    """In-context algorithm: ad | dpt | idt. idt is hierarchical: on the grid worlds the release's IDT
    (dicp_ray/models/idt_grid.py; plan mode = DICP-IDT beam search to the end of each 10-step block, plan.depth unused;
    release lr/batch: Darkroom 1e-2/1024, Key-to-Door 1e-3/2048, Permuted 1e-3/512, see
    tune_configs/darkroom_idt.yaml), on Meta-World the release's Meta-World IDT, dicp_ray/models/idt_continuous.py
    (return-to-go from 10 x horizon; plan: depth-1 sampled search on the blocks after step horizon // 2)."""
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
    action_embedding: str = "auto"
    """Query-action token of the world model (AD, DPT): auto | table | linear. table = a learned nn.Embedding row per
    action (the release's grid AD and DPT, nn.Embedding(5, 32)); linear = a Linear over the one-hot action with a
    bias (dicp_ray before issue #23). auto = table on the grid worlds, linear on Meta-World (continuous actions, as
    the release). docs/fidelity.md, row 7."""
    backbone: str = "auto"
    """Transformer details (AD, DPT): auto | release | gpt2. release = the authors' TinyLlama blocks (no final norm,
    dropout on each sublayer's input, attention bias, PyTorch default init, raw grid coordinates); gpt2 = our
    earlier choice (final RMSNorm, dropout on embeddings and residual branches, normal(0.02) init, coordinates
    scaled to [0, 1]). auto = release for AD and DPT everywhere and for IDT on Meta-World (the release uses the same
    TinyLlama there, release:metaworld/model/tiny_llama); the grid-world IDT keeps gpt2 under auto."""
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
    """bf16 autocast on CUDA. Off by default: one of the paper's small models is launch-bound and slower in bf16
    (H200: 26.4K vs 38.7K windows/s fp32), but stacked groups gain (6 models: 104K vs 50K; README "Measured
    speed"); CPUs never use it."""
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
    (a PyTorch-only box). The same loop (dicp_ray/train/loop.py), checkpoints and run identities either way."""
    models_per_process: int = 1
    """Train up to this many split seeds of the config together in one process (or one Ray Train worker group)
    with stacked weights (dicp_ray/train/model_group.py): each its own data, optimizer state and checkpoint."""
    device: str = "auto"
    """local backend: auto (cuda when train.use_gpu) | cpu | cuda."""
    compile: bool = False
    """torch.compile the training forward/backward (CUDA: mode reduce-overhead, i.e. CUDA graphs). Off by default:
    on CPU it measured 0.96x, and its warm-up takes 20-40 s; on an H200 one model gains 2.0x (fp32) / 4.2x (bf16),
    30 stacked 1.1x (README "Measured speed")."""
    sample_on_device: bool | None = None
    """Keep the dataset on the training device and gather windows there with torch ops (AD, DPT;
    dicp_ray/data/device_windows.py): the same windows as the host sampler for the same seed. None = on CUDA only;
    true also on CPU (tests); false = numpy on the host, copied over every step."""
    deadline_unix_s: float | None = None
    """Wall-clock deadline as an absolute Unix time in seconds (e.g. --set train.deadline_unix_s=$(( $(date +%s)
    + 300 )) for five minutes from now); None = no deadline. When the clock passes it, the loop stops after the
    current step (always at least one step per call), writes a checkpoint at that step and the run's model.pt
    with ``step`` < num_steps and ``stopped_at_deadline`` true. Such a model evaluates like any other (results
    record its step and the fraction of num_steps); a re-run with a later (or no) deadline continues it. Absolute,
    so one deadline covers every group of a train call and every stage of a scripted run."""


@dataclass(frozen=True)
class PlanConfig:
    beam_width: int = 10
    """K: beams kept per depth level of the grid worlds' beam search (paper: 10). Meta-World plans by sampled search
    (plan.num_samples), so it refuses another value here."""
    depth: int | None = None
    """H: planning depth; None = the paper's per-env default (8 Darkroom, 16 Key-to-Door / Permuted)."""
    num_samples: int = 10
    """L: candidates of Meta-World's sampled search (policy mean + L-1 samples; paper: 10). Grid worlds: unused."""
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
    """policy = sample the distilled policy; plan = DICP planning with the world model (grid worlds: beam search,
    plan.beam_width x plan.depth; Meta-World: sampled search, plan.num_samples; needs model.world_model)."""
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda."""
    backend: str = "ray"
    """Where the (split seed x mode) runs go: ray = one Ray task each (in parallel, GPUs shared by 2) | local =
    one after another in this process, without Ray (a bare GPU box). Same results files either way."""


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
    """CPUs for the embedded local Ray, and processes of collect.backend = local (None = all of this machine's)."""
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


def _unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ConfigError(f"unknown key '{key}': {hint}valid keys here are {', '.join(sorted(valid))}")


# The paper's in-context step budgets per ML1 task (SPEC §6); every other task gets META_WORLD_DEFAULT_EVAL_STEPS.
META_WORLD_EVAL_STEPS = {"reach-v3": 10_000, "push-v3": 30_000, "pick-place-v3": 200_000,
                         "peg-insert-side-v3": 200_000}
META_WORLD_DEFAULT_EVAL_STEPS = 20_000


