import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sslab.cli import build_parser, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_subcommand_help_lists_every_option_with_its_default():
    commands = dict(_subparsers(build_parser()))
    assert {"data", "data list", "data prepare", "data preview", "demo", "pretrain"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        for action in parser._actions:
            # (an old spelling is hidden on purpose: orchestrator/cli.py renamed)
            if action.option_strings and action.dest != "help" and action.help and action.help != argparse.SUPPRESS:
                assert action.option_strings[-1] in text, (name, action.dest)
                if not action.required:
                    assert "(default:" in text, name


def test_console_script_help_runs():
    result = subprocess.run([sys.executable, "-m", "sslab", "data", "prepare", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--split {train,test,all}" in result.stdout and "(default: all)" in result.stdout


def test_prepare_and_preview(tmp_path, data_root, capsys):
    assert main(["data", "prepare", "--dataset", "digits", "--split", "all", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"train: {tmp_path}/digits-train.beton" in out and f"test: {tmp_path}/digits-test.beton" in out
    png = tmp_path / "preview.png"
    assert main(["data", "preview", "--dataset", "digits", "--crops", "2x16+6x8", "--method", "dino",
                 "--out", str(png), "--cache-dir", str(tmp_path), "--num-images", "4"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["canvas"]["shape"] == [8, 8, 8, 3] and facts["canvas"]["dtype"] == "uint8"
    assert [v["shape"] for v in facts["views"]] == [[8, 3, 16, 16]] * 2 + [[8, 3, 8, 8]] * 6
    assert all(v["dtype"] == "float32" and v["min"] < 0 < v["max"] for v in facts["views"])
    assert len(facts["labels"]["first"]) == 4
    image = Image.open(png)
    assert image.width > 9 * 96 and image.height > 4 * 96  # canvas + 8 views, 4 rows


@pytest.mark.parametrize("argv,message,code", [
    (["data", "prepare", "--dataset", "cifar100"], "unknown data set 'cifar100'", 2),
    (["data", "prepare", "--dataset", "cifar10", "--data-root", "{tmp}"], "CIFAR-10 not found", 3),
    (["data", "preview", "--dataset", "digits", "--crops", "0x32"], "0 crops", 2),
    (["data", "preview", "--dataset", "digits", "--crops", "2x0"], "positive", 2),
    (["data", "prepare", "--dataset", "digits", "--jpeg-quality", "400"], "quality", 2),
])
def test_bad_input_gives_one_line_and_a_nonzero_exit(argv, message, code, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "sslab", *argv, "--out" if argv[1] == "prepare" else "--cache-dir",
                             str(tmp_path)], capture_output=True, text=True,
                            env={**__import__("os").environ, "SSLAB_DOWNLOAD": "0"})
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.beton"))


def test_pretrain_local_runs_and_prints_a_result_table(tmp_path, capsys):
    args = ["pretrain", "--local", "--config", str(CONFIGS / "supcon_fashion-mnist.yaml"), "--out",
            str(tmp_path / "run"), "--quiet", "--set", "data.crops=2x16", "--set", "data.batch_size=32",
            "--set", "data.train_subset=128", "--set", "train.epochs=1", "--set", "optim.warmup_epochs=0",
            "--set", "knn.max_train=200", "--set", "knn.max_test=100", "--set", "data.num_workers=1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kNN top-1 (k=20, T=0.07)" in out and "4 (1 epochs)" in out
    assert (tmp_path / "run" / "backbone.pt").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    # the same command again: finished run, resumes at the end and does no more steps
    assert main(args) == 0
    assert "4 (1 epochs)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message, code", [
    (["--set", "optim.lrr=0.1"], "did you mean 'lr'", 2),
    (["--set", "method.temperature=-1"], "temperature must be > 0", 2),
    (["--config", str(CONFIGS / "swav_cifar1.yaml")], "did you mean", 2),
    (["--ray", "--workers", "3"], "not divisible by --workers 3", 2),
    (["--ray", "--workers", "0"], "--workers must be >= 1", 2),
    (["--ray", "--tracking-uri", "./mlruns"], "file store is not supported", 2),
])
def test_pretrain_bad_input_is_one_line(args, message, code, capsys):
    # without --local the checks run before Ray or MLflow start
    local = [] if args[:1] == ["--ray"] else ["--local"]
    args = [a for a in args if a != "--ray"]
    assert main(["pretrain", *local, *args]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_print_config_shows_resolved_method_options(capsys):
    assert main(["pretrain", "--config", str(CONFIGS / "dino_cifar10.yaml"), "--print-config",
                 "--set", "method.teacher_temperature=0.05"]) == 0
    out = capsys.readouterr().out
    assert "teacher_temperature: 0.05" in out and "center_momentum: 0.9" in out


def test_local_dashboards_listen_on_localhost_only(capsys):
    assert main(["ui", "--dry-run"]) == 0
    command = capsys.readouterr().out.split()
    assert command[command.index("--host") + 1] == "127.0.0.1"
    import inspect

    from orchestrator.train import init_ray

    assert "include_dashboard=False" in inspect.getsource(init_ray)  # the embedded Ray starts no dashboard


@pytest.mark.parametrize("errno_name, words", [("EROFS", "Read-only file system"), ("ENOSPC", "No space left on device"),
                                              ("EACCES", "Permission denied")])
def test_a_full_or_read_only_disk_met_anywhere_is_exit_4_naming_the_path(errno_name, words, monkeypatch, capsys,
                                                                         tmp_path):
    import errno
    import os

    import orchestrator.cli as commands

    code = getattr(errno, errno_name)

    def failing(args):
        raise OSError(code, os.strerror(code), str(tmp_path / "somewhere" / "file"))

    monkeypatch.setattr(commands, "cmd_data_list", failing)
    assert main(["data", "list"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {tmp_path / 'somewhere' / 'file'}: {words} ("), err
    assert "GiB free on that file system); free space or choose a writable location" in err[0]


def test_an_os_error_that_is_not_about_storage_stays_a_bug(monkeypatch, capsys):
    import errno

    import orchestrator.cli as commands

    def failing(args):
        raise OSError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(commands, "cmd_data_list", failing)
    assert main(["data", "list"]) == 1
    assert "rerun with --debug" in capsys.readouterr().err
