"""The orchestrator's commands of the ``sslab`` command line: data, pretrain, sweep, submit, ui.

sslab/cli.py, above this layer and pipelines/, assembles them with the pipeline and eval commands.
Every subcommand's ``--help`` lists all options with their defaults. Heavy modules (torch, ffcv, Ray,
MLflow) are imported inside the commands, so ``--help`` is quick. Errors a user can fix print one line (``error: ...``) and exit non-zero; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys

from trainers.errors import UserError
from trainers.paths import DATA_ROOT_ENV, default_data_root, state_dir


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Renamed(argparse.Action):
    """An option's old spelling, hidden from --help: using it stops the command with one line naming the new one
    (sslab/cli.py main), instead of argparse's 'unrecognized arguments'."""

    def __init__(self, option_strings, dest, new: str = "", meaning: str = "", **kwargs):
        super().__init__(option_strings, dest="renamed_option", nargs="?", default=None, help=argparse.SUPPRESS)
        self.new, self.meaning = new, meaning

    def __call__(self, parser, namespace, values, option_string=None):
        why = "; --workers means Ray Train workers everywhere" if option_string == "--workers" else ""
        namespace.renamed_option = (f"{option_string} is now {self.new} ({self.meaning}{why}): pass {self.new}"
                                    + (f" {values}" if values else ""))


def renamed(parser: argparse.ArgumentParser, old: str, new: str, meaning: str) -> None:
    parser.add_argument(old, action=_Renamed, new=new, meaning=meaning)


def add_data_root(parser: argparse.ArgumentParser) -> None:
    root = default_data_root()
    parser.add_argument("--data-root", default=str(root) if root else None,
                        help=f"folder with the data archives (env {DATA_ROOT_ENV}; "
                             "default ../shared/data when it exists)")


def _add_prepare_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("auto", "raw", "jpeg"), default="auto",
                        help="pixel storage: auto = raw when the largest side <= --raw-max-side, else JPEG")
    parser.add_argument("--raw-max-side", type=int, default=64, help="largest side stored raw under --format auto")
    parser.add_argument("--max-side", type=int, default=512, help="larger images are scaled down to this side")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (1-100) when storing JPEG")
    parser.add_argument("--resize", type=int, default=None,
                        help="square-resize every image to this side first (e.g. 256 for ImageNet-like crops)")


def _prepare_settings(args):
    from trainers.data.beton import PrepareSettings

    return PrepareSettings(format=args.format, raw_max_side=args.raw_max_side, max_side=args.max_side,
                           jpeg_quality=args.jpeg_quality, resize=args.resize).validate()


def _print_json(facts: dict) -> None:
    """JSON with short lists (shapes, label samples) kept on one line."""
    text = json.dumps(facts, indent=1)
    print(re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text))


def _default_cache_dir() -> str:
    return str(state_dir() / "data")


# --------------------------------------------------------------------------- data
def cmd_data_list(args) -> int:
    from trainers.data.datasets import REGISTRY, load_split

    rows = []
    for name in REGISTRY:
        status = []
        for split in ("train", "test"):
            try:
                data = load_split(name, split, args.data_root)
                status.append(f"{split} {len(data):,}")
                source = data.source
            except UserError as exc:
                status.append(f"{split} missing")
                source = str(exc)[:90]
        rows.append((name, ", ".join(status), source))
    width = max(len(r[0]) for r in rows)
    for name, status, source in rows:
        print(f"{name:<{width}}  {status:<28}  {source}")
    print(f"{'imagefolder:<path>':<{width}}  <path>/train/<class>/*, <path>/test/<class>/* (or one class tree)")
    return 0


def cmd_data_prepare(args) -> int:
    from trainers.data.beton import prepare

    paths = prepare(args.dataset, args.split, args.out, args.data_root, _prepare_settings(args),
                    num_workers=args.writers, force=args.force, progress=not args.quiet)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def cmd_data_stage(args) -> int:
    from orchestrator.staging import stage_data
    from trainers.config import load_config
    from trainers.data.datasets import check_dataset_name
    from trainers.data.multicrop import ffcv_available

    check_dataset_name(args.dataset)
    if not args.storage.strip():
        raise UserError("--storage is empty: name the run storage the cluster's runs use (a shared folder, "
                        "s3://bucket/runs, gs://bucket/runs)")
    if not ffcv_available():
        raise UserError("data stage writes .beton files, which needs ffcv: install it (make setup) or run on a "
                        "machine that has it")
    settings = [f"data.dataset={args.dataset}", f"data.cache_dir={args.cache_dir}", "data.loader=ffcv"]
    if args.data_root:
        settings.append(f"data.data_root={args.data_root}")
    config = load_config(None, settings)
    from orchestrator.train import resolve_storage

    storage = resolve_storage(args.storage)  # as a run resolves its --storage (a relative folder: absolute)
    uri = stage_data(config, storage, log=lambda msg: print(msg, file=sys.stderr), require_source=True,
                     progress=not args.quiet)
    print(f"staged {args.dataset} (train, test) in {uri}: runs with --storage {storage} read them on nodes "
          f"that have no data")
    return 0


def cmd_data_preview(args) -> int:
    from trainers.data.augment import method_crop_groups
    from trainers.data.beton import check_num_workers
    from trainers.data.datasets import check_dataset_name
    from trainers.data.multicrop import build_multicrop_loader
    from trainers.data.preview import check_num_images, check_output, preview

    # every option before any work (reading the data, writing a .beton, drawing the grid)
    check_num_images(args.num_images)
    _check_seed(args.seed)
    check_num_workers(args.loader_workers, what="--loader-workers", default="unset: one per core")
    check_output(args.out)
    check_dataset_name(args.dataset)
    method_crop_groups(args.method, args.crops)
    check_crop_order(args.crops)
    settings = _prepare_settings(args)
    device = _check_device(args.device)
    loader = build_multicrop_loader(
        args.dataset, args.split, args.crops, args.method, batch_size=max(args.num_images, 8), device=device,
        loader=args.loader, seed=args.seed, data_root=args.data_root, cache_dir=args.cache_dir,
        canvas_size=args.canvas_size, num_workers=args.loader_workers, shuffle=True, drop_last=False,
        prepare_settings=settings, log=lambda msg: print(msg, file=sys.stderr))
    check_num_images(args.num_images, loader.num_samples, f"in {args.dataset} {args.split}")
    facts = preview(loader, args.out, num_images=args.num_images, classes=loader.classes)
    facts = {"dataset": args.dataset, "split": args.split, "method": args.method, "crops": args.crops, **facts}
    _print_json(facts)
    return 0


def _check_seed(seed) -> int:
    from trainers.errors import ConfigError
    from trainers.checks import SEED_LIMIT  # as train.seed

    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"--seed {seed} must be an integer in [0, {SEED_LIMIT})")
    return seed


def check_crop_order(spec: str) -> None:
    """As pretraining (trainers.loop.check_config): the first group is the global crops, and no local
    group may be larger."""
    from trainers.data.augment import parse_crop_spec
    from trainers.errors import ConfigError

    groups = parse_crop_spec(spec)
    global_size = groups[0][1]
    for count, size in groups[1:]:
        if count and size > global_size:
            ordered = "+".join(f"{c}x{s}" for c, s in sorted(groups, key=lambda g: -g[1]))
            raise ConfigError(f"--crops '{spec}': local crops of {size} px are larger than the global crops "
                              f"({global_size} px); list the global (largest) group first, e.g. --crops {ordered}")


def _check_device(name: str) -> str:
    """--device: a name the trainer knows (trainers.loop.check_device_name) and a GPU that is there;
    ``auto`` becomes cuda or cpu."""
    from trainers.errors import ConfigError
    from trainers.loop import check_device_name

    check_device_name(name)
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no GPU is visible to this process: use --device cpu")
        index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} GPU(s), numbered 0..{count - 1}")
    return name


def _add_data_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="data sets: list, prepare .beton files, stage them for a cluster, "
                                         "preview crops",
                                 formatter_class=HelpFormatter)
    commands = data.add_subparsers(dest="data_command", metavar="{list,prepare,stage,preview}", required=True)

    listing = commands.add_parser("list", help="known data sets and whether they are found",
                                  formatter_class=HelpFormatter)
    add_data_root(listing)
    listing.set_defaults(func=cmd_data_list)

    prep = commands.add_parser("prepare", help="write FFCV .beton files for a data set",
                               formatter_class=HelpFormatter,
                               description="Writes <out>/<dataset>-<split>.beton (+ a .json sidecar). "
                                           "Skips the work when an up-to-date file exists.")
    prep.add_argument("--dataset", required=True,
                      help="cifar10, tiny-imagenet, fashion-mnist, digits or imagefolder:<path>")
    prep.add_argument("--split", choices=("train", "test", "all"), default="all", help="which split(s) to write")
    prep.add_argument("--out", default=_default_cache_dir(), help="output folder")
    add_data_root(prep)
    _add_prepare_settings(prep)
    prep.add_argument("--writers", type=int, default=None,
                      help="writer processes (0..max(64, 4 per core)); None or 0 = min(8, cores)")
    renamed(prep, "--workers", "--writers", "writer processes")
    prep.add_argument("--force", action="store_true", help="rewrite even when an up-to-date file exists")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_data_prepare)

    stage = commands.add_parser(
        "stage", help="put a data set's .beton files into run storage, for cluster nodes without the data",
        formatter_class=HelpFormatter,
        description="Writes the .beton files here (from --data-root, skipped when up to date) and copies them to "
                    "<storage>/_data/ (a shared folder, s3://, gs://, file://; skipped when an identical copy is "
                    "there). A run with the same --storage then fetches them to each node's cache, also on nodes "
                    "and drivers that have no data archives. Example: sslab data stage --dataset cifar10 "
                    "--storage s3://my-bucket/sslab-runs")
    stage.add_argument("--dataset", required=True,
                       help="cifar10, tiny-imagenet, fashion-mnist, digits or imagefolder:<path>")
    stage.add_argument("--storage", required=True, help="the run storage the cluster's runs use (--storage there)")
    add_data_root(stage)
    stage.add_argument("--cache-dir", default=_default_cache_dir(), help="where the .beton files are written here")
    stage.add_argument("--quiet", action="store_true", help="no progress bar")
    stage.set_defaults(func=cmd_data_stage)

    prev = commands.add_parser("preview", help="PNG grid of images and their augmented views + tensor facts",
                               formatter_class=HelpFormatter)
    prev.add_argument("--dataset", required=True,
                      help="cifar10, tiny-imagenet, fashion-mnist, digits or imagefolder:<path>")
    prev.add_argument("--split", choices=("train", "test"), default="train", help="split to draw from")
    prev.add_argument("--crops", default="2x32+6x16", help="crop groups COUNTxSIZE joined by '+'; first = global")
    prev.add_argument("--method", choices=("swav", "dino", "sdmp", "supcon", "simclr"), default="swav",
                      help="whose augmentation defaults to use")
    prev.add_argument("--out", default="preview.png",
                      help="image to write; its extension names the format (.png, .jpg/.jpeg, .webp, .bmp, .tif)")
    prev.add_argument("--num-images", type=int, default=6, help="images (rows) to draw, 1..256")
    from trainers.config import LOADERS

    prev.add_argument("--loader", choices=LOADERS, default="auto",
                      help="canvas loader: ffcv (.beton, decoded once), jpeg (files decoded in batches by "
                           "torchvision, no ffcv) or torch (PIL DataLoader); auto = ffcv if installed, else jpeg")
    prev.add_argument("--device", default="cuda" if _cuda() else "cpu",
                      help="device for the augmentation: auto, cpu, cuda or cuda:N")
    prev.add_argument("--seed", type=int, default=0, help="seed for the order and the augmentation, 0..2**31-1")
    prev.add_argument("--canvas-size", type=int, default=None,
                      help="decode to this square canvas (needed for mixed-size images)")
    prev.add_argument("--cache-dir", default=_default_cache_dir(), help="where .beton files are kept")
    prev.add_argument("--loader-workers", type=int, default=None,
                      help="loader threads/processes, as data.num_workers (0..max(64, 4 per core)); None = one per core")
    renamed(prev, "--workers", "--loader-workers", "loader threads/processes")
    add_data_root(prev)
    _add_prepare_settings(prev)
    prev.set_defaults(func=cmd_data_preview)


def _cuda() -> bool:
    # cheap check without importing torch: a visible NVIDIA device node
    return os.path.exists("/dev/nvidia0") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""


# --------------------------------------------------------------------------- pretrain
def _load_pretrain_config(args):
    from trainers.config import load_config

    overrides = list(args.set or [])
    if args.name and getattr(args, "local", True):
        overrides.append(f"name={args.name}")
    if args.data_root:
        overrides.append(f"data.data_root={args.data_root}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    return load_config(args.config, overrides)


def cmd_pretrain(args) -> int:
    config = _load_pretrain_config(args)
    if args.print_config:
        import yaml

        from trainers.loop import check_config

        from trainers.errors import ConfigError

        if not args.local and args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        check_config(config, 1 if args.local else args.workers)  # the checks a real run applies, first
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    if not args.local:
        return _pretrain_on_ray(args, config)
    from trainers.loop import Trainer

    with _sigterm_exits("terminated (SIGTERM): rerun the same command to resume from the last checkpoint"):
        trainer = Trainer(config, out_dir=args.out_dir, progress=not args.quiet,
                          log=lambda msg: print(msg, file=sys.stderr))
        result = trainer.fit()
    _print_result_table(config, result)
    return 0


class _Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that cleanup (``finally``, atomic writes) runs."""


@contextlib.contextmanager
def _sigterm_exits(message: str, retry_s: float = 2.0):
    """SIGTERM inside the block ends the command like Ctrl-C does: the stack unwinds (checkpoints are
    written atomically, so the last one stays valid), then one line on stderr and exit 143 (128 +
    SIGTERM). Whatever fails while unwinding after a SIGTERM (loader workers that got the same signal)
    is part of the termination, not a second error.

    An exception raised from a signal handler can be swallowed where Python ignores exceptions (an
    at-fork hook when the loader forks its workers, a ``__del__``); so until the exception arrives
    here, a watcher thread raises it again every ``retry_s`` seconds. Forked children that inherited
    the handler die of the signal as before; the previous handlers come back afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner, main_thread = os.getpid(), threading.main_thread().ident
    received, arrived = threading.Event(), threading.Event()

    def again() -> None:  # a real signal to the main thread: it also ends a sleep or a blocking wait there
        if not arrived.is_set():
            signal.pthread_kill(main_thread, signal.SIGTERM)

    def watch() -> None:
        while not arrived.wait(retry_s):
            again()

    def on_sigterm(signum, frame):
        if os.getpid() != owner:  # a forked loader worker: the default action, without this process's message
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if arrived.is_set():
            return
        if not received.is_set():
            received.set()
            # torch's SIGCHLD handler would report the loader workers killed by the same signal as an error
            # (a Python no-op, not SIG_DFL: a SIGCHLD already pending must find a Python handler)
            signal.signal(signal.SIGCHLD, lambda *_: None)
            threading.Thread(target=watch, name="sslab-sigterm", daemon=True).start()
        raise _Terminated(128 + signal.SIGTERM)

    def unraisable(info) -> None:
        if isinstance(info.exc_value, _Terminated):  # swallowed (at-fork hook, __del__): raise it again now
            timer = threading.Timer(0.05, again)  # from another thread: a handler run here would be swallowed too
            timer.daemon = True
            timer.start()
            return
        previous_hook(info)

    previous, previous_hook = signal.signal(signal.SIGTERM, on_sigterm), sys.unraisablehook
    sys.unraisablehook = unraisable
    try:
        yield
    except BaseException:
        arrived.set()
        if not received.is_set():
            raise
        print(message, file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        arrived.set()
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


def _cluster_options(args):
    from orchestrator.train import ClusterOptions

    return ClusterOptions(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                          cpus_per_worker=args.cpus_per_worker, address=args.address, storage=args.storage,
                          max_failures=args.max_failures, num_to_keep=args.num_to_keep,
                          tracking_uri=args.tracking_uri, experiment=args.experiment, stage_data=args.stage_data,
                          resource_timeout_s=args.resource_timeout, require_tracking=args.require_tracking,
                          system_metrics_s=getattr(args, "system_metrics", None))


def _pretrain_on_ray(args, config) -> int:
    from orchestrator.train import run_pretraining

    if args.out_dir:
        raise UserError("--out is for --local runs; Ray runs live in --storage/<name>")
    outcome = run_pretraining(config, _cluster_options(args), name=args.name,
                              log=lambda msg: print(msg, file=sys.stderr))
    m = outcome.metrics
    rows = [("run", outcome.name), ("method", config.method_name), ("backbone", config.model.backbone),
            ("data set", config.data.dataset), ("workers", str(args.workers)),
            ("steps", f"{outcome.steps:,} ({m.get('epochs_completed', 0)} epochs)"), *_metric_rows(m),
            ("checkpoint", str(outcome.checkpoint)), ("MLflow run", str(outcome.run_id)),
            ("tracking URI", outcome.tracking_uri)]
    _print_rows(rows)
    return 0


def _metric_rows(m: dict) -> list[tuple[str, str]]:
    """Final loss, kNN top-1 per k, the online linear probe's top-1 and throughput, for the result tables."""
    rows = []
    if "loss" in m:
        rows.append(("final loss", f"{m['loss']:.4f}"))
    from trainers.knn import knn_label

    for key in sorted(k for k in m if k.startswith("knn_top1")):
        rows.append((knn_label(key) or key, f"{m[key]:.2%}"))
    if "online_linear_top1" in m:
        rows.append(("online linear top-1", f"{m['online_linear_top1']:.2%}"))
    if "img_per_s" in m:
        rows.append(("throughput", f"{m['img_per_s']:,.0f} img/s"))
    return rows


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray and MLflow (without --local)")
    g.add_argument("--workers", type=int, default=1, help="Ray Train workers (one process each; DDP when > 1)")
    g.add_argument("--gpus-per-worker", type=float, default=1.0 if _cuda() else 0.0, help="GPUs per worker")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    g.add_argument("--address", default=None,
                   help="Ray cluster: auto, ray://head:10001, or local / unset for an embedded Ray on this machine")
    g.add_argument("--storage", default=None, help="run storage (shared folder or s3://...); default "
                                                   "<state dir>/ray_results")
    g.add_argument("--stage-data", action=argparse.BooleanOptionalAction, default=None,
                   help="copy the .beton files through --storage/_data to each node's local disk, for nodes without "
                        "a shared file system (default: on with --address, off for an embedded Ray)")
    g.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up (-1: no limit)")
    g.add_argument("--num-to-keep", type=int, default=2, help="checkpoints kept in storage (best by kNN top-1)")
    g.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                                                        "sqlite:///<state dir>/mlflow/mlflow.db)")
    g.add_argument("--experiment", default="sslab", help="MLflow experiment")
    g.add_argument("--system-metrics", type=float, default=None, nargs="?", const=10.0, metavar="SECONDS",
                   help="sample CPU/memory/GPU utilisation (MLflow's system metrics) on rank 0's node into the run "
                        "every SECONDS (10 when given without a value); default off")
    g.add_argument("--require-tracking", action="store_true",
                   help="refuse to start when the MLflow server does not answer (default: train anyway, keep the "
                        "metrics in metrics.jsonl and log them when the server answers)")
    g.add_argument("--resource-timeout", type=float, default=None, metavar="SECONDS",
                   help="wait this long for the cluster to offer the requested CPUs/GPUs before failing (an "
                        "autoscaler adding nodes); default 0 for the embedded Ray, 600 with --address")


def _print_result_table(config, result) -> None:
    m = result.metrics
    rows = [("method", config.method_name), ("backbone", config.model.backbone), ("data set", config.data.dataset),
            ("steps", f"{result.steps:,} ({result.epochs_completed} epochs)"), *_metric_rows(m),
            ("wall time", f"{m.get('wall_s', 0):.0f} s"), ("run folder", str(result.out_dir)),
            ("checkpoint", str(result.checkpoint)), ("backbone", str(result.backbone))]
    _print_rows(rows)


def _add_pretrain(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="self-supervised pretraining from a YAML config", formatter_class=HelpFormatter,
        description="Pretrain a backbone with SwAV, DINO, SDMP, SupCon or SimCLR. Configs: configs/pretrain/*.yaml; "
                    "every key can be overridden with --set section.key=value (repeatable), e.g. "
                    "--set optim.lr=0.5 --set train.epochs=10. A rerun with the same name resumes from the "
                    "last checkpoint.")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults = SwAV on CIFAR-10)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--local", action="store_true", help="train in this process (no Ray, no MLflow)")
    p.add_argument("--name", default=None, help="run name; --local: default the config's name, run folder "
                                                "<state dir>/runs/<name>; Ray: default <config name>-<time>, "
                                                "rerunning a name resumes it")
    p.add_argument("--out", dest="out_dir", default=None, help="run folder of a --local run (overrides the name-based "
                   "default)")
    renamed(p, "--out-dir", "--out", "the run folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the config's train.device)")
    p.add_argument("--data-root", default=None, help="folder with the data archives (default: the config's, "
                                                     f"else ${DATA_ROOT_ENV} or ../shared/data)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_cluster_arguments(p)
    p.set_defaults(func=cmd_pretrain)


# --------------------------------------------------------------------------- sweep
def cmd_sweep(args) -> int:
    from orchestrator.sweep import load_sweep, run_sweep

    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    spec = load_sweep(args.config, args.set)
    if args.num_samples is not None:
        spec.num_samples = args.num_samples
    outcome = run_sweep(spec, _cluster_options(args), name=args.name, log=lambda msg: print(msg, file=sys.stderr))
    print((outcome.folder / "summary.md").read_text(), end="")
    if outcome.best is None:
        raise UserError(f"no trial of sweep {outcome.name} finished with {spec.metric}: see {outcome.folder}")
    print(f"best: {spec.metric} {outcome.best[spec.metric]:.4f} with "
          + ", ".join(f"{k}={outcome.best[k]}" for k in spec.space))
    print(f"best config: {outcome.folder / 'best_config.yaml'}  (sslab pretrain --config ...)")
    print(f"best checkpoint: {outcome.best.get('checkpoint')}")
    print(f"summary: {outcome.folder / 'summary.md'}; MLflow parent run: {outcome.parent_run_id}; "
          f"TensorBoard: tensorboard --logdir {outcome.folder / 'tune'}")
    return 0


def _add_sweep(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="Ray Tune sweep over pretraining config keys", formatter_class=HelpFormatter,
                              description="Runs the trials of a sweep YAML (configs/sweeps/*.yaml), each a Ray Train "
                                          "run, with ASHA or FIFO scheduling; writes a summary table, plots and the "
                                          "best config.")
    p.add_argument("--config", required=True, help="sweep YAML")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a base config value")
    p.add_argument("--name", default=None, help="sweep name (default <sweep name>-<time>)")
    p.add_argument("--num-samples", type=int, default=None, help="override the YAML's num_samples")
    _add_cluster_arguments(p)
    p.set_defaults(func=cmd_sweep)


# --------------------------------------------------------------------------- submit
def cmd_submit(args) -> int:
    from orchestrator.submit import submit

    command = list(args.command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if args.list_files:
        from orchestrator.submit import check_working_dir, upload_listing

        files = upload_listing(check_working_dir(args.working_dir))
        print("\n".join(files))
        print(f"{len(files)} file(s) would be uploaded", file=sys.stderr)
        return 0
    # submit() checks the command, --gpus/--cpus, --env and --working-dir before it connects
    return submit(command, address=args.address, name=args.name, wait=args.wait, gpus=args.gpus, cpus=args.cpus,
                  tracking_uri=args.tracking_uri, env=args.env or [], python=args.python,
                  working_dir=args.working_dir, log=lambda msg: print(msg, file=sys.stderr))


def _add_submit(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="run an sslab command as a Ray job on a cluster", formatter_class=HelpFormatter,
        description="Example: sslab submit --address http://head:8265 --wait -- pretrain --config "
                    "configs/pretrain/swav_cifar10.yaml --workers 8 --address auto")
    p.add_argument("--address", default=None, help="Ray job server (default $RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--name", default=None, help="job id (default: Ray picks one)")
    p.add_argument("--wait", action="store_true",
                   help="stream the logs and exit with the job's own exit status (6 when it was stopped)")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs reserved for the job's entrypoint (>= 0)")
    p.add_argument("--cpus", type=float, default=None, help="CPUs reserved for the job's entrypoint (>= 0)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow URI the job logs to (default: the cluster's own MLFLOW_TRACKING_URI; a cluster on "
                        "this machine: this checkout's store)")
    p.add_argument("--env", action="append", metavar="KEY=VALUE",
                   help="extra environment variable for the job (no secrets: the job's env is shown on the "
                        "dashboard; names like *TOKEN*, *PASSWORD*, *SECRET* are refused)")
    p.add_argument("--python", default="python", help="Python interpreter on the cluster")
    p.add_argument("--working-dir", default=None,
                   help="project folder to send: an sslab checkout (with pyproject.toml and sslab/cli.py); "
                        "default: this checkout")
    p.add_argument("--list-files", action="store_true",
                   help="print the files the job would upload (data, state and credentials are never sent) and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the sslab arguments")
    p.set_defaults(func=cmd_submit)


# --------------------------------------------------------------------------- MLflow UI
def cmd_ui(args) -> int:
    import subprocess

    from orchestrator.tracking import artifact_location, resolve_tracking_uri, sqlite_path

    explicit = bool(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    uri = resolve_tracking_uri(args.tracking_uri, create=False)  # a dry run creates nothing
    if not uri.startswith("sqlite:///"):
        raise UserError(f"{uri} is a tracking server: open it in a browser instead of starting a UI")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} must lie in 1..65535")
    folder = sqlite_path(uri).parent
    if explicit and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"no tracking store at {sqlite_path(uri)}: its folder {folder} {what}; pass the "
                        "--tracking-uri of an existing store (sqlite:///<folder>/<name>.db), or create the folder")
    if not args.dry_run:
        _check_port_free(args.host, args.port)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port)]
    location = artifact_location(uri)
    if location:
        command += ["--default-artifact-root", location]
    # MLflow 3.17's UI picks its layout from the URL or the browser's memory (a new browser: GenAI), not from
    # the experiment: this address opens the Model training layout (docs/screenshots.py)
    print(f"MLflow UI on http://{args.host}:{args.port}/#/experiments?workflowType=machine_learning for {uri} "
          "(Ctrl-C stops it)", file=sys.stderr)
    if args.dry_run:
        print(" ".join(command))
        return 0
    folder.mkdir(parents=True, exist_ok=True)  # the default store, before the first run
    code = subprocess.call(command)
    if code not in (0, -2, 130):  # -2 / 130: Ctrl-C
        raise UserError(f"the MLflow UI stopped with exit status {code} (its messages are above): fix what they "
                        "say, e.g. pass another --port", )
    return 0


def _check_port_free(host: str, port: int) -> None:
    import errno
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use (another MLflow UI?): pass --port N with a "
                            "free port, or stop what listens there") from None
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass --host 127.0.0.1 or "
                        "another --port") from None


def _add_ui(subparsers) -> None:
    p = subparsers.add_parser("ui", help="start the MLflow UI on the tracking store", formatter_class=HelpFormatter)
    p.add_argument("--tracking-uri", default=None,
                   help="store (default $MLFLOW_TRACKING_URI, else the state dir's sqlite store); a named sqlite "
                        "store's folder must exist (the default store's is created; --dry-run creates nothing)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=5000, help="port")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command instead of running it (creates nothing)")
    p.set_defaults(func=cmd_ui)


# --------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from trainers.export import export_backbone

    if args.register:
        from orchestrator.tracking import check_registered_model_name

        check_registered_model_name(args.register)
    out = export_backbone(args.source, args.format, args.out, weights=args.weights)
    print(f"wrote {out}: {out / f'model.{args.weights}'} ({args.format} state dict) and {out / 'MODEL_CARD.md'}")
    if args.register:
        from orchestrator.tracking import register_export, resolve_tracking_uri

        uri = resolve_tracking_uri(args.tracking_uri)
        version = register_export(uri, out, args.register, args.format)
        print(f"MLflow: registered model '{args.register}' version {version} ({uri})")
    return 0


def _add_export(subparsers) -> None:
    from trainers.export import FORMATS, WEIGHT_FILES

    p = subparsers.add_parser("export", formatter_class=HelpFormatter,
                              help="backbone weights as a torchvision / timm state dict with a model card",
                              description="Write a run's backbone as the state dict that torchvision's or timm's own "
                                          "module loads with strict=True (safetensors by default), a MODEL_CARD.md "
                                          "(method, recipe, data set, epochs, every evaluation metric) and "
                                          "export.json; optionally register it in the MLflow Model Registry.")
    p.add_argument("source", help="a run folder (with backbone.pt) or a backbone.pt file")
    p.add_argument("--format", choices=FORMATS, default="torchvision",
                   help="whose module the weights load into (ViTs: timm)")
    p.add_argument("--out", required=True, help="new (or empty) folder for the export")
    p.add_argument("--weights", choices=WEIGHT_FILES, default="safetensors", help="weights file type")
    p.add_argument("--register", default=None, metavar="NAME",
                   help="also register a version of MLflow model NAME (pytorch flavour) with the card")
    p.add_argument("--tracking-uri", default=None, help="MLflow store for --register (default as `sslab ui`)")
    p.set_defaults(func=cmd_export)


# --------------------------------------------------------------------------- registration
def add_commands(subparsers) -> None:
    """Register data, pretrain, sweep, submit and export (sslab/cli.py builds the whole command line)."""
    _add_data_commands(subparsers)
    _add_pretrain(subparsers)
    _add_sweep(subparsers)
    _add_submit(subparsers)
    _add_export(subparsers)


def add_ui_command(subparsers) -> None:
    _add_ui(subparsers)
