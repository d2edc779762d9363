"""Bad input, through the command line: one line naming the problem and the fix, a non-zero exit,
no traceback (unless --debug), and nothing left behind that looks like a finished result.

Every case here is a row of docs/errors.md (the last test keeps the two in step).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslab.cli import main
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


def _damaged(tmp: Path) -> Path:
    """A checkpoint with random bytes in the middle, same size (a bad disk block, a broken copy)."""
    path = save_checkpoint({"format": CHECKPOINT_FORMAT, "method": "swav", "backbone": "resnet_mini", "step": 3,
                            "w": torch.randn(50_000)}, tmp / "damaged" / "last.pt")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 512] = np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def _random_file(tmp: Path) -> Path:
    path = tmp / "random.pt"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 10_000, dtype=np.uint8).tobytes())
    return path


def _binary_config(tmp: Path) -> Path:
    path = tmp / "binary.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    return path


def _list_config(tmp: Path) -> Path:
    path = tmp / "list.yaml"
    path.write_text("- data\n- model\n")
    return path


def _yaml(tmp: Path, text: str) -> Path:
    path = tmp / "config.yaml"
    path.write_text(text)
    return path


def _a_file(tmp: Path) -> Path:
    path = tmp / "notes.txt"
    path.write_text("a file, not a folder\n")
    return path


_HELD: list = []  # what a case's setup keeps alive until the case has run (busy port, running process)


def _busy_port(tmp: Path) -> dict:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    _HELD.append(listener)
    return {"busy": listener.getsockname()[1]}


def _sgd_run(tmp: Path) -> dict:
    """A finished 2-step SGD run in {tmp}/run, to be resumed with another optimizer."""
    assert main(["pretrain", "--local", "--quiet", "--out", str(tmp / "run"), *TINY,
                 "--set", "train.max_steps=2"]) == 0
    return {}


def _running_run(tmp: Path) -> dict:
    """A real `pretrain --local` run writing into {tmp}/run (in another process), long enough to overlap."""
    lock = tmp / "run" / ".sslab-run.lock"
    process = subprocess.Popen(
        [sys.executable, "-m", "sslab", "pretrain", "--local", "--quiet", "--out", str(tmp / "run"),
         *TINY, "--set", "train.epochs=500", "--set", "train.checkpoint_every_epochs=1000"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _HELD.append(process)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if lock.is_file() and lock.read_text().strip() == str(process.pid):
            return {"pid": process.pid}
        time.sleep(0.2)
    raise AssertionError(f"the first run never took its lock: {process.stderr.read().decode()[-2000:]}")


# --------------------------------------------------------------------------- the cases
# id: (argv with {placeholders}, setup -> {placeholder: value}, words the line must hold, exit code)
CASES = {
    "unknown-method": (["pretrain", "--local", "--set", "method.name=swaw"], None, "did you mean 'swav'", 2),
    "unknown-dataset": (["pretrain", "--local", "--set", "data.dataset=cifar100"], None,
                        "unknown data set 'cifar100': did you mean 'cifar10'", 2),
    "unknown-backbone": (["pretrain", "--local", "--set", "model.backbone=resnet19"], None,
                         "unknown backbone 'resnet19': did you mean 'resnet18'", 2),
    "unknown-forward-views": (["pretrain", "--local", "--set", "model.forward_views=per_view"], None,
                              "model.forward_views must be one of by_size, each, got 'per_view'", 2),
    "unknown-config-key": (["pretrain", "--local", "--set", "optim.lrr=0.1"], None, "did you mean 'lr'", 2),
    "missing-config-file": (["pretrain", "--local", "--config", "configs/pretrain/swav_cifar1.yaml"], None,
                            "did you mean", 2),
    "missing-data": (["data", "prepare", "--dataset", "cifar10", "--data-root", "{tmp}", "--out", "{tmp}/out"],
                     None, "CIFAR-10 not found", 3),
    "corrupt-archive": (["data", "prepare", "--dataset", "cifar10", "--data-root", "{root}", "--out", "{tmp}/out"],
                        lambda t: {"root": _corrupt_archive(t)}, "corrupt or truncated", 3),
    "corrupt-beton": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", "--set", "data.cache_dir={cache}",
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
    "checkpoint-other-method": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", *TINY],
                                lambda t: {"ckpt": _checkpoint(t, "supcon", "resnet_mini")},
                                "written by method 'supcon', this run uses 'swav'", 2),
    "checkpoint-other-backbone": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", *TINY],
                                  lambda t: {"ckpt": _checkpoint(t, "swav", "resnet50")},
                                  "written by backbone 'resnet50', this run uses 'resnet_mini'", 2),
    "pickled-checkpoint": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", "--set",
                            "train.resume={evil}", *TINY],
                           lambda t: {"evil": _pickled(t)}, "refusing to load", 3),
    "truncated-checkpoint": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", "--set",
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
    # a crash, outputs that looked complete, and user errors that ended as bugs (exit 1), found by probing
    "run-folder-in-use": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", *TINY], _running_run,
                          "is in use by PID {pid}", 2),
    "canvas-size-zero": (["pretrain", "--local", "--set", "data.canvas_size=0"], None,
                         "data.canvas_size must be a positive number of pixels", 2),
    "canvas-size-negative": (["data", "preview", "--dataset", "digits", "--canvas-size", "-8", "--out",
                              "{tmp}/preview.png"], None, "canvas size -8 must be a positive number", 2),
    "zero-steps": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", *TINY, "--set", "train.max_steps=0"],
                   None, "train.max_steps must be >= 1", 2),
    "knn-k-larger-than-bank": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", *TINY, "--set",
                                "knn.every_epochs=1", "--set", "knn.max_train=500", "--set", "knn.k=[20,5000]"],
                               None, "knn.k [5000] is larger than the kNN memory bank (500 training images", 2),
    "knn-unknown-split": (["pretrain", "--local", "--set", "knn.split=bogus"], None,
                          "knn.split 'bogus' must be one of train, test", 2),
    "knn-empty-bank": (["pretrain", "--local", "--set", "knn.max_train=0"], None, "knn.max_train must be >= 1", 2),
    "damaged-checkpoint": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", "--set",
                            "train.resume={damaged}", *TINY], lambda t: {"damaged": _damaged(t)},
                           "do not match the SHA-256 written with it", 3),
    "not-a-checkpoint": (["eval", "knn", "--backbone", "{random}", "--dataset", "digits"],
                         lambda t: {"random": _random_file(t)}, "is not a PyTorch checkpoint", 3),
    "sweep-zero-samples": (["sweep", "--config", "configs/sweeps/swav_fashion-mnist.yaml", "--num-samples", "0"],
                           None, "--num-samples must be >= 1", 2),
    "ui-port-busy": (["ui", "--port", "{busy}", "--tracking-uri", "sqlite:///{tmp}/m.db"], _busy_port,
                     "is already in use", 2),
    "binary-config": (["pretrain", "--local", "--config", "{binary}"], lambda t: {"binary": _binary_config(t)},
                      "is not a text file", 2),
    "list-config": (["pretrain", "--local", "--config", "{listed}"], lambda t: {"listed": _list_config(t)},
                    "holds a YAML list, but a config file must be a mapping", 2),
    "negative-seed": (["pretrain", "--local", "--set", "train.seed=-1"], None, "train.seed must be an integer in", 2),
    "unknown-device": (["pretrain", "--local", "--device", "foo"], None,
                       "device 'foo' is not one this trainer runs on", 2),
    "resume-other-optimizer": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", *TINY, "--set",
                                "optim.name=adamw"], _sgd_run, "was written with optim.name=sgd, this run uses adamw", 2),
    # found by probing (second round)
    "min-lr-out-of-range": (["pretrain", "--local", "--set", "optim.min_lr=-1"], None, "optim.min_lr must lie in [0, ", 2),
    "min-lr-above-lr": (["pretrain", "--local", "--set", "optim.lr=0.1", "--set", "optim.min_lr=0.5", "--set",
                         "optim.lr_scaling=none"], None,
                        "optim.min_lr must lie in [0, the peak learning rate 0.1] (the cosine schedule's end), got 0.5", 2),
    "print-config-checks": (["pretrain", "--local", "--print-config", "--set", "data.batch_size=0"], None,
                            "data.batch_size must be positive, got 0", 2),
    "print-config-zero-workers": (["pretrain", "--print-config", "--workers", "0"], None, "--workers must be >= 1, got 0",
                                  2),
    "print-config-checks-workers": (["pretrain", "--print-config", "--workers", "3", "--set", "data.batch_size=64"],
                                    None, "data.batch_size 64 is not divisible by the 3 workers", 2),
    "momentum-out-of-range": (["pretrain", "--local", "--set", "optim.momentum=-1"], None,
                              "optim.momentum must lie in [0, 1)", 2),
    "betas-out-of-range": (["pretrain", "--local", "--set", "optim.name=adamw", "--set", "optim.betas=[2]"], None,
                           "optim.betas must be two numbers in [0, 1)", 2),
    "nan-clip-grad": (["pretrain", "--local", "--set", "optim.clip_grad=.nan"], None,
                      "optim.clip_grad must be a positive number or null", 2),
    "nan-weight-decay": (["pretrain", "--local", "--set", "optim.weight_decay=.nan"], None,
                         "optim.weight_decay must be a number >= 0, got nan", 2),
    "nan-knn-temperature": (["pretrain", "--local", "--set", "knn.temperature=.nan"], None,
                            "temperature > 0 needed", 2),
    "probe-bad-lr": (["pretrain", "--local", "--set", "probe.lr=0"], None,
                     "probe: lr > 0, momentum in [0, 1), weight_decay >= 0 and every_epochs >= 1 needed, got 0.0", 2),
    "too-many-loader-workers": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", *TINY, "--set",
                                 "data.loader=ffcv", "--set", "data.num_workers=100000"], None,
                                "100000 loader workers are more than this machine's", 2),
    "crop-too-large": (["pretrain", "--local", "--set", "data.crops=2x100000"], None,
                       "size 100000 must be a positive number of pixels in 2..2048", 2),
    "too-many-views": (["pretrain", "--local", "--set", "data.crops=100000x8"], None,
                       "asks for 100000 views per image, more than 64", 2),
    "crop-too-small": (["pretrain", "--local", "--set", "data.crops=2x1"], None, "size 1 must be a positive number of pixels in 2..2048", 2),
    "vit-local-crops": (["pretrain", "--local", "--set", "model.backbone=vit_tiny", "--set", "data.crops=2x8+2x6"],
                        None, "ViT patch size 4 must divide every crop size, not 6 px", 2),
    "train-subset-too-large": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", *TINY, "--set",
                                "data.train_subset=100000"], None,
                               "data.train_subset 100,000 is larger than the training set of digits (1,347 images)", 2),
    "negative-freeze-steps": (["pretrain", "--local", "--set", "method.freeze_prototypes_steps=-5"], None,
                              "method.freeze_prototypes_steps must be >= 0", 2),
    "fp16-on-cpu": (["pretrain", "--local", "--device", "cpu", "--set", "train.precision=fp16"], None,
                    "train.precision=fp16 needs a GPU", 2),
    "empty-name": (["pretrain", "--local", "--set", "name="], None, "name must be a non-empty string", 2),
    "name-outside-state-dir": (["pretrain", "--local", "--name", "../../escaped"], None,
                               "run name '../../escaped' may only hold letters", 2),
    "name-not-a-string": (["pretrain", "--local", "--config", "{cfg}"], lambda t: {"cfg": _yaml(t, "name: [a, b]\n")},
                          "name must be a non-empty string", 2),
    "section-not-a-mapping": (["pretrain", "--local", "--config", "{cfg}", "--set", "data.dataset=digits"],
                              lambda t: {"cfg": _yaml(t, "data: [1, 2]\n")}, "section 'data' must be a mapping", 2),
    "config-is-a-folder": (["pretrain", "--local", "--config", "{tmp}"], None, "is a folder: pass a YAML file", 2),
    "out-dir-is-a-file": (["pretrain", "--local", "--quiet", "--out", "{file}", *TINY],
                          lambda t: {"file": _a_file(t)}, "it is a file in the way", 2),
    "prepare-out-is-a-file": (["data", "prepare", "--dataset", "digits", "--out", "{file}", "--quiet"],
                              lambda t: {"file": _a_file(t)}, "it is a file in the way", 2),
    "resume-from-a-backbone": (["pretrain", "--local", "--quiet", "--out", "{tmp}/new", *TINY, "--set",
                                "train.resume={tmp}/run/backbone.pt"], _sgd_run, "is a backbone file", 2),
    "resume-from-a-folder-without-checkpoint": (["pretrain", "--local", "--quiet", "--out", "{tmp}/new", *TINY,
                                                 "--set", "train.resume={tmp}"], None,
                                                "is a folder without checkpoints/last.pt", 2),
    "resume-with-other-crops": (["pretrain", "--local", "--quiet", "--out", "{tmp}/run", *TINY, "--set",
                                 "data.crops=2x8+2x4"], _sgd_run,
                                "was written with data.crops=2x8, this run uses 2x8+2x4", 2),
    "num-to-keep-zero": (["pretrain", "--num-to-keep", "0"], None, "--num-to-keep must be >= 1", 2),
    "negative-resource-timeout": (["pretrain", "--resource-timeout", "-1"], None,
                                  "--resource-timeout must be a number of seconds >= 0", 2),
    # found by probing the augmentation settings
    "per-view-list-length": (["pretrain", "--local", "--set", "data.global_augment={{blur_p: [0.1, 0.2, 0.3]}}"], None,
                             "data.global_augment.blur_p lists 3 probabilities for the 2 views", 2),
}


@pytest.fixture
def no_ray_left():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def held():
    yield
    while _HELD:
        thing = _HELD.pop()
        if isinstance(thing, subprocess.Popen):
            if thing.poll() is None:
                os.killpg(thing.pid, signal.SIGKILL)
            thing.wait(timeout=30)
        else:
            thing.close()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_nonzero_and_leaves_nothing_complete(case, tmp_path, capsys, monkeypatch,
                                                                   no_ray_left, held):
    argv, setup, words, code = CASES[case]
    monkeypatch.chdir(ROOT)
    values = {"tmp": tmp_path, "port": _closed_port()}
    if setup is not None:
        values.update(setup(tmp_path))
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    argv = [a.format(**values) for a in argv]
    assert main(argv) == code
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err, "nothing said"
    if "--print-config" in argv:
        assert captured.out == "", "a refused config is not printed"
    last = err[-1]
    assert last.startswith("error: ") and words.format(**values) in last, err
    assert not any(line.startswith(("Traceback", "  File ")) for line in err), err
    assert sum(line.startswith("error") for line in err) == 1
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert not [p for p in new if p.name in COMPLETE_LOOKING or p.suffix in (".tmp",)], new


def test_a_sweep_of_zero_samples_is_refused_before_ray_starts(monkeypatch, capsys):
    import ray

    monkeypatch.chdir(ROOT)
    assert not ray.is_initialized()
    assert main(["sweep", "--config", "configs/sweeps/swav_fashion-mnist.yaml", "--num-samples", "0"]) == 2
    assert not ray.is_initialized()


def test_the_second_of_two_runs_into_one_folder_is_refused_and_the_first_is_untouched(tmp_path, capsys, monkeypatch,
                                                                                     held):
    monkeypatch.chdir(ROOT)
    first = _running_run(tmp_path)["pid"]
    config_before = (tmp_path / "run" / "config.yaml").read_text() if (tmp_path / "run" / "config.yaml").is_file() \
        else None
    assert main(["pretrain", "--local", "--quiet", "--out", str(tmp_path / "run"), *TINY,
                 "--set", "method.name=supcon"]) == 2
    assert f"is in use by PID {first}" in capsys.readouterr().err
    deadline = time.time() + 60
    while not (tmp_path / "run" / "config.yaml").is_file() and time.time() < deadline:
        time.sleep(0.2)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: swav" in config and "supcon" not in config  # the refused run wrote nothing there
    assert config_before in (None, config)
    _HELD.pop().send_signal(signal.SIGKILL)  # the holder dies: its lock goes with it, at once
    time.sleep(0.5)
    from trainers.locks import hold

    with hold(tmp_path / "run" / ".sslab-run.lock", wait=False, what="run folder"):
        pass


# documented cases tested in other files (each named by its test)
OTHER_FILES_CASES = {
    "prepare-disk-full": "tests/test_prepare_faults.py::test_full_disk_is_refused_before_writing",
    "prepare-disk-full-mid-write": "tests/test_prepare_faults.py::test_disk_filling_up_mid_write_stops_every_writer_process",
    "prepare-read-only": "tests/test_prepare_faults.py::test_read_only_output_folder",
    "image-float-range": "tests/test_image_modes.py::test_values_outside_the_range_a_mode_is_read_in_are_refused",
    "image-int-range": "tests/test_image_modes.py::test_values_outside_the_range_a_mode_is_read_in_are_refused",
    "image-mode-unsupported": "tests/test_image_modes.py::test_a_mode_without_a_defined_conversion_is_refused_by_name",
    "mlflow-host-refused": "tests/test_mlflow_server.py::test_mlflow_host_refused",
    "mlflow-login-refused": "tests/test_mlflow_server.py::test_mlflow_login_refused",
    "mlflow-login-missing": "tests/test_mlflow_server.py::test_mlflow_login_missing",
}


# --------------------------------------------------------------------------- storage faults
def _namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# id: (mount: "tmpfs:<dir>:<size>" or "ro:<dir>", argv, extra env, words the line must hold, exit code).
# Run in a private mount namespace (`unshare -m`): a small tmpfs is a full disk, a read-only bind mount a
# read-only disk. chmod would not do: the tests run as root, and root writes through file modes.
STORAGE_CASES = {
    "disk-full-checkpoint": ("tmpfs:{tmp}/small:256k", ["pretrain", "--local", "--quiet", "--out", "{tmp}/small/run",
                                                        *TINY, "--set", "data.cache_dir={tmp}/cache"], {},
                             "cannot write checkpoint {tmp}/small/run/checkpoints/last.pt: No space left on device", 4),
    "read-only-out-dir": ("ro:{tmp}/ro", ["pretrain", "--local", "--quiet", "--out", "{tmp}/ro/run", *TINY,
                                          "--set", "data.cache_dir={tmp}/cache"], {},
                          "cannot write run folder {tmp}/ro/run: Read-only file system", 4),
    "read-only-state-dir": ("ro:{tmp}/home", ["pretrain", "--local", "--quiet", *TINY], {"SSLAB_HOME": "{tmp}/home"},
                            "Read-only file system", 4),
}


@pytest.mark.parametrize("case", list(STORAGE_CASES))
def test_a_full_or_read_only_disk_is_exit_4_naming_the_path_and_leaves_nothing_complete(case, tmp_path):
    import shlex

    if not _namespaces_work():
        pytest.skip("this machine cannot make a private mount namespace (unshare -m needs root / CAP_SYS_ADMIN)")
    mount, argv, env, words, code = STORAGE_CASES[case]
    kind, folder, *size = mount.format(tmp=tmp_path).split(":")
    Path(folder).mkdir(parents=True)
    quoted = shlex.quote(folder)
    mounts = (f"mount -t tmpfs -o size={size[0]} tmpfs {quoted}" if kind == "tmpfs"
              else f"mount --bind {quoted} {quoted} && mount -o remount,bind,ro {quoted}")
    command = " ".join(shlex.quote(a.format(tmp=tmp_path)) for a in argv)
    script = f"{mounts} && exec {shlex.quote(sys.executable)} -m sslab {command}"
    environ = {**os.environ, **{k: v.format(tmp=tmp_path) for k, v in env.items()}}
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env=environ, timeout=600)
    err = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr[-3000:]
    assert err and err[-1].startswith("error: ") and words.format(tmp=tmp_path) in err[-1], err
    assert "GiB free" in err[-1] and sum(line.startswith("error") for line in err) == 1, err
    assert not any(line.startswith(("Traceback", "  File ")) for line in err), err
    # the mount is gone with the namespace: what the command left is what the disk under it holds
    left = [p for p in tmp_path.rglob("*") if p.is_file() and (p.name in COMPLETE_LOOKING or ".tmp" in p.name)]
    assert not left, left


def test_debug_shows_the_traceback(monkeypatch):
    from trainers.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        main(["--debug", "pretrain", "--local", "--set", "optim.lrr=0.1"])


def _tables_of_other_files() -> list[str]:
    """Case ids of the table-driven tests in other files (pipeline/sweep/eval files, CLI options)."""
    import importlib.util

    ids = []
    for file, tables in (("test_bad_specs.py", ("PIPELINES", "SWEEPS", "EVALS")), ("test_cli_checks.py", ("CASES",))):
        spec = importlib.util.spec_from_file_location(f"_cases_{file[:-3]}", ROOT / "tests" / file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for table in tables:
            ids += list(getattr(module, table))
    return ids


def test_every_case_is_documented_and_every_documented_case_is_tested():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), flags=re.MULTILINE)
    assert len(rows) == len(set(rows))
    assert set(rows) == set(CASES) | set(STORAGE_CASES) | set(OTHER_FILES_CASES) | set(_tables_of_other_files())
    for test in OTHER_FILES_CASES.values():
        file, name = test.split("::")
        assert f"def {name}(" in (ROOT / file).read_text(), test
    assert len(CASES) >= 20
