"""Shared pytest fixtures: one local Ray instance for every integration test of the session."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs (no dashboard, worker logs silenced), started once and shut down at the end.

    Code under test that calls ``dicp_ray.runtime.init_ray`` joins it instead of starting its own.
    If Ray is already running in this process (started elsewhere), it is reused and left running.
    """
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


@pytest.fixture
def one_thread():
    """Single-threaded torch, as in a Ray worker: 2 threads on 2 busy cores can be 50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
