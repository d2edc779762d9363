"""cluster/: every file validated offline.

The launcher configs against Ray's own schema (shipped in the ray package); the Kubernetes
manifests for their required fields and for consistent names, images, Secrets, volumes and
services; every sslab command written in them (and in their comments) parses with the real CLI and
names config files that exist; the Dockerfile matches the pinned Ray and ffcv's system packages.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
IMAGE = "ghcr.io/YOUR_ORG/sslab:0.1.0"
LAUNCHERS = sorted((CLUSTER / "launcher").glob("*.yaml"))
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml")) + sorted((CLUSTER / "mlflow").glob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in documents(path)]


def walk(node, key: str):
    """Every value stored under ``key`` anywhere in a nested structure."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def pod_specs(doc: dict) -> list[dict]:
    return [t["spec"] for t in walk(doc, "template") if isinstance(t, dict) and "containers" in t.get("spec", {})]


def test_there_is_something_to_check():
    assert len(LAUNCHERS) == 2 and len(MANIFESTS) >= 6
    kinds = {doc["kind"] for _, doc in all_documents()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Deployment", "Service", "Secret",
            "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_schema(path):
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))  # what `ray up` does: fill defaults, then check the schema
    assert config["docker"]["image"] == IMAGE
    assert config["head_node_type"] in config["available_node_types"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard is reached through `ray dashboard`'s tunnel"
    assert any("RAY_AUTH_MODE=token" in option for option in config["docker"]["run_options"])
    assert "auth_token" in " ".join(config["file_mounts"])
    assert any(t.get("max_workers", 0) > 0 for t in config["available_node_types"].values())


def test_a_broken_launcher_config_is_caught_by_the_same_check():
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHERS[0].read_text())
    config["available_node_types"]["gpu_worker"]["resources"] = {"GPU": -1}
    with pytest.raises(Exception, match="-1"):
        validate_config(prepare_config(config))
    config = yaml.safe_load(LAUNCHERS[0].read_text())
    config["max_wokers"] = 3
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path, doc", all_documents(), ids=lambda x: x.name if isinstance(x, Path) else x["kind"])
def test_manifest_has_required_fields(path, doc):
    assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path
    if doc["kind"] == "Secret":
        assert set(doc["stringData"].values()) == {"REPLACE_ME"}, "no secret values in the repository"
        return
    for spec in pod_specs(doc):
        for container in spec["containers"]:
            assert container.get("name") and container.get("image") == IMAGE, (path, container.get("name"))
    if doc["kind"] in ("RayCluster", "RayJob", "RayCronJob"):
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else \
            (doc["spec"].get("rayClusterSpec") or doc["spec"]["jobTemplate"]["rayClusterSpec"])
        assert cluster["authOptions"]["mode"] == "token"
        assert cluster["rayVersion"] == "2.60.0"
        gpu_groups = [g for g in cluster["workerGroupSpecs"]
                      if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
        assert gpu_groups and all(g["maxReplicas"] >= g["minReplicas"] for g in gpu_groups)
    if doc["kind"] == "CronJob":
        assert doc["spec"]["concurrencyPolicy"] == "Forbid"
        assert len(doc["spec"]["schedule"].split()) == 5
    if doc["kind"] == "Service":
        assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", "no public endpoint by default"


def test_names_secrets_volumes_and_services_are_consistent():
    docs = all_documents()
    defined = {(doc["kind"], doc["metadata"]["name"]) for _, doc in docs}
    secrets = {doc["metadata"]["name"]: set(doc["stringData"]) for _, doc in docs if doc["kind"] == "Secret"}
    for path, doc in docs:
        for ref in walk(doc, "secretKeyRef"):
            assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]], (path, ref)
        for name in walk(doc, "secretName"):
            assert name in secrets, (path, name)
        for claim in walk(doc, "persistentVolumeClaim"):
            assert ("PersistentVolumeClaim", claim["claimName"]) in defined, (path, claim)
        for spec in pod_specs(doc):
            volumes = {v["name"] for v in spec.get("volumes", [])}
            for container in spec["containers"]:
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes, (path, mount)
    ray_cluster = next(doc for _, doc in docs if doc["kind"] == "RayCluster")
    head_service = f"{ray_cluster['metadata']['name']}-head-svc"  # KubeRay's naming
    cron = next(doc for _, doc in docs if doc["kind"] == "CronJob")
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert f"--address=http://{head_service}:8265" in command
    service = next(doc for _, doc in docs if doc["kind"] == "Service" and doc["metadata"]["name"] == "sslab-mlflow")
    port = service["spec"]["ports"][0]["port"]
    uris = {e["value"] for _, doc in docs for env in walk(doc, "env") for e in env if e["name"] == "MLFLOW_TRACKING_URI"}
    assert uris == {f"http://{service['metadata']['name']}:{port}"}
    deployment = next(doc for _, doc in docs if doc["kind"] == "Deployment")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert "--app-name basic-auth" in " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["command"])


def sslab_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after 'sslab') for every sslab command in cluster/ (values, commands and comments)."""
    found = []
    for path in [*LAUNCHERS, *MANIFESTS, CLUSTER / "Dockerfile", CLUSTER / "README.md"]:
        for line in path.read_text().splitlines():
            for match in re.finditer(r"(?:^|[\s#`:])sslab ((?:pipeline|submit|pretrain|sweep|eval|data|ui|demo)\b[^`\n#]*)",
                                     line):
                if " --" in match.group(1):  # a command with options, not prose naming one
                    found.append((f"{path.name}: {match.group(0).strip()}", shlex.split(match.group(1))))
    for path, doc in all_documents():
        for command in walk(doc, "command"):
            if isinstance(command, list) and "sslab" in command:
                found.append((f"{path.name}: command", command[command.index("sslab") + 1:]))
    return found


def test_every_sslab_command_in_cluster_files_parses():
    from orchestrator.cli import build_parser

    commands = sslab_commands()
    assert len(commands) >= 6
    parser = build_parser()
    for where, argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"does not parse: {where}")
        if isinstance(args.command, list):  # submit: the job's own sslab arguments follow '--'
            try:
                args = parser.parse_args([a for a in args.command if a != "--"])
            except SystemExit:
                pytest.fail(f"the submitted command does not parse: {where}")
        config = getattr(args, "config", None)
        if config:
            assert (ROOT / config).is_file(), f"{where}: {config} does not exist"


def test_dockerfile_matches_the_pins_and_system_packages():
    text = (CLUSTER / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "ray[default,train,tune]>=2.60,<2.61" in pyproject and "FROM rayproject/ray:2.60.0" in text
    makefile = (ROOT / "Makefile").read_text()
    packages = re.search(r"SYSTEM_PACKAGES := (.*)", makefile).group(1).split()
    for package in packages:
        if not package.startswith("dataset-"):
            assert package in text, f"the image lacks {package}"
    assert "RAY_AUTH_MODE=token" in text and "COPY" in text
    assert ".state" not in text and "shared/data" not in text, "no state or data in the image"
