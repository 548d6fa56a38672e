"""The product end to end at smoke scale: pipeline + resume, Tune sweeps, and `ray job submit` to a real head."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicp_ray.config.load import load_config
from dicp_ray.config.schema import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "tune_configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(ray_local, tmp_path_factory):
    from dicp_ray.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("smoke_run")
    summary = run_pipeline(load_config(SMOKE), out)
    return out, summary


def test_pipeline_writes_every_stage_output(smoke_run):
    out, summary = smoke_run
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["task_ids"]) == 6          # 4 train + 2 test tasks
    assert (out / "train" / "split_0" / "model.pt").is_file()
    assert (out / "eval" / "learning_curves.png").stat().st_size > 1000
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["name"] == "smoke" and run["provenance"]["versions"]["ray"]
    assert set(summary["methods"]) == {"policy", "plan"}
    for method in summary["methods"].values():
        assert len(method["return_mean"]) == 5                               # eval.num_episodes
        assert all(0.0 <= r <= 20.0 for r in method["return_mean"])
    saved = json.loads((out / "eval" / "summary.json").read_text())
    assert saved["methods"] == json.loads(json.dumps(summary["methods"]))


def test_pipeline_rerun_skips_finished_stages(smoke_run):
    from dicp_ray.pipeline import run_pipeline

    out, summary = smoke_run
    watched = [out / "dataset" / "manifest.json", out / "train" / "split_0" / "model.pt",
               *sorted((out / "eval").rglob("results.json"))]
    assert len(watched) == 4
    before = [p.stat().st_mtime_ns for p in watched]
    again = run_pipeline(load_config(SMOKE), out)
    assert [p.stat().st_mtime_ns for p in watched] == before, "a finished stage was redone"
    assert json.loads(json.dumps(again["methods"])) == json.loads(json.dumps(summary["methods"]))


def test_pipeline_refuses_an_output_dir_of_another_config(smoke_run):
    from dicp_ray.pipeline import run_pipeline

    out, _ = smoke_run
    with pytest.raises(ConfigError, match="different env/collect/model/train config"):
        run_pipeline(load_config(SMOKE, ["train.lr=0.5"]), out)


def test_plan_sweep_2x2_through_tune(smoke_run, tmp_path):
    from dicp_ray.tune import run_sweep

    out, _ = smoke_run
    checkpoint = str(out / "train" / "split_0" / "model.pt")
    config = load_config(ROOT / "tune_configs" / "sweeps" / "plan_smoke.yaml")
    results = run_sweep(config, tmp_path, checkpoint=checkpoint)
    assert len(results) == 4 and results.num_errors == 0
    frame = results.get_dataframe()
    assert set(zip(frame["config/plan.depth"], frame["config/plan.beam_width"])) == {(1, 1), (1, 3), (2, 1), (2, 3)}
    assert ((frame["return_final"] >= 0) & (frame["return_final"] <= 20)).all()
    assert (tmp_path / "sweep" / "sweep_heatmap.png").stat().st_size > 1000
    assert len((tmp_path / "sweep" / "sweep_results.csv").read_text().splitlines()) == 5
    assert list((tmp_path / "tune").rglob("events.out.tfevents.*")), "Tune writes TensorBoard files per trial"
    # Re-running the same sweep restores it: the finished trials are kept, not run again.
    trial_dirs = sorted(p.name for p in (tmp_path / "tune" / "plan_plan_smoke").iterdir() if p.is_dir())
    again = run_sweep(config, tmp_path, checkpoint=checkpoint)
    assert len(again) == 4 and again.num_errors == 0
    assert sorted(p.name for p in (tmp_path / "tune" / "plan_plan_smoke").iterdir() if p.is_dir()) == trial_dirs
    assert sorted(again.get_dataframe()["return_final"]) == sorted(frame["return_final"])


def test_train_sweep_with_asha_reports_best_checkpoint(smoke_run, tmp_path, capsys):
    from dicp_ray.evaluate.sweep_report import TRAIN_METRIC
    from dicp_ray.tune import run_sweep

    out, _ = smoke_run
    (tmp_path / "dataset").symlink_to(out / "dataset")  # the sweep shares the run's dataset
    config = load_config(ROOT / "tune_configs" / "sweeps" / "train_smoke.yaml")
    results = run_sweep(config, tmp_path)
    assert len(results) == 2 and results.num_errors == 0
    best = results.get_best_result(metric=TRAIN_METRIC, mode="min")
    assert (Path(best.checkpoint.path) / "model.pt").is_file()
    assert "best checkpoint:" in capsys.readouterr().out


# ------------------------------------------------------------------------------- ray job submit, real head
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (our head's own temp dir): never other Ray instances."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _stop_head(marker: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_of(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while _pids_of(marker) and time.time() < deadline:
            time.sleep(0.2)


def test_ray_job_submit_runs_the_smoke_pipeline(tmp_path):
    bin_dir = Path(sys.executable).parent
    temp_dir = Path("/tmp") / f"dj{os.getpid()}"        # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Every port the head opens is chosen free: another local Ray (the session fixture's) already holds the
    # defaults, e.g. the dashboard agent's 52365, and a clash leaves the job agent down.
    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                              "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                              "metrics-export-port", "node-manager-port", "object-manager-port",
                                              "ray-client-server-port")}
    dash_port = ports["dashboard-port"]
    start = [str(bin_dir / "ray"), "start", "--head", "--num-cpus=2", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
             *(f"--{name}={port}" for name, port in ports.items())]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
        out = tmp_path / "job_run"
        submit = [str(bin_dir / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash_port}", "--",
                  sys.executable, "-m", "dicp_ray.cli", "pipeline", "--config", str(SMOKE), "--output", str(out),
                  "--address", "auto"]
        deadline = time.time() + 120  # the head's job agent takes a few seconds to come up after `ray start`
        while True:
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
            if "No available agent" not in job.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
        assert (out / "eval" / "summary.json").is_file() and (out / "train" / "split_0" / "model.pt").is_file()
        assert "oracle (max)" in job.stdout        # the results table reached the job's log
    finally:
        _stop_head(str(temp_dir))


def test_a_failing_trial_does_not_stop_the_sweep(smoke_run, tmp_path, capsys):
    from dicp_ray.config.load import replace
    from dicp_ray.tune import run_sweep

    out, _ = smoke_run
    config = load_config(ROOT / "tune_configs" / "sweeps" / "plan_smoke.yaml")
    # depth 99 passes the sweep's own checks but fails inside its trial (deeper than the 20-step episode)
    config = replace(config, {"sweep.grid": {"plan.depth": [1, 99]}})
    results = run_sweep(config, tmp_path, checkpoint=str(out / "train" / "split_0" / "model.pt"))
    assert len(results) == 2 and results.num_errors == 1
    finished = [r for r in results if r.error is None]
    assert len(finished) == 1 and finished[0].config["plan.depth"] == 1 and "return_final" in finished[0].metrics
    assert "1 trial(s) failed" in capsys.readouterr().out


def test_cli_console_is_clean_and_logs_go_to_files(tmp_path):
    """`dicp-ray pipeline` without --verbose: stage banners, bars and the table on the console; Ray's, RLlib's
    and Ray Train's own output only in <output>/logs (the console of `make demo` once had ~1,050 such lines)."""
    out = tmp_path / "cli_smoke"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DICP_RAY_VERBOSE", "DICP_RAY_LOG_DIR")}
    run = subprocess.run([sys.executable, "-m", "dicp_ray.cli", "pipeline", "--config", str(SMOKE), "--output",
                          str(out), "--set", "resources.num_cpus=2"], capture_output=True, text=True, env=env,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    console = (run.stdout + run.stderr).replace("\r", "\n")
    lines = [line for line in console.splitlines() if line.strip() and "collect learners" not in line
             and "%|" not in line]  # progress-bar redraws are one line on a terminal
    assert len(lines) < 40, "\n".join(lines)
    for stage in ("[1/3] collect:", "[2/3] train:", "[3/3] evaluate:", "oracle (max)", "learning_curves.png"):
        assert stage in console
    for noise in ("Ray Train Controller", "gputil", "Overriding environment", "new API stack",
                  "Token authentication", "RayTrainWorker", "pid="):
        assert noise not in console, noise
    assert (out / "logs" / "dicp_ray.log").read_text().count("dicp_ray") >= 3
    assert (out / "logs" / "ray").is_symlink() and any((out / "logs" / "ray").iterdir())
