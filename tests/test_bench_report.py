"""bench/report.py: result files in, a report with the performance targets' verdicts out (GPU misses make it exit 1)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def throughput(ratio, ours_vs_lightly, crops="2x32+4x16"):
    row = {"method": "swav", "crops": crops, "ceiling_img_s": 20000.0, "ours_img_s": 20000.0 * ratio,
           "ratio": ratio, "lightly_img_s": 20000.0 * ratio / ours_vs_lightly, "ours_vs_lightly": ours_vs_lightly}
    return {"facts": {"device": "NVIDIA H100", "backbone": "resnet18", "batch": 512, "precision": "bf16",
                      "compiled": False, "date": "2026-11-23"}, "rows": [row]}


def write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data))


def verdicts(checks):
    return {name.split(" (")[0]: (measured, verdict) for name, measured, _needs, verdict in checks}


def test_gpu_results_are_judged_against_the_targets(tmp_path):
    report = load_report()
    write(tmp_path, "throughput-cuda.json", throughput(ratio=0.9, ours_vs_lightly=7.5))
    write(tmp_path, "ray-overhead-cuda.json", {"facts": {"device": "NVIDIA H100"}, "result": {
        "plain_img_s": 10000.0, "ray_img_s": 9800.0, "plain_wall_s": 60.0, "ray_wall_s": 80.0, "ray_over_plain": 0.98}})
    write(tmp_path, "tta-dino-cuda.json", {"facts": {"method": "dino", "device": "NVIDIA H100", "target": 0.813,
                                                     "budget_s": 480.0, "reached_at_s": 510.0, "best": 0.82},
                                           "curve": [{"epoch": 10, "seconds": 510.0, "knn_top1_k200": 0.82}]})
    write(tmp_path, "sweep-concurrency-cuda.json", {"trials": 4, "max_concurrent": 4, "wall_s": 100.0,
                                                    "trial_seconds": [90.0] * 4, "resources_per_trial": {"gpu": 0.25}})
    text, checks = report.build_report(tmp_path)
    found = verdicts(checks)
    assert found["1: swav 2x32+4x16 eager"] == ("90.0%", "met")
    # 7.5x is below the multi-crop target of 8x (it would meet the 2x32 target of 5x)
    assert found["2: swav 2x32+4x16 vs lightly"] == ("7.5x", "**missed**")
    assert found["3: dino time to 81.3%"] == ("510 s", "**missed**")
    assert found["5: Ray Train overhead"] == ("98.0%", "met")
    assert found["5: sweep trials at once"] == ("4", "met")
    assert "| 10 | 510 | 82.00% |" in text  # the accuracy curve is in the report
    assert report.main(["--results", str(tmp_path)]) == 1  # a GPU miss is an exit status


def test_single_crop_lightly_target_is_five_times_and_cpu_results_are_only_smoke(tmp_path):
    report = load_report()
    write(tmp_path, "throughput-cuda.json", throughput(ratio=0.86, ours_vs_lightly=5.2, crops="2x32"))
    write(tmp_path, "throughput-cpu.json", throughput(ratio=0.5, ours_vs_lightly=1.1, crops="2x32"))
    _, checks = report.build_report(tmp_path)
    by_file = {name: verdict for name, _m, _n, verdict in checks}
    assert by_file["2: swav 2x32 vs lightly (throughput-cuda)"] == "met"
    assert by_file["1: swav 2x32 eager (throughput-cpu)"] == "CPU smoke"
    assert report.main(["--results", str(tmp_path)]) == 0
    _, only_gpu = report.build_report(tmp_path, device="cuda")
    assert all("throughput-cuda" in name for name, *_ in only_gpu)


def test_a_missing_results_folder_is_one_line_and_exit_2(tmp_path, capsys):
    report = load_report()
    assert report.main(["--results", str(tmp_path / "nowhere")]) == 2
    assert "run a benchmark first" in capsys.readouterr().err


def test_loader_rows_show_decode_crops_and_headroom_over_the_backbone(tmp_path):
    report = load_report()
    rows = [{"case": "tin256-2x224+6x96", "path": path, "img_per_s": rate} for path, rate in
            [("decode", 20000.0), ("crop", 12000.0), ("ffcv", 7200.0), ("torch", 2400.0), ("classic", 160.0),
             ("ceiling", 1260.0)]]
    write(tmp_path, "loader-cuda.json", {"meta": {"device": "NVIDIA H100", "workers": 16, "date": "2026-11-23"},
                                         "rows": rows})
    text, checks = report.build_report(tmp_path)
    assert "| tin256-2x224+6x96 | 20,000 | 12,000 | 7,200 | 2,400 | 160 | 1,260 | 45.0x | 5.7x |" in text
    assert verdicts(checks)["4: loader tin256-2x224+6x96"] == ("45.0x", "met")


def test_sdmp_ceiling_counts_its_mixed_image_and_the_report_says_so(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from throughput import ceiling_inputs
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert ceiling_inputs("sdmp", "2x32") == "3x32"  # two views + the mixed image, all global size
    assert ceiling_inputs("dino", "2x32+6x16") == "2x32+6x16"
    report = load_report()
    data = throughput(ratio=0.86, ours_vs_lightly=6.0, crops="2x32")
    data["rows"][0].update(method="sdmp", ceiling_inputs="3x32")
    write(tmp_path, "throughput-cuda.json", data)
    text, _ = report.build_report(tmp_path)
    assert "| sdmp | 2x32 (ceiling on 3x32) |" in text
