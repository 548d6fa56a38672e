"""Distil learning histories into one DICP Transformer with Ray Train (DDP: gloo on CPU, NCCL on GPU).

    dicp-ray train --config tune_configs/smoke.yaml --output runs/smoke
    train_model(config, "runs/smoke/dataset", "runs/smoke/train/split_0", split_seed=0)  # -> .../model.pt

Each rank samples windows of k = context_episodes * horizon transitions from the TRAIN tasks of the split
(never a test task: asserted on the first batch; IDT: windows of whole episodes, `make_window_sampler`), turns
them into the AD, DPT or IDT layout (`windows_to_batch`)
and takes AdamW steps with cosine decay to 0 (no warm-up) and grad clipping; bf16 autocast on CUDA when train.mixed_precision.
Every ``checkpoint_every_steps`` (and at the end) every rank calls ``ray.train.report``; rank 0 measures
held-out losses/accuracies on TEST-task histories and attaches a checkpoint with ``state.pt`` (model,
optimizer, scheduler, step, per-rank RNG states) and a self-describing ``model.pt``. Rank 0 also writes
TensorBoard scalars (``train/*``, ``heldout/*``) to ``<output>/tb`` and logs a progress line with an ETA.

Resuming: the Ray run's name and storage (``<output>/ray_train``) depend only on the output directory, and
Ray Train V2 reloads a run it finds there, so re-running the same command after a crash continues from the
last checkpoint. Worker failures inside a run are retried from it (``FailureConfig(max_failures=3)``).
Raising ``train.num_steps`` continues a finished run (the cosine schedule then spans the new num_steps).
Anything else that changes the checkpoints' meaning (model, data, split, optimiser) is refused for an
existing output directory. When ``<output>/model.pt`` already holds the finished model, nothing runs.

Expect ~15-20 s of Ray start-up per run on 2 CPU cores; the paper's AD model (4 layers, 32 wide, k = 80)
trains at roughly 150-200 windows/s per core, 2 workers at ~2x that (benchmarks/bench_train.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicp_ray.config import ConfigError, ExperimentConfig, TrainConfig
from dicp_ray.envs import GRID_SIZE, GRID_SPECS, cell_index, split_tasks
from dicp_ray.idt import EpisodeWindowSampler, best_episode_return, relabel_windows
from dicp_ray.idt_grid import HistoryWindowSampler
from dicp_ray.model import ModelSpec, build_model, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

TRAIN_TAGS = ("loss", "loss_action", "loss_reward", "loss_next_obs",
              "acc_action", "acc_reward", "acc_next_obs")
CRASH_ENV_VAR = "DICP_RAY_TEST_CRASH_AT_STEP"  # tests only: every rank raises once at this step
# What a run's checkpoints depend on (None = the whole section). A re-run in the same output directory may
# raise train.num_steps and change runtime settings (workers, GPUs, intervals), nothing in here.
_RUN_KEYS = {"env": ("name", "task", "train_ratio", "max_train_tasks"), "model": None,
             "train": ("seed", "batch_size", "lr", "weight_decay", "beta1", "beta2", "grad_clip",
                       "world_model_weight")}


# ------------------------------------------------------------------------------------------- model inputs
def model_spec_from_config(config: ExperimentConfig, dataset: Any) -> ModelSpec:
    """The model for `config` on `dataset`: obs size and action count from the data, classes from the env."""
    m = config.model
    if getattr(dataset, "is_continuous", False):  # Meta-World: Gaussian actions, reward/next-obs regression
        if m.variant not in ("ad", "idt"):
            raise ConfigError(f"model.variant = {m.variant!r}: continuous-action (Meta-World) training is "
                              "implemented for AD and IDT only (--set model.variant=ad)")
        reward_max = 10.0  # Meta-World's v2 reward functions pay at most 10 per step
        # IDT: returns-to-go / (max reward per step x horizon) lie in [0, 1] (the grid worlds' 1 / horizon), and
        # every test episode starts at the best episode return of the (train-task) data (dicp_ray/idt.py).
        idt = ({"return_scale": 1.0 / (reward_max * config.env.horizon),
                "return_target": best_episode_return(dataset)} if m.variant == "idt" else {})
        return ModelSpec(layout=m.variant, world_model=m.world_model, obs_dim=int(dataset.obs_dim),
                         discrete_actions=False, num_actions=int(dataset.action_dim), num_obs_classes=None,
                         reward_classes=None, reward_max=reward_max, context_len=config.context_len,
                         num_layers=m.num_layers, num_heads=m.num_heads, embed_dim=m.embed_dim, mlp_dim=m.mlp_dim,
                         dropout=m.dropout, attn_dropout=m.attn_dropout, obs_scale=1.0,
                         reward_loss_weight=m.reward_loss_weight, **idt)
    grid = GRID_SPECS[config.env.name]
    idt = {"return_scale": 1.0} if m.variant == "idt" else {}  # returns-to-go embedded unscaled (idt_grid.py)
    return ModelSpec(layout=m.variant, world_model=m.world_model, obs_dim=int(dataset.obs_dim),
                     discrete_actions=True, num_actions=int(dataset.num_actions),
                     num_obs_classes=grid.num_cells, reward_classes=2, reward_max=1.0,
                     context_len=config.context_len, num_layers=m.num_layers, num_heads=m.num_heads,
                     embed_dim=m.embed_dim, mlp_dim=m.mlp_dim, dropout=m.dropout, attn_dropout=m.attn_dropout,
                     obs_scale=1.0 / (GRID_SIZE - 1), **idt)  # cells 0..8 -> [0, 1]


def make_window_sampler(config: ExperimentConfig, dataset: Any, seed):
    """Training windows for config.model.variant: k consecutive transitions starting anywhere (AD, DPT; grid IDT
    in its history sorted by episode return, with relabelled return-to-go: `idt_grid.HistoryWindowSampler`), or
    context_episodes whole episodes (continuous IDT, whose episodes are then sorted in `windows_to_batch`)."""
    from dicp_ray.data import WindowSampler

    if config.model.variant == "idt" and getattr(dataset, "is_continuous", False):
        return EpisodeWindowSampler(dataset, config.model.context_episodes, config.env.horizon, seed=seed)
    if config.model.variant == "idt":
        return HistoryWindowSampler(dataset, config.context_len, config.env.horizon, seed=seed)
    return WindowSampler(dataset, config.context_len, seed=seed)


def windows_to_batch(windows: dict[str, np.ndarray], layout: str, world_model: bool,
                     device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """Training windows of k transitions (``WindowSampler.sample``) -> (batch, targets) tensors.

    The first k-1 transitions are the context, the last one the query: its observation is the query
    observation and (world model) its action the query action, whose reward class and next cell are the
    world-model targets. AD's target is the action the source took there. DPT conditions on a query state
    as well; we use the window's last observation (so AD and DPT see the same tokens and the query state is
    one the source visited in this task) and its target is the oracle action a* of that state at every one
    of the T + 1 action positions. Grid IDT windows (`idt_grid.HistoryWindowSampler`: already sorted, with a
    ``return_to_go`` column) become cells, actions, reward classes and returns-to-go, every step a target.
    Continuous IDT windows (whole episodes with a ``step`` column) are sorted by episode return and their
    return-to-go relabelled (`dicp_ray.idt.relabel_windows`); float actions, rewards and next observations of
    every step are the targets, as in `_continuous_batch`.
    """
    def tensor(x, dtype):
        return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device)

    if layout == "idt":
        if windows["action"].ndim == 3:  # continuous actions (B, k, A): Meta-World, regression targets
            return _continuous_idt_batch(relabel_windows(windows), world_model, tensor)
        if "return_to_go" not in windows:
            raise ValueError("grid IDT windows need a return_to_go column: sample them with "
                             "dicp_ray.idt_grid.HistoryWindowSampler (train.make_window_sampler)")
        cells, next_cells = cell_index(windows["obs"]), cell_index(windows["next_obs"])       # (B, k)
        batch = {"ctx_obs": tensor(cells, torch.long), "ctx_action": tensor(windows["action"], torch.long),
                 "ctx_reward": tensor(np.rint(windows["reward"]), torch.long),
                 "ctx_next_obs": tensor(next_cells, torch.long),
                 "ctx_return_to_go": tensor(windows["return_to_go"], torch.float32)}           # (B, k)
        targets = {"target_action": tensor(windows["action"], torch.long)}                    # (B, k)
        if world_model:
            targets["target_reward"] = tensor(np.rint(windows["reward"]), torch.long)
            targets["target_next_obs"] = tensor(next_cells, torch.long)
        return batch, targets

    obs, action, reward = windows["obs"], windows["action"], windows["reward"]    # (B,k,D), (B,k), (B,k)
    if action.ndim == 3:  # continuous actions (B, k, A): Meta-World, AD layout, regression targets
        return _continuous_batch(windows, layout, world_model, tensor)
    batch = {"ctx_obs": tensor(obs[:, :-1], torch.float32), "ctx_action": tensor(action[:, :-1], torch.long),
             "ctx_reward": tensor(reward[:, :-1], torch.float32),
             "ctx_next_obs": tensor(windows["next_obs"][:, :-1], torch.float32),
             "query_obs": tensor(obs[:, -1], torch.float32)}
    if layout == "ad":
        targets = {"target_action": tensor(action[:, -1], torch.long)}                        # (B,)
    elif layout == "dpt":
        a_star = windows["optimal_action"][:, -1:]                                           # (B, 1)
        targets = {"target_action": tensor(np.repeat(a_star, obs.shape[1], axis=1), torch.long)}  # (B, T+1)
    else:
        raise ValueError(f"layout must be 'ad', 'dpt' or 'idt', got {layout!r}")
    if world_model:
        batch["query_action"] = tensor(action[:, -1], torch.long)
        targets["target_reward"] = tensor(np.rint(reward[:, -1]), torch.long)                # (B,) 0 / 1
        targets["target_next_obs"] = tensor(cell_index(windows["next_obs"][:, -1]), torch.long)  # (B,) cell
    return batch, targets


def _continuous_batch(windows: dict[str, np.ndarray], layout: str, world_model: bool, tensor):
    """AD layout with float actions: the source's action, reward (clipped to [0, 10] by the loss) and next
    observation of the query transition are the targets."""
    if layout != "ad":
        raise ValueError(f"continuous actions are implemented for the 'ad' and 'idt' layouts only, got {layout!r}")
    obs, action, reward = windows["obs"], windows["action"], windows["reward"]
    batch = {"ctx_obs": tensor(obs[:, :-1], torch.float32), "ctx_action": tensor(action[:, :-1], torch.float32),
             "ctx_reward": tensor(reward[:, :-1], torch.float32),
             "ctx_next_obs": tensor(windows["next_obs"][:, :-1], torch.float32),
             "query_obs": tensor(obs[:, -1], torch.float32)}
    targets = {"target_action": tensor(action[:, -1], torch.float32)}                       # (B, A)
    if world_model:
        batch["query_action"] = tensor(action[:, -1], torch.float32)
        targets["target_reward"] = tensor(reward[:, -1], torch.float32)                      # (B,)
        targets["target_next_obs"] = tensor(windows["next_obs"][:, -1], torch.float32)       # (B, D)
    return batch, targets


def _continuous_idt_batch(w: dict[str, np.ndarray], world_model: bool, tensor):
    """Relabelled IDT windows with float actions: every step's action, reward (clipped to [0, 10] by the loss) and
    next observation are the targets."""
    batch = {"ctx_obs": tensor(w["obs"], torch.float32), "ctx_action": tensor(w["action"], torch.float32),
             "ctx_reward": tensor(w["reward"], torch.float32), "ctx_next_obs": tensor(w["next_obs"], torch.float32),
             "ctx_return_to_go": tensor(w["return_to_go"], torch.float32)}                    # (B, k, ...)
    targets = {"target_action": tensor(w["action"], torch.float32)}                            # (B, k, A)
    if world_model:
        targets["target_reward"] = tensor(w["reward"], torch.float32)                          # (B, k)
        targets["target_next_obs"] = tensor(w["next_obs"], torch.float32)                      # (B, k, D)
    return batch, targets


# ------------------------------------------------------------------------------------------- optimisation
def build_optimizer(model: torch.nn.Module, train: TrainConfig):
    """AdamW + cosine decay from train.lr to 0 over train.num_steps, no warm-up (closed form: resumable)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2),
                                  weight_decay=train.weight_decay)
    num_steps = train.num_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, num_steps) / num_steps)))
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, batch, targets, train: TrainConfig,
               bf16: bool | None = None) -> dict[str, torch.Tensor]:
    """One optimiser step (bf16 autocast on CUDA when train.mixed_precision, or as `bf16` says); returns
    the detached losses and accuracies."""
    model.train()
    device_type = batch["ctx_obs"].device.type
    bf16 = device_type == "cuda" and train.mixed_precision if bf16 is None else bf16
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        _, losses = model(batch, targets, world_model_weight=train.world_model_weight)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    scheduler.step()
    return {k: v.detach().float() for k, v in losses.items()}


@torch.no_grad()
def evaluate_batches(model, batches: list, world_model_weight: float, bf16: bool = False) -> dict[str, float]:
    """Mean losses and accuracies of `model` (eval mode) over prepared (batch, targets) pairs."""
    model.eval()
    totals: dict[str, float] = {}
    for batch, targets in batches:
        device_type = batch["ctx_obs"].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16 and device_type == "cuda"):
            _, losses = model(batch, targets, world_model_weight=world_model_weight)
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value) / len(batches)
    return totals


# ------------------------------------------------------------------------------------------- run identity
def run_identity(config_dict: dict[str, Any], split_seed: int, dataset_id: str) -> dict[str, Any]:
    """What a run's checkpoints depend on: continuing or reusing them under another identity is refused."""
    picked = {section: {k: v for k, v in config_dict[section].items() if keys is None or k in keys}
              for section, keys in _RUN_KEYS.items()}
    if picked["env"].get("task") is None:  # grid worlds have no task: keep their identities as before
        picked["env"].pop("task", None)
    if picked["model"].get("reward_loss_weight", 1.0) == 1.0:  # the default keeps older runs' identities
        picked["model"].pop("reward_loss_weight", None)
    if picked["model"].get("variant") == "idt" and picked["env"].get("name") in GRID_SPECS:
        picked["idt_format"] = "release-history-windows-v1"  # idt_grid.py: other windows and model than before
    return json.loads(json.dumps({**picked, "split_seed": split_seed, "dataset_id": dataset_id}))


def dataset_id(dataset) -> str:
    """sha256 of the dataset's manifest (canonical JSON; it holds the sha256 of every shard)."""
    return hashlib.sha256(json.dumps(dataset.manifest, sort_keys=True).encode()).hexdigest()


def run_name(output_dir: str | Path) -> str:
    """Ray Train run name: a function of the output directory only, so a re-run finds (and resumes) it."""
    return "train_" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(output_dir).resolve().name)


def _format_eta(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------------------------- rank state
def _sampler_rng(sampler) -> np.random.Generator:
    return sampler._rng  # WindowSampler keeps its generator private; its state belongs in a resumable run


def _rng_state(sampler) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "sampler": _sampler_rng(sampler).bit_generator.state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _all_gather(obj: Any, world_size: int) -> list[Any]:
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _restore(checkpoint, model, optimizer, scheduler, sampler, loop_config, rank: int,
             world_size: int) -> tuple[int, list[int]]:
    """Load a Ray checkpoint's state.pt into this rank -> (step to continue from, steps resumed at so far)."""
    seed = loop_config["config"].train.seed
    if checkpoint is None:
        torch.manual_seed(seed * 1000 + rank)  # per-rank dropout; the weights are DDP-broadcast anyway
        return 0, []
    with checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
    if state["run_identity"] != loop_config["run_identity"]:
        raise RuntimeError(f"checkpoint of another run: {state['run_identity']}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):  # the CURRENT num_steps' schedule
        group["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
    step = int(state["step"])
    if len(state["rng"]) == world_size:
        rng = state["rng"][rank]
        torch.set_rng_state(rng["torch"])
        _sampler_rng(sampler).bit_generator.state = rng["sampler"]
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # another worker count: fresh but deterministic streams
        torch.manual_seed(seed * 1000 + rank + 1_000_003 * step)
        fresh = np.random.default_rng([seed, rank, step])
        _sampler_rng(sampler).bit_generator.state = fresh.bit_generator.state
    return step, [*state["resumed_at_steps"], step]


def _write_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, step: int, rng: list,
                      resumed_at_steps: list[int], loop_config) -> None:
    config: ExperimentConfig = loop_config["config"]
    identity = loop_config["run_identity"]
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "rng": rng,
                "resumed_at_steps": resumed_at_steps, "run_identity": identity}, ckpt_dir / "state.pt")
    extra = {"env_name": config.env.name, "split_seed": loop_config["split_seed"],
             "dataset_id": loop_config["dataset_id"], "variant": config.model.variant,
             "world_model": config.model.world_model, "step": step, "resumed_at_steps": resumed_at_steps,
             "config": config.to_dict(), "train_task_ids": list(loop_config["train_task_ids"]),
             "test_task_ids": list(loop_config["test_task_ids"]), "run_identity": identity,
             "provenance": loop_config["provenance"]}
    save_checkpoint(str(ckpt_dir / "model.pt"), model, extra=extra)
    (ckpt_dir / "meta.json").write_text(json.dumps({"step": step, "run_identity": identity}))


class _MetricMeans:
    """Per-step losses summed on the device (no host sync per step), averaged over ranks when read."""

    def __init__(self):
        self.keys = None  # the TRAIN_TAGS this model reports (continuous models have no accuracies)
        self.sums, self.count = None, 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        if self.keys is None:
            self.keys = tuple(k for k in TRAIN_TAGS if k in losses)
        values = torch.stack([losses[k] for k in self.keys])
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def read(self, world_size: int) -> dict[str, float]:
        import torch.distributed as dist

        means = self.sums / self.count
        if world_size > 1 and dist.is_initialized():
            dist.all_reduce(means)
            means = means / world_size
        self.sums, self.count = None, 0
        return dict(zip(self.keys, means.tolist()))


def _heldout_batches(loop_config, spec: ModelSpec, batch_size: int, device) -> list:
    """Fixed windows of TEST-task histories (the same at every checkpoint), or [] if the data has none."""
    from dicp_ray.data import HistoryDataset

    config: ExperimentConfig = loop_config["config"]
    if not loop_config["heldout_task_ids"]:
        return []
    dataset = HistoryDataset.open(loop_config["dataset_dir"], task_ids=loop_config["heldout_task_ids"],
                                  verify=False)
    sampler = make_window_sampler(config, dataset, seed=[config.train.seed, 2 ** 31])  # not a rank's
    return [windows_to_batch(sampler.sample(batch_size), spec.layout, spec.world_model, device)
            for _ in range(config.train.eval_batches)]


def _crash_marker(loop_config, step) -> Path:
    return Path(loop_config["output_dir"]) / "ray_train" / f".test_crash_at_{step}"


@dataclass
class _Rank:
    """Everything one DDP rank trains with (built by `_setup_rank`)."""

    loop_config: dict[str, Any]
    rank: int
    world_size: int
    device: torch.device
    spec: ModelSpec
    model: torch.nn.Module          # DDP-wrapped when world_size > 1
    raw_model: torch.nn.Module      # DICPTransformer or IDTTransformer (build_model)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Any
    start_step: int
    resumed_at_steps: list[int]
    crash_at_step: int | None       # tests only (CRASH_ENV_VAR), None once it has crashed
    heldout: list                   # rank 0: fixed test-task batches
    writer: Any                     # rank 0: TensorBoard SummaryWriter


def _setup_rank(loop_config: dict[str, Any]) -> _Rank:
    import ray.train
    import ray.train.torch

    from dicp_ray.data import HistoryDataset

    config: ExperimentConfig = loop_config["config"]
    train = config.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(train.cpus_per_worker)
    device = ray.train.torch.get_device()
    dataset = HistoryDataset.open(loop_config["dataset_dir"], task_ids=loop_config["train_task_ids"],
                                  verify=False)
    assert set(loop_config["test_task_ids"]).isdisjoint(dataset.task_ids), "a test task in the training data"
    spec = model_spec_from_config(config, dataset)
    torch.manual_seed(train.seed)  # identical initial weights on every rank
    model = ray.train.torch.prepare_model(build_model(spec))
    raw_model = getattr(model, "module", model)
    optimizer, scheduler = build_optimizer(raw_model, train)
    sampler = make_window_sampler(config, dataset, seed=[train.seed, rank])
    start_step, resumed = _restore(ray.train.get_checkpoint(), raw_model, optimizer, scheduler, sampler,
                                   loop_config, rank, world_size)
    crash = loop_config.get("crash_at_step")
    crash = None if crash is None or _crash_marker(loop_config, crash).exists() else crash
    heldout, writer = [], None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        heldout = _heldout_batches(loop_config, spec, train.batch_size // world_size, device)
        writer = SummaryWriter(str(Path(loop_config["output_dir"]) / "tb"), purge_step=start_step or None)
        logger.info("rank 0/%d: training %s steps %d -> %d on %s, %d windows/step", world_size, spec.layout,
                    start_step, train.num_steps, device, train.batch_size)
    return _Rank(loop_config, rank, world_size, device, spec, model, raw_model, optimizer, scheduler, sampler,
                 start_step, resumed, crash, heldout, writer)


def _log(r: _Rank, metrics: dict, means: _MetricMeans, step: int, clock: dict[str, float]) -> None:
    """Interval metrics into `metrics` on every rank (a collective); rank 0 writes TensorBoard + progress."""
    train, now = r.loop_config["config"].train, time.perf_counter()
    windows_per_s = train.batch_size * (step - clock["step"]) / max(now - clock["time"], 1e-9)
    metrics.update({f"train/{k}": v for k, v in means.read(r.world_size).items()})
    metrics.update({"train/lr": r.scheduler.get_last_lr()[0], "train/samples_per_s": windows_per_s,
                    "train/tokens_per_s": windows_per_s * (r.spec.context_len + int(r.spec.world_model))})
    clock.update(time=now, step=step)
    if r.writer is None:
        return
    for key, value in metrics.items():
        if key != "step":
            r.writer.add_scalar(key, value, step)
    eta = (now - clock["start"]) / (step - r.start_step) * (train.num_steps - step)
    logger.info("step %d/%d loss %.4f acc_action %.3f lr %.2e | %.0f windows/s | ETA %s", step,
                train.num_steps, metrics["train/loss"], metrics.get("train/acc_action", float("nan")), metrics["train/lr"],
                windows_per_s, _format_eta(eta))


def _report(r: _Rank, metrics: dict[str, float], step: int) -> None:
    """Every rank calls this at the same steps; rank 0 adds held-out metrics and the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    rng = _all_gather(_rng_state(r.sampler), r.world_size)  # a collective: every rank, same place
    if r.rank == 0 and r.heldout:
        scores = evaluate_batches(r.raw_model, r.heldout, r.loop_config["config"].train.world_model_weight)
        metrics.update({f"heldout/{k}": v for k, v in scores.items()})
        for key, value in scores.items():
            r.writer.add_scalar(f"heldout/{key}", value, step)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if r.rank == 0:
            r.writer.flush()
            _write_checkpoint(Path(tmp), r.raw_model, r.optimizer, r.scheduler, step, rng, r.resumed_at_steps,
                              r.loop_config)
            checkpoint = Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")


# ------------------------------------------------------------------------------------------- worker loop
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train loop of one DDP rank; ``loop_config`` is built by `train_model`."""
    r, train = _setup_rank(loop_config), loop_config["config"].train
    test_ids = set(loop_config["test_task_ids"])
    means, now = _MetricMeans(), time.perf_counter()
    clock = {"start": now, "time": now, "step": r.start_step}
    for step in range(r.start_step, train.num_steps):
        windows = r.sampler.sample(train.batch_size // r.world_size)
        if step == r.start_step:
            leaked = test_ids.intersection(windows["task_id"].tolist())
            assert not leaked, f"sampled windows of test tasks {sorted(leaked)}"
        if step == r.crash_at_step:
            _crash_marker(loop_config, step).touch()
            raise RuntimeError(f"{CRASH_ENV_VAR}: simulated crash at step {step}")
        batch, targets = windows_to_batch(windows, r.spec.layout, r.spec.world_model, r.device)
        means.add(train_step(r.model, r.optimizer, r.scheduler, batch, targets, train))
        done, metrics = step + 1, {"step": step + 1}
        if done % train.log_every_steps == 0 or done == train.num_steps:
            _log(r, metrics, means, done, clock)
        if done % train.checkpoint_every_steps == 0 or done == train.num_steps:
            _report(r, metrics, done)
    if r.writer is not None:
        r.writer.close()


# ------------------------------------------------------------------------------------------- launcher
def split_task_ids(config: ExperimentConfig, split_seed: int,
                   dataset) -> tuple[list[int], list[int], list[int]]:
    """(train ids used, all test ids, test ids in the data for held-out metrics)."""
    train_ids, test_ids = split_tasks(config.env.name, split_seed, config.env.train_ratio)
    if config.env.max_train_tasks is not None:
        train_ids = train_ids[: config.env.max_train_tasks]
    present = {int(i) for i in dataset.task_ids}
    used = [i for i in train_ids if i in present]
    if not used:
        raise ConfigError(f"the dataset holds none of the {len(train_ids)} train tasks of split seed "
                          f"{split_seed} ({config.env.name}): collect it with the same env.* settings")
    if len(used) < len(train_ids):
        logger.warning("the dataset holds %d of the %d train tasks of split seed %d; training on those",
                       len(used), len(train_ids), split_seed)
    return used, test_ids, [i for i in test_ids if i in present]


def _check_dataset(config: ExperimentConfig, dataset) -> None:
    if dataset.env_name != config.env.name:
        raise ConfigError(f"env.name = {config.env.name!r} but the dataset holds {dataset.env_name!r} "
                          f"histories: --set env.name={dataset.env_name} or use a {config.env.name} dataset")
    if config.env.is_meta_world:
        if dataset.env_task != config.env.task:
            raise ConfigError(f"env.task = {config.env.task!r} but the dataset holds {dataset.env_task!r} "
                              f"histories: --set env.task={dataset.env_task} or use a {config.env.task} dataset")
        if not dataset.is_continuous:
            raise ConfigError(f"the {config.env.name} dataset has discrete actions: it was not written by "
                              "dicp_ray's Meta-World collection")
        return
    grid = GRID_SPECS[config.env.name]
    if (dataset.obs_dim, dataset.num_actions) != (grid.obs_dim, grid.num_actions):
        raise ConfigError(f"dataset obs_dim/num_actions {dataset.obs_dim}/{dataset.num_actions} do not match "
                          f"{config.env.name} ({grid.obs_dim}/{grid.num_actions})")
    if config.model.variant == "dpt" and "optimal_action" not in dataset.column_names:
        raise ConfigError("model.variant = 'dpt' needs oracle labels but the dataset has no optimal_action "
                          "column: --set model.variant=ad")


def _check_windows(config: ExperimentConfig, dataset, train_ids: list[int]) -> None:
    from dicp_ray.data import HistoryDataset

    try:  # raises when no train history holds a whole window
        train_data = HistoryDataset.open(dataset.path, task_ids=train_ids, verify=False)
        make_window_sampler(config, train_data, seed=0)
    except ValueError as err:
        raise ConfigError(f"model.context_episodes = {config.model.context_episodes}: {err}") from None
    model_spec_from_config(config, dataset)  # ModelSpec checks the remaining shapes


def _loop_config(config: ExperimentConfig, dataset_dir: str, output_dir: Path, split_seed: int) -> dict:
    """Check the dataset against the config (before Ray starts) and build the ranks' loop config."""
    from dicp_ray.data import HistoryDataset
    from dicp_ray.runtime import provenance

    dataset = HistoryDataset.open(dataset_dir, verify=False)  # shards are hashed only before training
    _check_dataset(config, dataset)
    train_ids, test_ids, heldout_ids = split_task_ids(config, split_seed, dataset)
    _check_windows(config, dataset, train_ids)
    ds_id, crash = dataset_id(dataset), os.environ.get(CRASH_ENV_VAR)
    return {"config": config, "output_dir": str(output_dir), "split_seed": split_seed, "dataset_id": ds_id,
            "dataset_dir": dataset_dir if "://" in dataset_dir else str(Path(dataset_dir).resolve()),
            "train_task_ids": train_ids, "test_task_ids": test_ids, "heldout_task_ids": heldout_ids,
            "run_identity": run_identity(config.to_dict(), split_seed, ds_id), "provenance": provenance(),
            "crash_at_step": int(crash) if crash else None}


def _is_finished_model(path: Path, identity: dict, num_steps: int) -> bool:
    try:
        _, payload = load_checkpoint(str(path))
    except (ValueError, FileNotFoundError) as err:
        logger.warning("ignoring %s: %s", path, err)
        return False
    return payload.get("run_identity") == identity and payload.get("step") == num_steps


def _latest_checkpoint(run_dir: Path, identity: dict, num_steps: int) -> Path | None:
    """The newest checkpoint directory of an earlier run in `run_dir`; refused if it cannot be continued."""
    metas = sorted(run_dir.glob("checkpoint_*/meta.json"))  # names hold zero-padded steps
    if not metas:
        return None
    meta = json.loads(metas[-1].read_text())
    if meta["run_identity"] != identity:
        raise ConfigError(f"{run_dir} holds a training run of a different config, split seed or dataset "
                          f"({metas[-1]}); use a new --output directory or delete that one")
    if meta["step"] > num_steps:
        raise ConfigError(f"train.num_steps = {num_steps} but {run_dir} already holds a run at step "
                          f"{meta['step']}: raise train.num_steps or use a new --output directory")
    return metas[-1].parent


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def train_model(config: ExperimentConfig, dataset_dir: str, output_dir: str, split_seed: int) -> str:
    """Train, resume or reuse the model of one split seed; returns the path of ``<output_dir>/model.pt``."""
    output_dir, train = Path(output_dir).resolve(), config.train
    final = output_dir / "model.pt"
    loop_config = _loop_config(config, str(dataset_dir), output_dir, split_seed)
    identity = loop_config["run_identity"]
    if final.exists() and _is_finished_model(final, identity, train.num_steps):
        logger.info("train: %s already holds this config's model, skipping", final)
        return str(final)
    if train.use_gpu and not (config.resources.address or os.environ.get("RAY_ADDRESS")) \
            and not torch.cuda.is_available():
        raise ConfigError("train.use_gpu = true but torch sees no CUDA device here: --set "
                          "train.use_gpu=false, or run on a GPU machine or cluster (--address)")
    storage, name = output_dir / "ray_train", run_name(output_dir)
    latest = _latest_checkpoint(storage / name, identity, train.num_steps)
    if latest is not None and _is_finished_model(latest / "model.pt", identity, train.num_steps):
        logger.info("train: the run in %s is finished, copying its model", latest.parent)
    else:
        latest = _fit(config, loop_config, storage, name)
    _copy_atomic(latest / "model.pt", final)
    logger.info("train: wrote %s", final)
    return str(final)


def train_in_process(config: ExperimentConfig, dataset_dir: str, output_dir: str, split_seed: int,
                     device: str = "cuda") -> str:
    """The optimisation of a 1-worker `train_model` run in this process, without Ray (no DDP, no FailureConfig).

    For machines that have PyTorch but not Ray (such as a lent bare GPU box): the same dataset checks, the
    same seeds as Ray Train's rank 0 of one worker, the same `train_step`, TensorBoard tags and
    self-describing ``<output_dir>/model.pt`` (evaluation cannot tell the two apart except by `provenance`).
    Not resumable: a crash means a re-run from step 0.
    """
    from torch.utils.tensorboard import SummaryWriter

    from dicp_ray.data import HistoryDataset

    output_dir, train = Path(output_dir).resolve(), config.train
    loop_config = _loop_config(config, str(dataset_dir), output_dir, split_seed)
    final = output_dir / "model.pt"
    if final.exists() and _is_finished_model(final, loop_config["run_identity"], train.num_steps):
        logger.info("train: %s already holds this config's model, skipping", final)
        return str(final)
    used = sorted(loop_config["train_task_ids"] + loop_config["heldout_task_ids"])
    HistoryDataset.open(loop_config["dataset_dir"], task_ids=used, verify=True)  # sha256 vs the manifest
    dataset = HistoryDataset.open(loop_config["dataset_dir"], task_ids=loop_config["train_task_ids"],
                                  verify=False)
    spec = model_spec_from_config(config, dataset)
    torch.manual_seed(train.seed)
    model = build_model(spec).to(device)
    optimizer, scheduler = build_optimizer(model, train)
    sampler = make_window_sampler(config, dataset, seed=[train.seed, 0])
    torch.manual_seed(train.seed * 1000)
    heldout = _heldout_batches(loop_config, spec, train.batch_size, torch.device(device))
    shutil.rmtree(output_dir / "tb", ignore_errors=True)  # not resumable: a re-run replaces the curves
    writer = SummaryWriter(str(output_dir / "tb"))
    means, clock = _MetricMeans(), time.perf_counter()
    start, last = clock, 0
    for step in range(train.num_steps):
        batch, targets = windows_to_batch(sampler.sample(train.batch_size), spec.layout, spec.world_model, device)
        means.add(train_step(model, optimizer, scheduler, batch, targets, train))
        done = step + 1
        if heldout and (done % train.checkpoint_every_steps == 0 or done == train.num_steps):
            scores = evaluate_batches(model, heldout, train.world_model_weight)  # where Ray Train reports
            for key, value in scores.items():
                writer.add_scalar(f"heldout/{key}", value, done)
        if done % train.log_every_steps == 0 or done == train.num_steps:
            now = time.perf_counter()
            rate = train.batch_size * (done - last) / max(now - clock, 1e-9)
            metrics = {f"train/{k}": v for k, v in means.read(1).items()}
            metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/samples_per_s": rate,
                            "train/tokens_per_s": rate * (spec.context_len + int(spec.world_model))})
            for key, value in metrics.items():
                writer.add_scalar(key, value, done)
            logger.info("step %d/%d loss %.4f acc_action %.3f | %.0f windows/s | ETA %s", done, train.num_steps,
                        metrics["train/loss"], metrics.get("train/acc_action", float("nan")), rate,
                        _format_eta((now - start) / done * (train.num_steps - done)))
            clock, last = now, done
    writer.close()
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(Path(tmp), model.cpu(), optimizer, scheduler, train.num_steps, [_rng_state(sampler)],
                          [], {**loop_config, "provenance": {**loop_config["provenance"],
                                                             "trainer": f"train_in_process on {device}"}})
        _copy_atomic(Path(tmp) / "model.pt", output_dir / "model.pt")
    return str(output_dir / "model.pt")


def _fit(config: ExperimentConfig, loop_config: dict, storage: Path, name: str) -> Path:
    """Verify the shards it reads, run (or resume) the Ray Train run; returns its final checkpoint dir."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from dicp_ray.data import HistoryDataset
    from dicp_ray.runtime import init_ray

    train = config.train
    used = sorted(loop_config["train_task_ids"] + loop_config["heldout_task_ids"])
    HistoryDataset.open(loop_config["dataset_dir"], task_ids=used, verify=True)  # sha256 vs the manifest
    init_ray(config.resources)
    if train.use_gpu and ray.cluster_resources().get("GPU", 0) < train.num_workers:
        logger.warning("train.use_gpu: the cluster has %s GPUs for %d workers now; waiting for the "
                       "autoscaler", ray.cluster_resources().get("GPU", 0), train.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                               resources_per_worker={"CPU": train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       failure_config=ray.train.FailureConfig(max_failures=3)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training in {storage / name} finished without a checkpoint")
    return Path(result.checkpoint.path)
