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
    ``loss_action + world_model_weight * (loss_reward + loss_next_obs)``.
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
    (``dicp_ray.idt.IDTTransformer``) built from the same blocks; ``build_model(spec)`` and
    ``load_checkpoint`` pick the class from ``spec.layout``.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "dicp_ray.checkpoint", 1


# ----------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored verbatim in checkpoints."""

    layout: str = "ad"                  # "ad" | "dpt" | "idt" (dicp_ray.idt.IDTTransformer)
    world_model: bool = True            # add query-action token + reward / next-obs heads
    obs_dim: int = 2
    discrete_actions: bool = True
    num_actions: int = 5                # action count (discrete) or action dim (continuous)
    num_obs_classes: int | None = 81    # None: regress obs_dim floats
    reward_classes: int | None = 2      # None: regression clipped to [0, reward_max]
    reward_max: float = 10.0
    context_len: int = 80               # k transitions per training window (k-1 context + 1 query)
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 32
    mlp_dim: int = 128
    dropout: float = 0.1
    attn_dropout: float = 0.1
    obs_scale: float = 1.0              # observations are multiplied by this before embedding
    # IDT only (ignored by "ad" / "dpt"; checkpoints written before these existed get the defaults)
    block_len: int = 10                 # c: steps per high-level decision
    z_dim: int = 8                      # size of a high-level decision z
    return_scale: float = 1.0           # returns-to-go are multiplied by this before embedding
    return_target: float | None = None  # continuous IDT: every test episode's initial return-to-go (set at training)
    reward_loss_weight: float = 1.0     # regression reward: weight of its MSE inside the world-model loss

    def __post_init__(self):
        if self.layout not in ("ad", "dpt", "idt"):
            raise ValueError(f"layout must be 'ad', 'dpt' or 'idt', got {self.layout!r}")
        for name in ("obs_dim", "num_actions", "context_len", "num_layers", "num_heads", "embed_dim",
                     "mlp_dim", "block_len", "z_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embedding")
        for name in ("num_obs_classes", "reward_classes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 2):
                raise ValueError(f"{name} must be None or an int >= 2, got {value!r}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not self.reward_max > 0 or not self.obs_scale > 0 or not self.return_scale > 0:
            raise ValueError("reward_max, obs_scale and return_scale must be > 0")
        if self.return_target is not None and not math.isfinite(self.return_target):
            raise ValueError(f"return_target must be None or finite, got {self.return_target!r}")
        if self.layout == "idt":
            if not self.discrete_actions and (self.reward_classes or self.num_obs_classes):
                raise ValueError("layout 'idt' with continuous actions needs regression heads: "
                                 "reward_classes=None, num_obs_classes=None")
            if self.context_len % self.block_len:
                raise ValueError(f"layout 'idt' needs context_len={self.context_len} to be a multiple of "
                                 f"block_len={self.block_len}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def action_in_dim(self) -> int:
        return self.num_actions  # one-hot width (discrete) == action dim (continuous)


# ----------------------------------------------------------------------------- KV cache
@dataclass
class KVCache:
    """Per-layer keys/values, each (B, heads, L, head_dim), with RoPE already applied to keys."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]

    def expand(self, repeats: int) -> "KVCache":
        """Repeat every batch row `repeats` times: new row b*repeats + j is a copy of row b."""
        return KVCache([(k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0))
                        for k, v in self.layers])

    def index_select(self, batch_idx: torch.Tensor) -> "KVCache":
        """Keep (and reorder / duplicate) batch rows by index, e.g. the surviving beams."""
        return KVCache([(k.index_select(0, batch_idx), v.index_select(0, batch_idx)) for k, v in self.layers])


# ----------------------------------------------------------------------------- building blocks
def rope_cos_sin(head_dim: int, positions: torch.Tensor, dtype):
    """cos/sin tables (..., head_dim) for integer positions (...,) (angles computed in float64)."""
    dims = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64)
    inv_freq = 1.0 / (10000.0 ** (dims / head_dim))        # (hd/2,)
    angles = positions.to(torch.float64)[..., None] * inv_freq   # (..., hd/2)
    angles = torch.cat([angles, angles], dim=-1)             # (..., hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, hd) by position ("rotate half" convention): scores depend on relative position."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.h, self.hd, self.attn_dropout = spec.num_heads, spec.head_dim, spec.attn_dropout
        self.qkv = nn.Linear(spec.embed_dim, 3 * spec.embed_dim, bias=False)
        self.proj = nn.Linear(spec.embed_dim, spec.embed_dim, bias=False)
        self.resid_drop = nn.Dropout(spec.dropout)

    def forward(self, x, cos, sin, past: tuple[torch.Tensor, torch.Tensor] | None, mask=None):
        B, L, E = x.shape
        q, k, v = (t.view(B, L, self.h, self.hd).transpose(1, 2)
                   for t in self.qkv(x).split(E, dim=2))            # each (B, H, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past_len = 0 if past is None else past[0].shape[2]
        if past_len:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, P+L, hd)
        dropout_p = self.attn_dropout if self.training else 0.0
        if past_len == 0 and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            if mask is None:  # SDPA's is_causal aligns top-left; with a cache new query i sits at P+i
                mask = torch.ones(L, past_len + L, dtype=torch.bool, device=x.device).tril(diagonal=past_len)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, L, E)
        return self.resid_drop(self.proj(y)), (k, v)


class SwiGLU(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.up = nn.Linear(spec.embed_dim, 2 * spec.mlp_dim, bias=False)  # gate and value, fused
        self.down = nn.Linear(spec.mlp_dim, spec.embed_dim, bias=False)
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x):
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(gate) * value))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(spec.embed_dim), nn.RMSNorm(spec.embed_dim)
        self.attn, self.mlp = CausalSelfAttention(spec), SwiGLU(spec)

    def forward(self, x, cos, sin, past, mask=None):
        a, kv = self.attn(self.norm1(x), cos, sin, past, mask)
        x = x + a
        return x + self.mlp(self.norm2(x)), kv


# ----------------------------------------------------------------------------- model
class DICPTransformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        if spec.layout == "idt":
            raise ValueError("layout 'idt' is dicp_ray.idt.IDTTransformer: build it with build_model(spec)")
        self.spec = spec
        D, A, E = spec.obs_dim, spec.action_in_dim, spec.embed_dim
        self.embed_transition = nn.Linear(2 * D + A + 1, E)   # (o, a, r, o') -> one token
        self.embed_query_obs_proj = nn.Linear(D, E)
        self.embed_query_action_proj = nn.Linear(A, E) if spec.world_model else None
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.norm = nn.RMSNorm(E)
        self.head_action = nn.Linear(E, A if spec.discrete_actions else 2 * A)  # logits | (mean, log_std)
        if spec.world_model:
            self.head_reward = nn.Linear(E, spec.reward_classes or 1)
            self.head_next_obs = nn.Linear(E, spec.num_obs_classes or D)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: shrink residual projections with depth
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * spec.num_layers))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

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
        """(B, D) -> (B, 1, E)."""
        return self.embed_query_obs_proj(self._obs_features(obs)).unsqueeze(1)

    def embed_query_action(self, action) -> torch.Tensor:
        """(B,) long | (B, A) float -> (B, 1, E)."""
        if self.embed_query_action_proj is None:
            raise RuntimeError("this model has world_model=False, so it has no query-action token")
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
        """Run new tokens (B, L, E) on top of `cache` -> (final-normed hidden (B, L, E), extended cache).

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
        return {"reward_logits" if self.spec.reward_classes else "reward": self.reward_head(h),
                "next_obs_logits" if self.spec.num_obs_classes else "next_obs": self.next_obs_head(h)}

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
        losses = None if targets is None else self.compute_losses(preds, targets, world_model_weight)
        return preds, losses

    def compute_losses(self, preds: dict, targets: dict, world_model_weight: float = 1.0) -> dict:
        spec, losses = self.spec, {}
        if spec.discrete_actions:
            losses["loss_action"], losses["acc_action"] = _ce(preds["action_logits"],
                                                              targets["target_action"])
        else:
            losses["loss_action"] = _gaussian_nll(preds["action_mean"], preds["action_log_std"],
                                                  targets["target_action"])
        loss = losses["loss_action"]
        if spec.world_model:
            if spec.reward_classes:
                losses["loss_reward"], losses["acc_reward"] = _ce(preds["reward_logits"],
                                                                  targets["target_reward"])
            else:
                target = targets["target_reward"].to(preds["reward"].dtype).clamp(0.0, spec.reward_max)
                losses["loss_reward"] = F.mse_loss(preds["reward"], target)  # reported in reward units
            if spec.num_obs_classes:
                losses["loss_next_obs"], losses["acc_next_obs"] = _ce(preds["next_obs_logits"],
                                                                      targets["target_next_obs"])
            else:
                target = targets["target_next_obs"].to(preds["next_obs"].dtype)
                losses["loss_next_obs"] = F.mse_loss(preds["next_obs"], target)
            reward_weight = 1.0 if spec.reward_classes else spec.reward_loss_weight
            loss = loss + world_model_weight * (reward_weight * losses["loss_reward"] + losses["loss_next_obs"])
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


def _gaussian_nll(mean, log_std, target):
    """-log N(target | mean, exp(log_std)^2), summed over action dims, averaged over the rest."""
    z = (target.to(mean.dtype) - mean) * torch.exp(-log_std)
    nll = 0.5 * z.pow(2) + log_std + 0.5 * math.log(2 * math.pi)
    return nll.sum(-1).mean()


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


def build_model(spec: ModelSpec) -> nn.Module:
    """The model class of ``spec.layout``: DICPTransformer ("ad", "dpt"), GridIDT ("idt", discrete actions) or
    IDTTransformer ("idt", continuous actions)."""
    if spec.layout == "idt" and spec.discrete_actions:
        from dicp_ray.idt_grid import GridIDT  # imported here: dicp_ray.idt_grid builds on this module

        return GridIDT(spec)
    if spec.layout == "idt":
        from dicp_ray.idt import IDTTransformer  # imported here: dicp_ray.idt builds on this module

        return IDTTransformer(spec)
    return DICPTransformer(spec)


def save_checkpoint(path: str, model: nn.Module, extra: dict | None = None) -> None:
    """Atomically write spec + weights + `extra` (plain Python types / tensors only)."""
    extra = dict(extra or {})
    reserved = {"format", "format_version", "model_spec", "state_dict"} & extra.keys()
    if reserved:
        raise ValueError(f"extra uses reserved checkpoint keys: {sorted(reserved)}")
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
               "model_spec": asdict(model.spec),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def load_checkpoint(path: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model (in eval mode, class from ``model_spec.layout``) from a checkpoint -> (model, payload)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle / zip errors differ by torch version; callers get one type
        raise ValueError(f"{path} is not a readable torch checkpoint: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dicp_ray checkpoint (missing format={CHECKPOINT_FORMAT!r})")
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {payload.get('format_version')!r} is not "
                         f"supported (expected {CHECKPOINT_VERSION})")
    raw_spec = payload.get("model_spec")
    known = {f.name for f in fields(ModelSpec)}
    if not isinstance(raw_spec, dict) or set(raw_spec) - known:
        raise ValueError(f"{path}: model_spec is missing or has unknown fields "
                         f"{sorted(set(raw_spec or {}) - known)}")
    try:
        model = build_model(ModelSpec(**raw_spec))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: weights do not match model_spec {raw_spec}: {e}") from e
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval(), payload
