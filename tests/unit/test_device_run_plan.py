"""scripts/device_run.py's planning of the full GPU run (which rows, how many split seeds), without a GPU."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def device_run():
    spec = importlib.util.spec_from_file_location("device_run", ROOT / "scripts" / "device_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(rates: dict[int, float], bf16_factor: float = 1.0) -> list[dict]:
    rows = []
    for bf16 in (False, True):
        for models, rate in rates.items():
            rows.append({"workload": "darkroom", "models": models, "mixed_precision": bf16, "compile": False,
                         "sample_on_device": True, "windows_per_s": rate * (bf16_factor if bf16 else 1.0)})
    rows.append({"workload": "darkroom", "models": 30, "mixed_precision": False, "compile": True,
                 "sample_on_device": True, "windows_per_s": 10 * max(rates.values())})   # never used for sizing
    return rows


def test_full_speed_table_rows(device_run):
    rows = device_run.speed_rows(smoke=False)
    grid = [(r["models"], r["mixed_precision"], r["compile"]) for r in rows if r["workload"] == "darkroom"
            and r["sample_on_device"]]
    assert sorted(grid) == sorted((m, bf16, c) for m in (1, 6, 10, 30) for bf16 in (False, True)
                                  for c in (False, True))
    assert [r["models"] for r in rows if r["compile"]][:2] == [1, 1]                  # compile last, M = 1 first
    assert rows.index(next(r for r in rows if r["compile"])) > max(
        i for i, r in enumerate(rows) if not r["compile"])
    assert {(r["workload"], r["mixed_precision"]) for r in rows if r["workload"] != "darkroom"} == {
        (w, b) for w in ("ml1_ad", "ml1_idt") for b in (False, True)}
    assert any(r["sample_on_device"] is False for r in rows) and all(r["batch"] == 512 for r in rows)


def test_rate_interpolates_between_measured_group_sizes(device_run):
    table = _table({1: 30_000, 6: 120_000, 10: 150_000, 30: 180_000})
    assert device_run.rate_for(table, 1, False) == 30_000
    assert device_run.rate_for(table, 2, False) == pytest.approx(48_000)
    assert device_run.rate_for(table, 8, False) == pytest.approx(135_000)
    assert device_run.rate_for(table, 40, False) == 180_000                          # beyond: the largest
    assert device_run.rate_for([], 4, False) is None


def test_seeds_are_as_many_as_reach_the_minimum_fraction(device_run):
    table = _table({1: 30_000, 6: 120_000, 10: 150_000, 30: 180_000}, bf16_factor=1.5)
    # 3 seeds = 6 models: 1.5 * 120K windows/s / (6 * 512) = 58.6 steps/s per model -> 200 s: 11.7K of 50K steps;
    # 4 seeds = 8 models: 1.5 * 135K / (8 * 512) = 49.4 steps/s -> 9.9K, under a fifth
    plan = device_run.choose_seeds(table, 200, 512, 50_000, 5, 0.2)
    assert plan["projected"][3] == {"fraction": pytest.approx(0.234, abs=1e-3), "mixed_precision": True}
    assert plan["projected"][4]["fraction"] < 0.2
    assert plan["split_seeds"] == 3 and plan["mixed_precision"] is True               # bf16 measured faster
    assert device_run.choose_seeds(table, 5, 512, 50_000, 5, 0.2)["split_seeds"] == 1   # at least one


def test_precision_is_chosen_per_group_size(device_run):
    """The H200's table (README): fp32 is faster for one model, bf16 from six stacked models on."""
    table = [{"workload": "darkroom", "models": m, "mixed_precision": bf16, "compile": False,
              "sample_on_device": True, "windows_per_s": rate}
             for (m, bf16), rate in {(1, False): 38_713, (6, False): 50_458, (10, False): 63_828,
                                     (1, True): 26_394, (6, True): 103_768, (10, True): 129_056}.items()]
    plan = device_run.choose_seeds(table, 85, 512, 50_000, 5, 0.1)
    assert plan["projected"][1]["mixed_precision"] is True          # 2 models: bf16 41.9K vs fp32 41.1K windows/s
    assert plan["projected"][3]["mixed_precision"] is True and plan["split_seeds"] == 1
    assert device_run.choose_seeds(table[:1] + table[3:4], 85, 512, 50_000, 1, 0.1)["mixed_precision"] is False
