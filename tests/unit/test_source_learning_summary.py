"""scripts/source_learning.py summary: directories with the same last name are reported apart, not merged."""
import importlib.util
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("source_learning", ROOT / "scripts" / "source_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sb3_dir(path: pathlib.Path, tasks: dict[int, float]) -> str:
    path.mkdir(parents=True)
    for task_id, success in tasks.items():                  # 2 streams x 10 episodes, success only in the last tenth
        flags = np.zeros((2, 10))
        flags[:, -1] = success
        np.savez(path / f"sb3_task_{task_id:05d}.npz", returns=flags * 100.0, success=flags)
    return str(path)


def test_same_named_directories_are_reported_apart(tmp_path, capsys):
    script = _script()
    learned = _sb3_dir(tmp_path / "paper_budget" / "dataset", {0: 1.0, 1: 1.0})
    not_learned = _sb3_dir(tmp_path / "cpu_budget" / "dataset", {0: 0.0, 1: 0.0, 2: 0.0})
    assert script.run_labels([learned, not_learned]) == ["paper_budget/dataset", "cpu_budget/dataset"]
    script.summary([learned, not_learned])
    out = capsys.readouterr().out
    assert "| mean of 2 | 0.000 -> 1.000 | 0 -> 100 | 0.000 -> 0.000 | 0 -> 0 |" in out
    assert "(paper_budget/dataset - cpu_budget/dataset): +1.000" in out
    with pytest.raises(SystemExit, match="given twice"):
        script.run_labels([learned, learned + "/"])
