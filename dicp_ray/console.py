"""What a `dicp-ray` command prints, and where everything else goes.

A command shows a one-line banner per stage, one progress bar per long stage (with an ETA), the final table
and the paths of its outputs. Everything else — Ray's, RLlib's and Ray Train's own logs, library warnings a
user cannot act on, per-step training lines — goes to files under the run directory::

    <output>/logs/dicp_ray.log   every log record of the driver, with timestamps (DEBUG with --verbose)
    <output>/logs/ray            -> Ray's session log directory (workers' stdout/stderr, raylet, GCS, ...)

``--verbose`` restores the old behaviour: everything on the console, worker output included.

Progress of work running inside Ray workers (training ranks, evaluation rollouts) reaches the driver through
small JSON files (`ProgressFile`, written atomically and at most a few times a second) that a driver-side
`watch_progress` thread sums into one tqdm bar; so the bar works the same for a local run and on a cluster
with a shared output directory, and costs the workers nothing but an occasional tiny write.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

__all__ = ["setup_logging", "quiet_library_loggers", "attach_log_file", "link_ray_logs", "announce_ray_logs", "banner", "ProgressFile", "watch_progress",
           "is_verbose"]

_VERBOSE_ENV = "DICP_RAY_VERBOSE"
_LOG_DIR_ENV = "DICP_RAY_LOG_DIR"   # set by attach_log_file: where init_ray links Ray's session logs
_CONSOLE_FORMAT = "%(message)s"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LIBRARY_WARNINGS = (  # warnings a user of dicp-ray cannot act on (they come from Ray/RLlib/gymnasium internals)
    (DeprecationWarning, None),
    (UserWarning, r".*Overriding environment.*"),
    (FutureWarning, None),
)


def is_verbose() -> bool:
    """Whether this process (or the command that started it) asked for --verbose."""
    return os.environ.get(_VERBOSE_ENV) == "1"


class _DriverConsoleFilter(logging.Filter):
    """On a quiet console: dicp_ray's INFO and up, anything else only from WARNING on, never Ray's chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "dicp_ray" or record.name.startswith("dicp_ray."):
            return record.levelno >= logging.INFO
        if record.name.startswith(("ray", "tensorboardX", "matplotlib", "urllib3", "filelock")):
            return record.levelno >= logging.ERROR
        return record.levelno >= logging.WARNING


def setup_logging(verbose: bool) -> None:
    """Configure the driver's logging once per command: quiet console (or everything with `verbose`)."""
    os.environ[_VERBOSE_ENV] = "1" if verbose else "0"  # inherited by child pipelines of a sweep
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    if verbose:
        console.setFormatter(logging.Formatter(_FILE_FORMAT, datefmt="%H:%M:%S"))
        root.setLevel(logging.DEBUG)
    else:
        console.setFormatter(logging.Formatter(_CONSOLE_FORMAT))
        console.addFilter(_DriverConsoleFilter())
        root.setLevel(logging.INFO)
        for category, message in _LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", category=category, message=message or "")
    root.addHandler(console)
    logging.captureWarnings(True)  # the warnings that are still shown go through the filter above
    quiet_library_loggers()


def quiet_library_loggers() -> None:
    """Ray installs its own stderr handlers on its loggers when it is imported; on a quiet console remove them
    so its records reach our root handlers (console filter, log file) instead. Call after importing Ray."""
    if is_verbose():
        return
    for name in ("ray", "ray.rllib", "ray.train", "ray.tune", "ray.data"):
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            lib.removeHandler(handler)
        lib.propagate = True


def attach_log_file(output_dir: str | Path) -> Path:
    """Also write every driver log record to ``<output>/logs/dicp_ray.log`` (appending); returns its path."""
    path = Path(output_dir) / "logs" / "dicp_ray.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return path
    os.environ[_LOG_DIR_ENV] = str(path.parent.resolve())
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    handler.setLevel(logging.DEBUG if is_verbose() else logging.INFO)
    root.addHandler(handler)
    return path


def link_ray_logs(output_dir: str | Path) -> Path | None:
    """Point ``<output>/logs/ray`` at the running Ray session's log directory; returns the link (None if Ray
    is not running here, e.g. a remote ``ray://`` client)."""
    try:
        import ray

        session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - client mode or no Ray: nothing local to link
        return None
    link = Path(output_dir) / "logs" / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    target = Path(session_dir) / "logs"
    with contextlib.suppress(FileNotFoundError):
        if link.is_symlink() or link.exists():
            link.unlink()
    with contextlib.suppress(OSError):
        link.symlink_to(target, target_is_directory=True)
        return link
    return None


def announce_ray_logs() -> None:
    """Once Ray runs: link its logs under the command's log directory and say so in one line."""
    log_dir = os.environ.get(_LOG_DIR_ENV)
    if not log_dir or is_verbose():
        return
    link = link_ray_logs(Path(log_dir).parent)
    if link is not None:
        logging.getLogger("dicp_ray").info("Ray, RLlib and Ray Train logs: %s (--verbose shows them here)", link)


def banner(step: int, total: int, stage: str, text: str) -> None:
    """One line announcing a stage, e.g. ``[2/3] train: 1 model, 2,000 steps of batch 64 -> runs/demo/train``."""
    print(f"[{step}/{total}] {stage}: {text}", flush=True)


class ProgressFile:
    """Progress of one unit of work (a training rank, an evaluation run), as a small JSON file.

    ``update(done)`` rewrites ``{"done", "total", "info"}`` atomically, at most every `min_interval_s`
    seconds (and always when ``done == total``), so a driver can poll it; the file is first written (done 0) when
    the object is made, in the worker, which starts the driver's clock (`watch_progress`). Writing failures are
    ignored: progress is a convenience, never a reason to fail a run.
    """

    def __init__(self, path: str | Path | None, total: int, min_interval_s: float = 0.5):
        self.path = None if path is None else Path(path)   # None: count nothing (e.g. remote storage)
        self.total, self.min_interval_s = int(total), min_interval_s
        self._last = -math.inf
        self.update(0)

    def update(self, done: int, **info: float | str) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if done < self.total and now - self._last < self.min_interval_s:
            return
        self._last = now
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"done": int(done), "total": self.total, "info": info}))
            os.replace(tmp, self.path)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def watch_progress(paths: list[Path], total: int, desc: str, unit: str, initial: int = 0,
                   poll_s: float = 0.5, unit_scale: bool = False) -> Iterator[Any]:
    """Show one tqdm bar summing the ``done`` of `paths` (ProgressFiles) while the body runs; yields the bar (None
    when none is drawn).

    Files left by an earlier, interrupted run are removed first, so the bar counts this run's work only (a resumed
    worker reports its own count). Missing files count as 0 (the work has not started); the bar never goes
    backwards. The bar's clock (elapsed, rate, remaining) starts when the first file appears, i.e. when the first
    worker reports (workers write ``update(0)`` as they begin), so Ray's start-up and the workers' imports do not
    make the rate read low. With --verbose the workers print their own progress, so no bar is drawn.
    """
    for path in paths:
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)
    if is_verbose() or not paths:
        yield None
        return
    from tqdm.auto import tqdm

    stop = threading.Event()
    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, unit_scale=unit_scale,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def poll() -> None:
        shown, started = initial, False
        while True:
            states = [s for s in (_read(p) for p in paths) if s]
            if states and not started:  # the first worker began: count time from here
                started = True
                bar.last_print_t = bar.start_t = bar._time()
            done = max(shown, initial + sum(s["done"] for s in states))
            if done > shown:
                bar.update(min(done, total) - shown)
                shown = min(done, total)
            info = {k: v for s in states[-1:] for k, v in s.get("info", {}).items()}
            if info:
                bar.set_postfix(info, refresh=False)
            if stop.wait(poll_s):
                return

    thread = threading.Thread(target=poll, name="dicp-ray-progress", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join(timeout=5)
        states = [s for s in (_read(p) for p in paths) if s]
        final = initial + sum(s["done"] for s in states)
        if final > bar.n:
            bar.update(min(final, total) - bar.n)
        bar.close()
