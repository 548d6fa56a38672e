"""Model inputs of the distillation: the ModelSpec of a config, its training windows and their batches per layout.

    dicp-ray train --config tune_configs/smoke.yaml --output runs/smoke            # Ray Train (DDP ranks)
    dicp-ray train --config ... --set train.backend=local train.models_per_process=5  # one process, 5 seeds at once
    train_model(config, "runs/smoke/dataset", "runs/smoke/train/split_0", split_seed=0)  # -> .../model.pt

Each run samples windows of k = context_episodes * horizon transitions from the TRAIN tasks of the split
(never a test task: asserted on the first batch; IDT: return-sorted histories, `make_window_sampler`) and turns
them into the AD, DPT or IDT layout (`windows_to_batch`); `train.step` takes the AdamW steps (cosine decay to 0,
no warm-up, grad clipping; bf16 autocast on CUDA when train.mixed_precision).

Where the rest lives: the one training loop (Ray Train worker or this process, one or many models per
process) is dicp_ray/train/loop.py, its checkpoints and backends dicp_ray/train/backends.py, stacked training
of several models dicp_ray/train/model_group.py, and the launcher (`train_model`, `train_models`, resume, reuse of
finished runs) dicp_ray/train/launch.py, run identities and checkpoints on disk dicp_ray/train/runs.py.

The paper's AD model (4 layers, 32 wide, k = 80, batch 512) trains at ~510-530 windows/s per CPU-second on
this project's shared 2-core machine, ~2.0x the step before issue 17 (265; benchmarks/bench_train.py, CPU-time
rates); stacking M models in one process keeps that per-core rate on a CPU (the step is compute-bound) and is
the GPU's win. Ray start-up adds ~15-20 s per run.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from dicp_ray.config.schema import ConfigError, ExperimentConfig
from dicp_ray.data.idt_windows import HistoryWindowSampler
from dicp_ray.envs import GRID_SIZE, GRID_SPECS, cell_index
from dicp_ray.models.spec import ModelSpec

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- model inputs
def token_choices(config: ExperimentConfig) -> dict[str, str]:
    """model.obs_embedding / model.action_embedding / model.backbone resolved ("auto" = the release's choice for the
    env and layout: its TinyLlama backbone for AD and DPT everywhere and for IDT on Meta-World, whose release uses
    the same blocks; the grid IDT keeps gpt2). IDT embeds observations and actions itself (no embedding choice)."""
    m = config.model
    mw = config.env.is_meta_world
    if m.variant == "idt":
        auto = "release" if mw else "gpt2"
        return {"backbone": auto if m.backbone == "auto" else m.backbone}
    auto_obs = "linear" if mw else ("cell" if m.variant == "ad" else "transition")
    auto_action = "linear" if mw else "table"
    return {"obs_embedding": auto_obs if m.obs_embedding == "auto" else m.obs_embedding,
            "action_embedding": auto_action if m.action_embedding == "auto" else m.action_embedding,
            "backbone": "release" if m.backbone == "auto" else m.backbone}


def model_spec_from_config(config: ExperimentConfig, dataset: Any) -> ModelSpec:
    """The model for `config` on `dataset`: obs size and action count from the data, classes from the env."""
    m = config.model
    if getattr(dataset, "is_continuous", False):  # Meta-World: Gaussian actions, reward/next-obs regression
        if m.variant not in ("ad", "idt"):
            raise ConfigError(f"model.variant = {m.variant!r}: continuous-action (Meta-World) training is "
                              "implemented for AD and IDT only (--set model.variant=ad)")
        reward_max = 10.0  # Meta-World's v2 reward functions pay at most 10 per step
        # IDT as the release (release:metaworld/model/idt.py:90): raw returns-to-go are embedded, and every test
        # episode starts at return-to-go 10 x horizon (= max reward per step x horizon = 1000).
        idt = ({"return_scale": 1.0, "return_target": reward_max * config.env.horizon}
               if m.variant == "idt" else {})
        return ModelSpec(layout=m.variant, world_model=m.world_model, obs_dim=int(dataset.obs_dim),
                         discrete_actions=False, num_actions=int(dataset.action_dim), num_obs_classes=None,
                         reward_classes=None, reward_max=reward_max, context_len=config.context_len,
                         num_layers=m.num_layers, num_heads=m.num_heads, embed_dim=m.embed_dim, mlp_dim=m.mlp_dim,
                         dropout=m.dropout, attn_dropout=m.attn_dropout, obs_scale=1.0,
                         reward_loss_weight=m.reward_loss_weight, next_obs_loss=config.next_obs_loss,
                         action_nll="mean", **idt, **token_choices(config))
    grid = GRID_SPECS[config.env.name]
    idt = {"return_scale": 1.0} if m.variant == "idt" else {}  # returns-to-go embedded unscaled (idt_grid.py)
    tokens = token_choices(config)
    # The release feeds raw cells 0..8 to its transition embedding; "gpt2" scales them to [0, 1].
    obs_scale = 1.0 if tokens.get("backbone") == "release" else 1.0 / (GRID_SIZE - 1)
    return ModelSpec(layout=m.variant, world_model=m.world_model, obs_dim=int(dataset.obs_dim),
                     discrete_actions=True, num_actions=int(dataset.num_actions),
                     num_obs_classes=grid.num_cells, reward_classes=2, reward_max=1.0,
                     context_len=config.context_len, num_layers=m.num_layers, num_heads=m.num_heads,
                     embed_dim=m.embed_dim, mlp_dim=m.mlp_dim, dropout=m.dropout, attn_dropout=m.attn_dropout,
                     obs_scale=obs_scale, **idt, **tokens)


def make_window_sampler(config: ExperimentConfig, dataset: Any, seed, device=None):
    """Training windows for config.model.variant: k consecutive transitions starting anywhere (AD, DPT; IDT in
    its history sorted by episode return, with relabelled return-to-go: `idt_windows.HistoryWindowSampler`).
    With `device` (the training loop's) and train.sample_on_device resolved true there, AD / DPT windows are
    gathered on that device (`data.device_windows.DeviceWindowSampler`: the same windows, torch tensors)."""
    from dicp_ray.data.history import WindowSampler

    if config.model.variant == "idt":
        return HistoryWindowSampler(dataset, config.context_len, config.env.horizon, seed=seed)
    if device is not None and samples_on_device(config, device):
        from dicp_ray.data.device_windows import DeviceWindowSampler

        return DeviceWindowSampler(dataset, config.context_len, seed=seed, device=device)
    return WindowSampler(dataset, config.context_len, seed=seed)


def samples_on_device(config: ExperimentConfig, device) -> bool:
    """train.sample_on_device resolved for `device`: None = on CUDA. IDT windows are always sampled on the host."""
    setting = config.train.sample_on_device
    on_device = torch.device(device).type == "cuda" if setting is None else setting
    return on_device and config.model.variant != "idt"


def windows_to_batch(windows: dict[str, np.ndarray], layout: str, world_model: bool,
                     device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """Training windows of k transitions (``WindowSampler.sample``) -> (batch, targets) tensors.

    The first k-1 transitions are the context, the last one the query: its observation is the query
    observation and (world model) its action the query action, whose reward class and next cell are the
    world-model targets. AD's target is the action the source took there. DPT conditions on a query state
    as well; we use the window's last observation (so AD and DPT see the same tokens and the query state is
    one the source visited in this task) and its target is the oracle action a* of that state after each of
    the T context transitions (positions 1..T; the query alone, position 0, is not supervised, as in the
    release). IDT windows (`idt_windows.HistoryWindowSampler`: already sorted, with a ``return_to_go``
    column) become cells, actions, reward classes and returns-to-go (grid worlds) or the float columns
    (Meta-World), every step a target.
    """
    def tensor(x, dtype):
        if isinstance(x, torch.Tensor):  # windows of data.device_windows.DeviceWindowSampler: already on the device
            return x.to(device=device, dtype=dtype)
        return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device)

    if layout == "idt":
        if "return_to_go" not in windows:
            raise ValueError("IDT windows need a return_to_go column: sample them with "
                             "dicp_ray.data.idt_windows.HistoryWindowSampler (train.make_window_sampler)")
        if windows["action"].ndim == 3:  # continuous actions (B, k, A): Meta-World, regression targets
            return _continuous_idt_batch(windows, world_model, tensor)
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
    elif layout == "dpt":  # the release supervises a* after each of the T context transitions (dpt.py:63)
        a_star = tensor(windows["optimal_action"][:, -1:], torch.long)                       # (B, 1)
        targets = {"target_action": a_star.expand(-1, obs.shape[1] - 1).contiguous()}        # (B, T)
    else:
        raise ValueError(f"layout must be 'ad', 'dpt' or 'idt', got {layout!r}")
    if world_model:
        batch["query_action"] = tensor(action[:, -1], torch.long)
        targets["target_reward"] = tensor(_rint(reward[:, -1]), torch.long)                  # (B,) 0 / 1
        targets["target_next_obs"] = tensor(_cell_index(windows["next_obs"][:, -1]), torch.long)  # (B,) cell
    return batch, targets


def _rint(x):
    """Round half to even, numpy or torch (the device sampler's windows)."""
    return torch.round(x) if isinstance(x, torch.Tensor) else np.rint(x)


def _cell_index(obs):
    """`envs.cell_index` of grid observations (..., 2), numpy or torch."""
    if isinstance(obs, torch.Tensor):
        cells = torch.round(obs).long()
        return cells[..., 0] * GRID_SIZE + cells[..., 1]
    return cell_index(obs)


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
    """Sorted, relabelled IDT windows with float actions: every step's action, reward (clipped to [0, 10] by the loss) and
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


# ------------------------------------------------------------------------------------------- run identity


# ------------------------------------------------------------------------------------------- launcher


