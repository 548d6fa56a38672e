"""Every stage without Ray (issue #25): collect.backend, train.backend and eval.backend local, in a subprocess
where ``import ray`` (and metaworld, mujoco) raises ImportError, as on a bare GPU box."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import without_packages

ROOT = Path(__file__).resolve().parents[2]
TINY = {"name": "no_ray",
        "env": {"name": "Darkroom", "split_seeds": [0, 1], "max_train_tasks": 2, "max_test_tasks": 1},
        "collect": {"num_streams": 4, "rollout_steps": 20, "minibatch_size": 40, "num_epochs": 2,
                    "env_steps_per_task": 240},
        "model": {"context_episodes": 1, "num_layers": 1, "num_heads": 2, "embed_dim": 16, "mlp_dim": 32},
        "train": {"num_steps": 6, "batch_size": 8, "checkpoint_every_steps": 3, "log_every_steps": 3,
                  "eval_batches": 1, "models_per_process": 2, "device": "cpu"},
        "plan": {"beam_width": 2, "depth": 2}, "eval": {"num_episodes": 2, "device": "cpu"},
        "resources": {"num_cpus": 2}}


def test_the_shadow_package_really_hides_ray(tmp_path):
    env = without_packages(tmp_path / "shadow")
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "shadow package" in probe.stderr


def test_pipeline_with_every_stage_local_never_imports_ray(tmp_path):
    config = tmp_path / "no_ray.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    code = ("import sys; from dicp_ray.cli import main; code = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules or sys.modules['ray'] is None, 'ray was imported'; "
            "bad = [m for m in ('metaworld', 'mujoco') if m in sys.modules]; assert not bad, bad; sys.exit(code)")
    args = [sys.executable, "-c", code, "pipeline", "--config", str(config), "--output", str(out),
            "--backend", "local"]
    done = subprocess.run(args, env=without_packages(tmp_path / "shadow"), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["task_ids"]) == 4          # (2 train + 1 test) per split seed, shared ids once
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert set(summary["methods"]) == {"policy", "plan"}
    for seed in (0, 1):
        assert (out / "train" / f"split_{seed}" / "model.pt").is_file()
        assert (out / "eval" / f"split_{seed}" / "plan" / "results.json").is_file()
    again = subprocess.run(args, env=without_packages(tmp_path / "shadow"), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)                                  # resumes: nothing to redo
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "eval" / "summary.json").read_text())["methods"] == summary["methods"]
