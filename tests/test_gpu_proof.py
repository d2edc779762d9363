"""bench/gpu_proof.sh --smoke: the one GPU proof command's code path on the CPU (issue 19 item 3).

Each part's JSON in priority order with real figures, the summary naming every part's status, the whole run
under 3 minutes, and a tiny --budget skipping what cannot fit instead of running past its deadline."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_proof.sh"
CASES = [("swav", "2x32+4x16"), ("dino", "2x32+6x16"), ("supcon", "2x32")]
PARTS = [("a", "throughput-eager", "throughput-cpu-proof.json"),
         ("b", "throughput-compiled", "throughput-cpu-compiled-proof.json"),
         ("c", "tta-swav", "tta-swav-cpu-proof.json")]
SMOKE_LIMIT_S = 180.0


@pytest.fixture(scope="module")
def prepared(data_root) -> Path:
    """CIFAR-10's .beton files in this session's SSLAB_HOME before the timed runs, as a GPU machine's first
    call would have them after its setup: the smoke's own prepare step then only checks them (a few s)."""
    subprocess.run([sys.executable, "-m", "sslab", "data", "prepare", "--dataset", "cifar10", "--quiet"], cwd=ROOT,
                   env={**os.environ, "SSLAB_DATA_ROOT": str(data_root)}, check=True, capture_output=True)
    return data_root


def run_proof(results: Path, data_root: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "SSLAB_DATA_ROOT": str(data_root), "SSLAB_PYTHON": sys.executable}
    env.pop("OUT", None)  # never copy into a device tool's folder from a test
    started = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--smoke", "--results", str(results), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=SMOKE_LIMIT_S + 60)
    return proc, time.monotonic() - started


def read_summary(results: Path, proc: subprocess.CompletedProcess) -> dict:
    path = results / "gpu-proof-summary-cpu.json"
    assert path.is_file(), (f"gpu_proof.sh wrote no {path.name} (exit {proc.returncode}: "
                            f"{(proc.stderr or proc.stdout).strip()[-300:]}); fix the script's setup")
    return json.loads(path.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_takes_every_part_in_priority_order(tmp_path, prepared):
    proc, wall = run_proof(tmp_path, prepared)
    summary = read_summary(tmp_path, proc)
    statuses = {p["part"]: p["status"] for p in summary["parts"]}
    assert proc.returncode == 0, (f"gpu_proof.sh --smoke exited {proc.returncode} with parts {statuses}: see "
                                  f"{tmp_path}/gpu-proof-cpu.log and fix the part that did not finish")
    assert wall < SMOKE_LIMIT_S, (f"the smoke took {wall:.0f} s (limit {SMOKE_LIMIT_S:.0f} s): shrink the --smoke "
                                  "sizes in bench/gpu_proof.sh")
    assert summary["finished"] and summary["deadline_met"] and summary["wall_s"] <= summary["budget_s"], \
        f"summary says finished={summary['finished']}, wall {summary['wall_s']} s of {summary['budget_s']} s: " \
        "the final summary must be written within the budget"
    assert [s["name"] for s in summary["setup"]] == ["kit", "data", "lightly"], \
        f"setup steps {[s['name'] for s in summary['setup']]}: expected kit, data, lightly in that order"
    lightly_status = summary["setup"][2]["status"]
    if importlib.util.find_spec("lightly") is None:
        assert lightly_status == "skipped (lightly not installed)", \
            f"lightly is not installed but the summary says '{lightly_status}': record it as skipped"
    assert [(p["part"], p["name"]) for p in summary["parts"]] == [(k, n) for k, n, _ in PARTS], \
        f"parts {[(p['part'], p['name']) for p in summary['parts']]}: expected a, b, c in priority order"
    assert all(p["status"] == "done" for p in summary["parts"]), f"part statuses {statuses}: every part must be done"

    written = []
    for (key, name, filename), part in zip(PARTS, summary["parts"]):
        assert part["json"] == filename and (tmp_path / filename).is_file(), \
            f"part {key} lists {part['json']!r}, expected {filename} in the results folder"
        written.append((tmp_path / filename).stat().st_mtime)
        data = json.loads((tmp_path / filename).read_text())
        if name.startswith("throughput"):
            rows = data["rows"]
            assert [(r["method"], r["crops"]) for r in rows] == CASES, \
                f"{filename} measured {[(r['method'], r['crops']) for r in rows]}, expected {CASES}"
            for r in rows:
                assert positive(r["ours_img_s"]) and positive(r["ceiling_img_s"]), \
                    f"{filename}: {r['method']} {r['crops']} ours {r['ours_img_s']} / ceiling {r['ceiling_img_s']} " \
                    "img/s: both must be positive and finite"
            assert data["facts"]["compiled"] is (name == "throughput-compiled"), \
                f"{filename}: facts.compiled is {data['facts']['compiled']} for part {name}"
            assert data["facts"]["cases_done"] == data["facts"]["cases_planned"] == 3, \
                f"{filename}: {data['facts']['cases_done']} of {data['facts']['cases_planned']} cases done"
            assert [f["ours_img_s"] for f in part["figures"]] == [r["ours_img_s"] for r in rows], \
                f"the summary's figures for {name} differ from {filename}"
            if importlib.util.find_spec("lightly") is None:
                assert not any("lightly_img_s" in r for r in rows), f"{filename} has lightly figures without lightly"
        else:
            curve = data["curve"]
            assert curve and all(0.0 <= p["knn_top1_k200"] <= 1.0 for p in curve), \
                f"{filename}: kNN curve {curve}: needs at least one finite accuracy in [0, 1]"
            assert data["facts"]["best"] == max(p["knn_top1_k200"] for p in curve), \
                f"{filename}: facts.best {data['facts']['best']} is not the curve's best"
            assert part["figures"]["best_knn_top1"] == data["facts"]["best"], \
                "the summary's tta figure differs from the tta JSON"
    assert written == sorted(written), f"part JSONs written out of priority order (mtimes {written})"
    markdown = (tmp_path / "gpu-proof-summary-cpu.md").read_text()
    assert all(f"{k}: {n} | done" in markdown for k, n, _ in PARTS), \
        f"gpu-proof-summary-cpu.md does not list every part as done:\n{markdown[:600]}"


@pytest.mark.slow
def test_tiny_budget_skips_what_cannot_fit(tmp_path, prepared):
    budget = 30
    proc, wall = run_proof(tmp_path, prepared, "--budget", str(budget))
    summary = read_summary(tmp_path, proc)
    statuses = [p["status"] for p in summary["parts"]]
    assert wall < budget + 3, (f"--budget {budget} ran {wall:.1f} s: a part outlived its time limit; give every "
                               "part a timeout computed from what remains")
    assert proc.returncode == 1, f"exit {proc.returncode} with parts {statuses}: expected 1 (not every part done)"
    assert statuses[0] == "done" or statuses[0].startswith(("timed out after", "skipped (no time left)")), \
        f"part a: '{statuses[0]}'"
    assert statuses[1:] == ["skipped (no time left)"] * 2, \
        f"with --budget {budget} parts b and c are {statuses[1:]}: expected 'skipped (no time left)'"
    assert summary["finished"] and summary["deadline_met"], \
        f"summary finished={summary['finished']}, wall {summary['wall_s']} s of {budget} s"
    for part in summary["parts"][1:]:
        assert part.get("json") is None and not (tmp_path / dict((k, f) for k, _, f in PARTS)[part["part"]]).exists(), \
            f"part {part['part']} was skipped but left a JSON behind"
