"""One optimiser step of one model: the AdamW + cosine optimiser, the step, and held-out losses.

``ModelGroup`` (``train.model_group``) builds each member's optimiser here; benchmarks and the training sweep call
``train_step`` directly.
"""
from __future__ import annotations

import math

import torch

from dicp_ray.config.schema import TrainConfig

TRAIN_TAGS = ("loss", "loss_action", "loss_reward", "loss_next_obs",
              "acc_action", "acc_reward", "acc_next_obs")


def build_optimizer(model: torch.nn.Module, train: TrainConfig):
    """AdamW + cosine decay from train.lr to 0 over train.num_steps, no warm-up (closed form: resumable).

    The fused AdamW kernel (one pass over every tensor, CPU and CUDA) where the parameters' device has one:
    the same update rule as the per-tensor loop, fewer kernel launches on a GPU."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=(train.beta1, train.beta2),
                                  weight_decay=train.weight_decay, fused=fused or None)
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
