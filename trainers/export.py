"""Backbone weights in the formats people load: torchvision and timm state dicts, as safetensors.

``export_backbone(source, fmt, out)`` reads a run folder (``backbone.pt``, plus ``summary.json`` and
``config.yaml`` for the model card) or a ``backbone.pt`` file and writes ``out/``:

- ``model.safetensors`` (or ``model.pt`` with ``weights="pt"``): exactly the keys and shapes the
  library's own module loads with ``strict=True``;
- ``MODEL_CARD.md``: how the weights were made (method, recipe, data set, epochs) and how good they are
  (every evaluation metric the run recorded, with its protocol), and the lines that load them;
- ``export.json``: the same facts for programs.

The modules, built the way the card says:

- torchvision (ResNet-18/50): ``torchvision.models.resnet18(); model.fc = torch.nn.Identity()`` (the
  classifier is not part of a self-supervised backbone). **CIFAR stem** (runs on images of 64 px or less):
  ``model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = torch.nn.Identity()`` too,
  since torchvision's 7x7/2 stem has no such variant.
- timm (ResNet-18/50 and ViT-Tiny/Small): ``timm.create_model(name, num_classes=0, ...)``, with ``img_size``
  and ``patch_size`` of the run for ViTs; timm's ResNets have no CIFAR stem either (same two lines).

``resnet_mini`` (the CPU test backbone) has no counterpart in either library and is refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from trainers.errors import ConfigError, UserError

FORMATS = ("torchvision", "timm")
WEIGHT_FILES = ("safetensors", "pt")
TIMM_NAMES = {"resnet18": "resnet18", "resnet50": "resnet50", "vit_tiny": "vit_tiny_patch16_224",
              "vit_small": "vit_small_patch16_224"}


def _read_source(source: str | Path) -> tuple[dict, dict, dict]:
    """(backbone file contents, summary metrics, resolved config) of a run folder or a backbone file."""
    from trainers.loop import load_backbone

    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent
    backbone = path / "backbone.pt" if path.is_dir() else path
    if not backbone.is_file():
        raise UserError(f"{source}: no backbone file there: pass a run folder (with backbone.pt, written when a "
                        "run finishes) or a backbone.pt file")
    _, _, info = load_backbone(backbone)
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    config = {}
    if (folder / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    return info, summary, config


def library_module(info: dict, fmt: str) -> torch.nn.Module:
    """The torchvision / timm module that ``info``'s exported weights load into with ``strict=True``,
    built as the model card says."""
    name, cifar_stem = info["backbone"], uses_cifar_stem(info)
    check_export(name, fmt)
    if fmt == "torchvision":
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        model.fc = torch.nn.Identity()
    else:
        import timm

        extra = {}
        if name.startswith("vit"):
            from trainers.backbones import vit_patch_size

            extra = dict(img_size=info["image_size"], patch_size=vit_patch_size(info["image_size"],
                                                                                 info.get("patch_size")),
                         dynamic_img_size=True)
        model = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=0, **extra)
    if name.startswith("resnet") and cifar_stem:
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


def uses_cifar_stem(info: dict) -> bool:
    """As build_backbone decides it: the run's model.cifar_stem, else automatic for images of 64 px or less."""
    from trainers.backbones import SMALL_IMAGE

    stem = info.get("cifar_stem")
    return info["image_size"] <= SMALL_IMAGE if stem is None else bool(stem)


def check_export(backbone: str, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"export format '{fmt}' must be one of {', '.join(FORMATS)}")
    if backbone not in TIMM_NAMES:
        raise ConfigError(f"a {backbone} backbone has no torchvision or timm counterpart: export a run of "
                          f"{', '.join(TIMM_NAMES)}")
    if fmt == "torchvision" and backbone.startswith("vit"):
        raise ConfigError(f"torchvision has no {backbone} with these weights' layout: export ViTs with --format timm")


def build_lines(info: dict, fmt: str, weights_file: str = "model.safetensors") -> list[str]:
    """Python lines that build the module and load the weights (for the card)."""
    name = info["backbone"]
    cifar = name.startswith("resnet") and uses_cifar_stem(info)
    if fmt == "torchvision":
        lines = ["import torch, torchvision", f"model = torchvision.models.{name}(weights=None)",
                 "model.fc = torch.nn.Identity()"]
    else:
        extra = ""
        if name.startswith("vit"):
            from trainers.backbones import vit_patch_size

            extra = (f", img_size={info['image_size']}, "
                     f"patch_size={vit_patch_size(info['image_size'], info.get('patch_size'))}, dynamic_img_size=True")
        lines = ["import torch, timm", f"model = timm.create_model('{TIMM_NAMES[name]}', num_classes=0{extra})"]
    if cifar:
        lines += ["model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem",
                  "model.maxpool = torch.nn.Identity()"]
    if weights_file.endswith(".safetensors"):
        lines += ["from safetensors.torch import load_file", f"model.load_state_dict(load_file('{weights_file}'))"]
    else:
        lines.append(f"model.load_state_dict(torch.load('{weights_file}', weights_only=True))")
    return lines


def _protocol_of(metric: str) -> str:
    from trainers.knn import knn_label

    if knn_label(metric):
        return f"{knn_label(metric)}, weighted kNN on frozen features"
    if metric.startswith("online_linear"):
        return "online linear probe: a detached linear classifier trained during pretraining (solo-learn's)"
    if metric.startswith("linear_"):
        return "linear probe on the frozen backbone (the pipeline's linear stage; its protocol is in its MLflow params)"
    if metric.startswith("semi"):
        return f"fine-tuned on {metric[4:].split('_')[0]}% of the labels (SwAV's semi-supervised protocol)"
    if metric.startswith("transfer_"):
        return "linear probe on another data set (the pipeline's transfer stage)"
    return ""


def model_card(info: dict, summary: dict, config: dict, fmt: str, weights_file: str) -> str:
    method = info.get("method", "?")
    data = config.get("data", {}) if isinstance(config, dict) else {}
    train = config.get("train", {}) if isinstance(config, dict) else {}
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and ("top1" in k or "top5" in k)}
    lines = [f"# {info['backbone']} pretrained with {method} (sslab)", "",
             "| | |", "|---|---|",
             f"| method | {method} |",
             f"| recipe | {config.get('name', '?') if isinstance(config, dict) else '?'} (config.yaml of the run) |",
             f"| data set | {data.get('dataset', '?')} |",
             f"| crops | {data.get('crops', '?')} |",
             f"| epochs | {summary.get('epochs_completed', train.get('epochs', '?'))} "
             f"({summary.get('steps', '?')} steps) |",
             f"| input | {info['image_size']} px, {info['feature_dim']}-d features |",
             f"| format | {fmt} state dict, {weights_file} |", ""]
    if metrics:
        lines += ["## Evaluation", "", "| metric | value | protocol |", "|---|---|---|"]
        lines += [f"| {k} | {100 * v:.2f}% | {_protocol_of(k)} |" for k, v in sorted(metrics.items())]
        lines.append("")
    lines += ["## Load", "", "```python", *build_lines(info, fmt, weights_file), "```", ""]
    return "\n".join(lines)


def default_format(backbone: str) -> str | None:
    """torchvision for ResNets, timm for ViTs, None for a backbone neither library has."""
    if backbone not in TIMM_NAMES:
        return None
    return "timm" if backbone.startswith("vit") else "torchvision"


def export_backbone(source: str | Path, fmt: str, out: str | Path, weights: str = "safetensors",
                    metrics: dict | None = None) -> Path:
    """Write ``out/`` (weights, MODEL_CARD.md, export.json) from a run folder or backbone file; the
    folder appears complete or not at all. ``metrics`` (e.g. a pipeline's evaluations) join the run's own
    for the card. Returns ``out``."""
    if weights not in WEIGHT_FILES:
        raise ConfigError(f"weights file type '{weights}' must be one of {', '.join(WEIGHT_FILES)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder: choose a new folder")
    info, summary, config = _read_source(source)
    summary = {**summary, **(metrics or {})}
    check_export(info["backbone"], fmt)
    model = library_module(info, fmt)
    state = {k: v.detach().cpu().contiguous() for k, v in info["state_dict"].items()}
    model.load_state_dict(state, strict=True)  # the promise of the format, checked before anything is written
    weights_file = f"model.{weights}"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if weights == "safetensors":
            from safetensors.torch import save_file

            save_file(state, str(staging / weights_file), metadata={"format": fmt, "backbone": info["backbone"]})
        else:
            torch.save(state, staging / weights_file)
        (staging / "MODEL_CARD.md").write_text(model_card(info, summary, config, fmt, weights_file))
        facts = {"format": fmt, "weights": weights_file, "backbone": info["backbone"], "method": info.get("method"),
                 "image_size": info["image_size"], "feature_dim": info["feature_dim"],
                 "cifar_stem": info.get("cifar_stem"), "patch_size": info.get("patch_size"),
                 "build": build_lines(info, fmt, weights_file), "metrics": {k: v for k, v in summary.items()
                                                             if isinstance(v, (int, float))}}
        (staging / "export.json").write_text(json.dumps(facts, indent=1))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
