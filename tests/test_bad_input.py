"""Bad input, through the command line: one line naming the problem and the fix, a non-zero exit,
no traceback (unless --debug), and nothing left behind that looks like a finished result.

Every case here is a row of docs/errors.md (the last test keeps the two in step).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.cli import main
from trainers.checkpoint import save_checkpoint
from trainers.loop import CHECKPOINT_FORMAT

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
# files whose presence says "this finished": none may appear after a refused command
COMPLETE_LOOKING = {"summary.json", "backbone.pt", "last.pt", "result.json", "report.md", "best_config.yaml",
                    "pipeline.json", "preview.png"}
TINY = ["--set", "data.dataset=digits", "--set", "data.crops=2x8", "--set", "data.batch_size=64",
        "--set", "model.backbone=resnet_mini", "--set", "train.epochs=1", "--set", "optim.warmup_epochs=0",
        "--set", "knn.every_epochs=0"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- what each case needs on disk
def _checkpoint(tmp: Path, method: str, backbone: str) -> Path:
    path = tmp / "run" / "checkpoints" / "last.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "method": method, "backbone": backbone, "step": 3,
                     "model": {"w": torch.zeros(2)}}, path)
    return path


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def _pickled(tmp: Path) -> Path:
    path = tmp / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "payload": _Exploit()}, path)
    return path


def _truncated(tmp: Path) -> Path:
    good = save_checkpoint({"format": CHECKPOINT_FORMAT, "method": "swav", "backbone": "resnet_mini",
                            "w": torch.randn(10_000)}, tmp / "good.pt")
    path = tmp / "cut.pt"
    path.write_bytes(good.read_bytes()[:20_000])
    good.unlink()
    return path


def _corrupt_archive(tmp: Path) -> Path:
    from trainers.paths import default_data_root

    root = tmp / "data"
    root.mkdir()
    with open(default_data_root() / "cifar10-jpg.tar.gz", "rb") as source:
        (root / "cifar10-jpg.tar.gz").write_bytes(source.read(200_000))  # an interrupted download
    return root


def _corrupt_beton(tmp: Path) -> Path:
    cache = tmp / "cache"
    assert main(["data", "prepare", "--dataset", "digits", "--out", str(cache), "--quiet"]) == 0
    for path in cache.glob("*.beton"):
        data = bytearray(path.read_bytes())
        data[:4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))  # same size: the sidecar still vouches for it, the bytes do not
    return cache


def _mixed_sizes(tmp: Path) -> Path:
    folder = tmp / "mixed"
    for name in ("a", "b"):
        (folder / "train" / name).mkdir(parents=True)
        for i, size in enumerate([(40, 30), (50, 70)]):
            pixels = np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "train" / name / f"{i}.png")
    return folder


def _sweep(tmp: Path) -> Path:
    path = tmp / "sweep.yaml"
    path.write_text("name: t\nspace:\n  method.temprature: {loguniform: [0.05, 0.2]}\n")
    return path


def _pipeline(tmp: Path) -> Path:
    path = tmp / "pipeline.yaml"
    path.write_text("name: p\nstages:\n  knn: {kind: knn, backbone: pretrain}\n")
    return path


# --------------------------------------------------------------------------- the cases
# id: (argv with {placeholders}, setup -> {placeholder: value}, words the line must hold, exit code)
CASES = {
    "unknown-method": (["pretrain", "--local", "--set", "method.name=swaw"], None, "did you mean 'swav'", 2),
    "unknown-dataset": (["pretrain", "--local", "--set", "data.dataset=cifar100"], None,
                        "unknown data set 'cifar100': did you mean 'cifar10'", 2),
    "unknown-backbone": (["pretrain", "--local", "--set", "model.backbone=resnet19"], None,
                         "unknown backbone 'resnet19': did you mean 'resnet18'", 2),
    "unknown-config-key": (["pretrain", "--local", "--set", "optim.lrr=0.1"], None, "did you mean 'lr'", 2),
    "missing-config-file": (["pretrain", "--local", "--config", "configs/pretrain/swav_cifar1.yaml"], None,
                            "did you mean", 2),
    "missing-data": (["data", "prepare", "--dataset", "cifar10", "--data-root", "{tmp}", "--out", "{tmp}/out"],
                     None, "CIFAR-10 not found", 3),
    "corrupt-archive": (["data", "prepare", "--dataset", "cifar10", "--data-root", "{root}", "--out", "{tmp}/out"],
                        lambda t: {"root": _corrupt_archive(t)}, "corrupt or truncated", 3),
    "corrupt-beton": (["pretrain", "--local", "--quiet", "--out-dir", "{tmp}/run", "--set", "data.cache_dir={cache}",
                       "--set", "data.loader=ffcv", *TINY],
                      lambda t: {"cache": _corrupt_beton(t)}, "is corrupt or not a .beton", 3),
    "mixed-image-sizes": (["data", "preview", "--dataset", "imagefolder:{folder}", "--loader", "ffcv", "--cache-dir",
                           "{tmp}/cache", "--out", "{tmp}/preview.png", "--crops", "2x16"],
                          lambda t: {"folder": _mixed_sizes(t)}, "mixed sizes", 3),
    "temperature": (["pretrain", "--local", "--set", "method.temperature=0"], None, "temperature must be > 0", 2),
    "epsilon": (["pretrain", "--local", "--set", "method.epsilon=-0.1"], None, "epsilon must be > 0", 2),
    "sinkhorn-iterations": (["pretrain", "--local", "--set", "method.sinkhorn_iterations=0"], None,
                            "sinkhorn_iterations must be >= 1", 2),
    "queue-shorter-than-batch": (["pretrain", "--local", "--set", "method.queue_length=300"], None,
                                 "smaller than the global batch 512", 2),
    "queue-not-multiple": (["pretrain", "--local", "--set", "method.queue_length=3840"], None,
                           "not a multiple of the global batch 512", 2),
    "queue-start-too-late": (["pretrain", "--local", "--set", "method.queue_length=3584", "--set",
                              "method.queue_start_epoch=400"], None, "beyond the last epoch", 2),
    "zero-global-crops": (["pretrain", "--local", "--set", "data.crops=0x32+4x16"], None, "0 global crops", 2),
    "local-larger-than-global": (["pretrain", "--local", "--set", "data.crops=2x16+4x32"], None,
                                 "larger than the global", 2),
    "crop-scale": (["pretrain", "--local", "--set", "data.local_scale=[0.05,1.5]"], None,
                   "must be [min, max] with 0 < min <= max <= 1", 2),
    "batch-not-divisible": (["pretrain", "--workers", "3"], None, "not divisible by --workers 3", 2),
    "workers-zero": (["pretrain", "--workers", "0"], None, "--workers must be >= 1", 2),
    "impossible-lr": (["pretrain", "--local", "--set", "optim.lr=-1"], None, "optim.lr must be a positive", 2),
    "too-many-gpus": (["pretrain", "--gpus-per-worker", "4", "--storage", "{tmp}/ray", "--tracking-uri",
                       "sqlite:///{tmp}/m.db", *TINY], None, "cannot place 1 worker(s) x 1 CPU + 4 GPU", 2),
    "checkpoint-other-method": (["pretrain", "--local", "--quiet", "--out-dir", "{tmp}/run", *TINY],
                                lambda t: {"ckpt": _checkpoint(t, "supcon", "resnet_mini")},
                                "written by method 'supcon', this run uses 'swav'", 2),
    "checkpoint-other-backbone": (["pretrain", "--local", "--quiet", "--out-dir", "{tmp}/run", *TINY],
                                  lambda t: {"ckpt": _checkpoint(t, "swav", "resnet50")},
                                  "written by backbone 'resnet50', this run uses 'resnet_mini'", 2),
    "pickled-checkpoint": (["pretrain", "--local", "--quiet", "--out-dir", "{tmp}/run", "--set",
                            "train.resume={evil}", *TINY],
                           lambda t: {"evil": _pickled(t)}, "refusing to load", 3),
    "truncated-checkpoint": (["pretrain", "--local", "--quiet", "--out-dir", "{tmp}/run", "--set",
                              "train.resume={cut}", *TINY],
                             lambda t: {"cut": _truncated(t)}, "unreadable", 3),
    "sweep-unknown-key": (["sweep", "--config", "{sweep}"], lambda t: {"sweep": _sweep(t)},
                          "unknown key 'method.temprature': did you mean 'temperature'", 2),
    "pipeline-undefined-input": (["pipeline", "run", "--config", "{pipeline}"], lambda t: {"pipeline": _pipeline(t)},
                                 "backbone 'pretrain' is not an earlier stage", 2),
    "unreachable-ray": (["pretrain", "--address", "ray://127.0.0.1:{port}"], None, "cannot reach the Ray cluster", 2),
    "unreachable-mlflow-required": (["pretrain", "--require-tracking", "--tracking-uri", "http://127.0.0.1:{port}"],
                                    None, "unreachable", 2),
    "file-store-uri": (["pretrain", "--tracking-uri", "./mlruns"], None, "file store is not supported", 2),
    "missing-backbone": (["eval", "knn", "--backbone", "{tmp}/nope.pt", "--dataset", "digits"], None,
                         "no such file", 2),
}


@pytest.fixture
def no_ray_left():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_nonzero_and_leaves_nothing_complete(case, tmp_path, capsys, monkeypatch,
                                                                   no_ray_left):
    argv, setup, words, code = CASES[case]
    monkeypatch.chdir(ROOT)
    values = {"tmp": tmp_path, "port": _closed_port()}
    if setup is not None:
        values.update(setup(tmp_path))
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    argv = [a.format(**values) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing said"
    last = err[-1]
    assert last.startswith("error: ") and words in last, err
    assert not any(line.startswith(("Traceback", "  File ")) for line in err), err
    assert sum(line.startswith("error") for line in err) == 1
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert not [p for p in new if p.name in COMPLETE_LOOKING or p.suffix in (".tmp",)], new


def test_debug_shows_the_traceback(monkeypatch):
    from trainers.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        main(["--debug", "pretrain", "--local", "--set", "optim.lrr=0.1"])


def test_every_case_is_documented_and_every_documented_case_is_tested():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), flags=re.MULTILINE)
    assert len(rows) == len(set(rows))
    assert set(rows) == set(CASES)
    assert len(CASES) >= 20
