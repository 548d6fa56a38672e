"""Ray Train distillation (dicp_ray.train) on a tiny real Darkroom dataset.

The dataset holds 6 tasks (4 train + 2 test tasks of split seed 0) x 2 streams x 10 episodes of the real
env, acted by a policy that mixes random and oracle actions (more oracle in later episodes, like a
learner). The first tests run without Ray; the TorchTrainer runs use 2 CPU workers, a 1-layer model and
20-40 steps (about 20-35 s each on 2 cores).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dicp_ray.collect.scripted import write_scripted_dataset
from dicp_ray.config.load import config_from_dict
from dicp_ray.config.schema import ConfigError, ExperimentConfig
from dicp_ray.data import history
from dicp_ray.envs import cell_index, split_tasks
from dicp_ray.models.checkpoints import load_checkpoint
from dicp_ray.models.transformer import DICPTransformer
from dicp_ray.train.batches import model_spec_from_config, windows_to_batch
from dicp_ray.train.launch import train_model
from dicp_ray.train.runs import CRASH_ENV_VAR
from dicp_ray.train.step import build_optimizer, train_step

NUM_STREAMS, NUM_EPISODES = 2, 10
TRAIN_IDS, TEST_IDS = split_tasks("Darkroom", 0)


def _tiny_config(model: dict | None = None, **train) -> ExperimentConfig:
    return config_from_dict({
        "env": {"name": "Darkroom"},
        "model": {"context_episodes": 2, "num_layers": 1, "num_heads": 2, "embed_dim": 16, "mlp_dim": 32,
                  "dropout": 0.0, "attn_dropout": 0.0, **(model or {})},
        "train": {"num_steps": 20, "batch_size": 16, "lr": 3e-3, "num_workers": 2, "log_every_steps": 5,
                  "checkpoint_every_steps": 10, "eval_batches": 1, **train},
        "resources": {"num_cpus": 2}})


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    task_ids = sorted(TRAIN_IDS[:4] + TEST_IDS[:2])
    path = str(tmp_path_factory.mktemp("train_data") / "dataset")
    write_scripted_dataset(path, "Darkroom", task_ids, NUM_STREAMS, NUM_EPISODES, fingerprint="test")
    return path


@pytest.fixture
def fast_reports(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # Train V2 copies it to its controller


# ------------------------------------------------------------------------------------------ no Ray
def _windows(batch_size: int = 3, k: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    cells = rng.integers(0, 9, (2, batch_size, k, 2)).astype(np.float32)
    return {"obs": cells[0], "action": rng.integers(0, 5, (batch_size, k)), "next_obs": cells[1],
            "reward": rng.integers(0, 2, (batch_size, k)).astype(np.float32),
            "optimal_action": rng.integers(0, 5, (batch_size, k)), "task_id": np.arange(batch_size)}


@pytest.mark.parametrize("layout", ["ad", "dpt"])
def test_windows_to_batch_splits_context_and_query(layout):
    w = _windows()
    batch, targets = windows_to_batch(w, layout, world_model=True)
    assert batch["ctx_obs"].shape == (3, 4, 2) and batch["ctx_obs"].dtype == torch.float32
    assert batch["ctx_action"].shape == (3, 4) and batch["ctx_action"].dtype == torch.long
    assert batch["ctx_reward"].shape == (3, 4) and batch["ctx_next_obs"].shape == (3, 4, 2)
    np.testing.assert_array_equal(batch["ctx_next_obs"].numpy(), w["next_obs"][:, :-1])
    np.testing.assert_array_equal(batch["query_obs"].numpy(), w["obs"][:, -1])
    np.testing.assert_array_equal(batch["query_action"].numpy(), w["action"][:, -1])
    if layout == "ad":  # the action the source took in the query state
        np.testing.assert_array_equal(targets["target_action"].numpy(), w["action"][:, -1])
    else:  # a* of the query state after each of the T = 4 context transitions (the release's positions)
        np.testing.assert_array_equal(targets["target_action"].numpy(),
                                      np.repeat(w["optimal_action"][:, -1:], 4, axis=1))
    np.testing.assert_array_equal(targets["target_reward"].numpy(), w["reward"][:, -1].astype(int))
    np.testing.assert_array_equal(targets["target_next_obs"].numpy(), cell_index(w["next_obs"][:, -1]))
    assert all(t.dtype == torch.long for t in targets.values())


def test_windows_to_batch_without_world_model_has_no_query_action():
    batch, targets = windows_to_batch(_windows(), "ad", world_model=False)
    assert "query_action" not in batch and set(targets) == {"target_action"}


@pytest.mark.parametrize("variant", ["ad", "dpt"])
def test_loss_falls_in_process(dataset_dir, variant, one_thread):
    config = _tiny_config(model={"variant": variant}, num_steps=60, lr=1e-2)
    dataset = history.HistoryDataset.open(dataset_dir, task_ids=TRAIN_IDS[:4])
    spec = model_spec_from_config(config, dataset)
    assert (spec.obs_dim, spec.num_actions, spec.context_len, spec.obs_scale) == (2, 5, 40, 1.0)  # raw cells
    assert (spec.obs_embedding, spec.backbone) == ("cell" if variant == "ad" else "transition", "release")
    assert (spec.num_obs_classes, spec.reward_classes, spec.layout) == (81, 2, variant)
    torch.manual_seed(0)
    model = DICPTransformer(spec)
    optimizer, scheduler = build_optimizer(model, config.train)
    sampler = history.WindowSampler(dataset, config.context_len, seed=0)
    losses = []
    for _ in range(config.train.num_steps):
        batch, targets = windows_to_batch(sampler.sample(32), spec.layout, spec.world_model)
        losses.append(float(train_step(model, optimizer, scheduler, batch, targets, config.train)["loss"]))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses  # measured: 0.53-0.70
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # cosine decayed to 0


def test_use_gpu_without_cuda_fails_before_ray(dataset_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="use_gpu"):
        train_model(_tiny_config(use_gpu=True), dataset_dir, str(tmp_path / "out"), 0)
    assert not (tmp_path / "out").exists()


def test_dataset_of_another_env_is_refused_before_ray(dataset_dir, tmp_path):
    config = config_from_dict({**_tiny_config().to_dict(), "env": {"name": "DarkroomPermuted"},
                               "model": {"context_episodes": 1}})
    with pytest.raises(ConfigError, match="env.name"):
        train_model(config, dataset_dir, str(tmp_path / "out"), 0)


# ------------------------------------------------------------------------------------------ Ray Train
@pytest.fixture(scope="module")
def trained_run(ray_local, dataset_dir, tmp_path_factory):
    """One real 2-worker run of 20 steps -> (output dir, its model.pt, a copy of the step-20 model.pt)."""
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    out = tmp_path_factory.mktemp("train_run") / "split_0"
    path = train_model(_tiny_config(), dataset_dir, str(out), split_seed=0)
    snapshot = out.parent / "model_step20.pt"
    snapshot.write_bytes(open(path, "rb").read())
    return out, path, snapshot


def _final_state(out) -> dict:
    checkpoints = sorted((out / "ray_train").glob("*/checkpoint_*/state.pt"))
    return torch.load(checkpoints[-1], map_location="cpu", weights_only=True)


@pytest.mark.ray
def test_two_worker_run_writes_self_describing_model_and_tensorboard(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, path, snapshot = trained_run
    assert path == str(out / "model.pt")
    model, payload = load_checkpoint(str(snapshot))
    assert (payload["step"], payload["env_name"], payload["split_seed"]) == (20, "Darkroom", 0)
    assert payload["variant"] == "ad" and payload["world_model"] is True and payload["resumed_at_steps"] == []
    assert len(payload["dataset_id"]) == 64 and payload["config"]["train"]["num_workers"] == 2
    assert payload["provenance"]["versions"]["torch"] and payload["run_identity"]["split_seed"] == 0
    assert payload["train_task_ids"] == TRAIN_IDS[:4] and payload["test_task_ids"] == TEST_IDS
    assert model.spec.context_len == 40 and model.spec.layout == "ad"
    tb = EventAccumulator(str(out / "tb"))
    tb.Reload()
    expected = {f"train/{k}" for k in ("loss", "loss_action", "loss_reward", "loss_next_obs", "acc_action",
                                       "acc_reward", "acc_next_obs", "lr", "samples_per_s", "tokens_per_s")}
    expected |= {"heldout/loss", "heldout/acc_action", "heldout/acc_reward", "heldout/acc_next_obs"}
    assert expected <= set(tb.Tags()["scalars"]), expected - set(tb.Tags()["scalars"])
    assert [e.step for e in tb.Scalars("train/loss")][:4] == [5, 10, 15, 20]
    assert [e.step for e in tb.Scalars("heldout/loss")][:2] == [10, 20]


@pytest.mark.ray
def test_rerun_of_a_finished_config_reuses_model_without_ray(trained_run, dataset_dir):
    out, path, _ = trained_run
    config = _tiny_config(num_steps=load_checkpoint(path)[1]["step"])
    mtime = os.path.getmtime(path)
    assert train_model(config, dataset_dir, str(out), split_seed=0) == path
    assert os.path.getmtime(path) == mtime
    os.remove(path)  # the finished Ray run still holds it: copied back, no training
    assert train_model(config, dataset_dir, str(out), split_seed=0) == path
    assert load_checkpoint(path)[1]["step"] == config.train.num_steps


@pytest.mark.ray
def test_output_dir_of_another_config_or_fewer_steps_is_refused(trained_run, dataset_dir):
    out, _, _ = trained_run
    for other in (_tiny_config(model={"embed_dim": 32}), _tiny_config(lr=1e-3)):
        with pytest.raises(ConfigError, match="different config"):
            train_model(other, dataset_dir, str(out), split_seed=0)
    with pytest.raises(ConfigError, match="raise train.num_steps"):
        train_model(_tiny_config(num_steps=5), dataset_dir, str(out), split_seed=0)


@pytest.mark.ray
def test_more_steps_resume_the_run_with_optimizer_state(trained_run, dataset_dir, fast_reports):
    out, _, _ = trained_run
    assert _final_state(out)["step"] == 20
    path = train_model(_tiny_config(num_steps=40), dataset_dir, str(out), split_seed=0)
    _, payload = load_checkpoint(path)
    assert payload["step"] == 40 and payload["resumed_at_steps"] == [20]
    state = _final_state(out)
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {40.0}  # 20 restored + 20 new; a fresh optimizer would count 20
    assert state["scheduler"]["last_epoch"] == 40


@pytest.mark.ray
def test_crash_mid_training_resumes_from_last_checkpoint(ray_local, dataset_dir, tmp_path, fast_reports,
                                                         monkeypatch):
    monkeypatch.setenv(CRASH_ENV_VAR, "15")  # read by train_model, passed to the ranks
    out = tmp_path / "split_0"
    path = train_model(_tiny_config(), dataset_dir, str(out), split_seed=0)
    _, payload = load_checkpoint(path)
    assert payload["step"] == 20 and payload["resumed_at_steps"] == [10]  # FailureConfig retry from step 10
    assert (out / "ray_train" / ".test_crash_at_15").exists()
    assert {float(s["step"]) for s in _final_state(out)["optimizer"]["state"].values()} == {20.0}


# ------------------------------------------------------------------------------------------ local backend, groups
def _local(**train) -> ExperimentConfig:
    return _tiny_config(backend="local", num_workers=1, **train)


def _weights(path) -> dict:
    return load_checkpoint(str(path))[0].state_dict()


def test_local_group_resumes_after_a_crash_and_equals_a_lone_run(dataset_dir, tmp_path, one_thread, monkeypatch):
    """Two runs trained as one group in this process (no Ray): a crash at step 15 and a re-run continue every
    member from its step-10 checkpoint; each member then equals the same run trained alone (dropout 0)."""
    from dicp_ray.train.launch import train_models

    config = _local(models_per_process=2)
    runs = [(str(tmp_path / "a"), 0), (str(tmp_path / "b"), 0)]
    monkeypatch.setenv(CRASH_ENV_VAR, "15")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_models(config, dataset_dir, runs)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("checkpoint_*")) == ["checkpoint_00000010"]
    paths = train_models(config, dataset_dir, runs)
    monkeypatch.delenv(CRASH_ENV_VAR)
    for path in paths:
        _, payload = load_checkpoint(path)
        assert payload["step"] == 20 and payload["resumed_at_steps"] == [10]
        assert "2 model(s) per process" in payload["provenance"]["trainer"]
    state = torch.load(tmp_path / "a" / "checkpoints" / "checkpoint_00000020" / "state.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {20.0}
    lone = train_models(_local(), dataset_dir, [(str(tmp_path / "lone"), 0)])[0]
    for key, value in _weights(lone).items():
        torch.testing.assert_close(_weights(paths[0])[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_weights(paths[1])[key], value, rtol=1e-5, atol=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "b" / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")][-2:] == [15, 20]
    assert [e.step for e in tb.Scalars("heldout/loss")][-1] == 20  # (the resume purges steps >= 10 of the crashed run)
    mtime = os.path.getmtime(paths[0])  # a re-run of a finished group trains nothing
    assert train_models(config, dataset_dir, runs) == paths and os.path.getmtime(paths[0]) == mtime


@pytest.mark.ray
def test_group_under_ray_train_equals_the_local_loop(ray_local, dataset_dir, tmp_path, fast_reports):
    """The same loop in a Ray Train worker: a group of 2 there trains each member to the local lone result."""
    from dicp_ray.train.launch import train_models

    runs = [(str(tmp_path / "ray" / "split_0"), 0), (str(tmp_path / "ray" / "split_0b"), 0)]
    paths = train_models(_tiny_config(num_workers=1, models_per_process=2), dataset_dir, runs)
    assert sorted(p.name for p in (tmp_path / "ray" / "ray_train").iterdir()) == ["train_group_split_0_split_0b"]
    lone = train_models(_local(), dataset_dir, [(str(tmp_path / "lone"), 0)])[0]
    for path in paths:
        _, payload = load_checkpoint(path)
        assert payload["step"] == 20 and payload["split_seed"] == 0
        for key, value in _weights(lone).items():
            torch.testing.assert_close(_weights(path)[key], value, rtol=1e-5, atol=1e-6)


def test_cli_trains_all_split_seeds_in_one_local_process(dataset_dir, tmp_path, one_thread, capsys):
    """`dicp-ray train --backend local --models-per-process 2`: both split seeds' models from one group, no Ray."""
    import shutil

    import yaml

    from dicp_ray.cli import main

    out = tmp_path / "run"
    shutil.copytree(dataset_dir, out / "dataset")
    config = _tiny_config().to_dict()
    config["env"]["split_seeds"] = [0, 1]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config))))
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--output", str(out), "--backend", "local",
                 "--models-per-process", "2", "--set", "train.num_workers=1"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "train" / f"split_{s}" / "model.pt") for s in (0, 1)]
    for seed in (0, 1):
        _, payload = load_checkpoint(printed[seed])
        assert payload["split_seed"] == seed and payload["step"] == 20
        assert "2 model(s) per process" in payload["provenance"]["trainer"]
    assert not (out / "train" / "ray_train").exists()


def test_deadline_stops_cleanly_evaluates_and_a_rerun_continues(dataset_dir, tmp_path, one_thread):
    """train.deadline_unix_s in the past: the loop takes one step, checkpoints it and writes model.pt marked as
    stopped (evaluable, its fraction of num_steps in the summary); a re-run without deadline continues it to
    num_steps and ends where an uninterrupted run ends."""
    from dicp_ray.evaluate.launch import run_evaluations
    from dicp_ray.train.launch import train_models

    runs = [(str(tmp_path / "a"), 0), (str(tmp_path / "b"), 0)]
    stopped = train_models(_local(models_per_process=2, deadline_unix_s=1.0), dataset_dir, runs)
    for path in stopped:
        _, payload = load_checkpoint(path)
        assert payload["step"] == 1 and payload["stopped_at_deadline"] and payload["num_steps"] == 20
    assert [p.name for p in (tmp_path / "a" / "checkpoints").glob("checkpoint_*")] == ["checkpoint_00000001"]
    config = config_from_dict({**_local().to_dict(), "env": {"name": "Darkroom", "max_test_tasks": 2},
                               "eval": {"num_episodes": 2, "modes": ["policy"], "backend": "local",
                                        "device": "cpu"}})
    summary = run_evaluations(config, {0: stopped[0]}, str(tmp_path / "eval"))
    assert summary["methods"]["policy"]["training"]["0"] == {"step": 1, "num_steps": 20, "fraction": 0.05,
                                                              "stopped_at_deadline": True}
    finished = train_models(_local(models_per_process=2), dataset_dir, runs)       # no deadline: continues
    _, payload = load_checkpoint(finished[0])
    assert payload["step"] == 20 and payload["resumed_at_steps"] == [1] and not payload["stopped_at_deadline"]
    lone = train_models(_local(), dataset_dir, [(str(tmp_path / "lone"), 0)])[0]
    for key, value in _weights(lone).items():
        torch.testing.assert_close(_weights(finished[0])[key], value, rtol=1e-5, atol=1e-6)


def test_windows_gathered_on_the_device_train_the_same_model(dataset_dir, tmp_path, one_thread):
    """train.sample_on_device (the CUDA default) on CPU tensors: the same windows, so the same weights as the host
    sampler."""
    from dicp_ray.train.launch import train_models

    host = train_models(_local(), dataset_dir, [(str(tmp_path / "host"), 0)])[0]
    device = train_models(_local(sample_on_device=True), dataset_dir, [(str(tmp_path / "device"), 0)])[0]
    for key, value in _weights(host).items():
        torch.testing.assert_close(_weights(device)[key], value, rtol=0, atol=0)
