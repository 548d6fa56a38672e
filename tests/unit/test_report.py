"""dicp_ray.evaluate.report: combining evaluation summaries into the results table."""
import json

import numpy as np
import pytest

from dicp_ray.evaluate import report


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
    assert ("DICP-AD − AD (paired by split seed): mean over episodes 1-10 +2.00 [95% CI -0.48, +4.48]; mean over "
            "episodes 1-50 +2.00 [95% CI -0.48, +4.48]; episode 50 +2.00 [95% CI -0.48, +4.48]." in table)
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * episodes and csv_lines[1].startswith("AD,1,5.0000")
    assert (out / "curves.png").stat().st_size > 1000


def test_paired_difference_over_the_early_episodes_and_notes(tmp_path):
    """DICP ahead by 3 in episodes 1-10 only: +3 early, +0.6 over 1-50, 0 at episode 50; notes head the table."""
    ad = [np.full(50, v) for v in (4.0, 5.0, 6.0)]
    dicp = [np.r_[np.full(10, v + 3.0), np.full(40, v)] for v in (4.0, 5.0, 6.0)]
    a = _summary(tmp_path, "ad", {"policy": ad})
    d = _summary(tmp_path, "dicp", {"plan": dicp})
    out = tmp_path / "out"
    report.main(["--out", str(out), "--method", f"AD={a}:policy", "--method", f"DICP-AD={d}:plan",
                 "--compare", "DICP-AD", "AD", "--note", "Scale: 1/40 of the paper's windows.", "--note", "x"])
    table = (out / "table.md").read_text()
    assert table.startswith("Scale: 1/40 of the paper's windows.\nx\n\nDarkroom: mean return")
    assert ("mean over episodes 1-10 +3.00 [95% CI +3.00, +3.00]; mean over episodes 1-50 +0.60 [95% CI +0.60, "
            "+0.60]; episode 50 +0.00 [95% CI +0.00, +0.00]." in table)


def test_mismatched_runs_are_refused(tmp_path):
    a = _summary(tmp_path, "a", {"policy": [np.zeros(5)] * 3})
    b = _summary(tmp_path, "b", {"policy": [np.zeros(5)] * 2}, seeds=(0, 1))
    with pytest.raises(SystemExit, match="differ"):
        report.main(["--out", str(tmp_path / "o"), "--method", f"A={a}:policy", "--method", f"B={b}:policy"])
    with pytest.raises(SystemExit, match="not 'plan'"):
        report.main(["--out", str(tmp_path / "o"), "--method", f"A={a}:plan"])


def _meta_world_summary(tmp_path, name, success_by_mode, seeds=(0, 1)):
    """Meta-World summaries: per-split success curves, no oracle, an ML1 task."""
    methods = {}
    for mode, per_seed in success_by_mode.items():
        once = [np.maximum.accumulate(np.asarray(c, dtype=float)) for c in per_seed]
        methods[mode] = {"per_split_return_mean": {str(s): list(100 * np.asarray(c)) for s, c in zip(seeds, per_seed)},
                         "per_split_success_mean": {str(s): list(c) for s, c in zip(seeds, per_seed)},
                         "per_split_success_once_so_far_mean": {str(s): list(o) for s, o in zip(seeds, once)},
                         "num_test_tasks": {str(s): 10 for s in seeds}}
    payload = {"env": "ML1", "split_seeds": list(seeds), "num_episodes": len(per_seed[0]),
               "oracle_max_return_mean": None, "methods": methods, "config": {"env": {"task": "reach-v3"}}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(payload))
    return str(path)


def test_meta_world_success_tables_with_the_papers_table_1(tmp_path):
    ad = [[0.0, 0.2, 0.1, 0.3, 0.2], [0.0, 0.4, 0.3, 0.1, 0.4]]
    dicp = [[0.1, 0.5, 0.3, 0.5, 0.6], [0.1, 0.5, 0.5, 0.3, 0.6]]
    a = _meta_world_summary(tmp_path, "ad", {"policy": ad})
    d = _meta_world_summary(tmp_path, "dicp", {"plan": dicp})
    out = tmp_path / "out"
    report.main(["--out", str(out), "--method", f"AD={a}:policy", "--method", f"DICP-AD={d}:plan",
                 "--compare", "DICP-AD", "AD"])
    table = (out / "table.md").read_text()
    assert "ML1 reach-v3" in table and "oracle" not in table and "paper, ep 50" not in table
    assert "per-episode success (%" in table and "succeeded at least once so far (%" in table
    # AD at episode 5: 20 % and 40 % -> mean 30, half-width t(1) * sd 14.14 / sqrt 2 = 127.06
    assert "| AD | 0.0 ± 0.0 | 30.0 ± 127.1 |" in table
    # at least once by episode 5: AD max 0.3 / 0.4 -> 35 %, paper's Table 1 (reach) 86 % beside it
    assert "| AD | 0.0 ± 0.0 | 35.0 ± 63.5 | 86 |" in table
    assert "| DICP-AD | 10.0 ± 0.0 | 60.0 ± 0.0 | 84 |" in table
    # differences are on success, in percentage points: per seed 0.40 - 0.16 and 0.40 - 0.24 -> +20.00
    assert ("DICP-AD − AD (paired by split seed), success (percentage points): mean over episodes 1-5 +20.00"
            in table and "mean over episodes 1-5 +20.00" in table)
    header = (out / "table.csv").read_text().splitlines()[0]
    assert header.endswith("success_once_so_far_ci_high,success_mean,success_ci_low,success_ci_high")
    # the paper's metric leads, then per-episode success, then return (issue #24)
    assert table.index("succeeded at least once so far (%") < table.index("per-episode success (%") < table.index(
        "mean return over the test tasks")
    assert (out / "curves.png").stat().st_size > 1000


def test_one_split_seed_is_reported_without_an_interval(tmp_path, capsys):
    a = _meta_world_summary(tmp_path, "ad", {"policy": [[0.0, 0.5]]}, seeds=(0,))
    report.main(["--out", str(tmp_path / "o"), "--method", f"AD={a}:policy"])
    table = (tmp_path / "o" / "table.md").read_text()
    assert "one split seed (0): no interval" in table and "| AD | 0.0 | 50.0 |" in table and "±" not in table
    assert "warning: split seeds [0]" in capsys.readouterr().out
