"""Configs: shipped YAML files load, every key is checked, --set overrides, impossible values refused."""

from pathlib import Path

import pytest

from trainers.config import load_config
from trainers.errors import ConfigError
from trainers.loop import check_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "pretrain").glob("*.yaml"))


def test_the_required_configs_are_shipped():
    names = {p.stem for p in CONFIGS}
    for method in ("swav", "dino", "sdmp", "supcon"):
        for dataset in ("cifar10", "fashion-mnist"):
            assert f"{method}_{dataset}" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    check_config(config)
    method, dataset, *variant = path.stem.split("_")  # <method>_<dataset>[_<variant>], e.g. swav_cifar10_multicrop
    assert config.method_name == method
    assert config.data.dataset == dataset


def test_defaults_and_overrides():
    config = load_config(None, ["optim.lr=0.5", "method.name=dino", "method.teacher_temperature=0.05",
                                "data.crops=2x32+6x16", "knn.k=[10, 20]", "name=abc", "model.cifar_stem=null"])
    assert config.optim.lr == 0.5 and config.name == "abc" and config.knn.k == [10, 20]
    options = config.method_options()
    assert options.teacher_temperature == 0.05 and options.student_temperature == 0.1
    assert config.flat()["method.teacher_temperature"] == 0.05
    assert config.model.cifar_stem is None


def test_switching_method_drops_the_old_methods_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: swav\n  epsilon: 0.03\n")
    config = load_config(path, ["method.name=supcon"])
    assert config.method_name == "supcon"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "did you mean 'lr'"),
    ("method.epsilom=0.1", "did you mean 'epsilon'"),
    ("optimm.lr=0.1", "did you mean 'optim'"),
    ("optim.lr=abc", "expected float"),
    ("train.epochs=1.5", "expected int"),
    ("method.name=swaw", "did you mean 'swav'"),
    ("model.backbone=resnet19", None),
    ("optim.lr", "section.key=value"),
])
def test_bad_keys_and_values_say_what_to_fix(override, message):
    with pytest.raises(ConfigError) as err:
        check_config(load_config(None, [override]))
    if message:
        assert message in str(err.value)


def test_missing_file_suggests_the_closest(tmp_path):
    (tmp_path / "swav_cifar10.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="did you mean .*swav_cifar10.yaml"):
        load_config(tmp_path / "swav_cifar1.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\noptim:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)


@pytest.mark.parametrize("overrides, message", [
    (["method.temperature=0"], "temperature must be > 0"),
    (["method.epsilon=-0.1"], "epsilon must be > 0"),
    (["method.sinkhorn_iterations=0"], "sinkhorn_iterations must be >= 1"),
    (["method.queue_length=100", "data.batch_size=256"], "smaller than the global batch"),
    (["method.queue_length=3584", "method.queue_start_epoch=300", "train.epochs=200"], "beyond the last epoch"),
    (["method.queue_length=3840"], "not a multiple of the global batch 512"),
    (["data.crops=0x32+4x16"], "0 global crops"),
    (["data.crops=2x16+4x32"], "larger than the global"),
    (["data.global_scale=[0.0, 1.0]"], None),
    (["optim.warmup_epochs=20", "train.epochs=10"], "warmup_epochs"),
    (["optim.lr=-1"], "optim.lr must be a positive"),
    (["method.name=dino", "method.teacher_temperature=0"], "temperatures must be > 0"),
    (["method.name=dino", "data.crops=1x32+6x16"], "at least 2 global crops"),
    (["method.name=sdmp", "method.mix_modes=[mixup, blend]"], "mix_modes"),
    (["method.name=sdmp", "data.crops=2x32+4x16"], "exactly 2 global crops"),
    (["method.name=supcon", "method.labels=some"], "labels"),
    (["optim.name=adam"], "optim.name"),
])
def test_impossible_hyperparameters_are_refused(overrides, message):
    config = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        check_config(config)
        if "global_scale" in overrides[0]:
            from trainers.data.augment import method_crop_groups

            method_crop_groups("swav", config.data.crops, global_scale=config.data.global_scale)
    if message:
        assert message in str(err.value)


def test_batch_must_split_over_workers():
    with pytest.raises(ConfigError, match="not divisible by the 3 workers"):
        check_config(load_config(None, ["data.batch_size=512"]), world_size=3)


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-6 as a string; a float field still accepts it
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 1e-6\n")
    assert load_config(path).optim.weight_decay == 1e-6
    assert load_config(None, ["optim.lr=3e-4"]).optim.lr == 3e-4
    with pytest.raises(ConfigError, match="wrong type"):
        load_config(None, ["optim.lr=fast"])
