"""The pipeline report: a markdown page, the same as HTML, and PNG plots.

Plots: pretraining curves (loss, online kNN), the accuracy table as bars, per-class linear-probe
accuracy, and kNN top-1 against k. Each plot is drawn only when its stage ran.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from pipelines.spec import PipelineSpec
from trainers.knn import knn_label

LABELS = {"linear_top1": "linear probe top-1", "linear_top5": "linear probe top-5"}


def metric_label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    if knn_label(key):
        return knn_label(key)
    top = key[-4:].replace("top", "top-")
    if key.startswith("semi") and key[-5:] in ("_top1", "_top5"):
        return f"fine-tuned on {key[4:-5].replace('p', '.')}% labels, {top}"
    if key.startswith("transfer_") and key[-5:] in ("_top1", "_top5"):
        return f"transfer to {key[9:-5]} (linear), {top}"
    if key.startswith("pretrain_"):
        return f"pretraining: {key[9:]}"
    return key


def accuracy_rows(outcomes) -> list[tuple[str, str, str, float]]:
    """(stage, metric key, label, value) of every top-1 and top-5 accuracy, in stage order."""
    rows = []
    for outcome in outcomes:
        for key, value in outcome.metrics.items():
            if isinstance(value, (int, float)) and ("top1" in key or "top5" in key):
                rows.append((outcome.name, key, metric_label(key), float(value)))
    return rows


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(outcomes, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    by_kind = {o.kind: o for o in outcomes}
    pretrain = by_kind.get("pretrain")
    if pretrain is not None and pretrain.result["extra"].get("history"):
        from trainers.plots import plot_history

        path = plot_history(pretrain.result["extra"]["history"], folder / "pretraining_curves.png",
                            title=pretrain.result["extra"].get("method", ""))
        if path is not None:
            paths.append(path)
    rows = [r for r in accuracy_rows(outcomes) if "top1" in r[1] and not r[1].startswith("pretrain")]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
        ax.barh([r[2] for r in rows][::-1], [100 * r[3] for r in rows][::-1], color="#4c72b0")
        for i, r in enumerate(rows[::-1]):
            ax.text(100 * r[3] + 0.5, i, f"{100 * r[3]:.1f}", va="center", fontsize=8)
        ax.set(xlabel="top-1 accuracy (%)", xlim=(0, 105), title="accuracy")
        paths.append(_save(fig, folder / "accuracy.png"))
    linear = by_kind.get("linear")
    if linear is not None and linear.result["extra"].get("per_class"):
        per_class = linear.result["extra"]["per_class"]
        fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(per_class)), 3.6))
        ax.bar(range(len(per_class)), [100 * v for v in per_class.values()], color="#55a868")
        ax.set_xticks(range(len(per_class)), list(per_class), rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="top-1 (%)", ylim=(0, 100), title="linear probe, per class")
        paths.append(_save(fig, folder / "per_class.png"))
    knn = by_kind.get("knn")
    if knn is not None and knn.result["extra"].get("knn_sweep"):
        sweep = {int(k): v for k, v in knn.result["extra"]["knn_sweep"].items()}
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot(list(sweep), [100 * v for v in sweep.values()], marker="o")
        ax.set(xscale="log", xlabel="k", ylabel="kNN top-1 (%)", title="kNN top-1 against k (T=0.07)")
        paths.append(_save(fig, folder / "knn_vs_k.png"))
    return paths


def _mark(check) -> str:
    band = f"[{100 * check.low:.2f}, {100 * check.high:.2f}]%" if check.high <= 1 else f"[{check.low:g}, {check.high:g}]"
    return {"in": f"in {band}", "out": f"OUT of {band}", "missing": f"missing (expected {band})"}[check.status]


def write_report(spec: PipelineSpec, outcomes, folder: Path, tracking_uri: str, parent_run_id: str,
                 checks=()) -> list[Path]:
    """Writes report.md, report.html and the plots into ``folder``; returns every file written. ``checks``
    (pipelines.expect): the declared bands, each marked in or out in the table and a verdict line."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = _plots(outcomes, folder)
    rows = accuracy_rows(outcomes)
    pretrain = next((o for o in outcomes if o.kind == "pretrain"), None)
    facts = [("pipeline", spec.name), ("MLflow parent run", parent_run_id), ("tracking URI", tracking_uri),
             ("written", time.strftime("%Y-%m-%d %H:%M:%S"))]
    if pretrain is not None:
        extra = pretrain.result["extra"]
        facts[1:1] = [("method", extra.get("method", "")), ("backbone", extra.get("backbone", "")),
                      ("pretraining data", extra.get("dataset", "")), ("pretraining steps", str(extra.get("steps", "")))]
    lines = [f"# {spec.name}: results", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts] + [""]
    marks = {(c.stage, c.metric): _mark(c) for c in checks}
    verdict_head = verdict_tail = ""
    if checks:
        from pipelines.expect import verdict

        out = [c.describe() for c in checks if c.status != "in"]
        verdict_head = f"Verdict: {verdict(list(checks))}"
        verdict_tail = (f"({len(checks) - len(out)} of {len(checks)} expected metrics in their bands"
                        f"{': ' + '; '.join(out) if out else ''})")
        lines += [f"**{verdict_head}** {verdict_tail}", ""]
    lines += ["| stage | metric | value | expected |", "|---|---|---|---|"]
    lines += [f"| {s} | {label} | {100 * v:.2f}% | {marks.get((s, key), '')} |" for s, key, label, v in rows]
    shown = {(s, key) for s, key, _, _ in rows}
    lines += [f"| {c.stage} | {c.metric} | {'' if c.value is None else f'{c.value:.4f}'} | {_mark(c)} |"
              for c in checks if (c.stage, c.metric) not in shown]
    lines += ["", "| stage | MLflow run | cached | seconds |", "|---|---|---|---|"]
    lines += [f"| {o.name} | {o.run_id} | {'yes' if o.cached else 'no'} | {o.seconds:.0f} |" for o in outcomes]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    markdown = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(markdown)
    table = "".join(f"<tr><td>{html.escape(s)}</td><td>{html.escape(label)}</td><td>{100 * v:.2f}%</td>"
                    f"<td>{html.escape(marks.get((s, key), ''))}</td></tr>" for s, key, label, v in rows)
    table += "".join(f"<tr><td>{html.escape(c.stage)}</td><td>{html.escape(c.metric)}</td>"
                     f"<td>{'' if c.value is None else f'{c.value:.4f}'}</td><td>{html.escape(_mark(c))}</td></tr>"
                     for c in checks if (c.stage, c.metric) not in shown)
    fact_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in facts)
    images = "".join(f'<figure><img src="{p.name}" alt="{p.stem}"><figcaption>{p.stem}</figcaption></figure>'
                     for p in plots)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(spec.name)} results</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.3em .6em}img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(spec.name)}: results</h1><ul>{fact_html}</ul>"
            + (f"<p><b>{html.escape(verdict_head)}</b> {html.escape(verdict_tail)}</p>" if checks else "") +
            f"<table><tr><th>stage</th><th>metric</th><th>value</th><th>expected</th></tr>{table}</table>{images}"
            "</body></html>")
    (folder / "report.html").write_text(page)
    return [folder / "report.md", folder / "report.html", *plots]
