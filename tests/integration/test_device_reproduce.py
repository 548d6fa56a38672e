"""scripts/device_reproduce.sh --smoke (issue #23): a reproduce table's IDT rows at tiny sizes on this CPU, with Ray,
metaworld and MuJoCo unimportable (as on the bare GPU box), from a dataset collected here and carried as a .tar.xz;
checked through the one file that comes back."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import without_packages

ROOT = Path(__file__).resolve().parents[2]
SMOKE_DATA = ["env.max_train_tasks=4", "env.max_test_tasks=2", "collect.env_steps_per_task=200",
              "collect.num_streams=2"]  # the sizes of device_reproduce.sh --smoke


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """The smoke dataset collected here, and the environment of a bare GPU box (no Ray, metaworld, MuJoCo)."""
    root = tmp_path_factory.mktemp("device_reproduce")
    env = {**without_packages(root / "shadow"), "PYTHON": sys.executable}
    done = subprocess.run([sys.executable, "-m", "dicp_ray.cli", "collect", "--config", "tune_configs/smoke.yaml",
                           "--backend", "local", "--output", str(root / "here"), "--set", *SMOKE_DATA],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / "here" / "dataset", env


def _carry(dataset: Path, path: Path, damage: bool = False) -> Path:
    with tarfile.open(path, "w:xz") as tar:
        tar.add(dataset, arcname="dataset")
        if damage:  # one shard's bytes changed, its sidecar's sha256 kept
            shard = sorted((dataset / "shards").glob("*.arrow"))[0]
            data = bytearray(shard.read_bytes())
            data[100] ^= 0xFF
            info = tar.gettarinfo(shard, arcname=f"dataset/shards/{shard.name}")
            tar.addfile(info, io.BytesIO(bytes(data)))
    return path


def _device_reproduce(env: dict, tmp_path: Path, carried: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "device_reproduce.sh"), "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**env, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
                                                       "REPRODUCE_DATASET": str(carried)})


def test_smoke_rows_from_a_carried_dataset_come_back_as_one_archive(collected, tmp_path):
    dataset, env = collected
    done = _device_reproduce(env, tmp_path, _carry(dataset, tmp_path / "dataset.tar.xz"))
    out = tmp_path / "out"
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "already a complete dataset of 6 tasks: nothing to collect" in log       # the carried bytes, not a collection
    assert sorted(p.name for p in out.iterdir()) == ["device_reproduce.log", "runs.tgz"]
    with tarfile.open(out / "runs.tgz") as tar:
        names = set(tar.getnames())
        manifest = tar.extractfile("smoke/data/dataset/manifest.json").read()
    assert manifest == (dataset / "manifest.json").read_bytes()
    assert not any("/shards" in name for name in names)
    assert not any(name.endswith(("run.json", ".pipeline.lock")) for name in names)   # the box's config stays there
    for run in ("idt_base", "idt_dicp"):
        split = f"smoke/{run}/train/split_0"
        assert {f"{split}/model.pt", f"{split}/checkpoints/checkpoint_00000006/state.pt"} <= names
        assert not any(name.startswith(f"{split}/checkpoints/checkpoint_00000003") for name in names)  # newest only
        assert f"smoke/{run}/eval/summary.json" in names
    assert "smoke/idt_dicp/eval/split_0/plan/results.json" in names


def test_a_damaged_carried_dataset_is_refused_before_training(collected, tmp_path):
    dataset, env = collected
    done = _device_reproduce(env, tmp_path, _carry(dataset, tmp_path / "damaged.tar.xz", damage=True))
    assert done.returncode != 0
    assert "do not match their sha256: the carried dataset is damaged" in done.stdout + done.stderr
    assert not (tmp_path / "work" / "runs" / "smoke" / "idt_base").exists()  # nothing trained on it


def test_models_trained_on_the_box_are_reused_by_the_next_run(collected, tmp_path):
    """REPRODUCE_STAGE=train (Meta-World's way: no MuJoCo there), the archive unpacked where the runs live, then the
    full reproduction: it trains nothing and evaluates the box's models."""
    dataset, env = collected
    carried = _carry(dataset, tmp_path / "dataset.tar.xz")
    done = _device_reproduce({**env, "REPRODUCE_STAGE": "train"}, tmp_path / "box", carried)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "REPRODUCE_STAGE=train: models trained" in done.stdout
    with tarfile.open(tmp_path / "box" / "out" / "runs.tgz") as tar:
        assert not any("/eval/" in name for name in tar.getnames())
        tar.extractall(tmp_path / "here" / "work" / "runs", filter="data")
    trained = {run: (tmp_path / "here" / "work" / "runs" / "smoke" / run / "train" / "split_0" / "model.pt").read_bytes()
               for run in ("idt_base", "idt_dicp")}
    done = _device_reproduce(env, tmp_path / "here", carried)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    runs = tmp_path / "here" / "work" / "runs" / "smoke"
    for run, model in trained.items():
        assert (runs / run / "train" / "split_0" / "model.pt").read_bytes() == model      # reused, not retrained
        assert (runs / run / "eval" / "summary.json").is_file() and (runs / run / "run.json").is_file()
