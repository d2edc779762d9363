"""The ``sslab`` command line: one parser over the orchestrator's and the pipelines' commands.

This module sits above both layers (``pipelines`` -> ``orchestrator`` -> ``trainers``) so neither of them
imports the other's command line. Every subcommand's ``--help`` lists all options with their defaults;
heavy modules (torch, ffcv, Ray, MLflow) are imported inside the commands, so ``--help`` is quick. Errors a
user can fix print one line (``error: ...``) and exit non-zero; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator import cli as orchestrator_cli
from pipelines import cli as pipelines_cli
from trainers.errors import UserError

COMMANDS = "{data,pretrain,sweep,pipeline,eval,submit,export,ui,demo}"


def build_parser() -> argparse.ArgumentParser:
    formatter = orchestrator_cli.HelpFormatter
    parser = argparse.ArgumentParser(
        prog="sslab", formatter_class=formatter,
        description="Self-supervised vision pretraining (SwAV, DINO, SDMP, SupCon/SimCLR) on FFCV multi-crop "
                    "batches, run by Ray and tracked in MLflow.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar=COMMANDS, required=True)
    orchestrator_cli.add_commands(subparsers)  # data, pretrain, sweep, submit, export
    pipelines_cli.add_pipeline_commands(subparsers, formatter)  # pipeline, demo
    pipelines_cli.add_eval_commands(subparsers, formatter, orchestrator_cli.add_data_root)  # eval
    orchestrator_cli.add_ui_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SSLAB_DEBUG") == "1"
    if getattr(args, "renamed_option", None):  # an old spelling (orchestrator/cli.py renamed)
        print(f"error: {args.renamed_option}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        storage = _storage_error(exc)
        if storage is None or debug:
            if debug:
                raise
            print(f"error: {exc.__class__.__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
            return 1
        print(f"error: {storage}", file=sys.stderr)
        return storage.exit_code
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with --debug
        if debug:
            raise
        print(f"error: {exc.__class__.__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


STORAGE_ERRNOS = {"ENOSPC", "EROFS", "EACCES", "EPERM", "EDQUOT", "EFBIG"}


def _storage_error(exc: OSError):
    """A full or read-only disk met anywhere (state dir, cache, run folder) as the storage error (exit 4)."""
    import errno

    if errno.errorcode.get(exc.errno or -1) not in STORAGE_ERRNOS | {"ENOTDIR", "EEXIST", "EISDIR"}:
        return None
    from trainers.checkpoint import StorageError, storage_error

    hint = "free space or choose a writable location (--out, --cache-dir, $SSLAB_HOME), then rerun"
    if not exc.filename:
        return StorageError(f"cannot write: {exc.strerror or exc}; {hint}")
    return storage_error(exc.filename, exc, "", hint=hint)


if __name__ == "__main__":
    sys.exit(main())
