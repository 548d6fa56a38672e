"""Unit tests for dicp_ray.models.transformer: shapes, causality, KV cache exactness, losses, checkpoints."""
import dataclasses
import math
import os

import pytest
import torch

from dicp_ray.models.blocks import KVCache
from dicp_ray.models.checkpoints import load_checkpoint, save_checkpoint
from dicp_ray.models.spec import ModelSpec
from dicp_ray.models.transformer import DICPTransformer, count_parameters, flops_per_token

SMALL = dict(num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, context_len=8)


def make_spec(**kw) -> ModelSpec:
    return ModelSpec(**{**SMALL, **kw})


def make_batch(spec: ModelSpec, B=3, T=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    D, A = spec.obs_dim, spec.num_actions

    def actions(*shape):
        if spec.discrete_actions:
            return torch.randint(0, A, shape, generator=g)
        return torch.randn(*shape, A, generator=g, dtype=dtype)

    batch = {
        "ctx_obs": torch.randint(0, 9, (B, T, D), generator=g).to(dtype),
        "ctx_action": actions(B, T),
        "ctx_reward": torch.randint(0, 2, (B, T), generator=g).to(dtype),
        "ctx_next_obs": torch.randint(0, 9, (B, T, D), generator=g).to(dtype),
        "query_obs": torch.randint(0, 9, (B, D), generator=g).to(dtype),
    }
    if spec.world_model:
        batch["query_action"] = actions(B)
    n_act = (B,) if spec.layout == "ad" else (B, T)  # DPT: a* after each context transition (release)
    targets = {"target_action": actions(*n_act)}
    if spec.reward_classes:
        targets["target_reward"] = torch.randint(0, spec.reward_classes, (B,), generator=g)
    else:
        targets["target_reward"] = torch.rand(B, generator=g, dtype=dtype) * 12 - 1  # some outside [0, 10]
    if spec.num_obs_classes:
        targets["target_next_obs"] = torch.randint(0, spec.num_obs_classes, (B,), generator=g)
    else:
        targets["target_next_obs"] = torch.randn(B, D, generator=g, dtype=dtype)
    return batch, targets


def variant(layout, discrete, world_model):
    if discrete:
        return make_spec(layout=layout, world_model=world_model)
    return make_spec(layout=layout, world_model=world_model, discrete_actions=False, num_actions=3,
                     obs_dim=4, num_obs_classes=None, reward_classes=None)


VARIANTS = [(lay, disc, wm) for lay in ("ad", "dpt") for disc in (True, False) for wm in (True, False)]


@pytest.mark.parametrize("layout,discrete,world_model", VARIANTS)
@pytest.mark.parametrize("T", [0, 5])
def test_shapes_and_losses(layout, discrete, world_model, T):
    spec = variant(layout, discrete, world_model)
    model = DICPTransformer(spec)
    B, A, D = 3, spec.num_actions, spec.obs_dim
    batch, targets = make_batch(spec, B=B, T=T)
    if layout == "dpt" and T == 0:  # acting on the query alone works; there is nothing to supervise
        assert model(batch)[0][next(iter(model(batch)[0]))].shape[:2] == (B, 1)
        return
    preds, losses = model(batch, targets)
    act_shape = (B, A) if layout == "ad" else (B, T + 1, A)
    if discrete:
        assert preds["action_logits"].shape == act_shape
    else:
        assert preds["action_mean"].shape == act_shape
        assert preds["action_log_std"].shape == act_shape
        assert preds["action_log_std"].min() >= -5 and preds["action_log_std"].max() <= 2
    if world_model:
        if discrete:
            assert preds["reward_logits"].shape == (B, 2)
            assert preds["next_obs_logits"].shape == (B, 81)
            assert {"acc_action", "acc_reward", "acc_next_obs"} <= losses.keys()
        else:
            assert preds["reward"].shape == (B,)
            assert preds["reward"].min() >= 0 and preds["reward"].max() <= spec.reward_max
            assert preds["next_obs"].shape == (B, D)
        expected = losses["loss_action"] + losses["loss_reward"] + losses["loss_next_obs"]
        torch.testing.assert_close(losses["loss"], expected)
    else:
        assert not any(k.startswith(("reward", "next_obs")) for k in preds)
        assert set(losses) <= {"loss", "loss_action", "acc_action"}
        torch.testing.assert_close(losses["loss"], losses["loss_action"])
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model(batch)[1] is None


def test_world_model_weight_scales_world_losses():
    spec = make_spec()
    model = DICPTransformer(spec).eval()
    batch, targets = make_batch(spec)
    _, losses = model(batch, targets, world_model_weight=0.25)
    expected = losses["loss_action"] + 0.25 * (losses["loss_reward"] + losses["loss_next_obs"])
    torch.testing.assert_close(losses["loss"], expected)


def test_regression_reward_gradient_flows_outside_clip_range():
    spec = variant("ad", False, True)
    model = DICPTransformer(spec)
    with torch.no_grad():
        model.head_reward.bias.fill_(50.0)  # raw prediction far above reward_max
    batch, targets = make_batch(spec)
    targets["target_reward"] = torch.zeros(3)
    _, losses = model(batch, targets)
    losses["loss_reward"].backward()
    assert model.head_reward.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["ad", "dpt"])
def test_causality(layout):
    spec = make_spec(layout=layout, dropout=0.0, attn_dropout=0.0)
    model = DICPTransformer(spec).double().eval()
    batch, _ = make_batch(spec, T=6, dtype=torch.float64)
    tokens = model.embed_batch(batch)
    h, _ = model.encode(tokens)
    for j in range(tokens.shape[1]):
        changed = tokens.clone()
        changed[:, j] += torch.randn_like(changed[:, j])
        h2, _ = model.encode(changed)
        torch.testing.assert_close(h2[:, :j], h[:, :j], atol=1e-12, rtol=0)
        assert not torch.allclose(h2[:, j], h[:, j])
    # The query action comes after every action-reading position, so it never changes them.
    other = dict(batch, query_action=(batch["query_action"] + 1) % spec.num_actions)
    p1, p2 = model(batch)[0], model(other)[0]
    torch.testing.assert_close(p1["action_logits"], p2["action_logits"], atol=1e-12, rtol=0)
    assert not torch.allclose(p1["reward_logits"], p2["reward_logits"])


@pytest.mark.parametrize("discrete", [True, False])
def test_kv_cache_matches_full_forward(discrete):
    spec = variant("ad", discrete, True)
    model = DICPTransformer(spec).double().eval()
    torch.manual_seed(1)
    B, T, N, E = 2, 7, 3, spec.embed_dim
    ctx = torch.randn(B, T, E, dtype=torch.float64)
    new = torch.randn(B, 4, E, dtype=torch.float64)
    full, full_cache = model.encode(torch.cat([ctx, new], dim=1))
    h_ctx, cache = model.encode(ctx)
    assert isinstance(cache, KVCache) and cache.length == T and cache.batch_size == B
    torch.testing.assert_close(h_ctx, full[:, :T], atol=1e-10, rtol=0)
    # one token at a time and a chunk at once must both match
    h_chunk, c_chunk = model.encode(new, cache)
    torch.testing.assert_close(h_chunk, full[:, T:], atol=1e-10, rtol=0)
    c = cache
    for i in range(new.shape[1]):
        h_i, c = model.encode(new[:, i:i + 1], c)
        torch.testing.assert_close(h_i[:, 0], full[:, T + i], atol=1e-10, rtol=0)
    for (k1, v1), (k2, v2) in zip(c.layers, full_cache.layers):
        torch.testing.assert_close(k1, k2, atol=1e-10, rtol=0)
        torch.testing.assert_close(v1, v2, atol=1e-10, rtol=0)
    # expand: context encoded once, N different continuations per task (row b*N+j <- task b)
    beams = torch.randn(B * N, 3, E, dtype=torch.float64)
    h_beams, big = model.encode(beams, cache.expand(N))
    assert big.length == T + 3 and big.batch_size == B * N
    ref, _ = model.encode(torch.cat([ctx.repeat_interleave(N, 0), beams], dim=1))
    torch.testing.assert_close(h_beams, ref[:, T:], atol=1e-10, rtol=0)
    # index_select keeps surviving beams; extending them must match the full sequence too
    keep = torch.tensor([5, 0, 0, 2])
    step = torch.randn(len(keep), 1, E, dtype=torch.float64)
    h_next, _ = model.encode(step, big.index_select(keep))
    ref2, _ = model.encode(torch.cat([ctx.repeat_interleave(N, 0)[keep], beams[keep], step], dim=1))
    torch.testing.assert_close(h_next[:, 0], ref2[:, -1], atol=1e-10, rtol=0)


def _block_causal(sizes, prefix: int = 0) -> torch.Tensor:
    """(L, prefix+L) mask: every token sees the prefix and, causally, only its own segment."""
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    sees = (seg[:, None] == seg[None, :]) & torch.ones(len(seg), len(seg), dtype=torch.bool).tril()
    return torch.cat([torch.ones(len(seg), prefix, dtype=torch.bool), sees], dim=1)


def test_encode_explicit_positions_and_causal_mask_equal_the_default():
    model = DICPTransformer(make_spec()).double().eval()
    torch.manual_seed(2)
    B, T, L, E = 2, 6, 4, model.spec.embed_dim
    ctx, new = torch.randn(B, T, E, dtype=torch.float64), torch.randn(B, L, E, dtype=torch.float64)
    h_ref, c_ref = model.encode(ctx)                                 # SDPA is_causal path
    h, c = model.encode(ctx, positions=torch.arange(T), attn_mask=torch.ones(T, T, dtype=torch.bool).tril())
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=0)
    new_ref, _ = model.encode(new, c_ref)                            # cached default: positions T..
    causal = torch.ones(L, T + L, dtype=torch.bool).tril(diagonal=T)
    for pos, mask in [(torch.arange(T, T + L), None), (None, causal),
                      (torch.arange(T, T + L).expand(B, L), causal[None, None].expand(B, 1, L, T + L))]:
        h_new, c_new = model.encode(new, c, positions=pos, attn_mask=mask)
        torch.testing.assert_close(h_new, new_ref, atol=1e-12, rtol=0)
        assert c_new.length == T + L
    # RoPE sees only relative positions: shifting every position by the same amount changes nothing
    shifted, _ = model.encode(ctx, positions=torch.arange(T) + 5)
    torch.testing.assert_close(shifted, h_ref, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        model.encode(new, c, positions=torch.arange(L + 1))
    with pytest.raises(ValueError, match="attn_mask"):
        model.encode(new, c, attn_mask=torch.ones(L, L, dtype=torch.bool))   # missing the cached columns
    with pytest.raises(ValueError, match="attn_mask"):
        model.encode(new, c, attn_mask=causal.double())


def test_encode_tree_mask_equals_encoding_each_branch_separately():
    """Branches packed into one row (positions restart per branch, block-causal mask) give the same
    hidden states as encoding each branch on its own, with and without a shared cached prefix."""
    model = DICPTransformer(make_spec()).double().eval()
    torch.manual_seed(3)
    B, T, E, sizes = 2, 5, model.spec.embed_dim, [3, 1, 2]
    ctx = torch.randn(B, T, E, dtype=torch.float64)
    branches = [torch.randn(B, n, E, dtype=torch.float64) for n in sizes]
    packed, positions = torch.cat(branches, dim=1), torch.cat([torch.arange(n) for n in sizes])
    _, cache = model.encode(ctx)
    h_tree, c_tree = model.encode(packed, cache, positions=T + positions, attn_mask=_block_causal(sizes, T))
    h_flat, _ = model.encode(packed, positions=positions, attn_mask=_block_causal(sizes))  # no cache
    assert c_tree.length == T + sum(sizes)
    for i, (branch, h) in enumerate(zip(branches, torch.split(h_tree, sizes, dim=1))):
        torch.testing.assert_close(h, model.encode(branch, cache)[0], atol=1e-10, rtol=0)
        torch.testing.assert_close(torch.split(h_flat, sizes, dim=1)[i], model.encode(branch)[0],
                                   atol=1e-10, rtol=0)
    # A deeper tree: a shared trunk of 2 tokens, then two children that each see the trunk only.
    trunk, kids = torch.randn(B, 2, E, dtype=torch.float64), torch.randn(B, 2, E, dtype=torch.float64)
    mask = torch.ones(4, T + 4, dtype=torch.bool)
    mask[:, T:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    h, _ = model.encode(torch.cat([trunk, kids], dim=1), cache, positions=T + torch.tensor([0, 1, 2, 2]),
                        attn_mask=mask)
    for j in range(2):
        ref, _ = model.encode(torch.cat([trunk, kids[:, j:j + 1]], dim=1), cache)
        torch.testing.assert_close(h[:, [0, 1, 2 + j]], ref, atol=1e-10, rtol=0)
    # Per-row positions and masks: row 0 packs the branches, row 1 is the plain causal continuation.
    L = sum(sizes)
    pos2 = torch.stack([T + positions, torch.arange(T, T + L)])
    mask2 = torch.stack([_block_causal(sizes, T), torch.ones(L, T + L, dtype=torch.bool).tril(T)])[:, None]
    h2, _ = model.encode(packed, cache, positions=pos2, attn_mask=mask2)
    torch.testing.assert_close(h2[0], h_tree[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(h2[1], model.encode(packed, cache)[0][1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("tokens", [{}, {"obs_embedding": "cell", "backbone": "release"},
                                    {"obs_embedding": "transition", "backbone": "release"}])
def test_forward_equals_pieces_with_cache(tokens):
    """The planner's path (embed pieces + cache + predict) reproduces forward() exactly."""
    spec = make_spec(layout="ad", **tokens)
    model = DICPTransformer(spec).double().eval()
    batch, _ = make_batch(spec, T=6, dtype=torch.float64)
    preds, _ = model(batch)
    ctx = model.embed_transitions(batch["ctx_obs"], batch["ctx_action"], batch["ctx_reward"],
                                  batch["ctx_next_obs"])
    _, cache = model.encode(ctx)
    q = torch.cat([model.embed_query_obs(batch["query_obs"]),
                   model.embed_query_action(batch["query_action"])], dim=1)
    h, _ = model.encode(q, cache)
    torch.testing.assert_close(model.action_head(h[:, 0]), preds["action_logits"], atol=1e-10, rtol=0)
    out = model.predict(h[:, 1])
    torch.testing.assert_close(out["reward_logits"], preds["reward_logits"], atol=1e-10, rtol=0)
    torch.testing.assert_close(model.next_obs_head(h[:, 1]), preds["next_obs_logits"], atol=1e-10, rtol=0)


def test_overfits_tiny_batch():
    torch.manual_seed(0)
    spec = make_spec(dropout=0.0, attn_dropout=0.0)
    model = DICPTransformer(spec)
    batch, targets = make_batch(spec, B=8, T=6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        _, losses = model(batch, targets)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = losses["loss"].item() if first is None else first
    assert losses["loss"].item() < 0.3 * first
    assert losses["acc_next_obs"] == 1.0 and losses["acc_action"] == 1.0


def test_eval_is_deterministic_and_train_uses_dropout():
    spec = make_spec()
    model = DICPTransformer(spec)
    batch, _ = make_batch(spec)
    model.eval()
    a, b = model(batch)[0], model(batch)[0]
    assert torch.equal(a["action_logits"], b["action_logits"])
    model.train()
    torch.manual_seed(0)
    c = model(batch)[0]
    assert not torch.allclose(c["action_logits"], a["action_logits"])


def test_checkpoint_round_trip(tmp_path):
    spec = make_spec(layout="dpt", obs_scale=0.125)
    model = DICPTransformer(spec).eval()
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(str(path), model, {"step": 7, "metrics": {"loss": 1.5}})
    assert path.exists() and not os.path.exists(str(path) + ".tmp")
    loaded, payload = load_checkpoint(str(path))
    assert loaded.spec == spec and not loaded.training
    assert payload["step"] == 7 and payload["metrics"] == {"loss": 1.5}
    batch, _ = make_batch(spec)
    for key, value in model(batch)[0].items():
        assert torch.equal(value, loaded(batch)[0][key])
    torch.load(str(path), weights_only=True)  # plain contents only
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(str(path), model, {"state_dict": {}})


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError):
        load_checkpoint(str(garbage))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a dicp_ray checkpoint"):
        load_checkpoint(str(foreign))
    model = DICPTransformer(make_spec())
    good = tmp_path / "good.pt"
    save_checkpoint(str(good), model, {})
    payload = torch.load(good, weights_only=True)
    for name, change in [("version", {"format_version": 99}),
                         ("unknown", {"model_spec": {**payload["model_spec"], "bogus": 1}}),
                         ("mismatch", {"model_spec": {**payload["model_spec"], "embed_dim": 32}})]:
        bad = tmp_path / f"{name}.pt"
        torch.save({**payload, **change}, bad)
        with pytest.raises(ValueError):
            load_checkpoint(str(bad))


def test_spec_validation():
    assert ModelSpec(layout="idt").layout == "idt"  # dicp_ray.models.idt_continuous.IDTTransformer (tests/unit/test_idt.py)
    with pytest.raises(ValueError):
        ModelSpec(layout="foo")
    with pytest.raises(ValueError):
        ModelSpec(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError):
        ModelSpec(embed_dim=12, num_heads=4)  # head_dim 3 is odd
    with pytest.raises(ValueError):
        ModelSpec(reward_classes=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelSpec().layout = "dpt"


def test_parameter_and_flop_counts():
    model = DICPTransformer(ModelSpec())
    n = count_parameters(model)
    assert 40_000 < n < 80_000  # paper-size grid model: ~50K parameters
    assert flops_per_token(model, 10) == 2 * n + 4 * 4 * 10 * 32
    assert flops_per_token(model) > flops_per_token(model, 10)


# ----------------------------------------------------------------------------- release tokens and backbone
def test_grid_defaults_follow_the_release():
    """What model_spec_from_config builds for Darkroom AD / DPT: the release's query token and backbone."""
    from dicp_ray.config.load import config_from_dict
    from dicp_ray.train.batches import model_spec_from_config

    class Data:  # the two facts model_spec_from_config reads from a grid dataset
        obs_dim, num_actions = 2, 5

    def spec_for(**model):
        config = config_from_dict({"env": {"name": "Darkroom"}, "model": model})
        return model_spec_from_config(config, Data())

    ad, dpt = spec_for(variant="ad"), spec_for(variant="dpt")
    assert (ad.obs_embedding, ad.backbone, ad.obs_scale) == ("cell", "release", 1.0)
    assert (dpt.obs_embedding, dpt.backbone) == ("transition", "release")
    old = spec_for(variant="ad", obs_embedding="linear", backbone="gpt2")
    assert (old.obs_embedding, old.backbone, old.obs_scale) == ("linear", "gpt2", 1 / 8)
    assert ModelSpec().obs_embedding == "linear" and ModelSpec().backbone == "gpt2"  # old checkpoints


def test_cell_embedding_is_a_learned_table_over_cells():
    model = DICPTransformer(make_spec(obs_embedding="cell", backbone="release"))
    obs = torch.tensor([[0.0, 0.0], [2.0, 7.0], [8.0, 8.0], [7.0, 2.0]])
    tokens = model.embed_query_obs(obs)                                             # (4, 1, E)
    table = model.embed_query_cell.weight
    assert table.shape == (81, 16) and not hasattr(model, "embed_query_obs_proj")
    torch.testing.assert_close(tokens[:, 0], table[[0, 25, 80, 65]], atol=0, rtol=0)
    # no affine structure in (x, y): (2, 7) and (7, 2) are unrelated rows, not mirror images
    assert not torch.allclose(tokens[1] + tokens[3], tokens[0] + tokens[2])


def test_transition_query_embedding_is_the_zero_padded_transition():
    """Release DPT: the query is (obs, zeros) through the shared context embedding (dpt.py:45-50)."""
    model = DICPTransformer(make_spec(layout="dpt", obs_embedding="transition", backbone="release"))
    obs = torch.tensor([[3.0, 5.0], [0.0, 8.0]])
    W, b = model.embed_transition.weight, model.embed_transition.bias                # (E, 2D + A + 1)
    torch.testing.assert_close(model.embed_query_obs(obs)[:, 0], obs @ W[:, :2].T + b)
    assert not hasattr(model, "embed_query_obs_proj") and not hasattr(model, "embed_query_cell")


def test_release_backbone_details():
    gpt2, release = DICPTransformer(make_spec()), DICPTransformer(make_spec(backbone="release"))
    assert isinstance(gpt2.norm, torch.nn.RMSNorm) and isinstance(release.norm, torch.nn.Identity)  # final norm
    assert gpt2.blocks[0].attn.qkv.bias is None and release.blocks[0].attn.qkv.bias is not None      # bias
    assert release.blocks[0].attn.proj.bias is not None and release.blocks[0].mlp.up.bias is None
    # dropout: the release drops each sublayer's input; gpt2 drops the embeddings and the branch outputs
    assert isinstance(release.blocks[0].in_drop, torch.nn.Dropout) and isinstance(release.drop, torch.nn.Identity)
    assert isinstance(release.blocks[0].attn.resid_drop, torch.nn.Identity)
    assert isinstance(gpt2.blocks[0].in_drop, torch.nn.Identity) and isinstance(gpt2.drop, torch.nn.Dropout)
    assert release.blocks[0].norm1.eps == 1e-5
    # init: PyTorch's default (uniform +-1/sqrt(fan_in)) vs GPT-2's normal(0, 0.02)
    assert gpt2.head_action.weight.std() < 0.03 < release.head_action.weight.std()
    bound = 1 / 16 ** 0.5
    assert release.head_action.weight.abs().max() <= bound and release.head_action.bias.abs().max() > 0


def test_checkpoints_without_token_fields_load_as_linear_gpt2(tmp_path):
    """A checkpoint written before obs_embedding / backbone existed loads and acts exactly as before."""
    model = DICPTransformer(make_spec(obs_scale=0.125)).eval()
    path = tmp_path / "old.pt"
    save_checkpoint(str(path), model, {})
    payload = torch.load(path, weights_only=True)
    for key in ("obs_embedding", "backbone"):
        del payload["model_spec"][key]
    torch.save(payload, path)
    loaded, _ = load_checkpoint(str(path))
    assert (loaded.spec.obs_embedding, loaded.spec.backbone) == ("linear", "gpt2")
    batch, _ = make_batch(model.spec)
    torch.testing.assert_close(loaded(batch)[0]["action_logits"], model(batch)[0]["action_logits"], atol=0, rtol=0)
    cell = DICPTransformer(make_spec(obs_embedding="cell"))
    with pytest.raises(ValueError, match="do not match"):  # a cell checkpoint never loads as another spec
        cell_path = tmp_path / "cell.pt"
        save_checkpoint(str(cell_path), cell, {})
        bad = torch.load(cell_path, weights_only=True)
        bad["model_spec"]["obs_embedding"] = "linear"
        torch.save(bad, cell_path)
        load_checkpoint(str(cell_path))


def test_dpt_supervises_a_star_after_each_transition_not_the_query_alone():
    torch.manual_seed(0)
    spec = make_spec(layout="dpt", world_model=False, obs_embedding="transition", backbone="release")
    model = DICPTransformer(spec).eval()
    batch, targets = make_batch(spec, B=4, T=5)
    preds, losses = model(batch, targets)
    logits = preds["action_logits"]                                                 # (B, T + 1, A)
    expected = torch.nn.functional.cross_entropy(logits[:, 1:].reshape(-1, 5), targets["target_action"].reshape(-1))
    torch.testing.assert_close(losses["loss_action"], expected)


@pytest.mark.parametrize("bad", [{"obs_embedding": "table"}, {"backbone": "llama"},
                                 {"obs_embedding": "cell", "num_obs_classes": None, "reward_classes": None,
                                  "discrete_actions": False},
                                 {"layout": "idt", "obs_embedding": "cell"}])
def test_token_spec_validation(bad):
    with pytest.raises(ValueError):
        make_spec(**bad)


# ----------------------------------------------------------------------------- attention dropout (CPU training path)
def _reference_attention(q, k, v, keep, p):
    """softmax(q k^T / sqrt(d) + causal) * keep / (1 - p) @ v, written out with autograd."""
    L = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return (scores.softmax(-1) * keep / (1 - p)) @ v


def test_attention_dropout_path_equals_the_written_out_maths(monkeypatch):
    """CausalAttentionDropout (the CPU training path with attn_dropout > 0) against plain autograd with the same
    keep masks (recorded per query block), forward and all three gradients, in float64."""
    from dicp_ray.models import attention

    p, drawn = 0.3, []
    original = attention._keep_mask
    monkeypatch.setattr(attention, "_keep_mask", lambda *a: drawn.append(original(*a)) or drawn[-1])
    q, k, v = (torch.randn(3, 2, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(3, 2, 7, 4, dtype=torch.float64)
    out = attention.CausalAttentionDropout.apply(q, k, v, p)
    fast = torch.autograd.grad(out, (q, k, v), grad)
    keep = torch.ones(6, 7, 7, dtype=torch.bool)        # the block above the diagonal is masked anyway
    for (lo, hi), mask in zip(attention._query_blocks(7), drawn):
        keep[:, lo:hi, :hi] = mask
    assert len(drawn) == 2 and [m.shape for m in drawn] == [(6, 3, 3), (6, 4, 7)]
    keep = keep.view(3, 2, 7, 7)
    ref = _reference_attention(q, k, v, keep, p)
    torch.testing.assert_close(out, ref)
    for got, want in zip(fast, torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want)
    assert 0 < int((~keep).tril().sum()) < 28 * 6  # the test exercised dropped and kept entries


def test_keep_mask_drops_at_rate_p():
    from dicp_ray.models.attention import _keep_mask

    torch.manual_seed(0)
    keep = _keep_mask(torch.Size([1000, 1001]), 0.1, "cpu")     # odd size: the last 32-bit half is cut off
    assert keep.shape == (1000, 1001) and keep.dtype == torch.bool
    assert abs(1 - keep.float().mean().item() - 0.1) < 0.002     # 1M draws: sd 3e-4


def test_training_with_attention_dropout_uses_the_fast_path_equal_to_sdpa_as_p_goes_to_0(monkeypatch):
    """The model in train mode with attn_dropout > 0 on CPU goes through CausalAttentionDropout; with p -> 0 it
    equals SDPA (same model, same inputs)."""
    from dicp_ray.models import attention

    spec = ModelSpec(context_len=8, num_layers=1, num_heads=2, embed_dim=8, mlp_dim=16, dropout=0.0,
                     attn_dropout=1e-12)
    torch.manual_seed(0)
    model = DICPTransformer(spec).train()
    x = torch.randn(4, 9, 8)
    calls = []
    original = attention.CausalAttentionDropout.apply
    monkeypatch.setattr(attention.CausalAttentionDropout, "apply",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    fast, _ = model.encode(x)
    monkeypatch.setattr(attention, "ATTENTION_DROPOUT_CPU", "sdpa")
    slow, _ = model.encode(x)
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def _release_grid_parameter_shapes(layout: str, E: int = 32, A: int = 5, D: int = 2, cells: int = 81) -> dict:
    """The release's grid AD / DPT parameters outside the Transformer, restated from its constructors
    (release:gridworld/model/ad.py:26-35, dpt.py:26-33) as {role: shape} with the dynamics heads on."""
    shapes = {"context": [(E, 2 * D + A + 1), (E,)], "query_action": [(A, E)],  # nn.Embedding(5, 32): no bias
              "action_head": [(A, E), (A,)], "reward_head": [(2, E), (2,)], "next_obs_head": [(cells, E), (cells,)]}
    shapes["query_obs"] = [(cells, E)] if layout == "ad" else []  # DPT: the zero-padded query shares "context"
    return shapes


@pytest.mark.parametrize("layout", ["ad", "dpt"])
def test_grid_query_action_token_is_the_releases_embedding_table(layout):
    """Issue #23: the release embeds the query action with nn.Embedding(5, 32): no bias, N(0, 1) init (std ~1.0,
    not a Linear's ~0.37 over a one-hot), so training and the gradient-clip norm see the same parameters."""
    from dicp_ray.config.load import config_from_dict
    from dicp_ray.train.batches import model_spec_from_config

    class Data:
        obs_dim, num_actions = 2, 5

    spec = model_spec_from_config(config_from_dict({"env": {"name": "Darkroom"}, "model": {"variant": layout}}),
                                  Data())
    assert spec.action_embedding == "table"
    torch.manual_seed(0)
    model = DICPTransformer(spec)
    ours = {"context": model.embed_transition, "query_action": model.embed_query_action_table,
            "action_head": model.head_action, "reward_head": model.head_reward,
            "next_obs_head": model.head_next_obs}
    if layout == "ad":
        ours["query_obs"] = model.embed_query_cell
    got = {role: [tuple(p.shape) for p in module.parameters()] for role, module in ours.items()}
    got.setdefault("query_obs", [])
    assert got == _release_grid_parameter_shapes(layout)
    assert model.embed_query_action_proj is None
    table = model.embed_query_action_table.weight
    assert 0.85 < table.std().item() < 1.15                     # nn.Embedding's N(0, 1); a Linear(5, 32) gives ~0.37
    actions = torch.tensor([0, 4, 2])
    torch.testing.assert_close(model.embed_query_action(actions)[:, 0], table[actions], atol=0, rtol=0)
    with pytest.raises(TypeError, match="integer"):
        model.embed_query_action(actions.float())


def test_query_action_table_is_for_discrete_actions_and_old_checkpoints_load_as_linear(tmp_path):
    with pytest.raises(ValueError, match="discrete"):
        make_spec(discrete_actions=False, num_obs_classes=None, reward_classes=None, action_embedding="table")
    model = DICPTransformer(make_spec(obs_embedding="cell", backbone="release")).eval()
    path = tmp_path / "before_23.pt"
    save_checkpoint(str(path), model, {})
    payload = torch.load(path, weights_only=True)
    del payload["model_spec"]["action_embedding"]      # written before the field existed: a Linear query action
    torch.save(payload, path)
    loaded, _ = load_checkpoint(str(path))
    assert loaded.spec.action_embedding == "linear" and loaded.embed_query_action_table is None
    batch, _ = make_batch(model.spec)
    torch.testing.assert_close(loaded(batch)[0]["reward_logits"], model(batch)[0]["reward_logits"], atol=0, rtol=0)
    table = DICPTransformer(make_spec(action_embedding="table"))
    bad_path = tmp_path / "table.pt"
    save_checkpoint(str(bad_path), table, {})
    bad = torch.load(bad_path, weights_only=True)
    bad["model_spec"]["action_embedding"] = "linear"
    torch.save(bad, bad_path)
    with pytest.raises(ValueError, match="do not match"):
        load_checkpoint(str(bad_path))
