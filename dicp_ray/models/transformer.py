"""The DICP Transformer: one causal model that is both a policy and a world model.

What it is
    A small pre-norm causal Transformer (RMSNorm, rotary position embedding, SwiGLU MLP,
    ``F.scaled_dot_product_attention``) that reads one token per whole transition (o, a, r, o')
    of a learning history and predicts
      * the next action (Algorithm Distillation "ad" layout, or Decision-Pretrained Transformer "dpt"), and
      * with ``world_model=True``: the reward and next observation of a query (o, a) pair.
    Pure PyTorch + stdlib, so it runs on a bare CPU or GPU box with no Ray or gymnasium.

How it is used
    Training calls ``model(batch, targets)`` and gets ``(preds, losses)``; ``losses["loss"]`` is
    ``loss_action + world_model_weight * (loss_reward + loss_next_obs)`` (no ``loss_next_obs`` and no
    next-observation head with ``spec.next_obs_loss=False``, the release's Meta-World models). A Gaussian
    action loss is averaged over the action dimensions (``spec.action_nll="mean"``) as the release's
    ``GaussianNLLLoss(full=True, reduction="mean")``.
    The planner uses the lower-level pieces that ``forward`` itself is built from::

        ctx = model.embed_transitions(obs, act, rew, next_obs)   # (B, T, E)
        _, cache = model.encode(ctx)                              # context encoded once
        cache = cache.expand(n)                                   # row b*n+j is a copy of row b
        h, cache2 = model.encode(new_tokens, cache)               # (B*n, L, E), RoPE continues at T
        out = model.predict(h[:, -1])                             # dict of head outputs
        # or pack n branches into one row each (no cache copies) with explicit positions and mask:
        h, _ = model.encode(packed, ctx_cache, positions=pos, attn_mask=tree_mask)

What to expect
    ``encode(a)`` followed by ``encode(b, cache)`` equals ``encode(cat(a, b))`` up to float rounding
    (tested at 1e-10 in float64). Checkpoints hold only tensors and plain Python types, so they load
    with ``torch.load(weights_only=True)``. The hierarchical "idt" layout is a different module
    (``dicp_ray.models.idt_continuous.IDTTransformer``) built from the same blocks; ``dicp_ray.models.checkpoints.build_model(spec)``
    and ``load_checkpoint`` pick the class from ``spec.layout`` (this module knows no other model class).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dicp_ray.models import attention
from dicp_ray.models.blocks import Block, KVCache, init_gpt2_, rope_cos_sin
from dicp_ray.models.spec import LOG_STD_MAX, LOG_STD_MIN, ModelSpec

# ----------------------------------------------------------------------------- spec


# ----------------------------------------------------------------------------- model
class DICPTransformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.layout == "idt":
            raise ValueError("layout 'idt' is dicp_ray.models.idt_continuous.IDTTransformer: build it with build_model(spec)")
        self.spec = spec
        D, A, E = spec.obs_dim, spec.action_in_dim, spec.embed_dim
        self.embed_transition = nn.Linear(2 * D + A + 1, E)   # (o, a, r, o') -> one token
        if spec.obs_embedding == "linear":
            self.embed_query_obs_proj = nn.Linear(D, E)
        elif spec.obs_embedding == "cell":
            self.embed_query_cell = nn.Embedding(spec.num_obs_classes, E)  # cell x * side + y -> token
        self.embed_query_action_proj = self.embed_query_action_table = None
        if spec.world_model and spec.action_embedding == "table":
            self.embed_query_action_table = nn.Embedding(spec.num_actions, E)  # release: nn.Embedding(5, E)
        elif spec.world_model:
            self.embed_query_action_proj = nn.Linear(A, E)
        gpt2 = spec.backbone == "gpt2"
        self.drop = attention.Dropout(spec.dropout) if gpt2 else nn.Identity()
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.norm = nn.RMSNorm(E) if gpt2 else nn.Identity()  # the release feeds the heads unnormalised
        self.head_action = nn.Linear(E, A if spec.discrete_actions else 2 * A)  # logits | (mean, log_std)
        if spec.world_model:
            self.head_reward = nn.Linear(E, spec.reward_classes or 1)
        if spec.has_next_obs_head:
            self.head_next_obs = nn.Linear(E, spec.num_obs_classes or D)
        if gpt2:  # "release" keeps PyTorch's default init, as the release does
            init_gpt2_(self, spec.num_layers)

    # -- token embeddings ----------------------------------------------------
    def _param_dtype(self):
        return self.embed_transition.weight.dtype

    def _action_features(self, action: torch.Tensor) -> torch.Tensor:
        """(...,) long -> one-hot (..., A); continuous (..., A) passes through."""
        if self.spec.discrete_actions:
            if action.dtype.is_floating_point:
                raise TypeError("discrete actions must be an integer tensor of action indices")
            return F.one_hot(action.long(), self.spec.num_actions).to(self._param_dtype())
        return action.to(self._param_dtype())

    def _obs_features(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.to(self._param_dtype()) * self.spec.obs_scale

    def embed_transitions(self, obs, action, reward, next_obs) -> torch.Tensor:
        """(B,T,D), (B,T)|(B,T,A), (B,T), (B,T,D) -> (B, T, E); T may be 0."""
        reward = reward.to(self._param_dtype()).unsqueeze(-1)                  # (B, T, 1)
        feats = torch.cat([self._obs_features(obs), self._action_features(action), reward,
                           self._obs_features(next_obs)], dim=-1)            # (B, T, 2D + A + 1)
        return self.embed_transition(feats)

    def embed_query_obs(self, obs) -> torch.Tensor:
        """(B, D) -> (B, 1, E), as ``spec.obs_embedding`` says (cells (x, y) are float copies of integers)."""
        kind = self.spec.obs_embedding
        if kind == "linear":
            return self.embed_query_obs_proj(self._obs_features(obs)).unsqueeze(1)
        if kind == "cell":
            xy = obs.round().long()
            return self.embed_query_cell(xy[..., 0] * math.isqrt(self.spec.num_obs_classes) + xy[..., 1]).unsqueeze(1)
        zeros = obs.new_zeros(*obs.shape[:-1], self.spec.action_in_dim + 1 + self.spec.obs_dim)
        feats = torch.cat([self._obs_features(obs), zeros.to(self._param_dtype())], dim=-1)  # (o, 0, 0, 0)
        return self.embed_transition(feats).unsqueeze(1)

    def embed_query_action(self, action) -> torch.Tensor:
        """(B,) long | (B, A) float -> (B, 1, E)."""
        if not self.spec.world_model:
            raise RuntimeError("this model has world_model=False, so it has no query-action token")
        if self.embed_query_action_table is not None:
            if action.dtype.is_floating_point:
                raise TypeError("discrete actions must be an integer tensor of action indices")
            return self.embed_query_action_table(action.long()).unsqueeze(1)
        return self.embed_query_action_proj(self._action_features(action)).unsqueeze(1)

    def embed_batch(self, batch: dict) -> torch.Tensor:
        """Whole input sequence for the spec's layout: (B, L, E) with L = T + 1 (+1 with world model)."""
        ctx = self.embed_transitions(batch["ctx_obs"], batch["ctx_action"], batch["ctx_reward"],
                                     batch["ctx_next_obs"])          # (B, T, E)
        q_obs = self.embed_query_obs(batch["query_obs"])              # (B, 1, E)
        parts = [ctx, q_obs] if self.spec.layout == "ad" else [q_obs, ctx]
        if self.spec.world_model:
            if "query_action" not in batch:
                raise KeyError("world_model=True needs batch['query_action']")
            parts.append(self.embed_query_action(batch["query_action"]))
        return torch.cat(parts, dim=1)

    # -- backbone --------------------------------------------------------------
    def encode(self, tokens: torch.Tensor, cache: KVCache | None = None,
               positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Run new tokens (B, L, E) on top of `cache` -> (hidden (B, L, E) after the final norm, if the backbone
        has one, extended cache).

        By default new tokens attend to every cached token and causally to each other, and RoPE
        positions continue at cache.length, so splitting a sequence across calls gives the same result.
        `positions` (L,) | (B, L) long overrides each new token's RoPE position; `attn_mask` (bool,
        broadcastable to (B, 1, L, cache.length + L), True = may attend; columns are cached then new
        tokens) replaces the default mask, e.g. to pack several branches sharing the cache into one
        row. Every query must see at least one key. The returned cache holds all new keys/values, so
        a later default-mask call sees every one of them.
        """
        B, L, _ = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + L, device=tokens.device)
        elif positions.dtype.is_floating_point or positions.shape not in ((L,), (B, L)):
            raise ValueError(f"positions must be integer (L,) or (B, L) = ({B}, {L}), got "
                             f"{positions.dtype} {tuple(positions.shape)}")
        full = (B, 1, L, start + L)
        if attn_mask is not None and (attn_mask.dtype != torch.bool or attn_mask.dim() > 4 or any(
                m not in (1, f) for m, f in zip(attn_mask.shape[::-1], full[::-1]))):
            raise ValueError(f"attn_mask must be bool and broadcastable to {full}, "
                             f"got {attn_mask.dtype} {tuple(attn_mask.shape)}")
        cos, sin = rope_cos_sin(self.spec.head_dim, positions, tokens.dtype)  # (L, hd) | (B, L, hd)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]                            # (B, 1, L, hd)
        x = self.drop(tokens)
        new_layers = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, cache.layers[i] if cache is not None else None, attn_mask)
            new_layers.append(kv)
        return self.norm(x), KVCache(new_layers)

    # -- heads -----------------------------------------------------------------
    def action_head(self, h: torch.Tensor):
        """(..., E) -> logits (..., A) if discrete, else (mean (..., A), log_std (..., A))."""
        out = self.head_action(h)
        if self.spec.discrete_actions:
            return out
        mean, log_std = out.chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def reward_head(self, h: torch.Tensor) -> torch.Tensor:
        """(..., E) -> logits (..., C), or reward (...,) clipped to [0, reward_max] for regression."""
        out = self.head_reward(h)
        if self.spec.reward_classes:
            return out
        raw = out.squeeze(-1)
        # Straight-through clip: the value is in range, but the gradient never dies outside it.
        return raw + (raw.clamp(0.0, self.spec.reward_max) - raw).detach()

    def next_obs_head(self, h: torch.Tensor) -> torch.Tensor:
        """(..., E) -> logits (..., num_obs_classes), or next observation (..., D) for regression."""
        if not self.spec.has_next_obs_head:
            raise RuntimeError("this model has no next-observation head (spec.next_obs_loss=False or no world "
                               "model): it predicts rewards only")
        return self.head_next_obs(h)

    def predict(self, h: torch.Tensor) -> dict:
        """Every head on the same hidden states (..., E), keyed like `forward`'s preds."""
        return {**self._action_preds(h), **self._world_preds(h)}

    def _action_preds(self, h: torch.Tensor) -> dict:
        if self.spec.discrete_actions:
            return {"action_logits": self.action_head(h)}
        mean, log_std = self.action_head(h)
        return {"action_mean": mean, "action_log_std": log_std}

    def _world_preds(self, h: torch.Tensor) -> dict:
        if not self.spec.world_model:
            return {}
        preds = {"reward_logits" if self.spec.reward_classes else "reward": self.reward_head(h)}
        if self.spec.has_next_obs_head:
            preds["next_obs_logits" if self.spec.num_obs_classes else "next_obs"] = self.next_obs_head(h)
        return preds

    # -- training forward ------------------------------------------------------
    def forward(self, batch: dict, targets: dict | None = None, world_model_weight: float = 1.0):
        """Returns (preds, losses or None). See the module docstring and docs/architecture.md for keys."""
        tokens = self.embed_batch(batch)            # (B, L, E)
        hidden, _ = self.encode(tokens)             # (B, L, E)
        T = batch["ctx_obs"].shape[1]
        # AD reads the action at the query-obs token (index T); DPT at the query obs (0) and after
        # every context transition (1..T). The world model reads the query-action token (last).
        h_action = hidden[:, T] if self.spec.layout == "ad" else hidden[:, : T + 1]
        preds = {**self._action_preds(h_action), **self._world_preds(hidden[:, -1])}
        if targets is None:
            return preds, None
        return preds, self.compute_losses(self.supervised(preds), targets, world_model_weight)

    def supervised(self, preds: dict) -> dict:
        """The predictions the losses see: DPT's a* is supervised after 1..T transitions, not at the query
        alone (the release's dpt.py:63), so its position-0 action outputs are dropped; AD's are all used."""
        if self.spec.layout != "dpt":
            return preds
        return {k: v[:, 1:] if k.startswith("action_") else v for k, v in preds.items()}

    def compute_losses(self, preds: dict, targets: dict, world_model_weight: float = 1.0) -> dict:
        spec, losses = self.spec, {}
        if spec.discrete_actions:
            losses["loss_action"], losses["acc_action"] = _ce(preds["action_logits"],
                                                              targets["target_action"])
        else:
            losses["loss_action"] = _gaussian_nll(preds["action_mean"], preds["action_log_std"],
                                                  targets["target_action"], spec.action_nll)
        loss = losses["loss_action"]
        if spec.world_model:
            if spec.reward_classes:
                losses["loss_reward"], losses["acc_reward"] = _ce(preds["reward_logits"],
                                                                  targets["target_reward"])
            else:
                target = targets["target_reward"].to(preds["reward"].dtype).clamp(0.0, spec.reward_max)
                losses["loss_reward"] = F.mse_loss(preds["reward"], target)  # reported in reward units
            reward_weight = 1.0 if spec.reward_classes else spec.reward_loss_weight
            world = reward_weight * losses["loss_reward"]
            if spec.num_obs_classes:
                losses["loss_next_obs"], losses["acc_next_obs"] = _ce(preds["next_obs_logits"],
                                                                      targets["target_next_obs"])
                world = world + losses["loss_next_obs"]
            elif spec.next_obs_loss:
                target = targets["target_next_obs"].to(preds["next_obs"].dtype)
                losses["loss_next_obs"] = F.mse_loss(preds["next_obs"], target)
                world = world + losses["loss_next_obs"]
            loss = loss + world_model_weight * world
        losses["loss"] = loss
        return losses


def _ce(logits: torch.Tensor, target: torch.Tensor):
    """Cross-entropy over any leading shape (mean over all positions) and detached accuracy."""
    if target.dtype.is_floating_point:
        raise TypeError("classification targets must be integer class indices")
    flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long()
    loss = F.cross_entropy(flat_logits, flat_target)
    acc = (flat_logits.argmax(-1) == flat_target).to(logits.dtype).mean().detach()
    return loss, acc


def _gaussian_nll(mean, log_std, target, reduction: str = "mean"):
    """-log N(target | mean, exp(log_std)^2) per action dimension, then "mean": averaged over everything,
    the release's ``GaussianNLLLoss(full=True, reduction="mean")`` (release:metaworld/model/ad.py:34; its
    variance floor 1e-6 never binds here, log_std >= -5 gives var >= 4.5e-5), or "sum": summed over the action
    dims and averaged over the rest (dicp_ray before issue #14: action_dim times the mean, so a quarter of the
    release's reward weight relative to the action loss with 4 action dims)."""
    z = (target.to(mean.dtype) - mean) * torch.exp(-log_std)
    nll = 0.5 * z.pow(2) + log_std + 0.5 * math.log(2 * math.pi)
    return nll.mean() if reduction == "mean" else nll.sum(-1).mean()


# ----------------------------------------------------------------------------- utilities
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: DICPTransformer, num_keys: int | None = None) -> int:
    """Forward FLOPs (2 per multiply-add) for one token attending to `num_keys` tokens.

    Linear layers cost ~1 MAC per weight; attention adds QK^T and AV, 2 * num_keys * E MACs per layer.
    Defaults to a full AD/DPT training window (context_len + 1 tokens).
    """
    spec = model.spec
    num_keys = spec.context_len + 1 if num_keys is None else num_keys
    return 2 * count_parameters(model) + 2 * (2 * spec.num_layers * num_keys * spec.embed_dim)
