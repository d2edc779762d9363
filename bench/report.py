"""Every benchmark result in bench/results/ as one markdown report, checked against the performance
targets (listed below; BENCHMARKS.md, first section, says where each stands).

  python bench/report.py                     # all devices
  python bench/report.py --device cuda       # only GPU results (what a GPU session produced)
  python bench/report.py --results DIR --out REPORT.md

Targets (each a ratio measured in one run on one device, so they only mean something on a GPU; CPU
results are listed with the verdict "CPU smoke"):
  1. ours / ceiling >= 85% for every throughput case (eager vs eager, compiled vs compiled)
  2. ours / lightly >= 5x at 2x32 and >= 8x with multi-crop
  3. time to accuracy: kNN k=200 above lightly's 200-epoch figure within 480 s
  4. 2x224+6x96 loader: decode-once ffcv + GPU crops >= 3x the torchvision per-view loader
  5. Ray Train (1 GPU worker) >= 97% of the plain process; 4 trials at 0.25 GPU run concurrently
Exit status: 0, or 1 when a GPU result misses its target (so a GPU session sees it at a glance).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

THROUGHPUT_TARGET = 0.85
LIGHTLY_TARGET = {"single": 5.0, "multi": 8.0}
TTA_BUDGET_S = 480.0
LOADER_TARGET = 3.0
RAY_TARGET = 0.97
SWEEP_TRIALS = 4


def verdict(value: float | None, target: float, gpu: bool) -> str:
    if value is None:
        return "no figure"
    if not gpu:
        return "CPU smoke"
    return "met" if value >= target else "**missed**"


def throughput_section(name: str, data: dict, gpu: bool) -> tuple[list[str], list[tuple]]:
    facts = data["facts"]
    mode = "compiled" if facts.get("compiled") else "eager"
    lines = [f"### {name}: {facts.get('device')}, {facts.get('backbone')}, batch {facts.get('batch')}, "
             f"{facts.get('precision')}, {mode}, {facts.get('date')}", "",
             "| method | crops | ceiling img/s | ours img/s | ours / ceiling | target 1 | lightly img/s | ours / lightly "
             "| target 2 |", "|---|---|---|---|---|---|---|---|---|"]
    checks = []
    for row in data["rows"]:
        ratio = row["ratio"]
        v1 = verdict(ratio, THROUGHPUT_TARGET, gpu)
        checks.append((f"1: {row['method']} {row['crops']} {mode}", f"{ratio:.1%}", f">= {THROUGHPUT_TARGET:.0%}", v1))
        if "lightly_img_s" in row:
            target = LIGHTLY_TARGET["multi" if "+" in row["crops"] else "single"]
            v2 = verdict(row["ours_vs_lightly"], target, gpu)
            theirs = f"{row['lightly_img_s']:,.0f} | {row['ours_vs_lightly']:.1f}x | {v2}"
            checks.append((f"2: {row['method']} {row['crops']} vs lightly", f"{row['ours_vs_lightly']:.1f}x",
                           f">= {target:.0f}x", v2))
        else:
            theirs = "- | - | -"
        inputs = row.get("ceiling_inputs", row["crops"])
        crops = row["crops"] if inputs == row["crops"] else f"{row['crops']} (ceiling on {inputs})"
        lines.append(f"| {row['method']} | {crops} | {row['ceiling_img_s']:,.0f} | {row['ours_img_s']:,.0f} "
                     f"| {ratio:.1%} | {v1} | {theirs} |")
    return lines, checks


def loader_section(name: str, data: dict, gpu: bool) -> tuple[list[str], list[tuple]]:
    meta = data["meta"]
    rates: dict[str, dict[str, float]] = {}
    for row in data["rows"]:
        rates.setdefault(row["case"], {})[row["path"]] = row["img_per_s"]
    lines = [f"### {name}: {meta.get('device')}, {meta.get('workers')} workers, {meta.get('date')}", "",
             "| case | decode only | + crops | ffcv (ours) | torch canvases (ours) | classic torchvision "
             "| backbone ceiling | ffcv / classic | ffcv / ceiling |",
             "|---|---|---|---|---|---|---|---|---|"]
    checks = []
    for case, paths in rates.items():
        ratio = paths["ffcv"] / paths["classic"] if paths.get("ffcv") and paths.get("classic") else None
        headroom = paths["ffcv"] / paths["ceiling"] if paths.get("ffcv") and paths.get("ceiling") else None
        cells = " | ".join(f"{paths[p]:,.0f}" if p in paths else "-"
                           for p in ("decode", "crop", "ffcv", "torch", "classic", "ceiling"))
        lines.append(f"| {case} | {cells} | {f'{ratio:.1f}x' if ratio else '-'} "
                     f"| {f'{headroom:.1f}x' if headroom else '-'} |")
        if "224" in case:
            checks.append((f"4: loader {case}", f"{ratio:.1f}x" if ratio else "-", f">= {LOADER_TARGET:.0f}x",
                           verdict(ratio, LOADER_TARGET, gpu)))
    return lines, checks


def tta_section(name: str, data: dict, gpu: bool) -> tuple[list[str], list[tuple]]:
    facts = data["facts"]
    reached = facts.get("reached_at_s")
    lines = [f"### {name}: {facts.get('method')} on {facts.get('device')}, target {facts.get('target'):.1%}, "
             f"budget {facts.get('budget_s'):.0f} s, {facts.get('date')}", "",
             "| epoch | seconds | kNN top-1 (k=200) |", "|---|---|---|"]
    for point in data["curve"]:
        lines.append(f"| {point['epoch']} | {point['seconds']:.0f} | {point['knn_top1_k200']:.2%} |")
    lines += ["", f"Reached: {f'{reached:.0f} s' if reached is not None else 'not within the budget'}; "
                  f"best {facts.get('best', 0):.2%}."]
    if reached is None:
        v = "**missed**" if gpu else "CPU smoke"
    else:
        v = verdict(TTA_BUDGET_S / max(reached, 1e-9), 1.0, gpu)
    checks = [(f"3: {facts.get('method')} time to {facts.get('target'):.1%}",
               f"{reached:.0f} s" if reached is not None else "not reached", f"<= {TTA_BUDGET_S:.0f} s", v)]
    return lines, checks


def ray_section(name: str, data: dict, gpu: bool) -> tuple[list[str], list[tuple]]:
    facts, result = data["facts"], data["result"]
    ratio = result["ray_over_plain"]
    lines = [f"### {name}: {facts.get('device')}, {facts.get('method')} {facts.get('crops')}, batch "
             f"{facts.get('batch')}, {facts.get('date')}", "",
             "| plain img/s | Ray Train img/s | Ray / plain | plain wall s | Ray wall s |", "|---|---|---|---|---|",
             f"| {result['plain_img_s']:,.0f} | {result['ray_img_s']:,.0f} | {ratio:.1%} | {result['plain_wall_s']:.1f} "
             f"| {result['ray_wall_s']:.1f} |"]
    return lines, [("5: Ray Train overhead", f"{ratio:.1%}", f">= {RAY_TARGET:.0%}", verdict(ratio, RAY_TARGET, gpu))]


def sweep_section(name: str, data: dict, gpu: bool) -> tuple[list[str], list[tuple]]:
    resources = data.get("resources_per_trial", {})
    lines = [f"### {name}: {data['trials']} trials, {resources} each, {data.get('date')}", "",
             f"Most trials running at once: {data['max_concurrent']} of {data['trials']}; sweep wall "
             f"{data['wall_s']:.0f} s; trials {', '.join(f'{s:.0f}' for s in data.get('trial_seconds', []))} s."]
    return lines, [("5: sweep trials at once", str(data["max_concurrent"]), f"= {SWEEP_TRIALS}",
                    verdict(data["max_concurrent"], SWEEP_TRIALS, gpu))]


def profile_section(name: str, data: dict, gpu: bool) -> tuple[list[str], list[tuple]]:
    facts = data["facts"]
    lines = [f"### {name}: {facts.get('method')} {facts.get('crops')} on {facts.get('device')}, batch "
             f"{facts.get('batch')}, {facts.get('date')}", "",
             f"Host syncs per step: {data.get('host_syncs_per_step')}; profiled {data.get('img_per_s_profiled', 0):,.0f} "
             "img/s.", "", "| share of | value |", "|---|---|"]
    for key, value in {**data.get("wall_share", {}), **data.get("time_by_family", {})}.items():
        lines.append(f"| {key} | {value:.1%} |")
    return lines, []


def kernels_section(name: str, data: dict, gpu: bool) -> tuple[list[str], list[tuple]]:
    facts = data["facts"]
    lines = [f"### {name}: kernels per call, {facts.get('backbone')}, {facts.get('date')} (the same on any device)", "",
             "| method | crops | ceiling step | our step | added by the method | augmentation | host syncs |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['method']} | {r['crops']} | {r['ceiling']} | {r['step']} | {r['added_by_method']} "
                     f"| {r['augment']} | {r['syncs']} |")
    return lines, []


SECTIONS = [("throughput-", throughput_section), ("loader-", loader_section), ("tta-", tta_section),
            ("ray-overhead-", ray_section), ("sweep-concurrency-", sweep_section), ("profile-", profile_section),
            ("kernels", kernels_section)]


def device_of(name: str) -> str:
    """The device a result file was measured on: every benchmark names its files ...-<cpu|cuda>[-...].json."""
    return "cuda" if "-cuda" in name.rsplit(".", 1)[0] else "cpu"


def build_report(results: Path, device: str | None = None) -> tuple[str, list[tuple]]:
    lines, checks = ["# Benchmark report", ""], []
    files = sorted(results.glob("*.json"))
    for prefix, section in SECTIONS:
        for path in files:
            if not path.name.startswith(prefix):
                continue
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}: not valid JSON ({error}); rerun the benchmark that wrote it")
            if device and device_of(path.name) != device:
                continue
            body, found = section(path.name, data, device_of(path.name) == "cuda")
            lines += body + [""]
            checks += [(f"{target} ({path.stem})", *rest) for target, *rest in found]
    lines += ["## Performance targets", "", "| target | measured | needs | verdict |", "|---|---|---|---|"]
    lines += [f"| {name} | {measured} | {needs} | {v} |" for name, measured, needs, v in checks]
    return "\n".join(lines) + "\n", checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder of result JSON files")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="only results from this device")
    parser.add_argument("--out", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"no results folder at {results}: run a benchmark first (e.g. python bench/throughput.py)",
              file=sys.stderr)
        return 2
    text, checks = build_report(results, args.device)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if any(v == "**missed**" for *_, v in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
