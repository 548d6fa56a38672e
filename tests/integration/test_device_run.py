"""scripts/device_run.sh --smoke (issue #25): the GPU box's prepared run at tiny sizes on this CPU, with Ray,
metaworld and MuJoCo unimportable (as on the bare GPU box), checked through the summary.json it writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import without_packages

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_without_ray_writes_the_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**without_packages(tmp_path / "shadow"), "PYTHON": sys.executable, "OUT": str(out), "WORK": str(work)}
    done = subprocess.run([str(ROOT / "scripts" / "device_run.sh"), "--smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "device_run.log", "summary.json", "table.csv",
                                                     "table.md"]                  # small: at most 8 files return
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scale"] == "smoke" and summary["facts"]["torch"]
    assert summary["facts"]["importable"]["ray"] is False and summary["facts"]["importable"]["gymnasium"]
    assert set(summary["stage_s"]) == {"facts", "speed", "collect", "train", "evaluate", "report"}
    speed = summary["speed"]
    assert {(r["workload"], r["models"], r["mixed_precision"]) for r in speed} >= {
        ("darkroom", 1, False), ("darkroom", 2, False), ("darkroom", 1, True), ("ml1_ad", 1, False),
        ("ml1_idt", 1, False)}
    assert {r["sample_on_device"] for r in speed if r["workload"] == "darkroom" and r["models"] == 1} == {True, False}
    assert all(r["windows_per_s"] or r["error"].startswith("skipped") for r in speed), speed
    assert summary["collect"]["tasks"] >= 6 and summary["collect"]["transitions"] > 0
    train = summary["train"]
    seeds = train["plan"]["split_seeds"]
    assert train["exit_codes"] == {"ad": 0, "dicp": 0} and 1 <= seeds <= 2
    assert len(train["models"]) == 2 * seeds
    for model in train["models"].values():
        assert 1 <= model["step"] <= model["num_steps"] == 20
        assert model["stopped_at_deadline"] == (model["step"] < 20)
    assert summary["evaluate"]["failed"] == {}
    rows = {r["label"]: r for r in summary["results"]["rows"]}
    assert set(rows) == {"AD", "AD + world model (no planning)", "DICP-AD"}
    assert all(len(r["return_mean"]) == 3 for r in rows.values())                 # eval.num_episodes of --smoke
    assert summary["results"]["split_seeds"] == list(range(seeds))
    assert "| DICP-AD |" in (out / "table.md").read_text()
    assert summary["wall_s"] < 300
