"""The Transformer's building blocks: the key-value cache, rotary position embedding, causal self-attention (SDPA,
or the exact fused CPU path with dropout of `dicp_ray.models.attention`), the SwiGLU MLP and the pre-norm block, in the
"gpt2" or the authors' release ("release") arrangement of norms, dropouts and biases (``ModelSpec.backbone``).

``DICPTransformer`` (`dicp_ray.models.transformer`) assembles them; ``CausalStack`` is the backbone of both IDTs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from dicp_ray.models import attention

if TYPE_CHECKING:
    from dicp_ray.models.spec import ModelSpec

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


def _branch_dropout(spec: ModelSpec) -> nn.Module:
    """Dropout on a residual branch's output ("gpt2"); the release drops each sublayer's input instead."""
    return attention.Dropout(spec.dropout) if spec.backbone == "gpt2" else nn.Identity()


class CausalSelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.h, self.hd, self.attn_dropout = spec.num_heads, spec.head_dim, spec.attn_dropout
        bias = spec.backbone == "release"  # the release's attention has biases (tiny_llama Config(bias=True))
        self.qkv = nn.Linear(spec.embed_dim, 3 * spec.embed_dim, bias=bias)
        self.proj = nn.Linear(spec.embed_dim, spec.embed_dim, bias=bias)
        self.resid_drop = _branch_dropout(spec)

    def forward(self, x, cos, sin, past: tuple[torch.Tensor, torch.Tensor] | None, mask=None):
        B, L, E = x.shape
        q, k, v = (t.view(B, L, self.h, self.hd).transpose(1, 2)
                   for t in self.qkv(x).split(E, dim=2))            # each (B, H, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past_len = 0 if past is None else past[0].shape[2]
        if past_len:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, P+L, hd)
        dropout_p = self.attn_dropout if self.training else 0.0
        if past_len == 0 and mask is None and dropout_p > 0 and x.device.type == "cpu" \
                and attention.ATTENTION_DROPOUT_CPU == "fused":
            y = attention.CausalAttentionDropout.apply(q, k, v, dropout_p)  # CUDA: SDPA's fused kernels do dropout
        elif past_len == 0 and mask is None:
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
        self.drop = _branch_dropout(spec)

    def forward(self, x):
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.drop(self.down(F.silu(gate) * value))


class Block(nn.Module):
    """Pre-norm block. "release": norm(dropout(x)) feeds each sublayer, as the release's fused
    dropout-RMSNorm (``release:gridworld/model/tiny_llama/rmsnorm.py:841``), with its eps 1e-5."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        release = spec.backbone == "release"
        eps = 1e-5 if release else None
        self.norm1, self.norm2 = nn.RMSNorm(spec.embed_dim, eps=eps), nn.RMSNorm(spec.embed_dim, eps=eps)
        self.in_drop = attention.Dropout(spec.dropout) if release else nn.Identity()
        self.attn, self.mlp = CausalSelfAttention(spec), SwiGLU(spec)

    def forward(self, x, cos, sin, past, mask=None):
        a, kv = self.attn(self.norm1(self.in_drop(x)), cos, sin, past, mask)
        x = x + a
        return x + self.mlp(self.norm2(self.in_drop(x))), kv


class CausalStack(nn.Module):
    """``spec.num_layers`` causal pre-norm Blocks (RoPE positions 0..L-1). "gpt2": dropout on the input tokens and a
    final RMSNorm; "release" (the release's TinyLlama ``Transformer``): neither, dropout sits inside the blocks."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.head_dim = spec.head_dim
        gpt2 = spec.backbone == "gpt2"
        self.drop = nn.Dropout(spec.dropout) if gpt2 else nn.Identity()
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.norm = nn.RMSNorm(spec.embed_dim) if gpt2 else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L, E) -> (N, L, E); token i attends to tokens 0..i."""
        return self.encode(tokens)[0]

    def encode(self, tokens: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """New tokens (N, L, E) on top of `cache` -> (hidden, cache of all keys/values). By default RoPE positions
        continue at cache.length and new tokens attend to the cache and causally to each other, so encode(a) then
        encode(b, cache) equals forward(cat(a, b)) up to float rounding; `positions` (L,) and a bool `attn_mask`
        (L, cache.length + L), True = may attend, override both (``DICPTransformer.encode``'s packing)."""
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        cos, sin = rope_cos_sin(self.head_dim, positions, tokens.dtype)
        x, layers = self.drop(tokens), []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, cache.layers[i] if cache is not None else None, attn_mask)
            layers.append(kv)
        return self.norm(x), KVCache(layers)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def init_gpt2_(model: nn.Module, num_layers: int) -> None:
    """GPT-2's init of every model built from these blocks: Linear weights normal(0, 0.02) and zero biases, then the
    residual projections (attention output, MLP down) normal(0, 0.02 / sqrt(2 * num_layers)); embeddings keep
    PyTorch's N(0, 1)."""
    model.apply(_init_linear)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.down.weight")):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * num_layers))
