"""Re-create the vendored KubeRay CRD schemas in cluster/schemas/kuberay/ from a KubeRay git clone.

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python cluster/schemas/vendor_kuberay.py /tmp/kuberay

For each release tag in TAGS, each CRD in ray-operator/config/crd/bases/ray.io_<plural>.yaml (the
files the KubeRay Helm chart installs) that exists at that tag: the `ray.io/v1` version's
`schema.openAPIV3Schema`, unchanged, written as sorted compact JSON, gzipped (deterministic: no
timestamp, so re-running it on the same tags reproduces the same bytes). SOURCES.json records the
tag, its commit and the path of each file.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import yaml

TAGS = ["v1.5.2", "v1.6.0", "v1.7.0"]
CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
CRD_DIR = "ray-operator/config/crd/bases"
OUT = Path(__file__).resolve().parent / "kuberay"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def main(repo: Path) -> None:
    sources = {}
    for tag in TAGS:
        commit = git(repo, "rev-list", "-n1", tag).strip()
        for kind, plural in CRDS.items():
            path = f"{CRD_DIR}/ray.io_{plural}.yaml"
            try:
                crd = yaml.safe_load(git(repo, "show", f"{tag}:{path}"))
            except subprocess.CalledProcessError:
                continue  # the CRD does not exist at this tag (RayCronJob before v1.6.0)
            assert crd["spec"]["names"]["kind"] == kind, (tag, path)
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            out = OUT / tag / f"{plural}.json.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            data = json.dumps(version["schema"]["openAPIV3Schema"], sort_keys=True, separators=(",", ":"))
            out.write_bytes(gzip.compress(data.encode(), compresslevel=9, mtime=0))
            sources[f"{tag}/{plural}.json.gz"] = {"kind": kind, "apiVersion": "ray.io/v1", "tag": tag,
                                                  "commit": commit, "path": path}
    (OUT / "SOURCES.json").write_text(json.dumps(sources, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
