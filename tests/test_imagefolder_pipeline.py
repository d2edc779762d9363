"""A user's own plain class folder through the whole pipeline, certified against expected bands.

The folder is built from real CIFAR-10 images (JPEG files in ``<class>/``, no train/test split): its
test split is the stratified hold-out (trainers/data/datasets.py). The pipeline prepares both splits
(the sidecars record the hold-out), pretrains with online kNN on the hold-out, evaluates and reports.
A band the kNN is inside passes (exit 0); a rerun with ``--force knn`` and a band it cannot reach
reruns only knn and the report, marks the metric out in the report, the JSON and MLflow, and exits 7.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow  # a Ray pretraining run and a pipeline, twice

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 30


def _pets(root: Path, data_root) -> Path:
    from trainers.data.datasets import load_split

    cifar = load_split("cifar10", "test", data_root)
    for label, name in enumerate(cifar.classes):
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(cifar.labels == label)[:PER_CLASS]:
            Image.fromarray(cifar.images[int(i)]).save(root / name / f"{i}.jpg", quality=95)
    return root


def _pipeline(tmp_path: Path, dataset: str, band, workers: int = 1) -> Path:
    spec = {"name": "pets", "seed": 0, "stages": {
        "prepare": {"datasets": [dataset]},
        "pretrain": {"config": str(ROOT / "configs" / "pretrain" / "swav_fashion-mnist.yaml"),
                     "set": [f"data.dataset={dataset}", "data.crops=2x32+2x16", "data.batch_size=64", "train.epochs=1",
                             "optim.warmup_epochs=0", "knn.every_epochs=1", "knn.k=[20]", "train.log_every=1",
                             ],
                     "workers": 1, "cpus_per_worker": 1},
        "knn": {"expect": {"knn_top1_k20": band}, "workers": workers},
        # trained on images: with workers > 1, data-parallel Ray Train workers (DDP), as pretraining
        "linear": {"protocol": "augmented", "epochs": 2, "workers": workers},
        "semi": {"fractions": [0.1], "epochs": 2, "min_steps": 0, "workers": workers},
        # on frozen features: with workers > 1, each worker extracts a block of each split
        "transfer": {"datasets": ["digits"], "epochs": 2, "workers": workers},
        "report": {}}}
    path = tmp_path / "pets.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # stages run in file order
    return path


def test_a_plain_class_folder_runs_the_pipeline_and_is_certified(local_ray, tmp_path, data_root, capsys):
    from mlflow.tracking import MlflowClient

    from sslab.cli import main
    from trainers.paths import state_dir

    folder = _pets(tmp_path / "pets", data_root)
    dataset = f"imagefolder:{folder}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    args = ["pipeline", "run", "--tracking-uri", uri, "--out", str(out), "--json"]

    assert main(args + ["--config", str(_pipeline(tmp_path, dataset, [0.0, 1.0]))]) == 0
    first = json.loads(capsys.readouterr().out)
    stages = {s["name"]: s for s in first["stages"]}
    knn = stages["knn"]["metrics"]["knn_top1_k20"]
    assert first["verdict"] == {"status": "pass", "checks": [
        {"stage": "knn", "metric": "knn_top1_k20", "value": knn, "band": [0.0, 1.0], "status": "in"}]}
    assert "pretrain_knn_top1_k20" in stages["pretrain"]["metrics"]  # online kNN on the held-out split

    # both splits prepared; the sidecars say how the test split was made: 6 of each class's 30 (20%)
    sidecars = [json.loads(p.read_text()) for p in (state_dir() / "data").glob("imagefolder-pets-*.beton.json")]
    assert sorted((m["split"], m["count"]) for m in sidecars) == [("test", 60), ("train", 240)]
    assert all(m["holdout"] == {"fraction": 0.2, "seed": 0, "of": str(folder)} for m in sidecars)
    client = MlflowClient(uri)
    pretrain_run = client.get_run(stages["pretrain"]["run_id"])
    profiles = {i.dataset.name: json.loads(i.dataset.profile) for i in pretrain_run.inputs.dataset_inputs}
    assert profiles and all(p["holdout"]["fraction"] == 0.2 for p in profiles.values())
    # every run shows its data sets: the evaluation stage and the pipeline's parent too
    pets = {m["key"][:36] for m in sidecars}
    for run_id in (stages["knn"]["run_id"], first["parent_run_id"]):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        ours = [i for i in inputs if i.dataset.digest in pets]
        assert sorted(i.dataset.name.rsplit("-", 1)[1] for i in ours) == ["test", "train"], run_id
    assert len(client.get_run(stages["knn"]["run_id"]).inputs.dataset_inputs) == 2  # the parent also has digits
    # (the transfer stage's), once a .beton of it exists in this session's state folder

    # the band it cannot be in, and --force knn: knn and the report run again, the rest is cached; the knn now
    # on 2 Ray workers, each extracting one block of each split: the same number as on one
    impossible = [round(knn + 0.5, 4), round(knn + 0.6, 4)]
    code = main(args + ["--config", str(_pipeline(tmp_path, dataset, impossible, workers=2)), "--force", "knn",
                        "--force", "linear", "--force", "semi", "--force", "transfer"])
    captured = capsys.readouterr()
    assert code == 7
    second = json.loads(captured.out)
    cached = {s["name"]: s["cached"] for s in second["stages"]}
    assert cached == {"prepare": True, "pretrain": True, "knn": False, "linear": False, "semi": False,
                      "transfer": False, "report": False}
    again = next(s for s in second["stages"] if s["name"] == "knn")
    assert again["metrics"]["knn_top1_k20"] == pytest.approx(knn) and again["run_id"] != stages["knn"]["run_id"]
    # 2 workers, the numbers of 1: DDP fine-tuning and augmented probe, the probe on gathered features
    for stage in second["stages"]:
        if stage["name"] in ("linear", "semi", "transfer"):
            assert stage["metrics"] == pytest.approx(stages[stage["name"]]["metrics"], abs=1e-6), stage["name"]
            assert stage["metrics"], stage["name"]
    assert "[linear] Ray Train: 2 worker(s)" in captured.err and "[semi] Ray Train: 2 worker(s)" in captured.err
    assert "[transfer] digits train features from 2 workers: 1,347 images" in captured.err
    assert second["verdict"]["status"] == "regression"
    assert second["verdict"]["checks"][0]["status"] == "out"
    assert f"[knn] {dataset} test features from 2 workers: 60 images" in captured.err
    assert f"[knn] kNN bank in 2 shards: 240 {dataset} train images, top-120 lists merged" in captured.err  # 120 per block
    error = captured.err.strip().splitlines()[-1]
    assert error == (f"error: 1 metric(s) outside their expected band: knn/knn_top1_k20 {knn:.4f} OUT of "
                     f"[{impossible[0]:g}, {impossible[1]:g}]: find the change that moved them, or record the new "
                     f"band in the pipeline's expect: if it is intended")
    assert client.get_run(second["parent_run_id"]).data.tags["sslab.verdict"] == "regression"
    knn_run = client.get_run(again["run_id"]).data.tags
    assert knn_run["sslab.forced"] == "1" and knn_run["sslab.expect.knn_top1_k20"].startswith(f"{knn:.4f} OUT of")
    report = (out / "report" / "report.md").read_text()
    assert "**Verdict: regression**" in report and "OUT of" in report
