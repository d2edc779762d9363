"""Bad pipeline files, sweep files and eval options, through the command line: one line
``error: <what>: <fix>``, exit 2, no traceback, and refused before any expensive work: Ray is not
started (``ray.init`` is replaced by a tripwire), no MLflow store appears, no evaluation runs.

Every case has an id (the tester's where there was one) and is a proposed row of docs/errors.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sslab.cli import main

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "configs" / "pretrain" / "swav_fashion-mnist.yaml")
TINY = ["data.dataset=digits", "data.crops=2x8", "data.batch_size=64", "model.backbone=resnet_mini",
        "train.epochs=2", "optim.warmup_epochs=0", "knn.every_epochs=1", "knn.k=[20]"]


# --------------------------------------------------------------------------- pipeline files
def _pipeline(stages: dict | None = None, **top) -> dict:
    return {"name": "t", "stages": stages or {"prepare": {"datasets": ["digits"]}}, **top}


def _with_pretrain(**stages) -> dict:
    """prepare -> pretrain (swav_fashion-mnist, batch 256) -> the given stages."""
    return _pipeline({"prepare": {"datasets": ["digits"]}, "pretrain": {"config": PRETRAIN}, **stages})


def _pretrain(**settings) -> dict:
    return _pipeline({"pretrain": {"config": PRETRAIN, **settings}})


PIPELINES = {
    # id: (pipeline mapping, extra argv, words of the one error line)
    "pl01-seed-not-a-number": (_pipeline(seed="abc"), [], "seed is 'abc': give an integer >= 0 and < 2147483648"),
    "pl02-ray-a-list": (_pipeline(ray=["a"]), [], "ray is ['a']: give a mapping, e.g. ray: {address: local}"),
    "pl03-ray-a-number": (_pipeline(ray=5), [], "ray is 5: give a mapping"),
    "pl04-old-resources-key": (_pipeline({"prepare": {"datasets": ["digits"], "resources": {"cpu": 2}}}), [],
                               "stage 'prepare': 'resources' is now cpus_per_worker and gpus_per_worker, the names "
                               "pretrain and sweeps use"),
    "pl04b-resources-on-the-report": (_pipeline({"prepare": {"datasets": ["digits"]}, "report": {"cpus_per_worker": 2}}),
                                      [], "stage 'report' (report): unknown setting 'cpus_per_worker'"),
    "pl05-data-root-a-number": (_pipeline(data_root=5), [], "data_root is 5: give a non-empty string"),
    "pl06-datasets-one-string": (_pipeline({"prepare": {"datasets": "digitz"}}), [],
                                 "unknown data set 'digitz'"),  # the whole name, not 'd'
    "pl07-inputs-one-string": (_pipeline({"prepare": {"datasets": ["digits"]}, "report": {"inputs": "knn"}}), [],
                               "stage 'report': input 'knn' is not an earlier stage"),  # not 'k'
    "pl24-set-not-yaml": (_pipeline(), ["--set", "seed=[1"], "seed is '[1': give an integer >= 0"),
    "p09-experiment-a-list": (_pipeline(experiment=["a"]), [], "experiment is ['a']: give a non-empty string"),
    "p10-name-a-path": (_pipeline(name="../../../x"), [],
                        "pipeline name '../../../x' is not a plain name: use letters, digits, '.', '_' and '-'"),
    "p10b-stage-name-a-path": (_pipeline({"../x": {"kind": "prepare", "datasets": ["digits"]}}), [],
                               "stage name '../x' is not a plain name"),
    "p11-negative-weight-decay": (_with_pretrain(linear={"weight_decay": -1}), [],
                                  "stage 'linear': weight_decay is -1: give a finite number >= 0"),
    "p12c-workers-on-a-prepare-stage": (_pipeline({"prepare": {"datasets": ["digits"], "workers": 2}}), [],
                                        "stage 'prepare': workers 2: a prepare stage runs as one Ray task: use "
                                        "workers: 1"),
    "p12d-batch-not-divisible-by-workers": (_with_pretrain(semi={"workers": 3}), [],
                                            "stage 'semi': batch_size 256 is not a multiple of its 3 workers"),
    "p12-negative-cpu": (_pipeline({"prepare": {"datasets": ["digits"], "cpus_per_worker": -1}}), [],
                         "stage 'prepare': cpus_per_worker is -1: give a finite number >= 0"),
    "p12b-gpu-over-one-not-whole": (_pipeline({"prepare": {"datasets": ["digits"], "gpus_per_worker": 1.5}}), [],
                                    "gpus_per_worker is 1.5: give a fraction in [0, 1] or a whole number"),
    "p13-pretrain-set-unknown-key": (_pretrain(set=["optim.lrr=1"]), [],
                                     "stage 'pretrain': unknown key 'optim.lrr': did you mean 'lr'?"),
    "p13b-pretrain-set-one-string": (_pretrain(set="optim.lrr=1"), [], "stage 'pretrain': unknown key 'optim.lrr'"),
    "p13c-pretrain-config-invalid": (_pretrain(set=["optim.warmup_epochs=9"]), [],
                                     "stage 'pretrain': optim.warmup_epochs 9.0 must lie in [0, train.epochs=5]"),
    "p13d-pretrain-set-by-option": (_pretrain(), ["--set", "stages.pretrain.set=[method.temperature=0]"],
                                    "stage 'pretrain': method.temperature must be > 0"),
    "p14-negative-seed": (_pipeline(seed=-5), [], "seed is -5: give an integer >= 0"),
    "p15-fraction-a-bool": (_with_pretrain(semi={"fractions": [True]}), [],
                            "stage 'semi': fractions[0] (a label fraction) is True: give a finite number > 0 and <= 1"),
    "p16-epochs-a-bool": (_with_pretrain(linear={"epochs": True}), [],
                          "stage 'linear': epochs is True: give an integer >= 1"),
    "p17-infinite-lr": (_with_pretrain(linear={"lr": float("inf")}), [],
                        "stage 'linear': lr is inf: give a finite number > 0"),
    "p18-batch-not-divisible-by-workers": (_pretrain(workers=3), [],
                                           "stage 'pretrain': data.batch_size 256 is not divisible by the 3 workers"),
    "p19-cpus-per-worker-text": (_pretrain(cpus_per_worker="abc"), [],
                                 "stage 'pretrain': cpus_per_worker is 'abc': give a finite number > 0"),
    "p19b-max-failures": (_pretrain(max_failures=-2), [],
                          "stage 'pretrain': max_failures is -2: give an integer >= -1"),
    "p19c-gpus-on-cpu-device": (_pretrain(gpus_per_worker=1, set=["train.device=cpu"]), [],
                                "gpus_per_worker is 1 but train.device is cpu"),
    "p20-optional-not-a-bool": (_with_pretrain(transfer={"datasets": [{"name": "digits", "optional": "maybe"}]}), [],
                                "stage 'transfer': optional (of data set digits) is 'maybe': give true or false"),
    "p21-ray-num-cpus-text": (_pipeline(ray={"num_cpus": "abc"}), [], "ray.num_cpus is 'abc': give an integer >= 1"),
    "p21b-ray-unknown-key": (_pipeline(ray={"adress": "local"}), [],
                             "unknown key ray.adress (did you mean 'address'?): the keys are address"),
    "p23-unknown-linear-protocol": (_with_pretrain(linear={"protocol": "augmentd"}), [],
                                    "stage 'linear': protocol 'augmentd' is not one of frozen_features, augmented "
                                    "(did you mean 'augmented'?)"),
    "p23b-head-lr-negative": (_with_pretrain(semi={"head_lr": -1}), [],
                              "stage 'semi': head_lr is -1: give a finite number > 0"),
    "p23c-transfer-has-no-protocol": (_with_pretrain(transfer={"datasets": ["digits"], "protocol": "augmented"}), [],
                                      "stage 'transfer' (transfer): unknown setting 'protocol'"),
    # a sweep stage's file is loaded (and refused) now, not after the stages before it ran
    "p22-sweep-stage-checked": (None, [], ("error: stage 'sweep': ", "metric 'knn_top1_k200' is not reported by "
                                           "the trials (did you mean 'knn_top1_k20'?)")),
}


def _sweep_file(tmp: Path, **keys) -> Path:
    raw = {"name": "s", "base": PRETRAIN, "set": TINY,
           "space": {"method.temperature": {"loguniform": [0.05, 0.2]}}, **keys}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --------------------------------------------------------------------------- sweep files
SWEEPS = {
    # id: (sweep keys over a valid 2-epoch digits sweep, words of the one error line)
    "sw01-num-samples-text": ({"num_samples": "4"}, "num_samples is '4': give an integer >= 1"),
    "sw02-old-resources-key": ({"resources_per_worker": {"cpu": 1}}, "'resources_per_worker' is now cpus_per_worker "
                               "and gpus_per_worker, the names pretrain and pipeline stages use: rename it"),
    "sw03-gpu-text": ({"gpus_per_worker": "abc"}, "gpus_per_worker is 'abc': give a finite"),
    "sw04-space-a-list": ({"space": ["a"]}, "space is ['a']: give a mapping of config key -> distribution"),
    "sw05-range-end-text": ({"space": {"method.temperature": {"uniform": [0.1, "x"]}}},
                            "space.method.temperature: uniform high is 'x': give a finite number"),
    "sw07-set-one-string": ({"set": "train.epochz=4"}, "unknown key 'train.epochz'"),  # not per character
    "w06-later-choice-invalid": ({"space": {"method.temperature": {"choice": [0.1, 0]}}},
                                 "space value method.temperature=0 is not a valid config: method.temperature "
                                 "must be > 0"),
    "w20-later-grid-invalid": ({"space": {"data.crops": {"grid": ["2x20", "2x10+2x20"]}}, "search": "grid"},
                               "space value data.crops=2x10+2x20 is not a valid config: data.crops '2x10+2x20': "
                               "local crops of 20 px are larger"),
    "w24-range-end-invalid": ({"space": {"optim.warmup_epochs": {"uniform": [0, 5]}}},
                              "space value optim.warmup_epochs=5 is not a valid config: optim.warmup_epochs 5.0 "
                              "must lie in [0, train.epochs=2]"),
    "w24b-combination-invalid": ({"space": {"train.epochs": {"choice": [8, 2]},
                                            "optim.warmup_epochs": {"choice": [0, 5]}}},
                                 "the trial with train.epochs=2, optim.warmup_epochs=5 is not a valid config"),
    "w08-quniform-q-zero": ({"space": {"optim.lr": {"quniform": [0.1, 0.5, 0]}}},
                            "space.optim.lr: quniform q (the step) is 0: give a finite number > 0"),
    "w08b-quniform-off-grid": ({"space": {"optim.lr": {"quniform": [0.15, 0.5, 0.1]}}},
                               "quniform bound 0.15 is not a multiple of q=0.1"),
    "w09-asha-grace-zero": ({"asha": {"grace_period": 0}}, "asha.grace_period is 0: give an integer >= 1"),
    "w10-asha-a-number": ({"asha": 5}, "asha is 5: give a mapping"),
    "w11-asha-unknown-key": ({"asha": {"grace": 1}}, "unknown key asha.grace (did you mean 'grace_period'?)"),
    "w12-asha-reduction-one": ({"asha": {"reduction_factor": 1}},
                               "asha.reduction_factor is 1: give a finite number > 1"),
    "w13-asha-grace-over-epochs": ({"asha": {"grace_period": 3}},
                                   "asha.grace_period 3 is longer than the trials' train.epochs (2)"),
    "w14-unknown-metric": ({"metric": "foo"}, "metric 'foo' is not reported by the trials: use one of img_per_s, "
                                              "knn_top1_k20, knn_top5_k20, loss, lr, weight_decay"),
    "w14b-knn-metric-without-knn": ({"scheduler": "fifo", "set": TINY + ["knn.every_epochs=0"]},
                                    "metric knn_top1_k20 needs kNN during training: set knn.every_epochs >= 1"),
    "w15-negative-cpu": ({"cpus_per_worker": -1}, "cpus_per_worker is -1: give a finite "
                                                                "number > 0"),
    "w16-three-number-loguniform": ({"space": {"method.temperature": {"loguniform": [0.05, 0.2, 10]}}},
                                    "space.method.temperature: loguniform needs [low, high], got [0.05, 0.2, 10]"),
    "w17-seed-text": ({"seed": "abc"}, "seed is 'abc': give an integer >= 0"),
    "w18-mode-unknown": ({"mode": "maximum"}, "mode 'maximum' is not one of max, min (did you mean 'max'?)"),
    "w19-optuna-grid": ({"search": "optuna", "space": {"method.temperature": {"grid": [0.1, 0.2]}}},
                        "Optuna cannot search a grid: use choice"),
    "w21-name-a-path": ({"name": "../x"}, "name '../x' is not a plain name"),
    "w22-space-key-not-section-key": ({"space": {"temperature": {"choice": [0.1]}}},
                                      "space key 'temperature' must be section.key of the base config"),
    "w22b-space-unknown-section": ({"space": {"data2.crops": {"choice": ["2x8"]}}},
                                   "space key 'data2.crops': unknown section 'data2' (did you mean 'data'?)"),
    "w23-workers-do-not-divide-batch": ({"workers": 3}, "the base config (with set: and --set) is not "
                                                                  "valid: data.batch_size 64 is not divisible by the "
                                                                  "3 workers"),
    "wk02-unknown-key-spacing": ({"data": {"crops": "2x8"}}, "unknown sweep key 'data' ('data' is a section of the "
                                                             "base config: set its keys with set: [data.<key>=value]"),
    "wk02b-unknown-key-suggestion": ({"ashaa": {}}, "unknown sweep key 'ashaa' (did you mean 'asha'?): the sweep "
                                                    "keys are asha, base,"),
}


# --------------------------------------------------------------------------- eval options
EVALS = {
    # id: (argv after `eval`, words of the one error line); {backbone} and {tmp} are filled in
    "e16-fractions-text": (["semi", "--fractions", "abc"], "--fractions 'abc': 'abc' is not a number: give label "
                                                            "fractions in (0, 1]"),
    "e43-fractions-empty-item": (["semi", "--fractions", "0.01,,0.1"], "--fractions '0.01,,0.1': '' is not a number"),
    "e44-fraction-over-one": (["semi", "--fractions", "0.1,1.5"], "1.5 is not in (0, 1]"),
    "e21-lr-nan": (["linear", "--lr", "nan"], "--lr is nan: give a finite number > 0"),
    "e22-lr-inf": (["linear", "--lr", "inf"], "--lr is inf: give a finite number > 0"),
    "e22b-transfer-lr-zero": (["transfer", "--lr", "0"], "--lr is 0.0: give a finite number > 0"),
    "e25-weight-decay-negative": (["semi", "--weight-decay", "-1"],
                                  "--weight-decay is -1.0: give a finite number >= 0"),
    "e26-weight-decay-nan": (["linear", "--weight-decay", "nan"], "--weight-decay is nan"),
    "e27-epochs-zero": (["linear", "--epochs", "0"], "--epochs is 0: give an integer >= 1"),
    "e28-min-steps-negative": (["semi", "--min-steps", "-1"], "--min-steps is -1: give an integer >= 0"),
    "e45-unknown-protocol": (["linear", "--protocol", "augmentd"], "--protocol 'augmentd' is not one of "
                                                                   "frozen_features, augmented (did you mean "
                                                                   "'augmented'?)"),
    "e46-head-lr-zero": (["semi", "--head-lr", "0"], "--head-lr is 0.0: give a finite number > 0"),
    "e23-out-a-file": (["knn", "--out", "{tmp}/taken"], "--out {tmp}/taken is a file, not a folder"),
    "e23b-out-under-a-file": (["knn", "--out", "{tmp}/taken/sub"], "{tmp}/taken is a file, so the folder cannot"),
    "e09-unknown-device": (["knn", "--device", "foo"], "device 'foo' is not one this trainer runs on"),
    "e24-negative-seed": (["semi", "--seed", "-1"], "--seed is -1: give an integer >= 0 and < 2147483648"),
    "e24b-seed-too-large": (["knn", "--seed", str(2**31)], "--seed is 2147483648"),
}


# --------------------------------------------------------------------------- the checks
@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """A private state dir and MLflow default, and tripwires on Ray and on every evaluation."""
    import ray

    import pipelines.stages

    def tripwire(*_, **__):
        raise AssertionError("expensive work started")

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SSLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(ray, "init", tripwire)
    monkeypatch.setattr(pipelines.stages, "run_evaluation", tripwire)
    assert not ray.is_initialized()
    yield tmp_path
    assert not ray.is_initialized()
    stores = [p for p in tmp_path.rglob("*") if p.suffix == ".db" or p.name in ("mlruns", "mlflow")]
    assert not stores, stores


def _one_line(capsys, argv: list[str], words: str | tuple[str, ...]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in ((words,) if isinstance(words, str) else words)), err
    assert "Traceback" not in err[0] and "rerun with --debug" not in err[0], err
    return err[0]


def _sweep_stage_pipeline(tmp: Path) -> dict:
    sweep = _sweep_file(tmp, metric="knn_top1_k200")  # the trials run kNN with k=20 only
    return _pipeline({"sweep": {"config": str(sweep)}, "pretrain": {"from_sweep": "sweep"}})


@pytest.mark.parametrize("case", list(PIPELINES))
def test_a_bad_pipeline_is_refused_in_one_line_before_ray(case, guarded, capsys):
    raw, extra, words = PIPELINES[case]
    if raw is None:
        raw = _sweep_stage_pipeline(guarded)
    path = guarded / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    _one_line(capsys, ["pipeline", "run", "--config", str(path), *extra], words)


@pytest.mark.parametrize("case", list(SWEEPS))
def test_a_bad_sweep_is_refused_in_one_line_before_ray(case, guarded, capsys):
    keys, words = SWEEPS[case]
    line = _one_line(capsys, ["sweep", "--config", str(_sweep_file(guarded, **keys))], words)
    assert "'did you" not in line and "? ;" not in line  # words not run together


@pytest.mark.parametrize("case", list(EVALS))
def test_bad_eval_options_are_refused_in_one_line_before_the_work(case, guarded, capsys):
    argv, words = EVALS[case]
    backbone = guarded / "backbone.pt"
    backbone.write_bytes(b"not read: every check comes first")
    (guarded / "taken").write_text("a file where the output folder should go")
    values = {"tmp": guarded}
    _one_line(capsys, ["eval", argv[0], "--backbone", str(backbone), "--dataset", "digits",
                       *[a.format(**values) for a in argv[1:]]], words.format(**values))


# --------------------------------------------------------------------------- what must still pass
def test_one_string_where_a_list_goes_is_a_list_of_one(tmp_path):
    from pipelines.spec import load_pipeline, parse_pipeline

    spec = parse_pipeline(_pipeline({"prepare": {"datasets": "digits"}, "pretrain": {"config": PRETRAIN,
                                                                                    "set": "train.epochs=3"},
                                     "report": {"inputs": "prepare"}}))
    assert spec.stage("prepare").settings["datasets"] == [{"name": "digits", "optional": False}]
    assert spec.stage("pretrain").settings["set"] == ["train.epochs=3"]
    assert spec.stage("report").inputs["inputs"] == ["prepare"]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_pipeline()))
    assert load_pipeline(path, ["seed=7"]).seed == 7


def test_shipped_sweeps_load_and_a_string_set_is_one_override():
    from orchestrator.sweep import load_sweep

    for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        spec = load_sweep(path)
        assert spec.space and spec.metric == "knn_top1_k20", path
    sweep = ROOT / "configs" / "sweeps" / "swav_fashion-mnist.yaml"
    assert load_sweep(sweep, ["train.epochs=6"]).base.train.epochs == 6


def test_string_set_in_a_sweep_file(tmp_path):
    from orchestrator.sweep import load_sweep

    spec = load_sweep(_sweep_file(tmp_path, set="train.epochs=3", metric="loss", mode="min", scheduler="fifo"))
    assert spec.base.train.epochs == 3 and spec.metric == "loss"


def test_good_eval_options_reach_the_evaluation(tmp_path, monkeypatch, capsys):
    import pipelines.stages

    calls = []

    def fake(kind, settings, backbone, data_root, device=None, seed=0, log=print):
        calls.append((kind, settings, device, seed))
        return {"metrics": {"semi1_top1": 0.5}, "extra": {}, "files": {"semi1_indices.txt": "1\n"}}

    monkeypatch.setattr(pipelines.stages, "run_evaluation", fake)
    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(b"x")
    out = tmp_path / "new" / "folder"
    assert main(["eval", "semi", "--backbone", str(backbone), "--dataset", "digits", "--device", "cpu",
                 "--fractions", "0.01, 0.1", "--seed", "3", "--lr", "0.02", "--out", str(out), "--json"]) == 0
    kind, settings, device, seed = calls[0]
    assert (kind, device, seed) == ("semi", "cpu", 3)
    assert settings["fractions"] == [0.01, 0.1] and settings["lr"] == 0.02 and settings["dataset"] == "digits"
    # SwAV's protocol spelled out: the trunk lr given, the head's per fraction (1%: 5, 10%: 0.2)
    assert settings["protocol"] == "swav" and settings["lrs"] == {"semi1": [0.02, 5.0], "semi10": [0.02, 0.2]}
    assert (settings["epochs"], settings["decay_at"], settings["gamma"]) == (20, [0.6, 0.8], 0.2)
    assert (out / "semi.json").is_file() and (out / "semi1_indices.txt").read_text() == "1\n"


def test_evaluation_settings_refuse_non_finite_values_themselves():
    from trainers.errors import ConfigError
    from trainers.evaluate import FinetuneSettings, LinearSettings

    for bad in ({"lr": float("nan")}, {"lr": float("inf")}, {"weight_decay": -1e-4}, {"epochs": True},
                {"seed": -1}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            LinearSettings(**bad).validate()
        with pytest.raises(ConfigError):
            FinetuneSettings(**bad).validate()
    with pytest.raises(ConfigError, match="weight_decay is nan"):
        FinetuneSettings(weight_decay=float("nan")).validate()
    assert LinearSettings().validate().lr == 0.1 and FinetuneSettings().validate().lr == 0.01
