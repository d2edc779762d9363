"""Expected bands: a pipeline that certifies its numbers instead of only rerunning.

A stage may declare ``expect: {metric: [low, high]}`` (pipelines/spec.py), a band measured on a run
one trusts. After the stages ran, every declared metric is checked: ``in`` its band, ``out`` of it,
or ``missing`` (the stage produced no such metric: a renamed metric must not pass silently). The
verdict is ``pass`` when every check is in, ``regression`` otherwise, ``none`` when nothing is declared.
"""

from __future__ import annotations

from dataclasses import dataclass

REGRESSION_EXIT = 7  # `sslab pipeline run`'s exit status when a metric is outside its band (docs/errors.md)


@dataclass(frozen=True)
class Check:
    stage: str
    metric: str
    value: float | None
    low: float
    high: float

    @property
    def status(self) -> str:
        if self.value is None:
            return "missing"
        return "in" if self.low <= self.value <= self.high else "out"

    def describe(self) -> str:
        """e.g. ``knn/knn_top1_k20 0.8412 in [0.83, 0.86]``."""
        band = f"[{self.low:g}, {self.high:g}]"
        if self.value is None:
            return f"{self.stage}/{self.metric} missing (expected in {band})"
        return f"{self.stage}/{self.metric} {self.value:.4f} {'in' if self.status == 'in' else 'OUT of'} {band}"

    def as_json(self) -> dict:
        return {"stage": self.stage, "metric": self.metric, "value": self.value, "band": [self.low, self.high],
                "status": self.status}


def check_expectations(expected: dict[str, dict], metrics: dict[str, dict]) -> list[Check]:
    """``expected``: stage -> {metric: [low, high]}; ``metrics``: stage -> its metrics (stages that did not run
    are left out: their checks are not made)."""
    checks = []
    for stage, bands in expected.items():
        if stage not in metrics:
            continue
        for metric, (low, high) in bands.items():
            value = metrics[stage].get(metric)
            checks.append(Check(stage, metric, None if value is None else float(value), low, high))
    return checks


def verdict(checks: list[Check]) -> str:
    if not checks:
        return "none"
    return "pass" if all(c.status == "in" for c in checks) else "regression"


def verdict_json(checks: list[Check]) -> dict:
    return {"status": verdict(checks), "checks": [c.as_json() for c in checks]}
