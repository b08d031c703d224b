"""The multi-node configurations docs/ray-cluster.md starts from (docs/examples/) parse, and carry what
Cleave relies on: the front door joins the cluster (ray.address auto), every node mounts the shared
artifact directory at cloud.yaml's ray.jobs.artifact_dir, job tasks declare no more memory than a
worker has, one Ray version everywhere, and the three files agree with each other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud_node.config import CloudConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def cloud_yaml() -> CloudConfig:
    return CloudConfig.from_yaml(str(EXAMPLES / "cloud-ray.yaml"))


def kuberay() -> dict[str, dict[str, Any]]:
    return {
        doc["kind"] + "/" + doc["metadata"]["name"]: doc
        for doc in yaml.safe_load_all((EXAMPLES / "kuberay-raycluster.yaml").read_text())
    }


def quantity_bytes(q: str) -> int:
    """A Kubernetes memory quantity (``8Gi``, ``512Mi``, ``4G``) in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([KMGT]i?)?", q)
    assert m, q
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def test_the_cloud_yaml_runs_jobs_and_tails_on_the_cluster_it_joins() -> None:
    config = cloud_yaml()  # parses and validates like cleave-cloud --config does
    assert config.ray.address == "auto" and config.ray.jobs.jobs_enabled
    assert config.ray.jobs.artifact_dir.startswith("/") and config.jobs.dir
    assert config.tls.cert and config.auth.tokens_file  # a public listen address comes with TLS and tokens
    assert config.ray.min_replicas <= config.ray.replicas <= config.ray.max_replicas


def test_kuberay_raycluster_carries_what_cleave_relies_on() -> None:
    docs = kuberay()
    cluster = docs["RayCluster/cleave"]
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    version = spec["rayVersion"]
    # The ConfigMap is the example cloud.yaml, word for word in meaning.
    mapped = yaml.safe_load(docs["ConfigMap/cleave-cloud"]["data"]["cloud.yaml"])
    assert mapped == yaml.safe_load((EXAMPLES / "cloud-ray.yaml").read_text())
    config = cloud_yaml()
    shared = config.ray.jobs.artifact_dir
    pvc = docs["PersistentVolumeClaim/cleave-artifacts"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every node writes to it
    assert docs["PersistentVolumeClaim/cleave-jobs"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Our command runs instead of KubeRay's, and still starts Ray through the generated command.
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    assert len(groups) >= 2
    for name, group in groups:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"].endswith(":" + version), (name, container["image"])
        assert "$KUBERAY_GEN_RAY_START_CMD" in " ".join(container["args"]), name
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims[next(n for n, p in mounts.items() if p == shared)] == "cleave-artifacts", name
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], name  # Ray sees what Kubernetes enforces
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    command = " ".join(head["args"])
    cloud_mount = next(m for m in head["volumeMounts"] if m["name"] == "cloud-config")
    assert f"cleave-cloud --config {cloud_mount['mountPath']}" in command
    assert "jobs" in {m["name"] for m in head["volumeMounts"] if m["mountPath"] == config.jobs.dir}
    assert 50051 in {p["containerPort"] for p in head["ports"]} and config.listen.endswith(":50051")
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert config.ray.jobs.job_memory_mb << 20 <= quantity_bytes(limits["memory"])
        assert config.ray.jobs.job_num_cpus <= float(limits["cpu"])
    dockerfile = (EXAMPLES / "Dockerfile.ray").read_text()
    assert f"FROM rayproject/ray:{version}-" in dockerfile and "[ray]" in dockerfile


def test_ray_up_cluster_yaml_carries_what_cleave_relies_on() -> None:
    cluster = yaml.safe_load((EXAMPLES / "ray-cluster.yaml").read_text())
    config = cloud_yaml()
    version = kuberay()["RayCluster/cleave"]["spec"]["rayVersion"]
    assert f'"ray[serve]=={version}"' in " ".join(cluster["setup_commands"])  # one Ray version everywhere
    assert any(config.ray.jobs.artifact_dir in c and "mount" in c for c in cluster["initialization_commands"])
    assert any("--head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cluster["worker_start_ray_commands"])
    remote = next(r for r, local in cluster["file_mounts"].items() if local == "docs/examples/cloud-ray.yaml")
    assert any(f"cleave-cloud --config {remote}" in c for c in cluster["head_start_ray_commands"])
    assert cluster["max_workers"] == len(cluster["provider"]["worker_ips"])


def test_ray_up_cluster_yaml_passes_rays_own_schema() -> None:
    pytest.importorskip("ray", reason="Ray is not installed: its cluster schema comes with it")
    pytest.importorskip("jsonschema", reason="jsonschema is not installed (Ray validates cluster YAML with it)")
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it touches a machine: fill Ray's defaults in, then check the schema.
    cluster = yaml.safe_load((EXAMPLES / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(cluster))
    with pytest.raises(Exception, match="head_start_commands"):  # the check is live: a misspelt key fails
        validate_config(prepare_config({**cluster, "head_start_commands": []}))
