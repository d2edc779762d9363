"""``sslab pipeline run`` and ``sslab eval knn|linear|semi|transfer`` (registered by sslab/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainers.errors import UserError
from trainers.paths import project_root


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pipeline run
def print_results(outcome) -> None:
    from pipelines.report import accuracy_rows

    rows = [(stage, label, f"{100 * value:.2f}%") for stage, _, label, value in accuracy_rows(outcome.stages)]
    width = [max([len(r[i]) for r in rows] + [len(h)]) for i, h in enumerate(("stage", "metric", "value"))]
    print(f"\n{'stage':<{width[0]}}  {'metric':<{width[1]}}  {'value':>{width[2]}}")
    for stage, label, value in rows:
        print(f"{stage:<{width[0]}}  {label:<{width[1]}}  {value:>{width[2]}}")
    cached = sum(s.cached for s in outcome.stages)
    print(f"\n{len(outcome.stages)} stages ({cached} cached); MLflow parent run {outcome.parent_run_id}")
    report = Path(outcome.out_dir) / "report" / "report.html"
    if report.is_file():
        print(f"report: {report}")
    print(f"open the MLflow UI: sslab ui   (tracking URI {outcome.tracking_uri})")


def cmd_pipeline_run(args) -> int:
    from pipelines.runner import run_pipeline
    from pipelines.spec import load_pipeline

    from pipelines.expect import REGRESSION_EXIT

    spec = load_pipeline(args.config, args.set)
    outcome = run_pipeline(spec, tracking_uri=args.tracking_uri, out_dir=args.out, resume=args.resume,
                           address=args.address, log=_err, force=args.force)
    if args.json:
        print(json.dumps({k: v for k, v in outcome.as_json().items()
                          if k in ("parent_run_id", "tracking_uri", "stages", "verdict")}), flush=True)
    else:
        print_results(outcome)
    if outcome.verdict == "regression":
        out = [c.describe() for c in outcome.checks if c.status != "in"]
        _err(f"error: {len(out)} metric(s) outside their expected band: {'; '.join(out)}: find the change that "
             f"moved them, or record the new band in the pipeline's expect: if it is intended")
        return REGRESSION_EXIT
    return 0


def demo_config() -> Path:
    root = project_root()
    path = root / "configs" / "pipelines" / "demo.yaml" if root else None
    if path is None or not path.is_file():
        raise UserError("configs/pipelines/demo.yaml not found: run the demo from a checkout of the project "
                        "(`make demo`), or pass --config to `sslab pipeline run`")
    return path


def cmd_demo(args) -> int:
    args.config = str(demo_config())
    return cmd_pipeline_run(args)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline key, e.g. stages.linear.epochs=10 (repeatable)")
    p.add_argument("--resume", default=None, metavar="RUN_ID",
                   help="continue this pipeline parent run (default: the last run of the same pipeline and "
                        "settings, else a new one)")
    p.add_argument("--out", default=None, help="output folder (default <state dir>/pipelines/<name>)")
    p.add_argument("--address", default=None, help="Ray address (default: the pipeline's ray.address, else local)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                                                        "sqlite:///<state dir>/mlflow/mlflow.db)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of the table "
                   "(with the verdict of the expected bands)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="run this stage (and every later stage that reads it) despite the cache, e.g. to certify "
                        "it again; repeat for several, or 'all' (default: none)")


def add_pipeline_commands(subparsers, formatter) -> None:
    pipeline = subparsers.add_parser("pipeline", help="pretrain -> kNN -> linear -> semi -> transfer -> report",
                                     formatter_class=formatter)
    sub = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="{run}")
    run = sub.add_parser("run", help="run (or resume) a pipeline; finished stages are cached",
                         formatter_class=formatter)
    run.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/pipelines/demo.yaml")
    _add_run_arguments(run)
    run.set_defaults(func=cmd_pipeline_run)

    demo = subparsers.add_parser("demo", help="the embedded default: configs/pipelines/demo.yaml (what `make demo` runs)",
                                 formatter_class=formatter)
    _add_run_arguments(demo)
    demo.set_defaults(func=cmd_demo)


# --------------------------------------------------------------------------- eval
def load_backbone_ref(ref: str, tracking_uri: str | None) -> Path:
    """A backbone file from a path (file or run folder) or an MLflow run id."""
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "backbone.pt").is_file():
        return path / "backbone.pt"
    if path.is_file():
        return path
    if "/" in ref or ref.endswith(".pt"):
        raise UserError(f"--backbone {ref}: no such file; pass a backbone.pt, a run folder holding one, or an "
                        f"MLflow run id")
    from mlflow.artifacts import download_artifacts

    from orchestrator import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    problem = tracking.check_reachable(uri)
    if problem:
        raise UserError(f"--backbone {ref} looks like an MLflow run id but {problem}")
    try:
        return Path(download_artifacts(run_id=ref, artifact_path="backbone/backbone.pt", tracking_uri=uri))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--backbone {ref}: not a file, and MLflow at {uri} has no run with backbone/backbone.pt "
                        f"({str(exc).splitlines()[0][:100]})") from None


def _eval_fractions(text: str) -> list[float]:
    """``--fractions 0.01,0.1``: label fractions in (0, 1], comma-separated."""
    from trainers.errors import ConfigError

    fix = "give label fractions in (0, 1] separated by commas, e.g. --fractions 0.01,0.1"
    fractions = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--fractions {text!r}: {item.strip()!r} is not a number: {fix}") from None
        if not 0 < value <= 1:  # also refuses nan and inf
            raise ConfigError(f"--fractions {text!r}: {item.strip()} is not in (0, 1]: {fix}")
        fractions.append(value)
    return fractions


def _check_out_folder(out: str) -> Path:
    """``--out``: a folder (created at the end); a file in its place is refused now, not after the work."""
    from trainers.errors import ConfigError

    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: pass a folder (it is created if missing) or move "
                          f"the file away")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, so the folder cannot be created there: pass another "
                          f"--out")
    return path


def _check_device(name: str, check_device_name) -> None:
    from trainers.errors import ConfigError

    check_device_name(name)
    if name.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            seen = f"{count} GPU(s), numbered 0..{count - 1}" if count else "no GPU"
            raise ConfigError(f"--device {name}: this machine has {seen}: use --device cpu"
                              + (" or one of those" if count else ""))


def eval_settings(args) -> dict:
    """The evaluation's settings from the command line, every value checked and the protocol spelled out
    (pipelines.stages.resolve_settings), before anything has run."""
    from pipelines.spec import DEFAULTS, SEED_LIMIT, check_number, dataset_entry, example_value
    from pipelines.stages import resolve_settings
    from trainers.errors import ConfigError
    from trainers.evaluate import LINEAR_PROTOCOLS, SEMI_PROTOCOLS, check_protocol
    from trainers.loop import check_device_name

    if args.device is not None:
        _check_device(args.device, check_device_name)
    check_number(args.seed, "--seed", integer=True, minimum=0, below=SEED_LIMIT, example="--seed 0")
    settings = dict(DEFAULTS.get(args.kind, {}))
    for key, bounds in (("epochs", {"integer": True, "minimum": 1}), ("batch_size", {"integer": True, "minimum": 1}),
                        ("min_steps", {"integer": True, "minimum": 0}), ("lr", {"above": 0}),
                        ("head_lr", {"above": 0}), ("weight_decay", {"minimum": 0})):
        value = getattr(args, key, None)
        if value is not None:
            flag = "--" + key.replace("_", "-")
            settings[key] = check_number(value, flag, **bounds, example=f"{flag} {example_value(args.kind, key)}")
    if getattr(args, "protocol", None) is not None:
        options = LINEAR_PROTOCOLS if args.kind == "linear" else SEMI_PROTOCOLS
        settings["protocol"] = check_protocol(args.protocol, options, "--protocol")
    if args.kind == "semi" and args.fractions:
        settings["fractions"] = _eval_fractions(args.fractions)
    if args.kind == "transfer":
        settings["datasets"] = [dataset_entry(name, "eval") for name in args.dataset.split(",")]
    else:
        dataset_entry(args.dataset, "eval")
        settings["dataset"] = args.dataset
    if args.out:
        out = _check_out_folder(args.out)
        if (out / f"{args.kind}.json").is_dir():
            raise ConfigError(f"--out {args.out}: {out / (args.kind + '.json')} is a folder, where the result file "
                              f"goes: pass another --out or move it away")
    return resolve_settings(args.kind, settings)


def cmd_eval(args) -> int:
    from pipelines.stages import run_evaluation

    settings = eval_settings(args)  # before the backbone is fetched or any image decoded
    backbone = load_backbone_ref(args.backbone, args.tracking_uri)
    result = run_evaluation(args.kind, settings, str(backbone), args.data_root, device=args.device, seed=args.seed,
                            log=_err)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in result.get("files", {}).items():
            (out / name).write_text(text)
        (out / f"{args.kind}.json").write_text(json.dumps({"metrics": result["metrics"], "extra": result["extra"]},
                                                          indent=1))
    if args.json:
        print(json.dumps(result["metrics"]))
    else:
        from pipelines.report import metric_label

        width = max(len(metric_label(k)) for k in result["metrics"])
        for key, value in result["metrics"].items():
            print(f"{metric_label(key):<{width}}  {100 * value:6.2f}%")
    return 0


def add_eval_commands(subparsers, formatter, add_data_root) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate a backbone: knn, linear, semi, transfer",
                                     formatter_class=formatter)
    sub = evaluate.add_subparsers(dest="kind", required=True, metavar="{knn,linear,semi,transfer}")
    helps = {"knn": "weighted kNN on frozen features (k=20/T=0.07, k=200/T=0.1)",
             "linear": "linear probe: frozen_features (fast, cached features) or augmented (crops each epoch)",
             "semi": "fine-tune on 1%% and 10%% of the labels (stratified), SwAV's protocol; top-1 on the test split",
             "transfer": "frozen-features linear probe on other data sets (--dataset a,b,c)"}
    for kind, text in helps.items():
        p = sub.add_parser(kind, help=text, formatter_class=formatter)
        p.add_argument("--backbone", required=True, help="backbone.pt, a run folder holding one, or an MLflow run id")
        p.add_argument("--dataset", required=True, help="data set name" + (" (comma-separated)" if kind == "transfer" else ""))
        p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
        p.add_argument("--seed", type=int, default=0, help="seed (subsets, initialisation, order)")
        p.add_argument("--tracking-uri", default=None, help="MLflow store to fetch a backbone by run id from")
        p.add_argument("--out", default=None, help="also write the result (and semi subsets) to this folder")
        p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
        add_data_root(p)
        if kind == "linear":
            p.add_argument("--protocol", default=None, help="frozen_features (None: this one) or augmented: "
                                                            "random-resized-crop + flip of the images each epoch")
        if kind == "semi":
            p.add_argument("--protocol", default=None, help="swav (None: this one, SwAV's eval_semisup.py)")
        if kind in ("linear", "transfer", "semi"):
            p.add_argument("--epochs", type=int, default=None, help="epochs (None: the protocol's)")
            p.add_argument("--lr", type=float, default=None,
                           help="learning rate" + (" of the trunk (None: SwAV's for the fraction)" if kind == "semi"
                                                   else " at batch 256 (None: the protocol's)"))
            p.add_argument("--batch-size", type=int, default=None, help="batch size (None: the protocol's)")
            p.add_argument("--weight-decay", type=float, default=None, help="weight decay (None: the protocol's)")
        if kind == "semi":
            p.add_argument("--head-lr", type=float, default=None,
                           help="learning rate of the new linear head (None: SwAV's for the fraction)")
            p.add_argument("--fractions", default="0.01,0.1", help="label fractions, comma-separated")
            p.add_argument("--min-steps", type=int, default=None,
                           help="at least this many steps per fraction (small subsets; None: 200)")
        p.set_defaults(func=cmd_eval)
