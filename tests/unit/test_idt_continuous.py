"""Unit tests of the Meta-World IDT in the release's layout (dicp_ray/models/idt_continuous.py): shapes, Gaussian
action head, reward / next-observation regression, causality, the release's windows on a hand-worked history,
windows -> batch, acting like a direct forward pass, DICP-IDT sampled search and when it runs, checkpoints
(earlier layout refused by name), config."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicp_ray.agents.idt_continuous import IDTAgent
from dicp_ray.config.load import config_from_dict, load_config
from dicp_ray.config.schema import ConfigError
from dicp_ray.data import history, shards
from dicp_ray.data.idt_windows import HistoryWindowSampler
from dicp_ray.models.checkpoints import build_model, load_checkpoint, save_checkpoint
from dicp_ray.models.idt_continuous import IDTTransformer
from dicp_ray.models.spec import LOG_STD_MAX, LOG_STD_MIN, ModelSpec
from dicp_ray.train.batches import model_spec_from_config, windows_to_batch

D, A, H = 5, 3, 20                      # obs dim, action dim, episode length of the synthetic data
SMALL = dict(layout="idt", discrete_actions=False, num_actions=A, obs_dim=D, num_obs_classes=None,
             reward_classes=None, reward_max=10.0, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32,
             context_len=40, block_len=10, z_dim=4, return_scale=1e-3, return_target=150.0, dropout=0.0,
             attn_dropout=0.0, backbone="release")
REPO = Path(__file__).resolve().parents[2]
LOSS_KEYS = {"loss", "loss_action", "loss_reward", "loss_next_obs"}   # AD continuous reports the same


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):  # tests/conftest.py
    yield


def make_model(seed=0, **kw) -> IDTTransformer:
    torch.manual_seed(seed)
    return build_model(ModelSpec(**{**SMALL, **kw}))


def make_batch(B=3, k=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    batch = {"ctx_obs": torch.randn(B, k, D, generator=g).to(dtype),
             "ctx_action": (torch.rand(B, k, A, generator=g) * 2 - 1).to(dtype),
             "ctx_reward": (torch.rand(B, k, generator=g) * 10).to(dtype),
             "ctx_next_obs": torch.randn(B, k, D, generator=g).to(dtype),
             "ctx_return_to_go": (torch.rand(B, k, generator=g) * 400).to(dtype)}
    targets = {"target_action": batch["ctx_action"].clone(), "target_reward": batch["ctx_reward"].clone(),
               "target_next_obs": batch["ctx_next_obs"].clone()}
    return batch, targets


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("world_model", [True, False])
def test_forward_shapes_losses_and_gradients(world_model):
    model = make_model(world_model=world_model)
    batch, targets = make_batch()
    if not world_model:
        targets = {"target_action": targets["target_action"]}
    model.train()
    preds, losses = model(batch, targets, world_model_weight=0.5)
    assert preds["action_mean"].shape == preds["action_log_std"].shape == (3, 40, A)
    assert preds["action_log_std"].min() >= LOG_STD_MIN and preds["action_log_std"].max() <= LOG_STD_MAX
    assert preds["z_mean"].shape == preds["z_log_var"].shape == (3, 4, 4) and "action_logits" not in preds
    if world_model:
        assert preds["reward"].shape == (3, 40) and preds["next_obs"].shape == (3, 40, D)
        assert preds["reward"].min() >= 0 and preds["reward"].max() <= 10       # clipped regression
        assert set(losses) == LOSS_KEYS
        expected = losses["loss_action"] + 0.5 * (losses["loss_reward"] + losses["loss_next_obs"])
        torch.testing.assert_close(losses["loss"], expected)
        # the heads and losses are AD's: the release's Gaussian NLL (mean over every element, action dims
        # included: release:metaworld/model/idt.py:31), MSE against the clipped reward
        mean, log_std = preds["action_mean"], preds["action_log_std"]
        nll = torch.nn.GaussianNLLLoss(full=True, reduction="mean")(mean, targets["target_action"],
                                                                    (2 * log_std).exp())
        torch.testing.assert_close(losses["loss_action"], nll)
        torch.testing.assert_close(losses["loss_reward"], ((preds["reward"] - targets["target_reward"]) ** 2).mean())
    else:
        assert "reward" not in preds and set(losses) == {"loss", "loss_action"}
    losses["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


def test_without_next_obs_loss_there_is_no_next_obs_head_or_loss():
    # The release's Meta-World IDT (learn_transition: False, release:metaworld/cfg/model/idt_ml1.yaml:34).
    model = make_model(next_obs_loss=False)
    assert not hasattr(model, "head_next_obs") and not model.spec.has_next_obs_head
    batch, targets = make_batch()
    preds, losses = model.train()(batch, targets, world_model_weight=0.5)
    assert "next_obs" not in preds and set(losses) == LOSS_KEYS - {"loss_next_obs"}
    torch.testing.assert_close(losses["loss"], losses["loss_action"] + 0.5 * losses["loss_reward"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_changing_a_later_transition_never_changes_an_earlier_output():
    """Continuous causality (float64): actions 0..j and world predictions 0..j-1 ignore everything after o_j;
    the world prediction of step j ignores r_j, o'_j and later steps."""
    torch.set_default_dtype(torch.float64)
    try:
        model = make_model(seed=3).double().eval()
        batch, _ = make_batch(B=2, seed=1, dtype=torch.float64)
        base = model(batch)[0]
        other, _ = make_batch(B=2, seed=2, dtype=torch.float64)
        for j in (0, 9, 10, 23, 39):
            later = {name: x.clone() for name, x in batch.items()}
            for name in later:
                later[name][:, j + 1:] = other[name][:, j + 1:]
            for name in ("ctx_action", "ctx_reward", "ctx_next_obs"):
                later[name][:, j] = other[name][:, j]
            out = model(later)[0]
            for key in ("action_mean", "action_log_std"):
                torch.testing.assert_close(out[key][:, : j + 1], base[key][:, : j + 1])
            for key in ("reward", "next_obs"):
                torch.testing.assert_close(out[key][:, :j], base[key][:, :j])
            if j < 39:
                assert not torch.allclose(out["action_mean"][:, j + 1:], base["action_mean"][:, j + 1:])
            outcome = {name: x.clone() for name, x in batch.items()}
            for name in ("ctx_reward", "ctx_next_obs"):
                outcome[name][:, j:] = other[name][:, j:]
            out = model(outcome)[0]
            for key in ("reward", "next_obs"):
                torch.testing.assert_close(out[key][:, : j + 1], base[key][:, : j + 1])
            moved = {name: x.clone() for name, x in batch.items()}   # the query action itself does matter
            moved["ctx_action"][:, j] = other["ctx_action"][:, j]
            assert not torch.allclose(model(moved)[0]["reward"][:, j], base["reward"][:, j])
    finally:
        torch.set_default_dtype(torch.float32)


def test_loss_falls_on_a_tiny_batch():
    model = make_model(seed=1)
    batch, targets = make_batch(B=4, seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    history = []
    for _ in range(80):
        _, losses = model(batch, targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first, last = history[0], np.mean([h["loss"] for h in history[-5:]])
    assert last < 0.6 * first["loss"], (first, history[-1])
    assert np.mean([h["loss_action"] for h in history[-5:]]) < first["loss_action"] - 0.2   # nats per action dim
    assert np.mean([h["loss_reward"] for h in history[-5:]]) < 0.5 * first["loss_reward"]


def test_checkpoint_round_trip_keeps_the_return_target(tmp_path):
    model = make_model(seed=4).eval()
    path = tmp_path / "idt.pt"
    save_checkpoint(str(path), model, extra={"variant": "idt"})
    loaded, payload = load_checkpoint(str(path))
    assert isinstance(loaded, IDTTransformer) and loaded.spec == model.spec
    assert payload["model_spec"]["return_target"] == 150.0 and not loaded.spec.discrete_actions
    batch, _ = make_batch()
    with torch.no_grad():
        for key in ("action_mean", "action_log_std", "reward", "next_obs", "z_mean"):
            torch.testing.assert_close(loaded(batch)[0][key], model(batch)[0][key], rtol=0, atol=0)


def test_checkpoints_of_the_earlier_continuous_idt_are_refused_by_name(tmp_path):
    model = make_model(seed=4).eval()
    state = {**model.state_dict(), "embed_decision.weight": torch.zeros(16, 1 + D + 4 + 1)}
    with pytest.raises(RuntimeError, match="earlier continuous IDT"):
        model.load_state_dict(state)
    path = tmp_path / "old.pt"
    save_checkpoint(str(path), model, extra={"variant": "idt"})
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {"embed_transition.weight": torch.zeros(16, 2 * D + A + 1),
                             "embed_decision.weight": torch.zeros(16, 1 + D + 4 + 1)}
    torch.save(payload, path)
    with pytest.raises(ValueError, match="earlier continuous IDT.*retrain"):
        load_checkpoint(str(path))


# ------------------------------------------------------------------------------------------ data
def write_continuous_dataset(path: str, task_ids, num_streams=2, num_episodes=4, horizon=H, seed=0,
                             rewards=None) -> list:
    """A tiny complete Meta-World-like dataset (random floats, whole episodes; `rewards` (n,) per task overrides
    the random rewards); returns the episode returns."""
    rng = np.random.default_rng(seed)
    sidecars, returns = [], []
    for task_id in task_ids:
        n = num_streams * num_episodes * horizon
        reward = (rng.uniform(0, 10, n) if rewards is None else np.asarray(rewards)).astype(np.float32)
        cols = {"stream": np.repeat(np.arange(num_streams), n // num_streams).astype(np.int32),
                "episode": np.tile(np.repeat(np.arange(num_episodes), horizon), num_streams).astype(np.int32),
                "step": np.tile(np.arange(horizon), n // horizon).astype(np.int32),
                "obs": (np.arange(n)[:, None] + np.zeros((1, D))).astype(np.float32),     # obs = row number
                "action": rng.uniform(-1, 1, (n, A)).astype(np.float32), "reward": reward,
                "next_obs": rng.normal(size=(n, D)).astype(np.float32), "terminated": np.zeros(n, bool),
                "truncated": np.tile(np.arange(horizon) == horizon - 1, n // horizon),
                "success": (reward > 9).astype(np.float32)}
        returns += list(reward.astype(np.float64).reshape(-1, horizon).sum(1))
        sidecars.append(shards.write_shard(path, task_id, cols, {}))
    shards.write_manifest(path, env_name="ML1", obs_dim=D, num_actions=None, action_type="continuous", action_dim=A,
                        env_task="reach-v3", task_ids=list(task_ids), shards=sidecars, collect_config={}, seeds={},
                        provenance={}, fingerprint="test", complete=True)
    return returns


def test_windows_match_the_releases_dataset_on_a_hand_worked_history(tmp_path):
    """release:metaworld/dataset.py IDTDataset, restated: per history, return-to-go = reverse cumsum inside each
    episode; episodes sorted by ascending return (argsort of the return-to-go at step 0); every episode's
    return-to-go raised by (max return-to-go of the history - its return); windows of k rows start at any row.

    One history, horizon 2, rewards ep0 [1, 2] (return 3), ep1 [0, 0.5] (0.5), ep2 [4, 1] (5):
    sorted episodes ep1, ep0, ep2 -> rows [2, 3, 0, 1, 4, 5]; return-to-go ep1 [0.5, 0.5] + 4.5, ep0 [3, 2] + 2,
    ep2 [5, 1] + 0 -> [5, 5, 5, 4, 5, 1]. Windows of k = 4 start at sorted rows 0, 1, 2."""
    path = str(tmp_path / "ds")
    write_continuous_dataset(path, [0], num_streams=1, num_episodes=3, horizon=2, rewards=[1, 2, 0, 0.5, 4, 1])
    data = history.HistoryDataset.open(path)
    sampler = HistoryWindowSampler(data, window_len=4, horizon=2, seed=0)
    rows, rtg = np.array([2, 3, 0, 1, 4, 5]), np.array([5, 5, 5, 4, 5, 1], np.float32)
    expected = {tuple(rows[s:s + 4]): rtg[s:s + 4] for s in range(3)}
    w = sampler.sample(64)
    assert w["action"].shape == (64, 4, A) and w["action"].dtype == np.float32
    seen = set()
    for i in range(64):
        key = tuple(w["obs"][i, :, 0].astype(int))                       # obs = original row number
        assert key in expected, key
        np.testing.assert_array_equal(w["return_to_go"][i], expected[key])
        np.testing.assert_array_equal(w["reward"][i], np.array([1, 2, 0, 0.5, 4, 1], np.float32)[list(key)])
        seen.add(key)
    assert len(seen) == 3                                                # every start is drawn
    batch, targets = windows_to_batch(w, "idt", world_model=True)
    assert batch["ctx_action"].shape == (64, 4, A) and batch["ctx_action"].dtype == torch.float32
    np.testing.assert_array_equal(batch["ctx_return_to_go"].numpy(), w["return_to_go"])
    np.testing.assert_array_equal(targets["target_reward"].numpy(), w["reward"])      # floats, not classes
    np.testing.assert_array_equal(targets["target_next_obs"].numpy(), w["next_obs"])
    assert set(windows_to_batch(w, "idt", world_model=False)[1]) == {"target_action"}
    with pytest.raises(ValueError, match="return_to_go column"):
        windows_to_batch({k: v for k, v in w.items() if k != "return_to_go"}, "idt", world_model=True)


def test_model_spec_on_continuous_data_is_the_releases(tmp_path):
    path = str(tmp_path / "ds")
    write_continuous_dataset(path, [0, 1, 50])
    train = history.HistoryDataset.open(path, task_ids=[0, 1])
    config = config_from_dict({"env": {"name": "ML1", "task": "reach-v3"},
                               "model": {"variant": "idt", "context_episodes": 2, "num_heads": 4, "embed_dim": 32,
                                         "mlp_dim": 128}, "train": {"lr": 1e-3}, "eval": {"modes": ["policy"]}})
    spec = model_spec_from_config(config, train)
    assert (spec.layout, spec.discrete_actions, spec.num_actions, spec.obs_dim) == ("idt", False, A, D)
    assert spec.reward_classes is None and spec.num_obs_classes is None and spec.reward_max == 10.0
    assert spec.return_scale == 1.0 and spec.return_target == 1000.0      # release: raw RTG from 10 x horizon
    assert spec.context_len == 200 and spec.backbone == "release"
    w = HistoryWindowSampler(train, 40, H, seed=0).sample(4)             # the data's horizon is 20, not 100
    assert torch.isfinite(make_model()(*windows_to_batch(w, "idt", world_model=True))[1]["loss"])
    ad = model_spec_from_config(config_from_dict({**config.to_dict(), "model": {"variant": "ad"}}), train)
    assert ad.layout == "ad" and ad.return_target is None and ad.backbone == "release"
    gpt2 = config_from_dict({**config.to_dict(), "model": {"variant": "idt", "backbone": "gpt2"}})
    assert model_spec_from_config(gpt2, train).backbone == "gpt2"


def test_run_identity_marks_the_meta_world_idt_and_the_resolved_backbone():
    from dicp_ray.train.runs import run_identity

    meta = {"env": {"name": "ML1", "task": "reach-v3"}, "model": {"variant": "idt"}, "train": {"lr": 1e-3}}
    ident = run_identity(config_from_dict(meta).to_dict(), 0, "d")
    assert ident["idt_format"] == "release-metaworld-v1" and ident["model"]["backbone"] == "auto=release"
    ad = run_identity(config_from_dict({**meta, "model": {"variant": "ad", "backbone": "gpt2"}}).to_dict(), 0, "d")
    assert "idt_format" not in ad and ad["model"]["backbone"] == "gpt2"


# ------------------------------------------------------------------------------------------ acting
@torch.no_grad()
def test_agent_first_actions_equal_a_direct_forward_pass():
    """Mean decisions: over its first context_len steps (2 episodes) the agent's action Gaussians and the reward
    predicted for the taken action equal the eval-mode forward on the same 40 steps, whose returns-to-go start
    every episode at the target and drop by each finished block's rewards."""
    model = make_model(seed=5).eval()
    N, k, c = 3, 40, 10
    target = torch.tensor([150.0, 90.0, 200.0])
    agent = IDTAgent(model, H, return_target=target, sample_decisions=False)
    g = torch.Generator().manual_seed(11)
    obs, action = torch.randn(N, k, D, generator=g), torch.rand(N, k, A, generator=g) * 2 - 1
    reward, next_obs = torch.rand(N, k, generator=g) * 10, torch.randn(N, k, D, generator=g)
    means, log_stds, rewards = [], [], []
    for t in range(k):
        if t % H == 0:
            agent.start_episode()
        mean, log_std = agent.policy(obs[:, t])
        rewards.append(agent.world_preds(action[:, t])["reward"])
        means.append(mean), log_stds.append(log_std)
        agent.observe(action[:, t], reward[:, t], next_obs[:, t])
    rtg = torch.zeros(N, k)
    for t in range(0, k, c):
        rtg[:, t] = target if t % H == 0 else rtg[:, t - c] - reward[:, t - c:t].sum(1)
    batch = {"ctx_obs": obs, "ctx_action": action, "ctx_reward": reward, "ctx_next_obs": next_obs,
             "ctx_return_to_go": rtg}
    preds = model(batch)[0]
    torch.testing.assert_close(torch.stack(means, 1), preds["action_mean"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(log_stds, 1), preds["action_log_std"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(rewards, 1), preds["reward"], rtol=1e-5, atol=1e-5)
    window = agent.context_window()
    assert window["obs"].shape == (N, 4, D) and window["z_dists"].shape == (N, 4, 8)
    torch.testing.assert_close(window["return_to_go"], rtg[:, ::c])


def test_the_context_slides_in_time_order_over_the_newest_blocks():
    model = make_model(seed=2).eval()
    agent = IDTAgent(model, H, torch.full((2,), 100.0), generator=torch.Generator().manual_seed(0))
    obs = torch.zeros(2, D)
    for step in range(5 * H):
        if step % H == 0:
            agent.start_episode()
        obs[:] = step
        agent.observe(agent.act(obs).clamp(-1, 1), torch.ones(2), obs)
        if step % 10 == 9:
            starts = agent.context_window()["obs"][0, :, 0]
            expected = torch.arange(max(0, step - 39), step + 1, 10, dtype=torch.float32) // 10 * 10
            torch.testing.assert_close(starts, expected)
    assert agent.num_finished == 5 and agent.steps_taken == 5 * H


def test_act_samples_the_gaussian_like_ad_and_is_deterministic():
    model = make_model(seed=2).eval()                                   # context 40 = 2 episodes of 20
    obs = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    policy = IDTAgent(model, H, torch.full((4,), 100.0), generator=torch.Generator().manual_seed(7))
    policy.start_episode()
    mean, log_std = policy.policy(obs)
    sampler = IDTAgent(model, H, torch.full((4,), 100.0), generator=torch.Generator().manual_seed(7))
    sampler.start_episode()
    action = sampler.act(obs)
    # both agents drew the same decisions z; act then draws float64 normals from the generator, like AD
    expected_noise = torch.randn(4, A, generator=policy.generator, dtype=torch.float64).float()
    torch.testing.assert_close(action, mean + log_std.exp() * expected_noise)
    assert action.shape == (4, A) and action.dtype == torch.float32
    runs = []
    for _ in range(2):
        agent = IDTAgent(model, H, torch.full((4,), 100.0), generator=torch.Generator().manual_seed(3))
        actions = []
        for _ in range(3):
            agent.start_episode()
            for _ in range(H):
                a = agent.act(obs)
                actions.append(a)
                agent.observe(a.clamp(-1, 1), torch.ones(4), obs)
        runs.append(torch.stack(actions))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    z = policy.z
    assert z.shape == (4, 10, 4) and not torch.allclose(z[:, 0], z[:, 1])   # one z sample per step


@torch.no_grad()
def test_plan_action_picks_the_candidate_with_the_best_predicted_reward():
    model = make_model(seed=6).eval()
    obs = torch.randn(5, D, generator=torch.Generator().manual_seed(1))

    def agent_at_step(t, seed=9):
        agent = IDTAgent(model, H, torch.full((5,), 100.0), generator=torch.Generator().manual_seed(seed))
        agent.start_episode()
        for _ in range(t):
            a = agent.act(obs)
            agent.observe(a.clamp(-1, 1), torch.full((5,), 2.0), obs)
        return agent

    for t in (0, 13):
        reference = agent_at_step(t)
        tokens = reference._step_tokens(obs)
        mean, log_std = model.action_head(model.decisions_to_go(tokens)[:, -1])
        noise = torch.randn(5, 5, A, generator=reference.generator, dtype=torch.float64).float()
        cands = torch.cat([mean[:, None], mean[:, None] + log_std.exp()[:, None] * noise], 1).clamp(-1, 1)
        scores = reference.predicted_rewards(tokens, cands)                           # (5, 6)
        planned = agent_at_step(t).plan_action(obs, num_samples=6)
        torch.testing.assert_close(planned, cands[torch.arange(5), scores.argmax(1)])
        assert planned.abs().max() <= 1.0
        only_mean = agent_at_step(t).plan_action(obs, num_samples=1)                 # L = 1: the policy mean
        torch.testing.assert_close(only_mean, mean.clamp(-1, 1))
    with pytest.raises(ValueError, match="world model"):
        IDTAgent(make_model(world_model=False).eval(), H, torch.zeros(5)).plan_action(obs, 4)


@pytest.mark.parametrize("second_half_only", [True, False])
def test_plan_mode_plans_only_on_blocks_after_step_50_once_k_steps_were_taken(second_half_only):
    """release:metaworld/model/idt.py:103: a block is planned iff at its start step >= n_transit (k) and
    step % horizon > 50; at horizon 100, c = 10, k = 2 episodes: blocks 60-90 of episodes 3 and 4."""
    from dicp_ray.agents.agent import make_agent
    from dicp_ray.agents.plan import PlannerSettings

    model = make_model(seed=7, context_len=200).eval()
    settings = PlannerSettings(num_samples=3, depth=1, second_half_only=second_half_only)
    agent = make_agent(model, 2, mode="plan", horizon=100, settings=settings,
                       generator=torch.Generator().manual_seed(0))
    planned = []
    obs = torch.zeros(2, D)
    for _ in range(4):
        for t in range(100):
            action = agent.act(obs)
            assert agent.planned.all() == agent.planned.any()              # lockstep: both tasks or neither
            planned.append(bool(agent.planned[0]))
            agent.observe(action.clamp(-1, 1), torch.ones(2), obs, episode_end=t == 99)
    planned = np.array(planned).reshape(4, 100)
    assert not planned[:2].any()
    expected = np.arange(100) >= (60 if second_half_only else 0)
    np.testing.assert_array_equal(planned[2:], np.broadcast_to(expected, (2, 100)))


# ------------------------------------------------------------------------------------------ config / evaluate
def test_ml1_reach_2core_idt_config_reuses_the_ml1_reach_2core_dataset():
    from dicp_ray.collect.driver import collection_task_ids
    from dicp_ray.collect.fingerprint import data_fingerprint

    config = load_config(REPO / "tune_configs" / "ml1_reach_2core_idt.yaml")
    base = load_config(REPO / "tune_configs" / "ml1_reach_2core.yaml")
    m = config.model
    assert (m.variant, m.world_model, m.num_heads, m.embed_dim, m.mlp_dim) == ("idt", True, 4, 32, 128)
    assert config.train.lr == 1e-3 and config.eval.modes == ("policy", "plan") and config.plan_depth == 1
    assert data_fingerprint(config) == data_fingerprint(base)
    assert collection_task_ids(config) == collection_task_ids(base)
    assert config.env == base.env and config.collect == base.collect


def test_idt_plans_on_meta_world_only_and_at_depth_1():
    meta = {"env": {"name": "ML1", "task": "reach-v3"}, "model": {"variant": "idt", "context_episodes": 2},
            "train": {"lr": 1e-3}, "eval": {"modes": ["policy", "plan"]}}
    config = config_from_dict(meta)
    with pytest.raises(ConfigError, match="depth 1 only"):
        config_from_dict({**meta, "plan": {"depth": 2}})
    grid = config_from_dict({**meta, "env": {"name": "Darkroom"}, "plan": {"depth": 2}})  # grid IDT: any depth
    assert grid.eval.modes == ("policy", "plan")

    from dicp_ray.evaluate.episodes import _check_compatible
    from dicp_ray.evaluate.results import method_label

    payload = {"env_name": "ML1", "variant": "idt", "config": {"env": {"task": "reach-v3"}}}
    _check_compatible(payload, make_model().spec, config, "plan", "model.pt")          # fine
    _check_compatible(payload, make_model().spec, config, "policy", "model.pt")
    deep = config_from_dict({**meta, "eval": {"modes": ["policy"]}, "plan": {"depth": 2}})
    with pytest.raises(ValueError, match="depth 1 only"):
        _check_compatible(payload, make_model().spec, deep, "plan", "model.pt")
    assert method_label("idt", "plan") == "DICP-IDT (plan)"
