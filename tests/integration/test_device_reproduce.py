"""scripts/device_reproduce.sh --smoke (issue #23): a reproduce table's IDT rows at tiny sizes on this CPU, with Ray,
metaworld and MuJoCo unimportable (as on the bare GPU box), from a dataset collected here and carried as a .tar.xz;
checked through the one file that comes back."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from tests.conftest import without_packages

ROOT = Path(__file__).resolve().parents[2]
SMOKE_DATA = ["env.max_train_tasks=4", "env.max_test_tasks=2", "collect.env_steps_per_task=200",
              "collect.num_streams=2"]  # the sizes of device_reproduce.sh --smoke


def test_smoke_rows_from_a_carried_dataset_come_back_as_one_archive(tmp_path):
    env = {**without_packages(tmp_path / "shadow"), "PYTHON": sys.executable}
    collected = subprocess.run([sys.executable, "-m", "dicp_ray.cli", "collect", "--config", "tune_configs/smoke.yaml",
                                "--backend", "local", "--output", str(tmp_path / "here"), "--set", *SMOKE_DATA],
                               env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    carried = tmp_path / "dataset.tar.xz"
    with tarfile.open(carried, "w:xz") as tar:
        tar.add(tmp_path / "here" / "dataset", arcname="dataset")

    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([str(ROOT / "scripts" / "device_reproduce.sh"), "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**env, "OUT": str(out), "WORK": str(work), "REPRODUCE_DATASET": str(carried)})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "already a complete dataset of 6 tasks: nothing to collect" in log       # the carried bytes, not a collection
    assert sorted(p.name for p in out.iterdir()) == ["device_reproduce.log", "runs.tgz"]
    with tarfile.open(out / "runs.tgz") as tar:
        names = set(tar.getnames())
        manifest = tar.extractfile("smoke/data/dataset/manifest.json").read()
    assert manifest == (tmp_path / "here" / "dataset" / "manifest.json").read_bytes()
    assert not any("/shards" in name for name in names)
    for run in ("idt_base", "idt_dicp"):
        split = f"smoke/{run}/train/split_0"
        assert {f"{split}/model.pt", f"{split}/checkpoints/checkpoint_00000006/state.pt"} <= names
        assert not any(name.startswith(f"{split}/checkpoints/checkpoint_00000003") for name in names)  # newest only
        assert f"smoke/{run}/eval/summary.json" in names
    assert "smoke/idt_dicp/eval/split_0/plan/results.json" in names
