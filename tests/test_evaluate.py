"""Evaluation protocols: stratified subsets, kNN suite, linear probes (frozen features, augmented),
SwAV's fine-tuning schedule, the protocol in a stage's MLflow params, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.errors import ConfigError
from trainers.finetune import MemoryImages, augmented_linear_probe, finetune
from trainers.evaluate import (KNN_SWEEP, BackboneSpec, FinetuneSettings, ImageSet, LinearSettings,
                               eval_view, finetune_plan, knn_suite, linear_probe,
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


def brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, classes):
    """Weighted kNN written out per test sample in float64 (the reference): (top-1, top-5) accuracy."""
    import numpy as np

    train = train_x.double().numpy() / np.linalg.norm(train_x.double().numpy(), axis=1, keepdims=True)
    test = test_x.double().numpy() / np.linalg.norm(test_x.double().numpy(), axis=1, keepdims=True)
    top1 = top5 = 0
    for query, truth in zip(test, test_y.tolist()):
        similarity = train @ query
        neighbours = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(classes)
        for index in neighbours:
            votes[int(train_y[index])] += np.exp(similarity[index] / temperature)
        ranked = np.argsort(-votes, kind="stable")
        top1 += int(ranked[0] == truth)
        top5 += int(truth in ranked[:5])
    return top1 / len(test_y), top5 / len(test_y)


def test_one_knn_online_and_offline_with_one_vocabulary():
    """The pipeline's knn stage (knn_suite, raw features) and the online kNN (knn_accuracy, normalised
    features) are one implementation with one set of names, and both equal kNN written out by hand."""
    train_x, train_y = _clusters(800, classes=7, spread=7)
    test_x, test_y = _clusters(200, classes=7, spread=7, seed=1)
    result = knn_suite(train_x, train_y, test_x, test_y, 7, chunk=64)
    ONE = 1.01 / len(test_y)  # noqa: N806
    n = lambda x: F.normalize(x, dim=1)  # noqa: E731
    online = knn_accuracy(n(train_x), train_y, n(test_x), test_y, ks=(20, 200), temperature=0.07, num_classes=7)
    online_wide = knn_accuracy(n(train_x), train_y, n(test_x), test_y, ks=(200,), temperature=0.1, num_classes=7)
    assert set(online) == {"knn_top1_k20", "knn_top5_k20", "knn_top1_k200", "knn_top5_k200"}
    assert set(online_wide) == {"knn_top1_k200_t0.1", "knn_top5_k200_t0.1"}
    assert set(result) == {"knn_top1_k20", "knn_top5_k20", "knn_top1_k200_t0.1", "knn_top5_k200_t0.1", "knn_sweep"}
    for (k, t), names in {(20, 0.07): ("knn_top1_k20", "knn_top5_k20"),
                          (200, 0.1): ("knn_top1_k200_t0.1", "knn_top5_k200_t0.1")}.items():
        expected = brute_force_knn(train_x, train_y, test_x, test_y, k, t, 7)
        # float32 against float64: one near-tie among 200 test images may fall the other way
        assert (result[names[0]], result[names[1]]) == pytest.approx(expected, abs=ONE), (k, t)
        assert result[names[0]] == {**online, **online_wide}[names[0]]  # the same code, the same names
        assert result[names[1]] == {**online, **online_wide}[names[1]]
    assert online["knn_top1_k200"] == pytest.approx(brute_force_knn(train_x, train_y, test_x, test_y, 200, 0.07, 7)[0],
                                                    abs=ONE)
    assert sorted(result["knn_sweep"]) == list(KNN_SWEEP)
    assert result["knn_sweep"][20] == result["knn_top1_k20"]
    assert result["knn_sweep"][1] == pytest.approx(brute_force_knn(train_x, train_y, test_x, test_y, 1, 0.07, 7)[0],
                                                   abs=ONE)
    assert 0.3 < result["knn_top1_k20"] < 0.95  # overlapping clusters: neither chance nor perfect
    # a bank smaller than k: every training sample votes
    small = knn_accuracy(n(train_x[:15]), train_y[:15], n(test_x), test_y, ks=(20,), num_classes=7)
    assert small["knn_top1_k20"] == pytest.approx(brute_force_knn(train_x[:15], train_y[:15], test_x, test_y, 15,
                                                                  0.07, 7)[0], abs=ONE)


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


# --------------------------------------------------------------------------- protocols
class _Recorder(torch.nn.Module):
    """A frozen stand-in backbone that keeps every batch it is given: features = 2x2 average pools."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return F.adaptive_avg_pool2d(x, 2).flatten(1) * self.scale


def _images(n, classes=2, size=8, seed=0, split="train"):
    """uint8 images whose brightness tells the class (class c: mean ~ 60 + 120 c)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    noise = torch.randint(0, 60, (n, size, size, 3), generator=g)
    images = (noise + 60 + 120 * labels.view(-1, 1, 1, 1)).clamp(0, 255).to(torch.uint8)
    return ImageSet("toy", split, images, labels, [str(c) for c in range(classes)])


SPEC = BackboneSpec(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_augmented_probe_draws_new_crops_each_epoch_and_a_fixed_view_at_test():
    train, test = _images(1), _images(3, seed=1, split="test")
    runs = []
    for seed in (0, 0, 1):
        backbone = _Recorder()
        settings = LinearSettings.for_protocol("augmented", "digits", epochs=4, batch_size=1, seed=seed)
        result = augmented_linear_probe(backbone, 12, train, test, SPEC, settings)
        assert len(backbone.seen) == 4 + 1 and [v.shape[0] for v in backbone.seen] == [1, 1, 1, 1, 3]
        runs.append((backbone.seen, result))
    views, _ = runs[0]
    whole = eval_view(train.images, SPEC)
    for i in range(4):
        assert not torch.allclose(views[i], whole, atol=1e-3), "a training view is a random crop, not the image"
        for j in range(i):
            assert not torch.allclose(views[i], views[j], atol=1e-3), f"epochs {j} and {i} drew the same crop"
    # at test: exactly the whole image, resized and normalised - no randomness, whatever the seed
    assert torch.equal(views[4], eval_view(test.images, SPEC, 1.0))
    assert torch.equal(runs[2][0][4], views[4])
    assert all(torch.equal(a, b) for a, b in zip(views, runs[1][0])), "same seed, same crops"
    assert runs[0][1] == runs[1][1]
    assert not torch.allclose(runs[2][0][0], views[0], atol=1e-3), "another seed, other crops"
    # ImageNet-like data: DINO's test view, the central 7/8 (here 7 of 8 px), resized to the input size
    backbone = _Recorder()
    settings = LinearSettings.for_protocol("augmented", "tiny-imagenet", epochs=1, batch_size=1)
    assert settings.test_crop == 0.875 and settings.schedule == "cosine_epoch" and settings.lr == 0.001
    augmented_linear_probe(backbone, 12, train, test, SPEC, settings)
    assert torch.equal(backbone.seen[-1], eval_view(test.images[:, :7, :7], SPEC))


def test_augmented_probe_learns_with_solo_learn_step_schedule():
    train, test = _images(64), _images(32, seed=1, split="test")
    settings = LinearSettings.for_protocol("augmented", "cifar10", epochs=10, batch_size=16)
    assert (settings.lr, settings.momentum, settings.nesterov, settings.weight_decay, settings.standardize) == \
        (0.1, 0.9, False, 0.0, False)
    lrs = []
    result = augmented_linear_probe(_Recorder(), 12, train, test, SPEC, settings,
                                    progress=lambda epoch, loss, lr: lrs.append(lr[0]))
    # solo-learn: x0.1 at epochs 60 and 80 of 100, here 6 and 8 of 10
    assert lrs == pytest.approx([0.1] * 6 + [0.01] * 2 + [0.001] * 2)
    assert result["linear_top1"] == 1.0  # brightness separates the classes


def test_semi_supervised_follows_swav_schedule_per_fraction(monkeypatch):
    import trainers.finetune as evaluate

    seen = []
    real_step = evaluate._sgd_step

    def spy(optimizer, lrs, loss):
        real_step(optimizer, lrs, loss)
        seen.append([(g["lr"], g["momentum"], g["nesterov"], g["weight_decay"], len(g["params"]))
                     for g in optimizer.param_groups])

    monkeypatch.setattr(evaluate, "_sgd_step", spy)
    train, test = _images(20), _images(6, seed=1, split="test")
    expected = {0.01: (0.02, 5.0), 0.1: (0.01, 0.2)}  # SwAV README: 1% / 10% labels
    for fraction, (trunk, head) in expected.items():
        seen.clear()
        torch.manual_seed(0)
        backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        settings = FinetuneSettings.for_fraction("swav", "cifar10", fraction, min_steps=0)
        assert (settings.epochs, settings.batch_size, settings.gamma, settings.test_crop) == (20, 256, 0.2, 1.0)
        result = finetune(backbone, 4, train, np.arange(20), test, SPEC, settings)
        assert result["plan"] == {"batch_size": 20, "steps_per_epoch": 1, "epochs": 20, "decay_epochs": [12, 16]}
        assert len(seen) == 20  # one update per epoch
        for epoch, groups in enumerate(seen):
            factor = 1.0 if epoch < 12 else 0.2 if epoch < 16 else 0.04
            (trunk_lr, *trunk_rest), (head_lr, *head_rest) = groups
            assert trunk_lr == pytest.approx(trunk * factor) and head_lr == pytest.approx(head * factor), epoch
            assert trunk_rest == [0.9, False, 0.0, 2] and head_rest == [0.9, False, 0.0, 2]  # conv / head w, b
    # a subset too small for min_steps updates in 20 epochs: longer, the decays keep their place (60%, 80%)
    plan = finetune_plan(FinetuneSettings.for_fraction("swav", "cifar10", 0.01), 13)
    assert plan == {"batch_size": 13, "steps_per_epoch": 1, "epochs": 200, "decay_epochs": [120, 160]}
    plan = finetune_plan(FinetuneSettings.for_fraction("swav", "cifar10", 0.01), 600)
    assert plan == {"batch_size": 256, "steps_per_epoch": 3, "epochs": 67, "decay_epochs": [40, 54]}


class _FakeMlflow:
    """What PipelineRunner._run_stage asks of an MLflow client, in memory."""

    def __init__(self):
        self.params: dict[str, dict] = {}

    def _run(self, run_id):
        from types import SimpleNamespace

        return SimpleNamespace(info=SimpleNamespace(run_id=run_id),
                               data=SimpleNamespace(params=self.params.setdefault(run_id, {}), metrics={}, tags={}))

    def search_runs(self, *_, **__):
        return []

    def create_run(self, experiment_id, run_name, tags):
        return self._run(run_name)

    def get_run(self, run_id):
        return self._run(run_id)

    def log_batch(self, run_id, metrics=(), params=()):
        self.params.setdefault(run_id, {}).update({p.key: p.value for p in params})

    def log_artifact(self, *_, **__):
        pass

    set_tag = set_terminated = update_run = log_artifact


def test_a_stage_logs_its_protocol_name_and_settings_as_params(tmp_path, monkeypatch):
    import json

    from pipelines.runner import PipelineRunner, StageOutcome
    from pipelines.spec import parse_pipeline

    monkeypatch.setenv("SSLAB_HOME", str(tmp_path / "home"))
    pretrain = str(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "swav_fashion-mnist.yaml")
    spec = parse_pipeline({"name": "t", "stages": {"pretrain": {"config": pretrain},
                                                    "linear": {"protocol": "augmented"},
                                                    "fast": {"kind": "linear", "lr": 0.5},
                                                    "semi": {"epochs": 30}}})
    runner = PipelineRunner(spec, tracking_uri=f"sqlite:///{tmp_path}/unused.db", out_dir=str(tmp_path / "out"))
    runner.client, runner.experiment_id, runner.parent_id, runner.children = _FakeMlflow(), "0", "parent", {}
    runner.outcomes["pretrain"] = StageOutcome("pretrain", "pretrain", "r", "finished", True, "k", "h",
                                               {"metrics": {}, "extra": {"dataset": "cifar10"}})
    computed = {}

    def compute(stage, settings, folder):  # what the Ray task would be handed
        computed[stage.name] = settings
        return {"metrics": {}, "extra": {}, "files": {}}

    monkeypatch.setattr(runner, "_compute", compute)
    for name in ("linear", "fast", "semi"):
        runner._run_stage(spec.stage(name))
    params = runner.client.params
    linear, fast, semi = params["t/linear"], params["t/fast"], params["t/semi"]
    # solo-learn's CIFAR linear protocol, spelled out
    assert {k: linear[k] for k in ("protocol", "dataset", "epochs", "lr", "batch_size", "weight_decay", "momentum",
                                   "nesterov", "schedule", "decay_at", "gamma", "standardize", "crop_scale",
                                   "test_crop")} == {
        "protocol": "augmented", "dataset": "cifar10", "epochs": "100", "lr": "0.1", "batch_size": "256",
        "weight_decay": "0.0", "momentum": "0.9", "nesterov": "False", "schedule": "multistep",
        "decay_at": "[0.6, 0.8]", "gamma": "0.1", "standardize": "False", "crop_scale": "[0.08, 1.0]",
        "test_crop": "1.0"}
    assert (fast["protocol"], fast["lr"], fast["schedule"], fast["standardize"], fast["crop_scale"]) == \
        ("frozen_features", "0.5", "cosine", "True", "None")
    assert (semi["protocol"], semi["epochs"], semi["gamma"], semi["decay_at"], semi["momentum"], semi["weight_decay"],
            semi["batch_size"]) == ("swav", "30", "0.2", "[0.6, 0.8]", "0.9", "0.0", "256")
    assert json.loads(semi["lrs"]) == {"semi1": [0.02, 5.0], "semi10": [0.01, 0.2]}
    assert computed["linear"]["schedule"] == "multistep" and computed["semi"]["lrs"]["semi1"] == [0.02, 5.0]


def test_the_augmented_stage_records_its_protocol_in_the_result(monkeypatch):
    import pipelines.stages as stages

    backbone = _Recorder()
    toy = {"train": _images(16), "test": _images(8, seed=1, split="test")}
    monkeypatch.setattr(stages, "image_source", lambda dataset, split, *_: MemoryImages(toy[split]))
    monkeypatch.setattr(stages, "_load_backbone", lambda path, device: (backbone, 12, {"image_size": 8}))
    result = stages.run_evaluation("linear", {"dataset": "tiny-imagenet", "protocol": "augmented", "epochs": 2,
                                              "lr": None}, "unused.pt", device="cpu", log=lambda *_: None)
    protocol = result["extra"]["protocol"]
    assert {k: protocol[k] for k in ("protocol", "epochs", "lr", "schedule", "test_crop", "crop_scale")} == {
        "protocol": "augmented", "epochs": 2, "lr": 0.001, "schedule": "cosine_epoch", "test_crop": 0.875,
        "crop_scale": [0.08, 1.0]}
    assert protocol["reference"].startswith("facebookresearch/dino eval_linear.py")
    assert len(backbone.seen) == 2 * 1 + 1 and backbone.seen[-1].shape == (8, 3, 8, 8)  # 2 epochs, then the test
    assert set(result["metrics"]) == {"linear_top1", "linear_top5"} and len(result["extra"]["per_class"]) == 2


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
    assert m["knn_top1_k20"] > 0.5 and m["linear_top1"] > 0.5 and m["transfer_digits_top1"] == m["linear_top1"]
    assert 0.1 < m["semi10_top1"] <= 1.0
    assert first["transfer"]["extra"]["skipped"] == ["imagefolder:/nonexistent"]
    subset = first["semi"]["files"]["semi10_indices.txt"].split()
    assert len(subset) == round(0.1 * 1347)
    assert len(first["linear"]["extra"]["per_class"]) == 10
    # each result names its protocol and every setting of it
    assert first["knn"]["extra"]["protocol"]["k"] == [20, 200]
    linear = first["linear"]["extra"]["protocol"]
    assert (linear["protocol"], linear["epochs"], linear["schedule"], linear["standardize"]) == \
        ("frozen_features", 5, "cosine", True)
    assert first["transfer"]["extra"]["protocol"]["protocol"] == "frozen_features"
    semi = first["semi"]["extra"]
    assert (semi["protocol"]["protocol"], semi["protocol"]["lrs"]) == ("swav", {"semi10": [0.01, 0.2]})
    assert {k: semi["subsets"]["semi10"][k] for k in ("lr", "head_lr", "steps_per_epoch", "epochs", "decay_epochs")} \
        == {"lr": 0.01, "head_lr": 0.2, "steps_per_epoch": 3, "epochs": 7, "decay_epochs": [4, 6]}  # 135 labels, 64


def test_eval_command_on_a_backbone_file(random_backbone, data_root, capsys, tmp_path):
    import json

    from sslab.cli import main

    argv = ["eval", "knn", "--backbone", str(random_backbone), "--dataset", "digits", "--device", "cpu",
            "--data-root", str(data_root), "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert set(first) == {"knn_top1_k20", "knn_top5_k20", "knn_top1_k200_t0.1", "knn_top5_k200_t0.1"}
    assert first["knn_top1_k20"] > 0.5
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
