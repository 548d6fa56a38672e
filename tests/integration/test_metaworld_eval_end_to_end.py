"""End to end: `dicp-ray mw-eval` scores tiny ML1 reach checkpoints (AD, and IDT) with metaworld.evaluation's
metalearning_evaluation (real MuJoCo) in policy and plan mode, prints its table and writes strict JSON."""
from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("mode", ["policy", "plan"])
def test_mw_eval_runs_metalearning_evaluation_end_to_end(mode, tmp_path, capsys, tiny_meta_world_checkpoints,
                                                         one_thread):
    from dicp_ray.cli import main

    out = tmp_path / "mw_eval.json"
    code = main(["mw-eval", "--checkpoint", tiny_meta_world_checkpoints["world_model"], "--mode", mode,
                 "--num-evals", "2", "--adaptation-episodes", "2", "--evaluation-episodes", "2",
                 "--meta-batch-size", "2", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "reach-v3" in printed and "mean over tasks" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    assert result["format"] == "dicp_ray.mw_eval" and result["mode"] == mode and result["split_seed"] == 0
    assert 0.0 <= result["success_mean"] <= 1.0 and result["return_mean"] >= 0
    assert set(result["success_per_task"]) == {"reach-v3"}
    assert 0.0 <= result["success_per_task"]["reach-v3"] <= 1.0
    rounds = result["task_ids_per_round"]                        # pseudorandom: new goals every round
    assert len(rounds) == 2 and len({i for ids in rounds for i in ids}) == 4
    assert all(50 <= i < 100 for ids in rounds for i in ids)     # ML1 test ids of split seed 0
    settings = result["settings"]
    assert (settings["meta_batch_size"], settings["adaptation_episodes"], settings["evaluation_episodes"]) == (2, 2, 2)
    # Meta-World's default world model predicts rewards only (no next-obs head): an episode's last transition
    # repeats its observation
    assert settings["eval_reward"] == "predicted" and settings["final_obs"] == "repeated obs"
    assert "biased upwards" in result["notes"][0]                 # 2 envs per task class
    timing = result["timing"]
    assert timing["decisions"] >= 2 * 2 * 2 * 100                 # 2 rounds x 2 envs x 200 adaptation steps
    # k = 200 transitions precede every evaluation step (none of the adaptation's): planning runs in all of them
    assert timing["planned_decisions"] == (timing["decisions"] - 2 * 2 * 200 if mode == "plan" else 0)
    print(f"{mode}: success {result['success_mean']:.3f} return {result['return_mean']:.2f} "
          f"decisions {timing['decisions']} planned {timing['planned_decisions']} wall {timing['wall_s']:.1f} s")


@pytest.mark.parametrize("mode", ["policy", "plan"])
def test_mw_eval_scores_a_continuous_idt_checkpoint(mode, tmp_path, capsys, tiny_meta_world_idt_checkpoints,
                                                    one_thread):
    """The same for IDT (one IDTAgent per env): one env, 2 rounds of 2 adaptation and 2 evaluation episodes."""
    from dicp_ray.cli import main
    from dicp_ray.models.checkpoints import load_checkpoint

    path, out = tiny_meta_world_idt_checkpoints["world_model"], tmp_path / "mw_eval.json"
    code = main(["mw-eval", "--checkpoint", path, "--mode", mode, "--num-evals", "2", "--adaptation-episodes", "2",
                 "--evaluation-episodes", "2", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "reach-v3" in printed and f"wrote {out}" in printed
    result = json.loads(out.read_text())
    assert result["variant"] == "idt" and result["mode"] == mode and result["notes"] == []
    assert result["idt_return_target"] == load_checkpoint(path)[0].spec.return_target
    assert 0.0 <= result["success_mean"] <= 1.0 and 0.0 <= result["success_per_task"]["reach-v3"] <= 1.0
    assert result["return_mean"] >= 0 and result["settings"]["meta_batch_size"] == 1
    settings = result["settings"]
    assert settings["eval_reward"] == "predicted" and settings["final_obs"] == "repeated obs"
    rounds = result["task_ids_per_round"]
    assert len(rounds) == 2 and all(len(ids) == 1 and 50 <= ids[0] < 100 for ids in rounds)
    timing = result["timing"]
    assert timing["decisions"] >= 2 * 2 * 100 + 2 * 2               # adaptation + at least 1 step per evaluation
    # the release's rule: blocks that start once k = 200 steps were taken: none of a round's 2 adaptation episodes,
    # every evaluation step (the checkpoint's plan.second_half_only is false)
    assert timing["planned_decisions"] == (timing["decisions"] - 2 * 200 if mode == "plan" else 0)
    print(f"IDT {mode}: success {result['success_mean']:.3f} return {result['return_mean']:.2f} "
          f"decisions {timing['decisions']} planned {timing['planned_decisions']} wall {timing['wall_s']:.1f} s")
