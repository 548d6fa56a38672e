"""``ModelSpec``: everything needed to rebuild a model, stored verbatim in checkpoints (pure Python)."""
from __future__ import annotations

import math
from dataclasses import dataclass

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # clamp of Gaussian action log-stds (every continuous model)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored verbatim in checkpoints."""

    layout: str = "ad"                  # "ad" | "dpt" | "idt" (models.idt_grid.GridIDT, models.idt_continuous.IDTTransformer)
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
    return_target: float | None = None  # continuous IDT: every test episode's initial return-to-go (10 x horizon)
    reward_loss_weight: float = 1.0     # regression reward: weight of its MSE inside the world-model loss
    # "ad" / "dpt" token and backbone details (docs/fidelity.md, row 7). The defaults are the behaviour of
    # checkpoints written before these fields existed, so those load and act as before; new grid-world
    # models get the release's choices from train.model_spec_from_config.
    obs_embedding: str = "linear"       # query-obs token: "linear" = Linear(obs * obs_scale); "cell" = learned
                                        # table over the num_obs_classes cells (release AD); "transition" = the
                                        # transition embedding of (obs, 0, 0, 0) (release DPT: zero-padded query)
    backbone: str = "gpt2"              # "gpt2": final RMSNorm, dropout on embeddings and residual branches, no
                                        # attention bias, normal(0.02) init; "release": the release's TinyLlama
                                        # blocks (no final norm, dropout on each sublayer's input before its norm,
                                        # attention bias, PyTorch default init)
    action_embedding: str = "linear"    # query-action token (world model): "linear" = Linear over the one-hot
                                        # action, with a bias (before issue #23); "table" = nn.Embedding(num_actions)
                                        # row of the action (the release's grid AD and DPT); continuous: "linear"
    # Loss (issue #14). Checkpoints written before these fields existed load with _LEGACY_SPEC (old behaviour).
    next_obs_loss: bool = True          # world model: a next-observation head, trained (False: no such head)
    action_nll: str = "mean"            # Gaussian action NLL over action dims: "mean" (release) | "sum" (old)

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
        if self.action_nll not in ("mean", "sum"):
            raise ValueError(f"action_nll must be 'mean' or 'sum', got {self.action_nll!r}")
        if not self.next_obs_loss and self.num_obs_classes:
            raise ValueError("next_obs_loss=False is for regression observations (num_obs_classes=None): the "
                             "grid worlds' beam search needs the next-cell head")
        if self.return_target is not None and not math.isfinite(self.return_target):
            raise ValueError(f"return_target must be None or finite, got {self.return_target!r}")
        if self.obs_embedding not in ("linear", "cell", "transition"):
            raise ValueError(f"obs_embedding must be 'linear', 'cell' or 'transition', got {self.obs_embedding!r}")
        if self.action_embedding not in ("linear", "table"):
            raise ValueError(f"action_embedding must be 'linear' or 'table', got {self.action_embedding!r}")
        if self.action_embedding == "table" and not self.discrete_actions:
            raise ValueError("action_embedding 'table' needs discrete actions (continuous actions use 'linear')")
        if self.backbone not in ("gpt2", "release"):
            raise ValueError(f"backbone must be 'gpt2' or 'release', got {self.backbone!r}")
        if self.obs_embedding == "cell" and (self.obs_dim != 2 or not self.num_obs_classes
                                             or math.isqrt(self.num_obs_classes) ** 2 != self.num_obs_classes):
            raise ValueError("obs_embedding 'cell' needs grid cells: obs_dim 2 and a square num_obs_classes "
                             f"(got obs_dim={self.obs_dim}, num_obs_classes={self.num_obs_classes})")
        if self.layout == "idt" and (self.obs_embedding != "linear" or self.action_embedding != "linear"):
            raise ValueError("layout 'idt' embeds observations and actions itself: it needs obs_embedding and "
                             "action_embedding 'linear'")
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

    @property
    def has_next_obs_head(self) -> bool:
        """The world model predicts next observations (planning deeper than one step needs them)."""
        return self.world_model and self.next_obs_loss


# Values that ModelSpec fields added later had in every checkpoint written before them (load_checkpoint).
_LEGACY_SPEC = {"next_obs_loss": True, "action_nll": "sum"}
