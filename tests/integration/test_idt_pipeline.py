"""Grid IDT end to end on a tiny real Darkroom dataset: release windows, falling loss, Ray Train, IDT and DICP-IDT.

The dataset holds 6 tasks (4 train + 2 test tasks of split seed 0) x 2 streams x 10 episodes acted by the
scripted epsilon-oracle learner (dicp_ray.collect.scripted). The in-process test needs no Ray; the Ray Train run uses
1 CPU worker, a 1-layer model and 10 steps (15-40 s on a busy 2-core box, mostly Ray start-up), then
`evaluate_in_context` acts on all 8 test goals in policy and plan mode (DICP-IDT). (Every IDT parameter gets a gradient, so DDP with
several workers needs no find_unused_parameters: tests/unit/test_idt.py.)
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dicp_ray.collect.scripted import write_scripted_dataset
from dicp_ray.config.load import config_from_dict
from dicp_ray.config.schema import ExperimentConfig
from dicp_ray.data import history
from dicp_ray.data.idt_windows import HistoryWindowSampler
from dicp_ray.envs import split_tasks
from dicp_ray.evaluate.episodes import evaluate_in_context
from dicp_ray.models.checkpoints import build_model, load_checkpoint
from dicp_ray.models.idt_grid import GridIDT
from dicp_ray.train.batches import make_window_sampler, model_spec_from_config, windows_to_batch
from dicp_ray.train.launch import train_model
from dicp_ray.train.step import build_optimizer, train_step

TRAIN_IDS, TEST_IDS = split_tasks("Darkroom", 0)


def _config(model: dict | None = None, **train) -> ExperimentConfig:
    return config_from_dict({
        "env": {"name": "Darkroom"},
        "model": {"variant": "idt", "context_episodes": 2, "num_layers": 1, "num_heads": 2, "embed_dim": 16,
                  "mlp_dim": 32, "dropout": 0.0, "attn_dropout": 0.0, **(model or {})},
        "train": {"num_steps": 10, "batch_size": 16, "lr": 3e-3, "num_workers": 1, "log_every_steps": 5,
                  "checkpoint_every_steps": 10, "eval_batches": 1, **train},
        "eval": {"num_episodes": 3, "modes": ["policy"]},
        "resources": {"num_cpus": 2}})


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("idt_data") / "dataset")
    write_scripted_dataset(path, "Darkroom", sorted(TRAIN_IDS[:4] + TEST_IDS[:2]), 2, 10, fingerprint="idt")
    return path


@pytest.mark.parametrize("world_model", [True, False])
def test_loss_falls_in_process(dataset_dir, world_model, one_thread):
    config = _config(model={"world_model": world_model}, num_steps=40, lr=1e-2)
    dataset = history.HistoryDataset.open(dataset_dir, task_ids=TRAIN_IDS[:4])
    spec = model_spec_from_config(config, dataset)
    assert (spec.layout, spec.context_len, spec.block_len, spec.return_scale) == ("idt", 40, 10, 1.0)
    sampler = make_window_sampler(config, dataset, seed=0)
    assert isinstance(sampler, HistoryWindowSampler)
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer, scheduler = build_optimizer(model, config.train)
    losses = []
    for _ in range(config.train.num_steps):
        windows = sampler.sample(32)
        assert set(windows["task_id"].tolist()) <= set(TRAIN_IDS[:4])
        batch, targets = windows_to_batch(windows, spec.layout, spec.world_model)
        losses.append(train_step(model, optimizer, scheduler, batch, targets, config.train))
    def mean(key, steps):
        return np.mean([float(l[key]) for l in steps])

    # The scripted learner acts at random with probability 1 - episode/10, so the action loss cannot go far
    # below ~1.2 nats (measured: 1.61 = ln 5 at the start, ~1.25 after 40 steps); the world-model losses can.
    assert mean("loss_action", losses[-5:]) < 0.85 * np.log(5), [float(l["loss_action"]) for l in losses]
    assert mean("acc_action", losses[-5:]) > 0.4                   # 5 actions: chance is 0.2
    if world_model:
        assert mean("loss", losses[-5:]) < 0.8 * mean("loss", losses[:5])   # measured: 0.65-0.7
    assert ("acc_next_obs" in losses[-1]) == world_model


@pytest.fixture(scope="module")
def trained_idt(ray_local, dataset_dir, tmp_path_factory):
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    out = tmp_path_factory.mktemp("idt_run") / "split_0"
    return out, train_model(_config(), dataset_dir, str(out), split_seed=0)


@pytest.mark.ray
def test_ray_train_writes_an_idt_checkpoint_and_policy_mode_evaluates_it(trained_idt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, path = trained_idt
    model, payload = load_checkpoint(path)
    assert isinstance(model, GridIDT) and model.spec.layout == "idt" and model.spec.world_model
    assert payload["variant"] == "idt" and payload["step"] == 10 and payload["test_task_ids"] == TEST_IDS
    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    assert {"train/loss", "train/acc_next_obs", "heldout/loss", "heldout/acc_next_obs"} <= set(tb.Tags()["scalars"])
    result = evaluate_in_context(path, output_dir=str(tmp_path / "eval"), mode="policy")
    returns = np.array(result["returns"])
    assert returns.shape == (8, 3) and np.all(returns >= 0)
    assert np.all(returns <= np.array(result["oracle_max_returns"])[:, None])
    assert (result["variant"], result["label"], result["mode"]) == ("idt", "IDT + world model (policy)", "policy")
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["returns"] == result["returns"] and (tmp_path / "eval" / "returns.csv").exists()
    again = evaluate_in_context(path, mode="policy")                # deterministic for eval.seed
    assert again["returns"] == result["returns"]
    planned = evaluate_in_context(path, mode="plan")                # DICP-IDT from episode 3 (k = 40 steps)
    assert np.array(planned["returns"]).shape == (8, 3) and planned["timing"]["planned_decisions"] == 8 * 20
