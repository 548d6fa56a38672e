"""Unit tests for dicp_ray.idt: shapes, causality, relabelling, windows, acting, checkpoints, config rules."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicp_ray.checkpoints import build_model, load_checkpoint, save_checkpoint
from dicp_ray.config import ConfigError, config_from_dict, load_config
from dicp_ray.data import HistoryDataset
from dicp_ray.idt import EpisodeWindowSampler, IDTAgent, IDTTransformer, relabel_windows
from dicp_ray.model import DICPTransformer, ModelSpec
from dicp_ray.scripted import write_scripted_dataset
from dicp_ray.train import TRAIN_TAGS, windows_to_batch

SMALL = dict(layout="idt", num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, context_len=40, block_len=10,
             z_dim=4, obs_scale=1 / 8, return_scale=1 / 20, reward_max=1.0, dropout=0.0, attn_dropout=0.0)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):  # tests/conftest.py
    yield


def make_model(seed=0, **kw) -> IDTTransformer:
    torch.manual_seed(seed)
    return build_model(ModelSpec(**{**SMALL, **kw}))


def make_batch(B=3, k=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    batch = {"ctx_obs": torch.randint(0, 9, (B, k, 2), generator=g).to(dtype),
             "ctx_action": torch.randint(0, 5, (B, k), generator=g),
             "ctx_reward": torch.randint(0, 2, (B, k), generator=g).to(dtype),
             "ctx_next_obs": torch.randint(0, 9, (B, k, 2), generator=g).to(dtype),
             "ctx_return_to_go": (torch.rand(B, k, generator=g) * 20).to(dtype)}
    targets = {"target_action": batch["ctx_action"].clone(),
               "target_reward": batch["ctx_reward"].long(),
               "target_next_obs": torch.randint(0, 81, (B, k), generator=g)}
    return batch, targets


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("world_model", [True, False])
def test_forward_shapes_and_loss_keys(world_model):
    model = make_model(world_model=world_model)
    assert isinstance(model, IDTTransformer)
    batch, targets = make_batch()
    if not world_model:
        targets = {"target_action": targets["target_action"]}
    model.train()
    preds, losses = model(batch, targets, world_model_weight=0.5)
    assert preds["action_logits"].shape == (3, 40, 5)
    assert preds["z_mean"].shape == preds["z_log_std"].shape == (3, 4, 4)   # 40 steps / c=10 blocks, z_dim 4
    if world_model:
        assert preds["reward_logits"].shape == (3, 40, 2) and preds["next_obs_logits"].shape == (3, 40, 81)
        assert set(losses) == set(TRAIN_TAGS)
        expected = losses["loss_action"] + 0.5 * (losses["loss_reward"] + losses["loss_next_obs"])
        torch.testing.assert_close(losses["loss"], expected)
    else:
        assert "reward_logits" not in preds and set(losses) == {"loss", "loss_action", "acc_action"}
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused  # every module is trained (DDP without find_unused_parameters needs this)


def test_eval_forward_is_deterministic_and_train_forward_samples_z():
    model, (batch, _) = make_model(), make_batch()
    model.eval()
    a, b = model(batch)[0]["action_logits"], model(batch)[0]["action_logits"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.train()
    torch.manual_seed(1)
    c = model(batch)[0]["action_logits"]
    assert not torch.allclose(a, c)


def test_changing_a_later_transition_never_changes_an_earlier_output():
    """Perturb everything after step j (and a_j, r_j, o'_j): actions 0..j and world predictions 0..j-1
    stay put; perturbing only r_j and o'_j (and later steps) keeps the world prediction of step j too."""
    torch.set_default_dtype(torch.float64)
    try:
        model = make_model(seed=3).double().eval()
        batch, _ = make_batch(B=2, k=40, seed=1, dtype=torch.float64)
        base = model(batch)[0]
        other, _ = make_batch(B=2, k=40, seed=2, dtype=torch.float64)
        for j in (0, 4, 9, 10, 17, 25, 39):
            later = {name: x.clone() for name, x in batch.items()}
            for name in later:
                later[name][:, j + 1:] = other[name][:, j + 1:]
            for name in ("ctx_action", "ctx_reward", "ctx_next_obs"):
                later[name][:, j] = other[name][:, j]
            out = model(later)[0]
            torch.testing.assert_close(out["action_logits"][:, : j + 1], base["action_logits"][:, : j + 1])
            for key in ("reward_logits", "next_obs_logits"):
                torch.testing.assert_close(out[key][:, :j], base[key][:, :j])
            if j < 39:  # the test is not vacuous: later outputs do change
                assert not torch.allclose(out["action_logits"][:, j + 1:], base["action_logits"][:, j + 1:])
            outcome = {name: x.clone() for name, x in batch.items()}
            for name in ("ctx_reward", "ctx_next_obs"):
                outcome[name][:, j:] = other[name][:, j:]
            out = model(outcome)[0]
            for key in ("reward_logits", "next_obs_logits"):
                torch.testing.assert_close(out[key][:, : j + 1], base[key][:, : j + 1])
    finally:
        torch.set_default_dtype(torch.float32)


def test_spec_rules():
    assert ModelSpec(layout="idt").block_len == 10 and ModelSpec(layout="idt").z_dim == 8  # paper: c=10, z 8
    with pytest.raises(ValueError, match="multiple of block_len"):
        ModelSpec(layout="idt", context_len=45)
    assert not ModelSpec(layout="idt", discrete_actions=False, num_obs_classes=None, reward_classes=None,
                         return_target=500.0).discrete_actions          # Meta-World IDT: test_idt_continuous.py
    with pytest.raises(ValueError, match="regression heads"):
        ModelSpec(layout="idt", discrete_actions=False)                 # continuous needs regression heads
    with pytest.raises(ValueError, match="build_model"):
        DICPTransformer(ModelSpec(layout="idt"))
    assert type(build_model(ModelSpec(layout="ad"))) is DICPTransformer


# ------------------------------------------------------------------------------------------ data
def _hand_made_windows():
    """2 windows x 3 episodes of H=3 steps. Returns: window 0 -> [2, 0, 3], window 1 -> [1, 1, 0]."""
    reward = np.array([[0, 1, 1, 0, 0, 0, 1, 1, 1],
                       [1, 0, 0, 0, 0, 1, 0, 0, 0]], np.float32)
    marker = np.arange(9)[None].repeat(2, 0) + np.array([[0], [100]])    # identifies each original row
    return {"obs": np.stack([marker, -marker], -1).astype(np.float32), "action": marker.astype(np.int64),
            "reward": reward, "next_obs": np.stack([marker, marker], -1).astype(np.float32),
            "step": np.tile(np.arange(3), (2, 3)).astype(np.int32), "task_id": np.array([7, 8])}


def test_relabel_sorts_episodes_and_relabels_return_to_go():
    w = _hand_made_windows()
    out = relabel_windows(w)
    # window 0: returns [2, 0, 3] -> order episodes 1, 0, 2; window 1: [1, 1, 0] -> 2, 0, 1 (tie keeps time order)
    np.testing.assert_array_equal(out["action"][0], [3, 4, 5, 0, 1, 2, 6, 7, 8])
    np.testing.assert_array_equal(out["action"][1], [106, 107, 108, 100, 101, 102, 103, 104, 105])
    for name in ("obs", "next_obs"):  # every per-step column moves with its episode
        np.testing.assert_array_equal(out[name][..., 0], out["action"])
    np.testing.assert_array_equal(out["obs"][..., 1], -out["action"])
    np.testing.assert_array_equal(out["reward"][0], [0, 0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(out["step"], w["step"])
    np.testing.assert_array_equal(out["episode_return"], [[0, 2, 3], [0, 1, 1]])
    # every episode starts at the window's best return and loses what it has collected so far
    np.testing.assert_array_equal(out["return_to_go"][0], [3, 3, 3, 3, 3, 2, 3, 2, 1])
    np.testing.assert_array_equal(out["return_to_go"][1], [1, 1, 1, 1, 0, 0, 1, 1, 1])
    assert out["return_to_go"].dtype == np.float32
    np.testing.assert_array_equal(out["task_id"], [7, 8])
    np.testing.assert_array_equal(w["action"][0], np.arange(9))  # the input is not modified


def test_relabel_refuses_windows_that_are_not_whole_episodes():
    w = _hand_made_windows()
    w["step"] = np.roll(w["step"], 1, axis=1)
    with pytest.raises(ValueError, match="whole episodes"):
        relabel_windows(w)


def test_windows_to_batch_for_idt():
    w = _hand_made_windows()
    w["obs"] = w["obs"] % 9
    w["next_obs"] = w["next_obs"] % 9
    batch, targets = windows_to_batch(w, "idt", world_model=True)
    out = relabel_windows(w)
    assert set(batch) == {"ctx_obs", "ctx_action", "ctx_reward", "ctx_next_obs", "ctx_return_to_go"}
    assert batch["ctx_obs"].shape == (2, 9, 2) and batch["ctx_obs"].dtype == torch.float32
    np.testing.assert_array_equal(batch["ctx_return_to_go"].numpy(), out["return_to_go"])
    np.testing.assert_array_equal(targets["target_action"].numpy(), out["action"])
    np.testing.assert_array_equal(targets["target_reward"].numpy(), out["reward"].astype(int))
    cells = out["next_obs"][..., 0] * 9 + out["next_obs"][..., 1]
    np.testing.assert_array_equal(targets["target_next_obs"].numpy(), cells)
    assert all(t.dtype == torch.long for t in targets.values())
    _, targets = windows_to_batch(w, "idt", world_model=False)
    assert set(targets) == {"target_action"}


def test_episode_window_sampler_returns_whole_episodes(tmp_path):
    path = str(tmp_path / "ds")
    write_scripted_dataset(path, "Darkroom", [3, 40], num_streams=2, num_episodes=5, seed=1)
    dataset = HistoryDataset.open(path)
    sampler = EpisodeWindowSampler(dataset, num_episodes=2, horizon=20, seed=0)
    w = sampler.sample(64)
    assert w["obs"].shape == (64, 40, 2) and w["obs"].dtype == np.float32 and w["action"].dtype == np.int64
    np.testing.assert_array_equal(w["step"], np.tile(np.arange(20), (64, 2)))
    np.testing.assert_array_equal(w["obs"][:, [0, 20]], np.full((64, 2, 2), 4.0))   # Darkroom starts at (4, 4)
    within = np.arange(39) % 20 != 19                                            # o_{t+1} = o'_t inside episodes
    np.testing.assert_array_equal(w["obs"][:, 1:][:, within], w["next_obs"][:, :-1][:, within])
    assert set(w["task_id"].tolist()) == {3, 40}
    assert set(w) >= {"optimal_action", "reward", "next_obs"}
    again = EpisodeWindowSampler(dataset, num_episodes=2, horizon=20, seed=0).sample(64)
    np.testing.assert_array_equal(again["action"], w["action"])               # deterministic for a seed
    starts = {tuple(row) for row in EpisodeWindowSampler(dataset, 2, 20, seed=1).sample(400)["action"][:, :3]}
    assert len(starts) > 4                                                     # several windows get drawn
    with pytest.raises(ValueError, match="6 episodes"):
        EpisodeWindowSampler(dataset, num_episodes=6, horizon=20, seed=0)


# ------------------------------------------------------------------------------------------ acting
def _drive(agent, episodes, num_tasks, horizon, seed):
    """Feed the agent a fixed random history; returns the logits it computed at every step of the last episode."""
    g = torch.Generator().manual_seed(seed)
    logits = []
    for _ in range(episodes):
        agent.start_episode()
        logits = []
        for _ in range(horizon):
            logits.append(agent.action_logits(torch.randint(0, 9, (num_tasks, 2), generator=g)))
            agent.observe(torch.randint(0, 5, (num_tasks,), generator=g),
                          torch.randint(0, 2, (num_tasks,), generator=g).float(),
                          torch.randint(0, 9, (num_tasks, 2), generator=g))
    return torch.stack(logits, dim=1)


def test_agent_acts_like_the_training_forward_on_the_same_window():
    """With decision means, the agent's logits in episode 5 equal the eval forward on the window it holds:
    the last E-1 = 3 finished episodes sorted by ascending return, then the current episode."""
    model = make_model(seed=5, context_len=80).eval()
    N, H = 3, 20
    agent = IDTAgent(model, H, return_target=torch.tensor([15.0, 9.0, 20.0]), sample_decisions=False)
    g = torch.Generator().manual_seed(11)
    steps = []
    for _ in range(5):
        agent.start_episode()
        window = agent.context_window()                                 # what this episode's decisions see
        for t in range(H):
            obs = torch.randint(0, 9, (N, 2), generator=g)
            steps.append(agent.action_logits(obs))
            current = {name: x.clone() for name, x in agent.current.items()}
            agent.observe(torch.randint(0, 5, (N,), generator=g), torch.randint(0, 2, (N,), generator=g).float(),
                          torch.randint(0, 9, (N, 2), generator=g))
    assert window["obs"].shape == (N, 3, H, 2)
    returns = window["reward"].sum(-1)
    assert torch.all(returns[:, 1:] >= returns[:, :-1])                 # ascending
    # the whole last episode, as the agent recorded it (current is the state before the last observe)
    last = current  # step H-1's action and outcome are not recorded yet: causality makes them irrelevant
    batch = {f"ctx_{name}": torch.cat([window[name].flatten(1, 2), last[name]], dim=1)
             for name in ("obs", "action", "reward", "next_obs", "return_to_go")}
    with torch.no_grad():
        expected = model(batch)[0]["action_logits"][:, -H:]
    torch.testing.assert_close(torch.stack(steps[-H:], dim=1), expected, rtol=1e-5, atol=1e-5)
    # returns-to-go start at the target and lose the rewards of the episode so far
    torch.testing.assert_close(last["return_to_go"][:, 0], torch.tensor([15.0, 9.0, 20.0]))
    torch.testing.assert_close(last["return_to_go"][:, 1:], torch.tensor([15.0, 9.0, 20.0])[:, None]
                               - last["reward"].cumsum(1)[:, :-1])


def test_agent_is_deterministic_for_a_generator_and_keeps_e_minus_1_episodes():
    model = make_model(seed=2).eval()                                   # context 40 = 2 episodes of 20
    runs = []
    for _ in range(2):
        agent = IDTAgent(model, 20, torch.full((4,), 12.0), generator=torch.Generator().manual_seed(7))
        moves = torch.Generator().manual_seed(3)
        actions = []
        for _ in range(3):
            agent.start_episode()
            obs = torch.full((4, 2), 4.0)
            for _ in range(20):
                a = agent.act(obs)
                assert a.shape == (4,) and a.dtype == torch.long and a.min() >= 0 and a.max() < 5
                actions.append(a)
                obs = (obs + torch.randint(-1, 2, (4, 2), generator=moves)).clamp(0, 8)
                agent.observe(a, torch.zeros(4), obs)
        assert agent.finished["obs"].shape == (4, 1, 20, 2)             # E - 1 = 1 finished episode kept
        runs.append(torch.stack(actions))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="eval"):
        IDTAgent(model.train(), 20, torch.zeros(4))
    with pytest.raises(ValueError, match="multiple of block_len"):
        IDTAgent(model.eval(), 15, torch.zeros(4))


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_builds_the_idt_class(tmp_path):
    model = make_model(seed=4, world_model=True).eval()
    path = tmp_path / "idt.pt"
    save_checkpoint(str(path), model, extra={"variant": "idt", "step": 3})
    loaded, payload = load_checkpoint(str(path))
    assert isinstance(loaded, IDTTransformer) and not loaded.training
    assert loaded.spec == model.spec and payload["model_spec"]["layout"] == "idt" and payload["variant"] == "idt"
    batch, _ = make_batch()
    with torch.no_grad():
        for key in ("action_logits", "reward_logits", "next_obs_logits", "z_mean"):
            torch.testing.assert_close(loaded(batch)[0][key], model(batch)[0][key], rtol=0, atol=0)


def test_checkpoint_written_before_the_idt_fields_still_loads(tmp_path):
    torch.manual_seed(0)
    ad = DICPTransformer(ModelSpec(num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32, context_len=8))
    path = tmp_path / "ad.pt"
    save_checkpoint(str(path), ad)
    payload = torch.load(path, weights_only=True)
    for name in ("block_len", "z_dim", "return_scale", "return_target"):     # as an old checkpoint's spec
        payload["model_spec"].pop(name)
    torch.save(payload, path)
    loaded, _ = load_checkpoint(str(path))
    assert type(loaded) is DICPTransformer and loaded.spec == ad.spec


# ------------------------------------------------------------------------------------------ config
def _idt_config(**eval_section):
    return config_from_dict({"model": {"variant": "idt"}, "train": {"lr": 1e-3},
                             "eval": {"modes": ["policy"], **eval_section}})


def test_config_accepts_idt_in_policy_mode_and_refuses_plan():
    assert _idt_config().model.variant == "idt"
    with pytest.raises(ConfigError, match=r"implemented for AD only.*--set eval.modes=\[policy\]"):
        _idt_config(modes=["policy", "plan"])
    config = load_config(REPO / "tune_configs" / "darkroom_idt.yaml")
    assert (config.model.variant, config.train.lr, config.eval.modes) == ("idt", 1e-3, ("policy",))
    assert config.model.world_model and config.env.name == "Darkroom"


def test_evaluate_refuses_plan_mode_for_an_idt_checkpoint(tmp_path):
    from dicp_ray.evaluate import _check_compatible

    model = make_model()
    payload = {"env_name": "Darkroom", "variant": "idt"}
    with pytest.raises(ValueError, match="implemented for AD and DPT on the grid worlds"):
        _check_compatible(payload, model.spec, _idt_config(), "plan", "model.pt")
    _check_compatible(payload, model.spec, _idt_config(), "policy", "model.pt")  # fine
