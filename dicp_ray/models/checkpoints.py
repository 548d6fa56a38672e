"""Model checkpoints: build the model class of a spec, write and read checkpoints, in one place.

What it does
    ``build_model(spec)`` returns the module of ``spec.layout``: ``dicp_ray.models.transformer.DICPTransformer`` ("ad",
    "dpt") or ``dicp_ray.models.idt_continuous.IDTTransformer`` ("idt"). ``save_checkpoint`` writes the spec, the weights and
    plain-Python extras atomically; ``load_checkpoint`` rebuilds the model (eval mode) from one. This is the
    only module that knows every model class, so model.py and idt.py need not import each other both ways
    (idt.py builds on model.py's blocks; nothing in model.py knows IDT).

How to use it
    from dicp_ray.models.checkpoints import build_model, load_checkpoint, save_checkpoint
    save_checkpoint("model.pt", build_model(spec), {"step": 0})
    model, payload = load_checkpoint("model.pt")

What to expect
    Checkpoints hold only tensors and plain Python types, so they load with ``torch.load(weights_only=True)``;
    a file that is not a dicp_ray checkpoint, of another format version, or whose weights do not fit its spec
    raises ``ValueError`` naming the path.
"""
from __future__ import annotations

import os
from dataclasses import asdict, fields

import torch
import torch.nn as nn

from dicp_ray.models.idt_continuous import IDTTransformer
from dicp_ray.models.idt_grid import GridIDT
from dicp_ray.models.spec import _LEGACY_SPEC, ModelSpec
from dicp_ray.models.transformer import DICPTransformer

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "dicp_ray.checkpoint", 1


def build_model(spec: ModelSpec) -> nn.Module:
    """The model class of ``spec.layout``: DICPTransformer ("ad", "dpt"), GridIDT ("idt", discrete actions: the
    release's grid-world IDT) or IDTTransformer ("idt", continuous actions: Meta-World)."""
    if spec.layout == "idt" and spec.discrete_actions:
        return GridIDT(spec)
    if spec.layout == "idt":
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
        raw_spec = {**_LEGACY_SPEC, **raw_spec}  # fields a checkpoint predates: the behaviour it was trained with
        model = build_model(ModelSpec(**raw_spec))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: weights do not match model_spec {raw_spec}: {e}") from e
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval(), payload


__all__ = ["build_model", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]
