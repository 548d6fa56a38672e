"""What the two IDTs share: heads and losses of the DICP Transformer, the spec check, and the init (GPT-2's for
``spec.backbone`` "gpt2", PyTorch's default for "release", as ``DICPTransformer``).

Both IDTs (``idt_grid.GridIDT`` and ``idt_continuous.IDTTransformer``, the release's grid-world and Meta-World layouts)
are three ``blocks.CausalStack`` modules (Reviewing-Decisions, Making-Decisions, Decisions-to-Go) with their own
token embeddings; their action / reward / next-observation heads and losses are the DICP Transformer's, read from
``self.spec`` and the ``head_*`` layers each defines under the same names.
"""
from __future__ import annotations

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

    def _init_parameters(self) -> None:
        if self.spec.backbone == "gpt2":  # as DICPTransformer: "release" keeps PyTorch's default init
            init_gpt2_(self, self.spec.num_layers)
