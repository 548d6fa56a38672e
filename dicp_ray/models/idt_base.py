"""What the two IDTs share: heads and losses of the DICP Transformer, the spec check, and the init (GPT-2's for
``spec.backbone`` "gpt2", PyTorch's default for "release", as ``DICPTransformer``).

Both IDTs (``idt_grid.GridIDT`` and ``idt_continuous.IDTTransformer``, the release's grid-world and Meta-World layouts)
are three ``blocks.CausalStack`` modules (Reviewing-Decisions, Making-Decisions, Decisions-to-Go) with their own
token embeddings; their action / reward / next-observation heads and losses are the DICP Transformer's, read from
``self.spec`` and the ``head_*`` layers each defines under the same names.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dicp_ray.models.blocks import init_gpt2_
from dicp_ray.models.spec import ModelSpec
from dicp_ray.models.transformer import DICPTransformer


class IDTBase(nn.Module):
    """Subclasses build their embeddings, three CausalStacks and heads, then call ``_init_parameters()``."""

    action_head = DICPTransformer.action_head
    reward_head = DICPTransformer.reward_head
    next_obs_head = DICPTransformer.next_obs_head
    _action_preds = DICPTransformer._action_preds
    _world_preds = DICPTransformer._world_preds
    compute_losses = DICPTransformer.compute_losses

    def __init__(self, spec: ModelSpec, *, discrete: bool):
        super().__init__()
        kind = "grid-world IDT: GridIDT" if discrete else "continuous IDT: IDTTransformer"
        if spec.layout != "idt" or spec.discrete_actions != discrete or (discrete and not spec.num_obs_classes):
            raise ValueError(f"the {kind} needs spec.layout == 'idt' with "
                             + ("discrete actions and grid cells (num_obs_classes)" if discrete
                                else "continuous actions") + f" (build_model(spec) picks the class), got {spec}")
        self.spec = spec

    def _param_dtype(self):
        return self.head_action.weight.dtype

    # -- Making-Decisions: the same in both layouts ----------------------------------------------------------
    def decision_tokens(self, return_to_go, obs, z_dists) -> torch.Tensor:
        """Block starts (B, L) return-to-go and observations (grid: cells (B, L) long; Meta-World: (B, L, D)),
        Reviewing-Decisions distributions (B, L', 2Z) with L' in {L-1, L} -> MD tokens (B, 3L - (L - L'), E):
        [R_i, o_i, zd_i] per block, the last zd left out when L' = L - 1 (the release pads it with zeros; a causal
        stack never lets the o token see it)."""
        B, L = return_to_go.shape
        Lz = z_dists.shape[1]
        if Lz not in (L - 1, L):
            raise ValueError(f"decision_tokens needs {L - 1} or {L} reviewed blocks for {L} blocks, got {Lz}")
        dtype = self._param_dtype()
        r = self.md_return(return_to_go.to(dtype).unsqueeze(-1) * self.spec.return_scale)
        o = self.md_obs(obs.to(dtype) if obs.dtype.is_floating_point else obs)
        zd = self.md_z(z_dists.to(dtype))
        if Lz < L:
            zd = torch.cat([zd, zd.new_zeros(B, 1, zd.shape[-1])], dim=1)
        return torch.stack([r, o, zd], dim=2).reshape(B, 3 * L, -1)[:, : 3 * L - (L - Lz)]

    def decide(self, return_to_go, obs, z_dists) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mean and log-variance (B, L, Z) of every block's decision, read at the o tokens."""
        hidden = self.making_decisions(self.decision_tokens(return_to_go, obs, z_dists))
        return self.head_decision(hidden[:, 1::3]).chunk(2, dim=-1)

    def _init_parameters(self) -> None:
        if self.spec.backbone == "gpt2":  # as DICPTransformer: "release" keeps PyTorch's default init
            init_gpt2_(self, self.spec.num_layers)
