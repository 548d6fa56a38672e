"""Starting or joining Ray, and the provenance every artifact records (versions, git revision, seeds).

``init_ray(resources)`` is the one place dicp_ray starts Ray: with ``resources.address`` (or ``RAY_ADDRESS``)
it joins that cluster; otherwise it starts an embedded local instance sized by ``resources.num_cpus``.
An unreachable address fails fast with a clear message instead of hanging.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from dicp_ray.config.schema import ResourcesConfig

logger = logging.getLogger(__name__)


class ClusterUnreachableError(ConnectionError):
    """The Ray address given with --address / RAY_ADDRESS does not answer."""


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when a cluster address does not accept TCP connections (ray.init would retry for long).

    "auto"/"local" are left to Ray; "ray://host:port", "http://host:port" and "host:port" are probed.
    """
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachableError(f"--address {address!r} is not host:port (e.g. 127.0.0.1:6379 or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterUnreachableError(
            f"cannot reach the Ray cluster at {address!r} ({err}); start one with `ray start --head` "
            "or drop --address to run locally") from None


def init_ray(resources: ResourcesConfig, *, log_to_driver: bool | None = None) -> dict[str, Any]:
    """Start or join Ray once per process; returns the cluster's resources. Safe to call repeatedly.

    Workers' stdout/stderr (RLlib's and Ray Train's own messages) reach this console only with --verbose
    (`log_to_driver` None = follow it); otherwise they stay in Ray's session logs, which the CLI links as
    ``<output>/logs/ray`` (dicp_ray.console).
    """
    import ray

    from dicp_ray.console import is_verbose, quiet_library_loggers

    quiet_library_loggers()
    if log_to_driver is None:
        log_to_driver = is_verbose()

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray Train's controller polls workers every 2 s by default, which makes every report() slow.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if ray.is_initialized():
        return ray.cluster_resources()
    address = resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)
    else:
        ray.init(num_cpus=resources.num_cpus or os.cpu_count(), num_gpus=resources.num_gpus,
                 include_dashboard=False, log_to_driver=log_to_driver, configure_logging=False)
    from dicp_ray.console import announce_ray_logs

    announce_ray_logs()
    return ray.cluster_resources()


def git_revision() -> str | None:
    """The checkout's commit (with '-dirty' when modified), or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def provenance() -> dict[str, Any]:
    """Library versions, host and git revision, recorded in manifests, checkpoints and results."""
    import importlib.metadata as md

    versions = {}
    for package in ("dicp_ray", "ray", "torch", "gymnasium", "numpy", "pyarrow", "metaworld"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {"versions": versions, "python": platform.python_version(), "host": platform.node(),
            "git_revision": git_revision()}


def _umask() -> int:
    """The process umask, read without changing it (os.umask would briefly set 0 for other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write via a temp file in the same directory + fsync + rename: readers see the old file or the new
    one, never a partial one (a killed writer or a full disk leaves only a hidden .tmp behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
