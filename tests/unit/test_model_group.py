"""Stacked training of several models (dicp_ray.train.model_group): a model trained in a group equals it trained alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dicp_ray.config.load import config_from_dict
from dicp_ray.models.checkpoints import build_model
from dicp_ray.models.spec import ModelSpec
from dicp_ray.train.batches import windows_to_batch
from dicp_ray.train.model_group import (
    ModelGroup,
    StackedEmbedding,
    member_optimizer_state,
    stack_models,
    stack_optimizer_states,
)


def _train_config(**kw):
    return config_from_dict({"train": {"num_steps": 50, "lr": 3e-3, "grad_clip": 0.05, **kw}}).train


def _spec(layout="ad", world_model=True, dropout=0.0):
    return ModelSpec(layout=layout, world_model=world_model, context_len=6, num_layers=2, num_heads=2,
                     embed_dim=16, mlp_dim=32, dropout=dropout, attn_dropout=dropout, num_obs_classes=81,
                     obs_scale=1 / 8)


def _pairs(seed: int, steps: int, layout: str, world_model: bool, batch: int = 8, k: int = 6):
    """Per step one (batch, targets) pair of random grid-world windows; a distinct stream per seed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        cells = rng.integers(0, 9, (2, batch, k, 2)).astype(np.float32)
        w = {"obs": cells[0], "next_obs": cells[1], "action": rng.integers(0, 5, (batch, k)),
             "reward": rng.integers(0, 2, (batch, k)).astype(np.float32),
             "optimal_action": rng.integers(0, 5, (batch, k))}
        out.append(windows_to_batch(w, layout, world_model))
    return out


def _models(spec, seeds):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_model(spec))
    return models


@pytest.mark.parametrize("layout,world_model,per_pass", [("ad", True, None), ("dpt", False, None), ("ad", True, 2)])
def test_model_trained_in_a_group_of_three_equals_it_trained_alone(layout, world_model, per_pass, one_thread):
    """Dropout 0: each member's losses, weights and AdamW state after 6 steps equal a lone run's (float rounding);
    per_pass = 2 runs the forward/backward in passes of 2 + 1 models (bounded memory), the same maths."""
    spec, train, steps = _spec(layout, world_model), _train_config(), 6
    streams = [_pairs(seed, steps, layout, world_model) for seed in (10, 11, 12)]
    group = ModelGroup(_models(spec, [0, 1, 2]), train, torch.device("cpu"), models_per_pass=per_pass)
    group_losses = [group.step([s[i] for s in streams]) for i in range(steps)]
    for m, seed in enumerate([0, 1, 2]):
        alone = ModelGroup(_models(spec, [seed]), train, torch.device("cpu"))
        alone_losses = [alone.step([streams[m][i]]) for i in range(steps)]
        for got, want in zip(group_losses, alone_losses):
            assert float(got[m]["loss"]) == pytest.approx(float(want[0]["loss"]), rel=1e-5, abs=1e-6)
        mine = group.member_state(m)
        for key, value in alone.member_state(0)["model"].items():
            torch.testing.assert_close(mine["model"][key], value, rtol=1e-5, atol=1e-6)
        for i, state in alone.member_state(0)["optimizer"]["state"].items():
            assert float(mine["optimizer"]["state"][i]["step"]) == float(state["step"]) == steps
            torch.testing.assert_close(mine["optimizer"]["state"][i]["exp_avg_sq"], state["exp_avg_sq"],
                                       rtol=1e-4, atol=1e-9)
    # the members really diverged (different data and init): the test compares distinct models
    a, b = group.member_state(0)["model"], group.member_state(1)["model"]
    assert not torch.allclose(a["head_action.weight"], b["head_action.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_group_equals_alone_on_cuda():
    """The same on a GPU (stacked batched GEMMs, fused AdamW, SDPA kernels); TF32 off, so fp32 tolerances hold."""
    torch.backends.cuda.matmul.allow_tf32 = False
    spec, train, cuda = _spec(), _train_config(), torch.device("cuda")
    streams = [[tuple({k: v.to(cuda) for k, v in d.items()} for d in pair) for pair in _pairs(seed, 4, "ad", True)]
               for seed in (10, 11, 12)]
    group = ModelGroup(_models(spec, [0, 1, 2]), train, cuda)
    for i in range(4):
        group.step([s[i] for s in streams])
    for m in range(3):
        alone = ModelGroup(_models(spec, [0]), train, cuda)
        for i in range(4):
            alone.step([streams[m][i]])
        for key, value in alone.member_state(0)["model"].items():
            torch.testing.assert_close(group.member_state(m)["model"][key], value, rtol=1e-4, atol=1e-5)


def test_clipping_is_per_model(one_thread):
    """A tiny clip norm is active for every model; each is clipped by its own norm, as when trained alone."""
    spec, train = _spec(), _train_config(grad_clip=1e-4, lr=1e-2)
    streams = [_pairs(seed, 2, "ad", True) for seed in (1, 2)]
    group = ModelGroup(_models(spec, [0, 0]), train, torch.device("cpu"))
    for i in range(2):
        group.step([s[i] for s in streams])
    for m in range(2):
        alone = ModelGroup(_models(spec, [0]), train, torch.device("cpu"))
        for i in range(2):
            alone.step([streams[m][i]])
        for key, value in alone.member_state(0)["model"].items():
            torch.testing.assert_close(group.member_state(m)["model"][key], value, rtol=1e-5, atol=1e-7)


def test_member_states_round_trip_and_resume_a_group(one_thread):
    """Saving members (lone-run format) and loading them into a new group continues the same trajectory."""
    spec, train = _spec(), _train_config()
    streams = [_pairs(seed, 6, "ad", True) for seed in (3, 4)]
    straight = ModelGroup(_models(spec, [0, 1]), train, torch.device("cpu"))
    for i in range(6):
        straight.step([s[i] for s in streams])
    first = ModelGroup(_models(spec, [0, 1]), train, torch.device("cpu"))
    for i in range(3):
        first.step([s[i] for s in streams])
    saved = [first.member_state(m) for m in range(2)]
    resumed = ModelGroup(_models(spec, [7, 8]), train, torch.device("cpu"))
    resumed.load_member_states(saved)
    for i in range(3, 6):
        resumed.step([s[i] for s in streams])
    for m in range(2):
        for key, value in straight.member_state(m)["model"].items():
            torch.testing.assert_close(resumed.member_state(m)["model"][key], value, rtol=1e-6, atol=1e-7)
    state = first.optimizer.state_dict()
    again = stack_optimizer_states([member_optimizer_state(state, m) for m in range(2)])
    for i in state["state"]:
        torch.testing.assert_close(again["state"][i]["exp_avg"], state["state"][i]["exp_avg"])


def test_stacked_embedding_uses_each_models_table():
    tables = [torch.nn.Embedding(5, 3) for _ in range(2)]
    stacked = StackedEmbedding(tables)
    index = torch.tensor([[0, 4], [1, 2], [3, 3], [4, 0]])       # rows 0-1: model 0, rows 2-3: model 1
    out = stacked(index)
    torch.testing.assert_close(out[:2], tables[0](index[:2]))
    torch.testing.assert_close(out[2:], tables[1](index[2:]))


def test_stacking_refuses_unknown_parameter_holders():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="cannot stack"):
        stack_models([Odd(), Odd()])


@pytest.mark.parametrize("layout", ["dpt", "idt", "idt_continuous"])
def test_stacked_forward_equals_each_members_own_forward(layout):
    """Eval mode (deterministic: IDT uses its decisions' means): the stacked module on the concatenated batch gives
    every member exactly its own model's predictions, for the plain and the hierarchical (IDT) Transformer."""
    from dicp_ray.train.model_group import concat_batches, split_rows

    if layout == "idt":  # 4 blocks of 10 steps, as tests/unit/test_idt.py's small model
        spec = ModelSpec(layout="idt", num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, context_len=40,
                         block_len=10, z_dim=4, obs_scale=1 / 8, return_scale=1 / 20, reward_max=1.0, dropout=0.0,
                         attn_dropout=0.0)
        g = torch.Generator().manual_seed(0)
        pairs = [({"ctx_obs": torch.randint(0, 81, (3, 40), generator=g),           # grid IDT: cell indices
                   "ctx_action": torch.randint(0, 5, (3, 40), generator=g),
                   "ctx_reward": torch.randint(0, 2, (3, 40), generator=g).float(),
                   "ctx_next_obs": torch.randint(0, 81, (3, 40), generator=g),
                   "ctx_return_to_go": torch.rand(3, 40, generator=g) * 20}, {}) for _ in range(3)]
    elif layout == "idt_continuous":  # the release's Meta-World IDT on its TinyLlama backbone
        spec = ModelSpec(layout="idt", discrete_actions=False, num_actions=4, obs_dim=11, num_obs_classes=None,
                         reward_classes=None, reward_max=10.0, context_len=40, num_layers=1, num_heads=2, embed_dim=16,
                         mlp_dim=32, return_target=1000.0, backbone="release", next_obs_loss=False, dropout=0.0,
                         attn_dropout=0.0)
        g = torch.Generator().manual_seed(0)
        pairs = [({"ctx_obs": torch.randn(3, 40, 11, generator=g), "ctx_action": torch.rand(3, 40, 4, generator=g),
                   "ctx_reward": torch.rand(3, 40, generator=g), "ctx_next_obs": torch.randn(3, 40, 11, generator=g),
                   "ctx_return_to_go": torch.rand(3, 40, generator=g) * 1000}, {}) for _ in range(3)]
    else:
        spec = _spec(layout, world_model=True)
        pairs = [p[0] for p in (_pairs(s, 1, layout, True) for s in range(3))]
    models = _models(spec, [0, 1, 2])
    stacked = stack_models(models).eval()
    batch, _ = concat_batches(pairs)
    with torch.no_grad():
        preds = split_rows(stacked(batch)[0], 3)
        for m, model in enumerate(models):
            for key, value in model.eval()(pairs[m][0])[0].items():
                torch.testing.assert_close(preds[m][key], value, rtol=1e-5, atol=1e-6)
