"""Exact, faster CPU training paths for the Transformer's dropout: attention with dropout, and dropout masks.

Why: with dropout, PyTorch's ``scaled_dot_product_attention`` takes its unfused math path on CPU, which for the
paper's AD model (batch 512, k = 80: 13M attention probabilities per layer) was ~44 % of a training step, and
``bernoulli_`` masks alone ~18 % (issue 17's profile). `CausalAttentionDropout` computes the same function with
fewer passes; `_keep_mask` draws the same Bernoulli masks with half the generator calls. Training only (the model
uses them when ``self.training`` and the device is a CPU); on CUDA the fused SDPA kernels and nn.Dropout run.

What holds: the maths and the distribution of the masks are those of SDPA / nn.Dropout (P(drop) = p to within
2^-33); the draws differ, so a run with dropout is not bitwise the run torch's kernels would give. With p = 0
nothing changes. tests/unit/test_model.py checks the forward and all gradients against the written-out maths.
Set ``ATTENTION_DROPOUT_CPU = "sdpa"`` to use torch's kernels (benchmarks/bench_train.py's "today" row does).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def _keep_mask(shape: torch.Size, p: float, device) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask from the default generator: 32 random bits per element (two per 64-bit draw,
    half the generator calls of ``bernoulli_``), P(drop) = round(p * 2^32) / 2^32, i.e. p to within 2^-33."""
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    threshold = round(p * 2 ** 32) - 2 ** 31
    return bits.view(torch.int32)[:n].view(shape) >= threshold


_CAUSAL_BIAS: dict = {}
ATTENTION_DROPOUT_CPU = "fused"  # "fused": CausalAttentionDropout + Dropout's masks; "sdpa": torch's own (benchmarks)


def _causal_bias(length: int, dtype, device) -> torch.Tensor:
    """(L, L) additive mask, 0 on and below the diagonal and -inf above (cached per shape/dtype/device)."""
    key = (length, dtype, str(device))
    if key not in _CAUSAL_BIAS:
        ones = torch.ones(length, length, dtype=torch.bool, device=device)
        _CAUSAL_BIAS[key] = torch.zeros(length, length, dtype=dtype, device=device).masked_fill_(
            ~ones.tril(), float("-inf"))
    return _CAUSAL_BIAS[key]


class CausalAttentionDropout(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + causal) with dropout p on the probabilities, times v: the maths of
    ``F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)``, with fewer passes on CPU.

    SDPA with dropout falls back to its unfused math path on CPU (the attention tensors of a step are 13M
    elements per layer at batch 512, k = 80): scaled q and k, a separate mask, a "safe" softmax that scans
    for fully masked rows, ``bernoulli_`` masks and several full passes in the backward. Here: one
    ``baddbmm`` (scores + causal bias), softmax, a 32-bit-threshold keep mask (`_keep_mask`), the 1/(1-p)
    scale applied to the small output instead of the probabilities, and a hand-written backward that needs
    no mask: with D = P * keep and G = s dO v^T, dS = G * D - P * rowsum(G * D); the scores of the first half of
    the queries skip the second half of the keys (all masked). Same distribution of
    dropout masks; other draws than SDPA's, so not bitwise equal to it with p > 0 (equal with p = 0).
    """

    @staticmethod
    def forward(ctx, q, k, v, p: float):
        B, H, L, hd = q.shape
        scale, keep_scale = hd ** -0.5, 1.0 / (1.0 - p)
        q3, k3, v3 = (t.reshape(B * H, L, hd) for t in (q, k, v))
        # Two query blocks: queries [0, h) see only keys [0, h), so the all-masked top-right (h x (L - h)) block of
        # the scores is never computed: 25 % fewer of the (L x L) elements every later pass touches.
        blocks = _query_blocks(L)
        outs, saved = [], []
        for lo, hi in blocks:
            bias = _causal_bias(hi, q.dtype, q.device)[lo:]                      # rows lo..hi-1, keys 0..hi-1
            probs = torch.baddbmm(bias, q3[:, lo:hi], k3[:, :hi].transpose(1, 2), alpha=scale).softmax(-1)
            dropped = probs * _keep_mask(probs.shape, p, q.device)
            outs.append(torch.bmm(dropped, v3[:, :hi]))
            saved += [probs, dropped]
        out = (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]).mul_(keep_scale)
        ctx.save_for_backward(q3, k3, v3, *saved)
        ctx.scale, ctx.keep_scale, ctx.blocks = scale, keep_scale, blocks
        return out.view(B, H, L, hd)

    @staticmethod
    def backward(ctx, grad_out):
        q3, k3, v3, *saved = ctx.saved_tensors
        g = grad_out.reshape(q3.shape) * ctx.keep_scale                          # (BH, L, hd)
        grad_q, grad_k, grad_v = torch.empty_like(q3), torch.zeros_like(k3), torch.zeros_like(v3)
        for (lo, hi), probs, dropped in zip(ctx.blocks, saved[0::2], saved[1::2]):
            g_blk = g[:, lo:hi]
            # X^T Y as (Y^T X)^T: CPU batched GEMM is ~5x faster with the (L, L) operand on the right, untransposed
            grad_v[:, :hi] += torch.bmm(g_blk.transpose(1, 2), dropped).transpose(1, 2)
            ds = torch.bmm(g_blk, v3[:, :hi].transpose(1, 2)).mul_(dropped)      # G * D
            ds.addcmul_(probs, ds.sum(-1, keepdim=True), value=-1.0)              # - P * rowsum(G * D)
            grad_q[:, lo:hi] = torch.bmm(ds, k3[:, :hi])
            grad_k[:, :hi] += torch.bmm(q3[:, lo:hi].transpose(1, 2), ds).transpose(1, 2)
        shape = grad_out.shape
        return (grad_q.mul_(ctx.scale).view(shape), grad_k.mul_(ctx.scale).view(shape), grad_v.view(shape), None)


def _query_blocks(length: int) -> list[tuple[int, int]]:
    """[(lo, hi)]: query rows lo..hi-1 attend keys 0..hi-1 (causal); two halves from 2 tokens on."""
    half = length // 2
    return [(0, half), (half, length)] if half else [(0, length)]


class _DropoutFn(torch.autograd.Function):
    """x * keep / (1 - p) with a `_keep_mask` (saved as bool for the backward)."""

    @staticmethod
    def forward(ctx, x, p: float):
        keep = _keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU training masks come from `_keep_mask` (half the generator calls of
    ``bernoulli_``); CUDA and eval mode are nn.Dropout's own. Same distribution, other draws."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0 and x.device.type == "cpu" and ATTENTION_DROPOUT_CPU == "fused":
            return _DropoutFn.apply(x, self.p)
        return super().forward(x)
