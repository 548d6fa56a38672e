"""dicp_ray.report: combining evaluation summaries into the results table."""
import json

import numpy as np
import pytest

from dicp_ray import report


def _summary(tmp_path, name, curves_by_mode, env="Darkroom", seeds=(0, 1, 2)):
    methods = {mode: {"per_split_return_mean": {str(s): list(c) for s, c in zip(seeds, curves)}}
               for mode, curves in curves_by_mode.items()}
    payload = {"env": env, "split_seeds": list(seeds), "num_episodes": len(curves_by_mode[next(iter(
        curves_by_mode))][0]), "oracle_max_return_mean": 17.0, "methods": methods}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(payload))
    return str(path)


def test_table_ci_and_paired_difference(tmp_path):
    episodes = 50
    ad = [np.full(episodes, v) for v in (4.0, 5.0, 6.0)]
    dicp = [np.full(episodes, v) for v in (6.0, 8.0, 7.0)]
    a = _summary(tmp_path, "ad", {"policy": ad})
    d = _summary(tmp_path, "dicp", {"policy": ad, "plan": dicp})
    out = tmp_path / "out"
    report.main(["--out", str(out), "--method", f"AD={a}:policy", "--method", f"DICP-AD={d}:plan",
                 "--compare", "DICP-AD", "AD"])
    table = (out / "table.md").read_text()
    # AD mean 5, sd 1, n 3 -> half-width t(2) * 1 / sqrt(3) = 2.48; paper value beside it
    assert "| AD | 5.00 ± 2.48 |" in table and "≈13.3" in table and "≈15.3" in table
    # differences 2, 3, 1 -> mean 2, half-width 2.48
    assert "DICP-AD − AD (paired by split seed): mean over all 50 episodes +2.00 [95% CI -0.48, +4.48]" in table
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * episodes and csv_lines[1].startswith("AD,1,5.0000")
    assert (out / "curves.png").stat().st_size > 1000


def test_mismatched_runs_are_refused(tmp_path):
    a = _summary(tmp_path, "a", {"policy": [np.zeros(5)] * 3})
    b = _summary(tmp_path, "b", {"policy": [np.zeros(5)] * 2}, seeds=(0, 1))
    with pytest.raises(SystemExit, match="differ"):
        report.main(["--out", str(tmp_path / "o"), "--method", f"A={a}:policy", "--method", f"B={b}:policy"])
    with pytest.raises(SystemExit, match="not 'plan'"):
        report.main(["--out", str(tmp_path / "o"), "--method", f"A={a}:plan"])
