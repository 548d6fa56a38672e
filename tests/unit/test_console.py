"""The console's progress files and bar (dicp_ray.console): what a worker writes, what the driver's bar counts."""
from __future__ import annotations

import json
import time

from dicp_ray.console import ProgressFile, watch_progress


def test_progress_file_is_written_when_made_and_throttled(tmp_path):
    path = tmp_path / "p.json"
    progress = ProgressFile(path, total=10, min_interval_s=60)
    assert json.loads(path.read_text()) == {"done": 0, "total": 10, "info": {}}     # the worker has begun
    progress.update(3)
    assert json.loads(path.read_text())["done"] == 0                                # within the interval: skipped
    progress.update(10, rate=1.5)
    assert json.loads(path.read_text()) == {"done": 10, "total": 10, "info": {"rate": 1.5}}  # the end always
    ProgressFile(None, total=10).update(5)                                            # no path: counts nothing


def test_bar_clock_starts_when_the_first_worker_reports(tmp_path):
    """Start-up before the first report (Ray, imports) is not counted in the bar's elapsed time and rate."""
    path = tmp_path / "p.json"
    with watch_progress([path], total=100, desc="collect", unit="step", poll_s=0.05) as bar:
        made = bar.start_t
        time.sleep(0.6)                                                               # start-up: no file yet
        assert bar.start_t == made
        progress = ProgressFile(path, total=100, min_interval_s=0)
        deadline = time.time() + 10
        while bar.start_t == made and time.time() < deadline:
            time.sleep(0.05)
        assert bar.start_t >= made + 0.6
        progress.update(100)
    assert bar.n == 100


def test_a_file_left_by_an_interrupted_run_is_not_counted(tmp_path):
    path = tmp_path / "p.json"
    ProgressFile(path, total=100).update(100)                           # a crashed run's last count
    with watch_progress([path], total=100, desc="train", unit="step", poll_s=0.05) as bar:
        assert not path.exists()
        time.sleep(0.2)
        assert bar.n == 0
        ProgressFile(path, total=100, min_interval_s=0).update(40)     # the resumed worker's own count
        deadline = time.time() + 10
        while bar.n < 40 and time.time() < deadline:
            time.sleep(0.05)
    assert bar.n == 40
