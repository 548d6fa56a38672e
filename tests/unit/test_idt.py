"""Grid-world IDT as the release trains it (dicp_ray/models/idt_grid.py) and acts / plans (dicp_ray/agents/idt_grid.py)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dicp_ray.agents.idt_grid import GridIDTAgent, beam_search
from dicp_ray.config.load import config_from_dict, load_config
from dicp_ray.data import history, shards
from dicp_ray.data.idt_windows import HistoryWindowSampler, sort_history
from dicp_ray.models.checkpoints import build_model, load_checkpoint, save_checkpoint
from dicp_ray.models.idt_grid import GridIDT
from dicp_ray.models.spec import ModelSpec
from dicp_ray.models.transformer import DICPTransformer
from dicp_ray.train.batches import windows_to_batch
from dicp_ray.train.step import TRAIN_TAGS

SMALL = dict(layout="idt", num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, context_len=40, block_len=10,
             z_dim=4, return_scale=1.0, reward_max=1.0, dropout=0.0, attn_dropout=0.0)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):  # tests/conftest.py
    yield


def make_model(seed=0, unit_scale=False, dtype=torch.float32, **kw) -> GridIDT:
    """A small GridIDT; `unit_scale` draws weights of unit gain so head argmaxes vary between candidates."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec(**{**SMALL, **kw})).to(dtype)
    if unit_scale:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model


def make_batch(B=3, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"ctx_obs": torch.randint(0, 81, (B, k), generator=g), "ctx_action": torch.randint(0, 5, (B, k), generator=g),
             "ctx_reward": torch.randint(0, 2, (B, k), generator=g), "ctx_next_obs": torch.randint(0, 81, (B, k), generator=g),
             "ctx_return_to_go": torch.rand(B, k, generator=g) * 20}
    targets = {"target_action": batch["ctx_action"].clone(), "target_reward": batch["ctx_reward"].clone(),
               "target_next_obs": batch["ctx_next_obs"].clone()}
    return batch, targets


# ------------------------------------------------------------------------------------------ windows
# A hand-worked history: 4 episodes of 3 steps with returns 1, 3, 0, 1.
REWARDS = np.array([0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0], np.float32)
# Ascending return, ties in time order: episode 2 (0), episode 0 (1), episode 3 (1), episode 1 (3).
SORTED_ROWS = np.array([6, 7, 8, 0, 1, 2, 9, 10, 11, 3, 4, 5])
# Returns-to-go in the episode [0,0,0] [1,1,0] [1,0,0] [3,2,1], each raised to start at the best return 3.
SORTED_RTG = np.array([3, 3, 3, 3, 3, 2, 3, 2, 2, 3, 2, 1], np.float32)


def test_sort_history_against_a_hand_worked_history():
    rows, rtg = sort_history(REWARDS, horizon=3)
    np.testing.assert_array_equal(rows, SORTED_ROWS)
    np.testing.assert_array_equal(rtg, SORTED_RTG)
    assert rtg.dtype == np.float32
    rows2, rtg2 = sort_history(np.stack([REWARDS, np.zeros_like(REWARDS)]), horizon=3)   # a batch of histories
    np.testing.assert_array_equal(rows2, [SORTED_ROWS, np.arange(12)])
    np.testing.assert_array_equal(rtg2, [SORTED_RTG, np.zeros(12)])
    with pytest.raises(ValueError, match="whole episodes of 3"):
        sort_history(REWARDS[:-1], horizon=3)


def _write_history(path: str) -> None:
    """One Darkroom task, one stream: the hand-worked history, obs x = row index so a window names its rows."""
    n = REWARDS.size
    obs = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.float32)
    columns = {"stream": np.zeros(n, np.int32), "episode": np.arange(n) // 3, "step": np.arange(n) % 3,
               "obs": obs, "action": np.arange(n) % 5, "reward": REWARDS, "next_obs": obs + [0, 1],
               "terminated": np.zeros(n, bool), "truncated": np.arange(n) % 3 == 2,
               "optimal_action": np.zeros(n, np.int64)}
    sidecar = shards.write_shard(path, 7, columns, {})
    shards.write_manifest(path, env_name="Darkroom", obs_dim=2, num_actions=5, action_type="discrete", task_ids=[7],
                        shards=[sidecar], collect_config={}, seeds={}, provenance={}, fingerprint="hand",
                        complete=True)


def test_history_windows_start_anywhere_in_the_sorted_history(tmp_path):
    path = str(tmp_path / "ds")
    _write_history(path)
    sampler = HistoryWindowSampler(history.HistoryDataset.open(path), window_len=4, horizon=3, seed=0)
    w = sampler.sample(400)
    expected = {start: (SORTED_ROWS[start:start + 4], SORTED_RTG[start:start + 4]) for start in range(9)}
    seen = set()
    for rows, rtg, reward, action in zip(w["obs"][:, :, 0], w["return_to_go"], w["reward"], w["action"]):
        start = [s for s, (r, _) in expected.items() if np.array_equal(rows, r)]
        assert len(start) == 1, rows                                # a contiguous slice of the sorted history
        np.testing.assert_array_equal(rtg, expected[start[0]][1])
        np.testing.assert_array_equal(reward, REWARDS[expected[start[0]][0]])
        np.testing.assert_array_equal(action, expected[start[0]][0] % 5)
        seen.add(start[0])
    assert seen == set(range(9))                                     # every start, episode-straddling ones too
    again = HistoryWindowSampler(history.HistoryDataset.open(path), 4, 3, seed=0).sample(400)
    np.testing.assert_array_equal(again["obs"], w["obs"])            # deterministic for a seed
    batch, targets = windows_to_batch(w, "idt", world_model=True)
    assert batch["ctx_obs"].dtype == torch.long and batch["ctx_obs"].shape == (400, 4)
    torch.testing.assert_close(batch["ctx_obs"], torch.as_tensor(w["obs"][:, :, 0] * 9, dtype=torch.long))
    torch.testing.assert_close(targets["target_next_obs"], batch["ctx_obs"] + 1)
    torch.testing.assert_close(batch["ctx_return_to_go"], torch.as_tensor(w["return_to_go"]))
    with pytest.raises(ValueError, match="whole 4-step episodes"):
        HistoryWindowSampler(history.HistoryDataset.open(path), 4, 4, seed=0)


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("world_model", [True, False])
def test_forward_shapes_and_loss_keys(world_model):
    model = make_model(world_model=world_model)
    assert isinstance(model, GridIDT)
    batch, targets = make_batch()
    if not world_model:
        targets = {"target_action": targets["target_action"]}
    preds, losses = model.train()(batch, targets)
    assert preds["action_logits"].shape == (3, 40, 5) and preds["z_mean"].shape == (3, 4, 4)
    assert ("reward_logits" in preds) == world_model
    if world_model:
        assert preds["reward_logits"].shape == (3, 40, 2) and preds["next_obs_logits"].shape == (3, 40, 81)
        assert set(losses) == set(TRAIN_TAGS)
    losses["loss"].backward()
    for name in ("rd_obs.weight", "md_return.weight", "embed_z.weight", "head_action.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name   # all three modules learn end to end


def test_changing_a_later_transition_never_changes_an_earlier_output():
    model = make_model(seed=1).eval()
    batch, _ = make_batch(B=1)
    base = model(batch)[0]
    for t in (5, 19, 23):                                             # inside blocks 0, 1 and 2
        changed = {k: v.clone() for k, v in batch.items()}
        changed["ctx_action"][0, t] = (changed["ctx_action"][0, t] + 1) % 5
        changed["ctx_reward"][0, t] = 1 - changed["ctx_reward"][0, t]
        changed["ctx_next_obs"][0, t] = (changed["ctx_next_obs"][0, t] + 1) % 81
        out = model(changed)[0]
        torch.testing.assert_close(out["action_logits"][0, : t + 1], base["action_logits"][0, : t + 1])
        torch.testing.assert_close(out["reward_logits"][0, :t], base["reward_logits"][0, :t])
        assert not torch.allclose(out["action_logits"][0, t + 1:], base["action_logits"][0, t + 1:])


# ------------------------------------------------------------------------------------------ acting
def _drive(agent, episodes, N, seed, plan=None):
    """Random observations and outcomes; -> the per-step (obs, action, reward, next_obs, logits-or-action) lists."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(episodes):
        agent.start_episode()
        for _ in range(agent.horizon):
            obs = torch.randint(0, 9, (N, 2), generator=g)
            if plan is not None and agent.plan_ready:
                out = agent.plan_action(obs, **plan)
                action = out
            else:
                out = agent.action_logits(obs)
                action = torch.randint(0, 5, (N,), generator=g)
            reward, next_obs = torch.randint(0, 2, (N,), generator=g), torch.randint(0, 9, (N, 2), generator=g)
            agent.observe(action, reward, next_obs)
            steps.append((obs, action, reward, next_obs, out))
    return steps


def test_agent_acts_like_the_training_forward_on_the_same_window():
    """With decision means, the agent's logits over its first context_len steps equal the eval forward on them."""
    model = make_model(seed=5).eval()
    N, H = 3, 20
    target = torch.tensor([15.0, 9.0, 20.0])
    agent = GridIDTAgent(model, H, target, sample_decisions=False)
    steps = _drive(agent, 2, N, seed=11)
    cells = [o[:, 0] * 9 + o[:, 1] for o, *_ in steps]
    rtg_starts = agent.context_window()["return_to_go"]                          # (N, 4) blocks
    reward = torch.stack([s[2] for s in steps], 1)
    torch.testing.assert_close(rtg_starts[:, [0, 2]], target[:, None].expand(N, 2))
    torch.testing.assert_close(rtg_starts[:, 1], target - reward[:, :10].sum(1).float())
    torch.testing.assert_close(rtg_starts[:, 3], target - reward[:, 20:30].sum(1).float())
    batch = {"ctx_obs": torch.stack(cells, 1), "ctx_action": torch.stack([s[1] for s in steps], 1),
             "ctx_reward": reward, "ctx_next_obs": torch.stack([n[:, 0] * 9 + n[:, 1] for *_, n, _ in steps], 1),
             "ctx_return_to_go": rtg_starts.repeat_interleave(10, dim=1)}
    with torch.no_grad():
        expected = model(batch)[0]["action_logits"]
    torch.testing.assert_close(torch.stack([s[4] for s in steps], 1), expected, rtol=1e-5, atol=1e-5)


def test_agent_slides_a_time_ordered_window_of_blocks_and_restores_it():
    model = make_model(seed=2).eval()                                  # context 40 = 4 blocks
    agent = GridIDTAgent(model, 20, torch.full((2,), 12.0), generator=torch.Generator().manual_seed(7))
    steps = _drive(agent, 3, 2, seed=3)
    window = agent.context_window()
    starts = torch.stack([steps[t][0][:, 0] * 9 + steps[t][0][:, 1] for t in (20, 30, 40, 50)], 1)
    torch.testing.assert_close(window["obs"], starts)                 # the newest 4 blocks, oldest first
    assert window["z_dists"].shape == (2, 4, 8) and agent.num_finished == 3 and agent.plan_ready
    saved = agent.finished_episodes()
    _drive(agent, 1, 2, seed=4)
    agent.restore_finished(saved)
    torch.testing.assert_close(agent.context_window()["obs"], starts)
    assert agent.num_finished == 3 and agent.steps_taken == 60
    agent.restore_finished(None)                                      # back to no context
    assert agent.context_window()["obs"].shape == (2, 0) and not agent.plan_ready and agent.num_finished == 0
    with pytest.raises(ValueError, match="eval"):
        GridIDTAgent(model.train(), 20, torch.zeros(2))
    with pytest.raises(ValueError, match="multiple of block_len"):
        GridIDTAgent(model.eval(), 15, torch.zeros(2))


# ------------------------------------------------------------------------------------------ planning
@pytest.mark.parametrize("seed,beam_width", [(0, 1), (1, 3), (2, 10)])
def test_cached_and_reference_planners_choose_identical_actions(seed, beam_width):
    """DICP-IDT on random models: both modes take the same draws and choose the same actions, every step."""
    model = make_model(seed=seed, unit_scale=True, dtype=torch.float64, context_len=20).eval()
    runs = []
    for use_cache in (True, False):                                   # 2 episodes of 10 steps, then 1 planned
        agent = GridIDTAgent(model, 10, torch.full((3,), 5.0), generator=torch.Generator().manual_seed(seed))
        steps = _drive(agent, 3, 3, seed=seed + 10, plan={"beam_width": beam_width, "use_cache": use_cache})
        runs.append(torch.stack([s[1] for s in steps[20:]], 1))
    assert runs[0].shape == (3, 10)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_wide_beams_find_the_best_predicted_return_of_every_action_sequence():
    """With K >= A^depth the beam keeps every sequence: from step j = 1 of a 4-step block (depth 3) its first action
    must start a sequence of maximal predicted return, checked against an exhaustive search written independently
    (every imagined step re-encoded from `low_level_tokens`, so z of step j + d is the one at step j + d)."""
    model = make_model(seed=3, unit_scale=True, dtype=torch.float64, block_len=4, context_len=16).eval()
    g = torch.Generator().manual_seed(0)
    N, A, j, S = 32, 5, 1, 5 ** 3
    z = 4 * torch.randn(N, 4, 4, generator=g, dtype=torch.float64)          # large: z moves the argmaxes
    obs, a0, r0 = torch.randint(0, 81, (N, 2), generator=g), torch.randint(0, 5, (N, 1), generator=g), torch.ones(N, 1)
    prefix = model.low_level_tokens(z, obs, a0, r0)                                   # [z0, o0, a0, r0, z1, o1]
    action = beam_search(model, prefix, z, j, beam_width=S, generator=torch.Generator().manual_seed(1))
    seqs = torch.tensor(list(itertools.product(range(A), repeat=3)))                  # (S, 3), all sequences
    with torch.no_grad():
        for n in range(N):
            cells, acts, rewards, total = obs[n].expand(S, 2), a0[n].expand(S, 1), r0[n].expand(S, 1).long(), 0
            for d in range(3):
                acts = torch.cat([acts, seqs[:, d:d + 1]], dim=1)
                h = model.decisions_to_go(model.low_level_tokens(z[n].expand(S, 4, 4), cells, acts, rewards))[:, -1]
                r, c = model.reward_head(h).argmax(-1), model.next_obs_head(h).argmax(-1)
                total, rewards, cells = total + r, torch.cat([rewards, r[:, None]], 1), torch.cat([cells, c[:, None]], 1)
            best = torch.full((A,), -1).scatter_reduce(0, seqs[:, 0], total, "amax")  # per first action
            assert best[action[n]] == best.max(), (best, int(action[n]))


def test_dicp_idt_evaluates_in_plan_mode_on_darkroom(tmp_path):
    """A tiny random DICP-IDT checkpoint runs `dicp-ray evaluate`'s plan mode on Darkroom's test tasks."""
    from dicp_ray.evaluate.episodes import _check_compatible, evaluate_in_context

    config = config_from_dict({"env": {"name": "Darkroom", "max_test_tasks": 2},
                               "model": {"variant": "idt", "context_episodes": 2, "num_layers": 1, "num_heads": 2,
                                         "embed_dim": 16, "mlp_dim": 32},
                               "eval": {"num_episodes": 3, "modes": ["policy", "plan"]}, "plan": {"beam_width": 3}})
    model = make_model(seed=6, num_layers=1, world_model=True).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(str(path), model, extra={"variant": "idt", "env_name": "Darkroom", "split_seed": 0,
                                             "config": config.to_dict()})
    _check_compatible({"env_name": "Darkroom", "variant": "idt"}, model.spec, config, "plan", str(path))
    result = evaluate_in_context(str(path), config=config, mode="plan")
    returns = np.array(result["returns"])
    assert returns.shape == (2, 3) and np.all(returns >= 0)
    assert result["timing"]["planned_decisions"] == 2 * 20              # episode 3: context_len = 40 steps taken
    again = evaluate_in_context(str(path), config=config, mode="plan")
    assert again["returns"] == result["returns"]                    # deterministic for eval.seed


# ------------------------------------------------------------------------------------------ checkpoints, config
def test_checkpoint_round_trip_builds_the_grid_idt_class(tmp_path):
    model = make_model(seed=4).eval()
    path = tmp_path / "idt.pt"
    save_checkpoint(str(path), model, extra={"variant": "idt", "step": 3})
    loaded, payload = load_checkpoint(str(path))
    assert isinstance(loaded, GridIDT) and not loaded.training and loaded.spec == model.spec
    batch, _ = make_batch()
    with torch.no_grad():
        for key in ("action_logits", "reward_logits", "next_obs_logits", "z_mean"):
            torch.testing.assert_close(loaded(batch)[0][key], model(batch)[0][key], rtol=0, atol=0)
    old = dict(payload, state_dict={"embed_decision.weight": torch.zeros(1)})   # the earlier grid IDT's weights
    torch.save(old, path)
    with pytest.raises(ValueError, match="earlier per-window grid IDT"):
        load_checkpoint(str(path))


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


def test_darkroom_idt_config_is_the_releases_and_plans():
    config = load_config(REPO / "tune_configs" / "darkroom_idt.yaml")
    assert (config.model.variant, config.train.lr, config.train.batch_size) == ("idt", 1e-2, 1024)
    assert config.eval.modes == ("policy", "plan") and config.model.world_model and config.context_len == 80


def test_run_identity_marks_the_grid_idt_format():
    from dicp_ray.train.runs import run_identity

    idt = config_from_dict({"model": {"variant": "idt"}}).to_dict()
    ad = config_from_dict({}).to_dict()
    assert run_identity(idt, 0, "d")["idt_format"] == "release-history-windows-v1"
    assert "idt_format" not in run_identity(ad, 0, "d")
