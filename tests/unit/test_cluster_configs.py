"""Cluster configs: the launcher YAML passes Ray's own schema; KubeRay manifests are well-formed and consistent."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text()))
    validate_config(config)  # raises jsonschema.ValidationError on any schema violation
    types = config["available_node_types"]
    assert types["gpu_train"]["resources"]["GPU"] >= 1 and types["cpu_collect"]["resources"]["CPU"] >= 1


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests(name, kind):
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-collect", "gpu-train"}
    gpu_limits = groups["gpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    if kind == "RayJob":
        config = doc["spec"]["entrypoint"].split("--config ")[1].split()[0]
        assert (ROOT / config).is_file(), f"the RayJob runs {config}, which must exist"
