"""Expected bands (pipelines/expect.py, a stage's `expect:`) and `--force`: parsing, checking, the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.expect import Check, check_expectations, verdict, verdict_json
from pipelines.runner import StageOutcome, forced_stages
from pipelines.spec import parse_pipeline
from trainers.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

def _spec(**changes):
    stages = {"prepare": {"datasets": ["digits"]},
              "pretrain": {"config": str(ROOT / "configs" / "pretrain" / "swav_fashion-mnist.yaml")},
              "knn": {"expect": {"knn_top1_k20": [0.83, 0.86]}},
              "linear": {"expect": {"linear_top1": [0.7, 0.8], "linear_top5": [0.95, 1.0]}},
              "report": {}}
    for name, settings in changes.items():
        stages[name] = {**stages[name], **settings}
    return parse_pipeline({"name": "t", "stages": stages}, base=ROOT)


def test_bands_are_parsed_and_kept_out_of_the_pipeline_identity():
    spec = _spec()
    assert spec.stage("knn").expect == {"knn_top1_k20": [0.83, 0.86]}
    assert "expect" not in spec.stage("knn").settings  # not a setting: no part of the stage's cache key
    assert _spec(knn={"expect": {"knn_top1_k20": [0.5, 0.6]}}).digest() == spec.digest()
    assert _spec(linear={"epochs": 3}).digest() != spec.digest()


@pytest.mark.parametrize("expect, message", [
    ({"knn_top1_k20": [0.9, 0.8]}, "expect.knn_top1_k20 is [0.9, 0.8]: low is above high; write [0.8, 0.9]"),
    ({"knn_top1_k20": 0.85}, "expect.knn_top1_k20 is 0.85: give [low, high]"),
    ({"knn_top1_k20": [0.8, "high"]}, "expect.knn_top1_k20"),
    ([0.8, 0.9], "expect is [0.8, 0.9]: give a mapping of metric -> [low, high]"),
])
def test_bad_bands_are_one_line(expect, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        _spec(knn={"expect": expect})


def test_checks_and_verdict():
    expected = {"knn": {"knn_top1_k20": [0.83, 0.86]}, "linear": {"linear_top1": [0.7, 0.8], "linear_top9": [0, 1]},
                "semi": {"semi1_top1": [0.1, 0.2]}}
    metrics = {"knn": {"knn_top1_k20": 0.8412}, "linear": {"linear_top1": 0.69}}
    checks = check_expectations(expected, metrics)
    assert [(c.stage, c.metric, c.status) for c in checks] == [
        ("knn", "knn_top1_k20", "in"), ("linear", "linear_top1", "out"), ("linear", "linear_top9", "missing")]
    assert checks[0].describe() == "knn/knn_top1_k20 0.8412 in [0.83, 0.86]"
    assert checks[1].describe() == "linear/linear_top1 0.6900 OUT of [0.7, 0.8]"
    assert verdict(checks) == "regression" and verdict(checks[:1]) == "pass" and verdict([]) == "none"
    assert verdict_json(checks[:2])["checks"][1] == {"stage": "linear", "metric": "linear_top1", "value": 0.69,
                                                       "band": [0.7, 0.8], "status": "out"}
    assert Check("k", "m", 0.83, 0.83, 0.86).status == "in" and Check("k", "m", 0.86, 0.83, 0.86).status == "in"


def test_force_reruns_a_stage_and_the_stages_that_read_it():
    spec = _spec()
    assert forced_stages(spec, []) == set()
    assert forced_stages(spec, ["knn"]) == {"knn", "report"}
    assert forced_stages(spec, ["pretrain"]) == {"pretrain", "knn", "linear", "report"}
    assert forced_stages(spec, ["prepare"]) == {"prepare", "pretrain", "knn", "linear", "report"}
    assert forced_stages(spec, ["all"]) == {s.name for s in spec.stages}
    with pytest.raises(ConfigError, match="--force knnn: no stage 'knnn' in pipeline t \\(did you mean 'knn'\\?\\)"):
        forced_stages(spec, ["knnn"])


def test_report_marks_each_band(tmp_path):
    from pipelines.report import write_report

    spec = _spec()
    outcomes = [StageOutcome("knn", "knn", "r1", "finished", False, "k", "h", {"metrics": {"knn_top1_k20": 0.8412},
                                                                              "extra": {}}),
                StageOutcome("linear", "linear", "r2", "finished", False, "k", "h",
                             {"metrics": {"linear_top1": 0.69, "linear_top5": 0.97}, "extra": {}})]
    checks = check_expectations({"knn": spec.stage("knn").expect, "linear": spec.stage("linear").expect},
                                {o.name: o.metrics for o in outcomes})
    write_report(spec, outcomes, tmp_path, "sqlite:///x", "parent", checks)
    text = (tmp_path / "report.md").read_text()
    assert "**Verdict: regression** (2 of 3 expected metrics in their bands: linear/linear_top1 0.6900 OUT of " \
           "[0.7, 0.8])" in text
    assert "| knn | kNN" in text and "| 84.12% | in [83.00, 86.00]% |" in text
    assert "| 69.00% | OUT of [70.00, 80.00]% |" in text and "| 97.00% | in [95.00, 100.00]% |" in text
    assert "<td>OUT of [70.00, 80.00]%</td>" in (tmp_path / "report.html").read_text()


def test_a_malformed_stage_result_fails_when_the_stage_returns():
    from pipelines.stages import check_result

    good = {"metrics": {"knn_top1_k20": 0.8}, "extra": {}, "files": {}}
    assert check_result("knn", good) is good
    pretrain = {"metrics": {}, "extra": {"backbone_path": "/x/backbone.pt"}, "files": {}}
    with pytest.raises(TypeError, match="the pretrain stage returned a malformed result: extra lacks \\['dataset'\\]"):
        check_result("pretrain", pretrain)
    with pytest.raises(TypeError, match="metrics \\['knn_top1_k20'\\] are not numbers"):
        check_result("knn", {**good, "metrics": {"knn_top1_k20": "0.8"}})
    with pytest.raises(TypeError, match="not a mapping with metrics, extra and files"):
        check_result("linear", {"metrics": {}})


def test_expected_names_are_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="stage 'knn': expect.knn_top1_k200 is not a metric of a knn stage .*: it "
                                          "reports knn_top1_k20, knn_top1_k200_t0.1, knn_top5_k20, knn_top5_k200_t0.1"):
        _spec(knn={"expect": {"knn_top1_k200": [0.7, 0.8]}})
    with pytest.raises(ConfigError, match="stage 'report' \\(report\\): unknown setting 'expect'; it takes inputs"):
        _spec(report={"expect": {"x": [0, 1]}})
    with pytest.raises(ConfigError, match="unknown setting 'cpu_per_worker' \\(did you mean 'cpus_per_worker'\\?\\)"):
        _spec(knn={"cpu_per_worker": 2})
    spec = _spec(knn={"expect": {"knn_top5_k200_t0.1": [0.9, 1.0]}})  # every name a knn stage reports is accepted
    assert spec.stage("knn").expect == {"knn_top5_k200_t0.1": [0.9, 1.0]}


def test_image_folder_options_name_one_file_and_metric():
    from pipelines.stages import metric_key
    from trainers.data.beton import PrepareSettings, beton_path
    from trainers.data.datasets import load_split

    names = ["imagefolder:/data/pets", "imagefolder:/data/pets?holdout=0.2,seed=0", "imagefolder:/data/pets?seed=0"]
    assert len({beton_path("/x", n, "test", PrepareSettings()) for n in names}) == 1  # one spelling of the defaults
    assert beton_path("/x", "imagefolder:/data/pets?seed=1,holdout=0.1", "test", PrepareSettings()) == \
        beton_path("/x", "imagefolder:/data/pets?holdout=0.1,seed=1", "test", PrepareSettings())
    assert metric_key("imagefolder:/data/pets?holdout=0.1,seed=3") == "imagefolder__data_pets_holdout_0.1_seed_3"
    assert metric_key("tiny-imagenet") == "tiny_imagenet"
    with pytest.raises(ConfigError, match="seed=-1 must be a whole number in \\[0, 2\\*\\*32\\)"):
        load_split("imagefolder:/data/pets?seed=-1", "test")
