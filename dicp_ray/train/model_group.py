"""Train M same-shape models in one step: stacked weights, one forward/backward, per-model everything else.

Why: the paper's grid-world model (~65K parameters) leaves a GPU almost idle, and a results table is many such
models (split seeds x variants). `ModelGroup` trains a group in lock-step so one kernel per layer serves all M.

How
    `stack_models(models)` deep-copies the first model and swaps every parameter-holding leaf module
    (Linear, RMSNorm, LayerNorm, Embedding) for a stacked twin whose parameters carry a leading model axis
    (M, ...). The batches of the M models are concatenated along the batch axis (model-major rows), and each
    stacked leaf views its input as (M, rows / M, ...) and applies model m's weights to block m (batched
    matmuls). Everything between the leaves (attention, RoPE, one-hot, dropout) is row-wise, so the
    unchanged model code runs as is (`model.forward`), and each model's loss is computed on its own rows.
    The gradient of the summed losses w.r.t. model m's slice is exactly model m's own gradient; clipping
    uses each model's own norm; AdamW is elementwise, so one optimizer over the stacked tensors is M
    independent AdamWs.

What holds
    With dropout 0 a model trained in a group equals the same model trained alone up to float rounding
    (tests/unit/test_model_group.py: a group of 3 vs alone). With dropout the masks of model m come from the
    group's one RNG stream, so they differ from the masks it would draw alone: same distribution, other draws.
    State dicts and optimizer state of a member have exactly a lone model's keys and shapes (`member_*`),
    so checkpoints of grouped and lone runs are interchangeable.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- stacked leaves
class _Stacked(nn.Module):
    """Base of the stacked leaves: ``active`` (a slice of models, set by `ModelGroup` for a partial pass)."""

    active: slice | None = None

    def _p(self, param: torch.Tensor | None) -> torch.Tensor | None:
        return param if param is None or self.active is None else param[self.active]


def _rows(x: torch.Tensor, m: int) -> torch.Tensor:
    if x.shape[0] % m:
        raise ValueError(f"a stacked group of {m} models got {x.shape[0]} rows: concatenate one equal-size batch "
                         "per model along the batch axis")
    return x.reshape(m, -1, *x.shape[1:])


class StackedLinear(_Stacked):
    """M Linear layers: weight (M, out, in), bias (M, out); rows of block m use model m's weights."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.in_features, self.out_features = layers[0].in_features, layers[0].out_features
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = None if layers[0].bias is None else nn.Parameter(torch.stack([l.bias.detach() for l in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._p(self.weight), self._p(self.bias)
        m = weight.shape[0]
        x3 = _rows(x, m).reshape(m, -1, self.in_features)                       # (M, rows * ..., in)
        w = weight.transpose(1, 2)                                               # (M, in, out)
        y = torch.bmm(x3, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), x3, w)
        return y.reshape(*x.shape[:-1], self.out_features)


class StackedRMSNorm(_Stacked):
    """M RMSNorms over the last axis: weight (M, E)."""

    def __init__(self, layers: list[nn.RMSNorm]):
        super().__init__()
        self.normalized_shape, self.eps = layers[0].normalized_shape, layers[0].eps
        if len(self.normalized_shape) != 1 or layers[0].weight is None:
            raise ValueError("only RMSNorm over the last axis with a weight can be stacked")
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._p(self.weight)
        m = weight.shape[0]
        y = F.rms_norm(_rows(x, m).reshape(m, -1, x.shape[-1]), self.normalized_shape, None, self.eps)
        return (y * weight.unsqueeze(1)).reshape(x.shape)


class StackedLayerNorm(_Stacked):
    """M LayerNorms over the last axis: weight, bias (M, E)."""

    def __init__(self, layers: list[nn.LayerNorm]):
        super().__init__()
        self.normalized_shape, self.eps = layers[0].normalized_shape, layers[0].eps
        if len(self.normalized_shape) != 1 or layers[0].weight is None or layers[0].bias is None:
            raise ValueError("only LayerNorm over the last axis with weight and bias can be stacked")
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._p(self.weight), self._p(self.bias)
        m = weight.shape[0]
        y = F.layer_norm(_rows(x, m).reshape(m, -1, x.shape[-1]), self.normalized_shape, None, None, self.eps)
        return torch.addcmul(bias.unsqueeze(1), y, weight.unsqueeze(1)).reshape(x.shape)


class StackedEmbedding(_Stacked):
    """M embedding tables (M, N, E): index i of a row of block m reads row m * N + i of the flat table."""

    def __init__(self, layers: list[nn.Embedding]):
        super().__init__()
        first = layers[0]
        if first.padding_idx is not None or first.max_norm is not None or first.sparse:
            raise ValueError("only plain nn.Embedding (no padding_idx, max_norm or sparse) can be stacked")
        self.num_embeddings, self.embedding_dim = first.num_embeddings, first.embedding_dim
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        weight = self._p(self.weight)
        m = weight.shape[0]
        offset = torch.arange(m, device=index.device).view(m, *[1] * index.dim()) * self.num_embeddings
        flat = (_rows(index, m) + offset).reshape(index.shape)
        return F.embedding(flat, weight.reshape(-1, self.embedding_dim))


_STACKED = {nn.Linear: StackedLinear, nn.RMSNorm: StackedRMSNorm, nn.LayerNorm: StackedLayerNorm,
            nn.Embedding: StackedEmbedding}


def stack_models(models: list[nn.Module]) -> nn.Module:
    """One module computing all `models` (same class and shapes) on a model-major concatenated batch."""
    template = copy.deepcopy(models[0])
    names = [n for n, _ in models[0].named_parameters()]
    for other in models[1:]:
        if [(n, p.shape) for n, p in other.named_parameters()] != [(n, p.shape) for n, p in
                                                                    models[0].named_parameters()]:
            raise ValueError("models of a group must have the same parameter names and shapes")
    if any(True for _ in template.buffers()):
        raise ValueError("models with buffers cannot be stacked (none of dicp_ray's models has one)")
    members = [dict(m.named_modules()) for m in models]
    for name, module in list(template.named_modules()):
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        kind = _STACKED.get(type(module))
        if kind is None:
            raise ValueError(f"cannot stack {name or 'the model'} ({type(module).__name__}): it holds parameters "
                             f"directly; stackable leaves are {', '.join(t.__name__ for t in _STACKED)}")
        parent, _, attr = name.rpartition(".")
        setattr(template.get_submodule(parent) if parent else template, attr, kind([mm[name] for mm in members]))
    if [n for n, _ in template.named_parameters()] != names:
        raise AssertionError("stacking changed the parameter order")
    return template


# ----------------------------------------------------------------------------- members' state
def member_state_dict(stacked: nn.Module, m: int) -> dict[str, torch.Tensor]:
    """Model m's weights with a lone model's keys and shapes (cloned: saving a view would save all M)."""
    return {k: v[m].detach().clone() for k, v in stacked.state_dict().items()}


def stack_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def member_optimizer_state(state: dict, m: int) -> dict:
    """Model m's part of a stacked optimizer's state_dict: the same layout as a lone model's optimizer."""
    per_param = {i: {k: (v[m].clone() if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()}
                 for i, s in state["state"].items()}
    return {"state": per_param, "param_groups": copy.deepcopy(state["param_groups"])}


def stack_optimizer_states(states: list[dict]) -> dict:
    """Inverse of `member_optimizer_state` (scalars such as Adam's step are the group's: taken from model 0)."""
    stacked = {i: {k: (torch.stack([s["state"][i][k] for s in states]) if torch.is_tensor(v) and v.dim() > 0
                       else v) for k, v in st.items()} for i, st in states[0]["state"].items()}
    return {"state": stacked, "param_groups": copy.deepcopy(states[0]["param_groups"])}


def clip_grad_norms_(params: list[nn.Parameter], max_norm: float, num_models: int) -> torch.Tensor:
    """Per-model `clip_grad_norm_` on stacked parameters (leading axis = model); returns the (M,) norms.

    Like torch's: each model's total norm over all its gradients, coefficient max_norm / (norm + 1e-6)
    capped at 1, applied on the device without a host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(num_models, -1), dim=1) for g in grads])
    norms = torch.linalg.vector_norm(per_tensor, dim=0)                        # (M,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [coef.view(-1, *[1] * (g.dim() - 1)) for g in grads])
    return norms


def concat_batches(pairs: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """[(batch, targets)] of M models -> one model-major (batch, targets) pair."""
    if len(pairs) == 1:
        return pairs[0]
    return tuple({k: torch.cat([p[i][k] for p in pairs]) for k in pairs[0][i]} for i in (0, 1))


def split_rows(tensors: dict[str, torch.Tensor], num_models: int) -> list[dict[str, torch.Tensor]]:
    """Inverse of `concat_batches` for one dict (predictions or targets)."""
    chunks = {k: v.chunk(num_models) for k, v in tensors.items()}
    return [{k: c[m] for k, c in chunks.items()} for m in range(num_models)]


# ----------------------------------------------------------------------------- the training group
class ModelGroup:
    """M models of one `ModelSpec` trained in lock-step: one optimizer step for all of them per `step`.

    M = 1 trains the model itself (no stacking: a lone run's numerics). Gradients are averaged over the
    data-parallel ranks with one all-reduce per step when ``world_size`` > 1 (what DDP does for a lone
    model). No host sync per step: losses stay on the device until the caller reads them.
    """

    def __init__(self, models: list[nn.Module], train, device: torch.device, world_size: int = 1,
                 compile: bool = False, models_per_pass: int | None = None):
        from dicp_ray.train.step import build_optimizer

        self.size, self.spec, self.train, self.device = len(models), models[0].spec, train, torch.device(device)
        self.world_size = world_size
        # Forward/backward passes over at most this many models (gradients accumulate, one optimizer step):
        # bounds activation memory (~0.5 GB per paper model at batch 512) without changing the maths.
        self.models_per_pass = min(models_per_pass or self.size, self.size)
        self.module = (models[0] if self.size == 1 else stack_models(models)).to(self.device)
        self.params = list(self.module.parameters())
        self.optimizer, self.scheduler = build_optimizer(self.module, train)
        self.bf16 = self.device.type == "cuda" and train.mixed_precision
        self._forward = self.module
        if compile:  # static shapes (fixed batch); on CUDA "reduce-overhead" replays the step as CUDA graphs
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._forward = torch.compile(self.module, mode=mode, dynamic=False)

    def step(self, pairs: list[tuple[dict, dict]]) -> list[dict[str, torch.Tensor]]:
        """One AdamW step of every model on its own (batch, targets) -> each model's detached losses."""
        if len(pairs) != self.size:
            raise ValueError(f"a group of {self.size} models got {len(pairs)} batches")
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for lo in range(0, self.size, self.models_per_pass):
            hi = min(lo + self.models_per_pass, self.size)
            if hi - lo < self.size:
                self._activate(slice(lo, hi))
            losses += self._forward_backward(pairs[lo:hi])
        self._activate(None)
        if self.world_size > 1:
            self._all_reduce_grads()
        if self.size == 1:
            torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip, foreach=True)
        else:
            clip_grad_norms_(self.params, self.train.grad_clip, self.size)
        self.optimizer.step()
        self.scheduler.step()
        return [{k: v.detach().float() for k, v in l.items()} for l in losses]

    def _forward_backward(self, pairs: list[tuple[dict, dict]]) -> list[dict[str, torch.Tensor]]:
        """Losses of these models (the active ones) on their batches, and their gradients accumulated."""
        batch, targets = concat_batches(pairs)
        weight, n = self.train.world_model_weight, len(pairs)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            preds, _ = self._forward(batch)
            if hasattr(self.module, "supervised"):  # DICPTransformer: DPT drops its unsupervised position
                preds = self.module.supervised(preds)
            if n == 1:
                losses = [self.module.compute_losses(preds, targets, weight)]
            else:
                losses = [self.module.compute_losses(p, t, weight)
                          for p, t in zip(split_rows(preds, n), split_rows(targets, n))]
        (losses[0]["loss"] if n == 1 else torch.stack([l["loss"] for l in losses]).sum()).backward()
        return [{k: v.detach() for k, v in l.items()} for l in losses]  # drop the graph before the next pass

    def _activate(self, models: slice | None) -> None:
        for module in self.module.modules():
            if isinstance(module, _Stacked):
                module.active = models

    def _all_reduce_grads(self) -> None:
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    # -- members -----------------------------------------------------------------
    def member_model(self, m: int) -> nn.Module:
        """Model m as a lone module (a copy when stacked) on the group's device, for evaluation and saving."""
        if self.size == 1:
            return self.module
        from dicp_ray.models.checkpoints import build_model

        model = build_model(self.spec).to(self.device)
        model.load_state_dict(member_state_dict(self.module, m))
        return model

    def member_state(self, m: int) -> dict:
        """Model m's weights, optimizer and scheduler state in a lone run's format."""
        if self.size == 1:
            return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}
        return {"model": member_state_dict(self.module, m),
                "optimizer": member_optimizer_state(self.optimizer.state_dict(), m),
                "scheduler": self.scheduler.state_dict()}

    def load_member_states(self, states: list[dict]) -> None:
        """Restore every member from `member_state`-format dicts (e.g. lone or grouped checkpoints)."""
        if len(states) != self.size:
            raise ValueError(f"{len(states)} states for a group of {self.size}")
        if self.size == 1:
            self.module.load_state_dict(states[0]["model"])
            self.optimizer.load_state_dict(states[0]["optimizer"])
        else:
            self.module.load_state_dict(stack_state_dicts([s["model"] for s in states]))
            self.optimizer.load_state_dict(stack_optimizer_states([s["optimizer"] for s in states]))
        self.scheduler.load_state_dict(states[0]["scheduler"])
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):  # CURRENT num_steps
            group["lr"] = base_lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
