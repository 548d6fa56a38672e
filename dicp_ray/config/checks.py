"""Validation of an :class:`ExperimentConfig`: ranges and cross-stage rules, run on every load before anything
distributed starts. Every problem raises :class:`ConfigError` naming the key, the bad value and the fix."""
from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any

from dicp_ray.config.schema import (
    _ENV_TABLE,
    _SECTION_CLASSES,
    META_WORLD_TASKS,
    CollectConfig,
    ConfigError,
    EnvConfig,
    ExperimentConfig,
    ModelConfig,
    PlanConfig,
    TrainConfig,
    _unknown_key_error,
)

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
    _check_choice("collect.backend", c.backend, ["ray", "local"])
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
    _check_choice("model.action_embedding", m.action_embedding, ["auto", "table", "linear"])
    if m.variant == "idt":
        _require(m.obs_embedding in ("auto", "linear") and m.action_embedding in ("auto", "linear"),
                 "model.obs_embedding", m.obs_embedding,
                 f"(and model.action_embedding = {m.action_embedding!r}) must be auto for variant idt, which "
                 "embeds observations and actions itself", "auto")
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
    if t.deadline_unix_s is not None:
        _require(t.deadline_unix_s > 0, "train.deadline_unix_s", t.deadline_unix_s,
                 "must be a Unix time in seconds (or null for no deadline)", "$(( $(date +%s) + 300 ))")
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
    _check_choice("eval.backend", e.backend, ["ray", "local"])
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
    if s.kind == "pipeline" and not s.grid:
        raise ConfigError("sweep.kind = 'pipeline' needs sweep.grid, e.g. {env.task: [reach-v3, push-v3]}")
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
    if config.model.action_embedding == "table" and config.env.is_meta_world:
        raise ConfigError(f"model.action_embedding = 'table' needs discrete actions; {config.env.name} actions are "
                          "continuous: use auto or linear")
    if config.env.is_meta_world and config.plan.beam_width != PlanConfig.beam_width:
        raise ConfigError(f"plan.beam_width = {config.plan.beam_width} does nothing on {config.env.name}: its planner is "
                          "a sampled search, sized by plan.num_samples (e.g. --set plan.num_samples=10)")
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
    if config.collect.learner == "population" and config.collect.algorithm != "ppo":
        raise ConfigError(f"collect.learner = 'population' runs PPO only, not "
                          f"{config.collect.algorithm.upper()} (on {config.env.name}): use --set "
                          "collect.learner=auto (or rllib) for SAC")
    grid_population = not config.env.is_meta_world and config.collect.algorithm == "ppo"
    if config.collect.backend == "local" and not (grid_population and config.collect.learner != "rllib"):
        raise ConfigError(f"collect.backend = 'local' runs the grid worlds' population PPO learners only; "
                          f"{config.env.name} with collect.learner = {config.collect.learner!r} and "
                          f"{config.collect.algorithm.upper()} needs Ray (and MuJoCo): use --set collect.backend=ray")
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
