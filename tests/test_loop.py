"""The training loop on real data (Fashion-MNIST, CPU): exact resume, checkpoints, failures."""

import json
import math

import pytest
import torch

from trainers.checkpoint import StorageError, load_checkpoint, save_checkpoint
from trainers.config import load_config
from trainers.errors import ConfigError, DataError
from trainers.loop import NonFiniteLossError, Trainer, TrainerEvents, load_backbone

METHOD_SETTINGS = {
    "swav": ["method.prototypes=30", "method.queue_length=64", "method.queue_start_epoch=1",
             "method.freeze_prototypes_steps=3", "data.crops=2x16+2x8"],
    "dino": ["method.out_dim=128", "method.hidden_dim=64", "method.bottleneck_dim=32", "data.crops=2x16+2x8",
             "optim.clip_grad=3.0", "optim.clip_mode=per_parameter", "optim.weight_decay_end=0.01"],
    "sdmp": ["method.moco_hidden_dim=64", "method.moco_out_dim=32", "method.moco_predictor_hidden_dim=64",
             "data.crops=2x16"],
    "supcon": ["data.crops=2x16"],
}


def tiny_config(method, out_dir, *extra):
    return load_config(None, [
        f"method.name={method}", *METHOD_SETTINGS[method], "data.dataset=fashion-mnist", "data.batch_size=32",
        "data.train_subset=256", "data.num_workers=1", "model.backbone=resnet_mini", "train.epochs=2",
        "optim.warmup_epochs=1", "train.log_every=1", "knn.every_epochs=0", "knn.max_test=300",  # the probe's test set
        f"train.out_dir={out_dir}", *extra])


class Recorded(TrainerEvents):
    """The loop's events, kept: losses by step, and the order of checkpoints and epoch ends."""

    def __init__(self):
        self.losses, self.reported = {}, []

    def on_log(self, step, row):
        self.losses[step] = row["loss"]

    def on_checkpoint(self, step, metrics, path):
        self.reported.append(step)

    def on_epoch_end(self, step, completed, metrics, path, final):
        self.reported.append(("epoch", completed, path is not None))


def run(config, **kwargs):
    events = Recorded()
    losses = events.losses
    trainer = Trainer(config, progress=False, log=lambda *_: None, events=events, **kwargs)
    result = trainer.fit()
    return trainer, result, losses


def tensors_of(tree, prefix="") -> dict:
    """Every tensor of a nested dict/list (a state dict, an optimizer's), by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    found = {}
    for key, value in items:
        found.update(tensors_of(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_resume_reproduces_the_uninterrupted_run_exactly(method, tmp_path):
    _, full, full_losses = run(tiny_config(method, tmp_path / "full"))
    assert full.steps == 16 and len(full_losses) == 16
    # the same run stopped mid-epoch after 5 steps, then restarted from its checkpoint
    _, part, _ = run(tiny_config(method, tmp_path / "cut", "train.max_steps=5"))
    assert part.steps == 5 and (tmp_path / "cut" / "checkpoints" / "last.pt").is_file()
    resumed_trainer, resumed, resumed_losses = run(tiny_config(method, tmp_path / "cut"))
    assert resumed.steps == 16
    assert sorted(resumed_losses) == list(range(6, 17))  # only the steps after the checkpoint ran again
    for step in range(6, 17):
        assert resumed_losses[step] == full_losses[step], (step, resumed_losses[step], full_losses[step])
    full_state, resumed_state = load_checkpoint(full.checkpoint), load_checkpoint(resumed.checkpoint)
    final_full, final_resumed = full_state["model"], resumed_state["model"]
    for key, value in final_full.items():
        assert torch.equal(value, final_resumed[key]), key
    # the online linear probe resumes exactly too (weights and SGD momentum)
    probe_full, probe_resumed = tensors_of(full_state["probe"]), tensors_of(resumed_state["probe"])
    assert len(probe_full) == 4 and probe_full.keys() == probe_resumed.keys()  # weight, bias, 2 momentum buffers
    for key, value in probe_full.items():
        assert torch.equal(value, probe_resumed[key]), key
    assert resumed.metrics["online_linear_top1"] == full.metrics["online_linear_top1"]
    # metrics.jsonl holds every step once, and the probe's evaluations (the cut run's final one at step 5)
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 17))
    assert [r["step"] for r in rows if "online_linear_top1" in r] == [5, 8, 16]


@pytest.mark.parametrize("stop_at", [5, 8])  # mid-epoch, and the epoch's last step (8 steps per epoch)
def test_a_stop_request_checkpoints_the_step_in_flight_and_the_resumed_run_is_the_uninterrupted_one(stop_at,
                                                                                                  tmp_path):
    """Trainer(stop=...) (what a SIGTERM on a Ray worker sets): the loop stops after the step in flight,
    writes a checkpoint there (reported through on_checkpoint), raises StopRequested; rerun, it resumes
    from that step and ends with the uninterrupted run's losses and weights."""
    from trainers.loop import StopRequested

    _, full, full_losses = run(tiny_config("supcon", tmp_path / "full"))
    holder, reported = {}, []

    def stop():
        return "test stop" if holder["trainer"].step >= stop_at else None

    events = Recorded()
    events.reported = reported
    trainer = Trainer(tiny_config("supcon", tmp_path / "cut"), progress=False, log=lambda *_: None, stop=stop,
                      events=events)
    holder["trainer"] = trainer
    with pytest.raises(StopRequested) as stopped:
        trainer.fit()
    assert stopped.value.step == stop_at and stopped.value.reason == "test stop"
    assert load_checkpoint(stopped.value.checkpoint)["step"] == stop_at
    # the checkpoint reaches whoever keeps it: mid-epoch via on_checkpoint, at the epoch end via on_epoch_end
    assert reported == ([stop_at] if stop_at == 5 else [("epoch", 1, True)])
    _, resumed, resumed_losses = run(tiny_config("supcon", tmp_path / "cut"))
    assert resumed.steps == 16 and sorted(resumed_losses) == list(range(stop_at + 1, 17))
    assert all(resumed_losses[s] == full_losses[s] for s in resumed_losses)
    final, expected = load_checkpoint(resumed.checkpoint)["model"], load_checkpoint(full.checkpoint)["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_backbone_file_loads_for_evaluation(tmp_path):
    _, result, _ = run(tiny_config("supcon", tmp_path, "train.max_steps=3"))
    module, dim, info = load_backbone(result.backbone)
    assert dim == 256 and info["method"] == "supcon"
    assert tuple(module(torch.randn(2, 3, 16, 16)).shape) == (2, 256)


def test_online_knn_is_reported(tmp_path):
    _, result, _ = run(tiny_config("supcon", tmp_path, "train.epochs=1", "knn.every_epochs=1", "knn.max_train=500",
                                   "knn.max_test=200", "knn.k=[5, 20]"))
    for key in ("knn_top1_k5", "knn_top1_k20", "knn_top5_k20"):
        assert 0.0 <= result.metrics[key] <= 1.0
    assert result.metrics["knn_top1_k20"] > 0.2  # 10 classes: chance is 0.1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["knn_top1_k20"] == result.metrics["knn_top1_k20"]


def test_online_probe_trains_beside_the_run_without_changing_it(tmp_path):
    from trainers.probe import OnlineLinearProbe

    trainer, on, _ = run(tiny_config("supcon", tmp_path / "on", "probe.every_epochs=2"))
    _, off, _ = run(tiny_config("supcon", tmp_path / "off", "probe.online_linear=false"))
    with_probe, without = load_checkpoint(on.checkpoint), load_checkpoint(off.checkpoint)
    # backbone, heads and BN statistics: bit for bit those of the same run without the probe (its
    # features are detached, its optimizer holds only its own weights, it draws no random numbers)
    assert with_probe["model"].keys() == without["model"].keys()
    for key, value in with_probe["model"].items():
        assert torch.equal(value, without["model"][key]), key
    assert without["probe"] == {} and "online_linear_top1" not in off.metrics
    # the probe itself trained: its weights left their (seeded) start, with solo-learn's SGD settings
    start = OnlineLinearProbe(256, 10, lr=0.1, seed=0).linear.state_dict()
    trained = with_probe["probe"]["linear"]
    assert (trained["weight"] - start["weight"]).abs().max() > 1e-3 and not torch.equal(trained["bias"], start["bias"])
    group = with_probe["probe"]["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"]) == (0.9, 0.0)
    assert trainer.probe_peak_lr == pytest.approx(0.1 * 32 / 256)  # per 256 images, as the backbone's lr
    # reported: fit()'s metrics, metrics.jsonl (every 2nd epoch: after the last one only), summary.json
    assert 0.0 <= on.metrics["online_linear_top1"] <= on.metrics["online_linear_top5"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "online_linear_top1" in r]
    assert [r["step"] for r in evaluated] == [16] and evaluated[0]["online_linear_top1"] == on.metrics["online_linear_top1"]
    assert all(math.isfinite(r["online_linear_loss"]) for r in rows if "loss" in r)
    assert json.loads((tmp_path / "on" / "summary.json").read_text())["online_linear_top1"] == on.metrics[
        "online_linear_top1"]


def test_online_probe_learns_digits(tmp_path):
    # 40 steps of 16 images; min_lr = the peak lr keeps the backbone's (and so the probe's) lr constant
    config = load_config(None, ["method.name=supcon", "data.dataset=digits", "data.crops=2x8", "data.batch_size=16",
                                "data.train_subset=640", "data.num_workers=1", "model.backbone=resnet_mini",
                                "train.epochs=1", "optim.warmup_epochs=0", f"optim.min_lr={0.3 * 16 / 256}",
                                "knn.every_epochs=0", f"train.out_dir={tmp_path}"])
    _, result, _ = run(config)
    assert result.metrics["online_linear_top1"] > 0.35  # 450 held-out digits, 10 classes: chance is 0.1
    assert result.metrics["online_linear_top5"] > 0.8


def test_a_data_set_without_a_held_out_split_trains_without_the_probe_unless_the_knn_needs_that_split(tmp_path):
    from PIL import Image

    for i in range(16):  # a plain <class>/* tree of one image per class: nothing to hold out, a train split only
        path = tmp_path / "images" / f"c{i:02d}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (15 * i, 0, 0)).save(path)
    settings = ["method.name=supcon", f"data.dataset=imagefolder:{tmp_path / 'images'}", "data.crops=2x8",
                "data.batch_size=8", "data.loader=torch", "data.num_workers=1", "model.backbone=resnet_mini",
                "train.epochs=1", "optim.warmup_epochs=0", "train.resume=null"]
    said = []
    trainer = Trainer(load_config(None, [*settings, "knn.every_epochs=0", f"train.out_dir={tmp_path / 'a'}"]),
                      progress=False, log=said.append)
    result = trainer.fit()
    assert result.steps == 2 and trainer.probe is None and "online_linear_top1" not in result.metrics
    assert any(line.startswith("no online linear probe: its held-out split knn.split=test") for line in said)
    with pytest.raises(DataError, match="no test split"):  # the kNN asked for it: the error stands
        run(load_config(None, [*settings, "knn.every_epochs=1", "knn.k=[2]", f"train.out_dir={tmp_path / 'b'}"]))


def test_non_finite_loss_stops_with_step_method_and_remedy(tmp_path):
    config = tiny_config("swav", tmp_path, "optim.lr=1.0e+30", "optim.warmup_epochs=0", "train.checkpoint_every_steps=1")
    with pytest.raises(NonFiniteLossError) as err:
        run(config)
    message = str(err.value)
    assert "at step" in message and "of swav" in message and "lr" in message and "epsilon" in message
    step = int(message.split("at step ")[1].split()[0])
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == step  # the last good state is the resume point
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_a_resumed_run_that_diverges_names_the_checkpoint_it_resumed_from(tmp_path):
    run(tiny_config("swav", tmp_path, "train.max_steps=3"))
    with pytest.raises(NonFiniteLossError) as err:
        run(tiny_config("swav", tmp_path, "optim.lr=1.0e+30", "optim.warmup_epochs=0"))
    message = str(err.value)
    assert "no checkpoint was written yet" not in message
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'last.pt'}" in message
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3


def test_checkpoint_of_another_method_is_refused(tmp_path):
    run(tiny_config("supcon", tmp_path, "train.max_steps=2"))
    with pytest.raises(ConfigError, match="written by method 'supcon'"):
        run(tiny_config("swav", tmp_path))


def test_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": Exploit()}, path)
    with pytest.raises(DataError, match="refusing to load"):
        load_checkpoint(path)


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"format": 1, "step": 1, "w": torch.ones(3)}, path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(StorageError, match="No space left.*GiB free.*previous checkpoint is unchanged"):
        save_checkpoint({"format": 1, "step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    # no temporary file left behind; the checksum beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_a_checkpoint_is_verified_by_its_checksum_and_a_crash_between_the_renames_keeps_it_loadable(tmp_path):
    from trainers.checkpoint import checksum_path

    path = tmp_path / "last.pt"
    save_checkpoint({"format": 1, "step": 1, "w": torch.arange(1000.0)}, path)
    first = path.read_bytes()
    save_checkpoint({"format": 1, "step": 2, "w": torch.arange(1000.0)}, path)
    assert len(checksum_path(path).read_text().split()) == 2  # the new digest and the previous one
    path.write_bytes(first)  # as if the process died after the sidecar's rename, before the file's
    assert load_checkpoint(path)["step"] == 1
    damaged = bytearray(first)
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte in the middle
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="do not match the SHA-256"):
        load_checkpoint(path)
    checksum_path(path).unlink()  # a hand copy without its sidecar loads unchecked
    path.write_bytes(first)
    assert load_checkpoint(path)["step"] == 1


def test_disk_full_mid_run_is_one_line_and_the_run_resumes_from_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                         capsys):
    from sslab.cli import main

    args = ["pretrain", "--local", "--quiet", "--out", str(tmp_path / "run"), "--set", "method.name=supcon",
            "--set", "data.dataset=digits", "--set", "data.crops=2x8", "--set", "data.batch_size=64",
            "--set", "model.backbone=resnet_mini", "--set", "train.epochs=2", "--set", "optim.warmup_epochs=0",
            "--set", "knn.every_epochs=0", "--set", "train.checkpoint_every_steps=5"]
    real_save, calls = torch.save, []

    def fills_up(obj, f, *a, **k):  # the third checkpoint write finds the disk full
        calls.append(1)
        if len(calls) >= 3:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fills_up)
    assert main(args) == StorageError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write checkpoint") and str(tmp_path / "run") in err[-1]
    assert "No space left on device" in err[-1] and "GiB free" in err[-1]
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "backbone.pt").exists()
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp"))
    # writes 1 and 2 were last.pt at steps 5 and 10; the failed third one left the step-10 file intact
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 10
    monkeypatch.undo()
    assert main(args) == 0  # space freed: the same command resumes and finishes
    assert "resumed from" in capsys.readouterr().err
    steps_per_epoch = 1347 // 64  # the digits train split, full batches
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2 * steps_per_epoch
