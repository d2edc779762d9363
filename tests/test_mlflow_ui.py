"""MLflow's UI, in a real browser, shows sslab's runs the way issue 18 asks: the experiment's runs table,
a pipeline parent with every stage (cached ones as link runs), a sweep's trials in the compare view.

The store is built by docs/screenshots.py (the code that makes README's screenshots) through sslab's
own tracking code: pipelines/runner.py's PipelineRunner with its stage computations replaced by
recorded results, run twice (the second time with other linear-probe settings, so five of its seven
stages are cached), and a sweep's parent and trial runs as orchestrator/sweep.py makes them. A real
``mlflow server`` serves it; headless Chromium (Debian's `chromium`, which `make setup` installs as root)
renders the pages and the test reads the rendered DOM: what a user sees, not what the API returns.
About 40 s on 2 cores; skipped (with the reason) where Chromium is not installed.
"""

from __future__ import annotations

import html
import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts an MLflow server and a browser: `make test-fast` leaves it out
ROOT = Path(__file__).resolve().parents[1]


def _screenshots():
    spec = importlib.util.spec_from_file_location("sslab_docs_screenshots", ROOT / "docs" / "screenshots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


shots = _screenshots()


def _text(dom: str) -> str:
    """The page's visible text, whitespace collapsed."""
    dom = re.sub(r"<(style|script|svg)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))).strip()


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    if shots.chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium; `make setup` installs it as root): "
                    "the MLflow UI check needs a real browser")
    tmp = tmp_path_factory.mktemp("mlflow-ui")
    built = []  # the store is built while the server starts on it
    with shots.mlflow_server(shots.create_store(tmp / "store"), tmp / "server.log",
                             meanwhile=lambda: built.append(shots.build_store(tmp / "store"))) as url:
        yield built[0], url, tmp


def _dom(ui, page: str, name: str) -> str:
    _, _, tmp = ui
    dom = shots.dump_dom(page, tmp / f"profile-{name}", window=(3000, 1400))  # wide: every compared run rendered
    (tmp / f"{name}.html").write_text(dom)
    return dom


def _runs(store):
    from orchestrator import tracking

    return tracking.client(store.uri).search_runs([store.experiment_id], max_results=1000)


def test_the_experiment_opens_as_model_training_with_its_runs(ui):
    store, url, _ = ui
    text = _text(_dom(ui, shots.runs_page(url, store.experiment_id), "runs"))
    runs = _runs(store)
    top = {r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert top == {"demo", shots.SWEEP_NAME}
    assert text.startswith(f"Runs - Experiment {store.experiment_id} - MLflow"), text[:200]
    # the model-training layout (Runs / Models / Traces), not the GenAI one (Overview, Observability, Judges)
    assert "Model registry" in text and "Observability" not in text and "Judges" not in text, text[:600]
    assert f"{len(runs)} matching runs" in text and len(runs) == 25
    assert text.count(" demo ") >= 2 and shots.SWEEP_NAME in text


def test_the_pipeline_parent_lists_every_stage_with_the_cached_ones_as_links(ui):
    store, url, _ = ui
    parent = store.pipelines[-1].parent_run_id
    dom = _dom(ui, shots.pipeline_page(url, store), "pipeline")
    text = _text(dom)
    children = [r for r in _runs(store) if r.data.tags.get("mlflow.parentRunId") == parent]
    links = {r.info.run_id for r in children if "sslab.cached_from" in r.data.tags}
    assert len(children) == 7 and len(links) == 5
    # "Child runs" lists each stage by name, each a link to its run: the five cached stages' link runs too
    listed = text.split("Child runs", 1)[1].split("Source", 1)[0]
    assert sorted(n.strip() for n in listed.split(",")) == sorted(f"demo/{s}" for s in
                                                                  ("prepare", "pretrain", "knn", "linear", "semi",
                                                                   "transfer", "report"))
    shown = set(re.findall(rf'href="#/experiments/{store.experiment_id}/runs/([0-9a-f]{{32}})"', dom))
    assert {r.info.run_id for r in children} <= shown and links <= shown
    assert "Status Finished" in text and "linear_top1 0.7941" in text and "knn_top1_k20 0.7412" in text


def test_the_sweeps_trials_compare_side_by_side_with_their_metric(ui):
    store, url, _ = ui
    text = _text(_dom(ui, shots.compare_page(url, store), "compare"))
    trials = store.sweep["trials"]  # best first
    assert f"Comparing {len(trials)} Runs from 1 Experiment" in text
    names = text.split("Run Name:", 1)[1].split("Start Time:", 1)[0].split()
    assert names == [t["name"] for t in trials]
    row = re.search(r"Metrics Show diff only knn_top1_k20 loss ([0-9. ]+)", text)
    assert row, text[-2000:]
    values = [float(v) for v in row.group(1).split()[:len(trials)]]
    assert values == [round(t["knn_top1_k20"], 3) for t in trials]
    assert values == sorted(values, reverse=True) and len(set(values)) > 1
