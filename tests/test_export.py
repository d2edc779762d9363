"""sslab export: weights that torchvision's and timm's own modules load with strict=True, a model card,
and a registered MLflow model that loads back with MLflow's pytorch flavour."""

import json

import pytest
import torch
import yaml

from sslab.cli import main
from trainers.backbones import build_backbone
from trainers.checkpoint import save_checkpoint
from trainers.errors import ConfigError
from trainers.export import export_backbone


def fake_run(folder, backbone="resnet18", image_size=32, method="swav"):
    """A finished run folder as the Trainer leaves it: backbone.pt, summary.json, config.yaml."""
    torch.manual_seed(0)
    module, dim = build_backbone(backbone, image_size)
    for m in module.modules():  # non-trivial BatchNorm statistics, so a missed buffer shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    save_checkpoint({"format": 1, "method": method, "backbone": backbone, "image_size": image_size,
                     "feature_dim": dim, "cifar_stem": None, "patch_size": None, "state_dict": module.state_dict()},
                    folder / "backbone.pt", what="backbone")
    (folder / "summary.json").write_text(json.dumps({"steps": 1560, "epochs_completed": 4, "knn_top1_k20": 0.8125,
                                                     "online_linear_top1": 0.7,  "wall_s": 12.0}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"name": "swav_cifar10", "data": {"dataset": "cifar10",
                                                                                          "crops": "2x32"},
                                                        "train": {"epochs": 4}}))
    return module.eval()


def outputs(module, size=32):
    with torch.no_grad():
        return module.eval()(torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1)))


def test_resnet_weights_load_strictly_into_torchvision_and_timm_as_the_card_says(tmp_path):
    import timm
    import torchvision
    from safetensors.torch import load_file

    ours = fake_run(tmp_path / "run")
    for fmt in ("torchvision", "timm"):
        out = export_backbone(tmp_path / "run", fmt, tmp_path / fmt)
        assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "export.json", "model.safetensors"]
        # the card's recipe, written out here by hand
        model = (torchvision.models.resnet18(weights=None) if fmt == "torchvision" else
                 timm.create_model("resnet18", pretrained=False, num_classes=0))
        model.fc = torch.nn.Identity()
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem, as the card says
        model.maxpool = torch.nn.Identity()
        model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
        assert torch.allclose(outputs(model), outputs(ours), atol=1e-5), fmt
        card = (out / "MODEL_CARD.md").read_text()
        assert "model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem" in card
        assert "| method | swav |" in card and "| data set | cifar10 |" in card and "| epochs | 4 (1560 steps) |" in card
        assert "| knn_top1_k20 | 81.25% | kNN top-1 (k=20, T=0.07), weighted kNN on frozen features |" in card
        assert "| online_linear_top1 | 70.00% | online linear probe" in card
        facts = json.loads((out / "export.json").read_text())
        assert facts["format"] == fmt and facts["metrics"]["knn_top1_k20"] == 0.8125
    # a 224-px run keeps torchvision's own stem: the plain module loads the weights
    fake_run(tmp_path / "large", image_size=224)
    out = export_backbone(tmp_path / "large" / "backbone.pt", "torchvision", tmp_path / "large-tv", weights="pt")
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)
    assert "CIFAR stem" not in (out / "MODEL_CARD.md").read_text()


def test_vit_weights_load_strictly_into_timm(tmp_path):
    import timm
    from safetensors.torch import load_file

    ours = fake_run(tmp_path / "run", backbone="vit_tiny", method="dino")
    out = export_backbone(tmp_path / "run", "timm", tmp_path / "timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                              dynamic_img_size=True)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert torch.allclose(outputs(model), outputs(ours), atol=1e-5)
    assert "img_size=32, patch_size=4" in (out / "MODEL_CARD.md").read_text()
    with pytest.raises(ConfigError, match="export ViTs with --format timm"):
        export_backbone(tmp_path / "run", "torchvision", tmp_path / "tv")
    assert not (tmp_path / "tv").exists()


def test_what_cannot_be_exported_is_refused_in_one_line_and_leaves_nothing(tmp_path, capsys):
    fake_run(tmp_path / "mini", backbone="resnet_mini")
    assert main(["export", str(tmp_path / "mini"), "--out", str(tmp_path / "x")]) == 2
    assert "resnet_mini backbone has no torchvision or timm counterpart" in capsys.readouterr().err
    fake_run(tmp_path / "run")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) == 2
    assert "no backbone file there" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "z"), "--register", "a/b"]) == 2
    assert "is not a model name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini", "nothing", "run", "taken"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["mini", "run", "taken"]
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["file"]


def test_register_gives_a_model_version_that_mlflow_loads_back(tmp_path, capsys, monkeypatch):
    import mlflow
    import mlflow.pytorch

    monkeypatch.setenv("SSLAB_HOME", str(tmp_path / "home"))
    ours = fake_run(tmp_path / "run")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "tv"), "--register", "swav-r18",
                 "--tracking-uri", uri]) == 0
    assert "registered model 'swav-r18' version 1" in capsys.readouterr().out
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/swav-r18/1")
    assert torch.allclose(outputs(loaded), outputs(ours), atol=1e-5)
    version = mlflow.MlflowClient(uri).get_model_version("swav-r18", "1")
    assert version.description == (tmp_path / "tv" / "MODEL_CARD.md").read_text()
    assert version.tags["format"] == "torchvision"


def test_the_pipeline_report_exports_the_final_backbone_with_the_pipelines_metrics(tmp_path):
    from types import SimpleNamespace

    from pipelines.runner import PipelineRunner, StageOutcome

    fake_run(tmp_path / "run")
    pretrain = StageOutcome("pretrain", "pretrain", "r1", "finished", False, "k", "h",
                            {"metrics": {"knn_top1_k20": 0.5}, "extra": {"backbone": "resnet18", "method": "swav",
                             "backbone_path": str(tmp_path / "run" / "backbone.pt")}})
    linear = StageOutcome("linear", "linear", "r2", "finished", False, "k", "h",
                          {"metrics": {"linear_top1": 0.875}, "extra": {}})
    said = []
    files = PipelineRunner._export_final_backbone(SimpleNamespace(log=said.append), [pretrain, linear],
                                                  tmp_path / "report")
    assert [p.name for p in files] == ["MODEL_CARD.md", "export.json", "model.safetensors"]
    card = (tmp_path / "report" / "export" / "MODEL_CARD.md").read_text()
    assert "| linear_top1 | 87.50% | linear probe on the frozen backbone" in card and "torchvision state dict" in card
    assert "| knn_top1_k20 | 50.00% |" in card  # the pipeline's value over the run's own 81.25%
    # a backbone neither library has: the report goes on without an export
    mini = StageOutcome("pretrain", "pretrain", "r1", "finished", False, "k", "h",
                        {"metrics": {}, "extra": {"backbone": "resnet_mini", "backbone_path": "x"}})
    assert PipelineRunner._export_final_backbone(SimpleNamespace(log=said.append), [mini], tmp_path / "r2") == []
