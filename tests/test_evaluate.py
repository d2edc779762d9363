"""Evaluation protocols: stratified subsets, kNN suite, linear probe, fine-tuning, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.errors import ConfigError
from trainers.evaluate import (KNN_SWEEP, LinearSettings, knn_suite, linear_probe, random_resized_flip,
                               stratified_subset)
from trainers.knn import knn_accuracy


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_stratified_subset_has_exact_size_and_class_proportions(fraction):
    rng = np.random.default_rng(0)
    labels = rng.choice(10, size=60_000, p=np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum())  # unbalanced
    indices = stratified_subset(labels, fraction, seed=3)
    assert len(indices) == round(fraction * 60_000) and len(set(indices.tolist())) == len(indices)
    counts = np.bincount(labels[indices], minlength=10)
    expected = np.bincount(labels, minlength=10) * fraction
    assert np.all(np.abs(counts - expected) < 1.0), (counts, expected)  # largest-remainder rounding
    assert np.array_equal(indices, stratified_subset(labels, fraction, seed=3)), "fixed seed, same subset"
    assert not np.array_equal(indices, stratified_subset(labels, fraction, seed=4))


def test_stratified_subset_refuses_impossible_fractions():
    labels = np.repeat(np.arange(10), 50)
    for fraction in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="must lie in"):
            stratified_subset(labels, fraction)
    with pytest.raises(ConfigError, match="fewer than the 10 classes"):
        stratified_subset(labels, 0.01)  # 5 images for 10 classes
    assert len(stratified_subset(labels, 1.0)) == 500


def _clusters(n, dim=32, classes=5, spread=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


def test_knn_suite_matches_the_reference_knn_and_sweeps_k():
    train_x, train_y = _clusters(3000, spread=7)
    test_x, test_y = _clusters(700, spread=7, seed=1)
    result = knn_suite(train_x, train_y, test_x, test_y, 5, chunk=256)
    n = lambda x: F.normalize(x, dim=1)  # noqa: E731
    ref20 = knn_accuracy(n(train_x), train_y, n(test_x), test_y, ks=(20,), temperature=0.07, num_classes=5)
    ref200 = knn_accuracy(n(train_x), train_y, n(test_x), test_y, ks=(200,), temperature=0.1, num_classes=5)
    assert result["knn_top1"] == pytest.approx(ref20["knn_top1_k20"], abs=1e-6)
    assert result["knn_top5"] == pytest.approx(ref20["knn_top5_k20"], abs=1e-6)
    assert result["knn_top1_k200"] == pytest.approx(ref200["knn_top1_k200"], abs=1e-6)
    assert sorted(result["knn_sweep"]) == list(KNN_SWEEP)
    assert result["knn_sweep"][20] == pytest.approx(result["knn_top1"], abs=1e-6)
    assert 0.4 < result["knn_top1"] < 1.0  # overlapping clusters: neither chance nor perfect


def test_linear_probe_separates_clusters_and_is_deterministic():
    train_x, train_y = _clusters(2000)
    test_x, test_y = _clusters(500, seed=1)
    settings = LinearSettings(epochs=10, seed=0)
    first = linear_probe(train_x, train_y, test_x, test_y, 5, settings)
    again = linear_probe(train_x, train_y, test_x, test_y, 5, settings)
    assert first["linear_top1"] > 0.97 and first["linear_top5"] == 1.0
    assert first == again
    assert len(first["per_class"]) == 5 and min(first["per_class"]) > 0.9
    shuffled = linear_probe(train_x, train_y[torch.randperm(2000, generator=torch.Generator().manual_seed(0))],
                            test_x, test_y, 5, settings)
    assert shuffled["linear_top1"] < 0.4  # labels carry the signal, not the probe


def test_random_resized_flip_keeps_shape_and_mirrors():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = random_resized_flip(x, (1.0, 1.0), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):  # full-size crops: either the image or its mirror, nothing else
        assert torch.allclose(out[i], x[i], atol=1e-4) or torch.allclose(out[i], x[i].flip(-1), atol=1e-4)


@pytest.fixture
def random_backbone(tmp_path):
    from trainers.backbones import build_backbone
    from trainers.checkpoint import save_checkpoint
    from trainers.loop import CHECKPOINT_FORMAT

    torch.manual_seed(0)
    module, dim = build_backbone("resnet_mini", 16)
    return save_checkpoint({"format": CHECKPOINT_FORMAT, "method": "none", "backbone": "resnet_mini", "image_size": 16,
                            "feature_dim": dim, "cifar_stem": None, "patch_size": None,
                            "state_dict": module.state_dict()}, tmp_path / "backbone.pt")


def test_each_evaluation_is_reproducible_on_a_fixed_backbone(random_backbone, tmp_path, monkeypatch, data_root):
    from pipelines.stages import run_evaluation

    settings = {"knn": {"dataset": "digits", "batch_size": 512},
                "linear": {"dataset": "digits", "epochs": 5, "lr": 0.1, "weight_decay": 0.0, "batch_size": 128},
                "semi": {"dataset": "digits", "fractions": [0.1], "epochs": 1, "lr": 0.01, "weight_decay": 5e-4,
                         "batch_size": 64, "min_steps": 20},
                "transfer": {"datasets": [{"name": "digits", "optional": False},
                                          {"name": "imagefolder:/nonexistent", "optional": True}],
                             "epochs": 5, "lr": 0.1, "weight_decay": 0.0, "batch_size": 128}}
    results = []
    for attempt in range(2):  # separate state dirs: no feature cache shared between the two
        monkeypatch.setenv("SSLAB_HOME", str(tmp_path / f"state{attempt}"))
        results.append({kind: run_evaluation(kind, s, str(random_backbone), str(data_root), device="cpu",
                                             log=lambda *_: None) for kind, s in settings.items()})
    first, second = results
    for kind in settings:
        assert first[kind]["metrics"] == second[kind]["metrics"], kind
    m = {k: v for r in first.values() for k, v in r["metrics"].items()}
    # digits, 10 classes: random conv features are far above chance (0.1)
    assert m["knn_top1"] > 0.5 and m["linear_top1"] > 0.5 and m["transfer_digits_top1"] == m["linear_top1"]
    assert 0.1 < m["semi10_top1"] <= 1.0
    assert first["transfer"]["extra"]["skipped"] == ["imagefolder:/nonexistent"]
    subset = first["semi"]["files"]["semi10_indices.txt"].split()
    assert len(subset) == round(0.1 * 1347)
    assert len(first["linear"]["extra"]["per_class"]) == 10


def test_eval_command_on_a_backbone_file(random_backbone, data_root, capsys, tmp_path):
    import json

    from orchestrator.cli import main

    argv = ["eval", "knn", "--backbone", str(random_backbone), "--dataset", "digits", "--device", "cpu",
            "--data-root", str(data_root), "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert set(first) == {"knn_top1", "knn_top5", "knn_top1_k200", "knn_top5_k200"} and first["knn_top1"] > 0.5
    assert main(argv) == 0 and json.loads(capsys.readouterr().out) == first  # cached features, same numbers
    assert main(["eval", "semi", "--backbone", str(random_backbone.parent), "--dataset", "digits", "--device", "cpu",
                 "--fractions", "0.1", "--epochs", "1", "--min-steps", "5", "--out", str(tmp_path / "semi")]) == 0
    table = capsys.readouterr().out
    assert "fine-tuned on 10% labels, top-1" in table
    assert len((tmp_path / "semi" / "semi10_indices.txt").read_text().split()) == 135

    assert main(["eval", "linear", "--backbone", str(tmp_path / "missing" / "backbone.pt"), "--dataset", "digits"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --backbone") and "no such file" in error and error.count("\n") == 1
    assert main(["eval", "knn", "--backbone", str(random_backbone), "--dataset", "digitz"]) == 2
    assert "digitz" in capsys.readouterr().err
