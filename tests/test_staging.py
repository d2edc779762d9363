"""Staging the .beton files through the run storage for nodes without a shared file system.

The driver stages an image folder's files into a storage folder; a "node" (another cache folder)
fetches them; the image folder is then deleted, as on a node without the source data, and the
loader still reads every image from the staged copy.
"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

if importlib.util.find_spec("ffcv") is None:  # not importorskip: the project imports ffcv its own way
    pytest.skip("ffcv is not installed", allow_module_level=True)
pytest.importorskip("pyarrow")

from orchestrator.staging import fetch_staged, stage_data  # noqa: E402
from trainers.config import load_config  # noqa: E402
from trainers.data.beton import read_meta  # noqa: E402
from trainers.data.multicrop import build_canvas_loader  # noqa: E402
from trainers.errors import DataNotFoundError  # noqa: E402


def make_folder(root, shade=0):
    for split, count in (("train", 6), ("test", 2)):
        for label, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.full((8, 8, 3), shade + 20 * i + 100 * label, np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def config_for(folder, cache):
    return load_config(None, [f"data.dataset=imagefolder:{folder}", f"data.cache_dir={cache}", "data.loader=ffcv"])


def read_all(dataset, cache):
    loader, kind = build_canvas_loader(dataset, "train", 4, loader="ffcv", cache_dir=cache, shuffle=False,
                                       drop_last=False, num_workers=1, log=lambda *_: None)
    assert kind == "ffcv"
    images, labels = zip(*((x.clone(), y.clone()) for x, y in loader))
    return torch.cat(images), torch.cat(labels)


def test_staged_files_reach_a_node_without_the_source_data(tmp_path):
    folder = make_folder(tmp_path / "pets")
    dataset = f"imagefolder:{folder}"
    storage = tmp_path / "storage"
    messages = []
    uri = stage_data(config_for(folder, tmp_path / "driver"), str(storage), log=messages.append)
    assert uri == f"{storage}/_data"
    staged = sorted(p.name for p in (storage / "_data").iterdir())
    assert len(staged) == 4 and sum(name.endswith(".beton") for name in staged) == 2  # train + test, + sidecars
    assert sum(m.startswith("staging") for m in messages) == 2
    messages.clear()
    stage_data(config_for(folder, tmp_path / "driver"), str(storage), log=messages.append)
    assert not any(m.startswith("staging") for m in messages), "an up-to-date staged file is not copied again"

    node = tmp_path / "node"
    copied = fetch_staged(config_for(folder, node), uri, log=lambda *_: None)
    assert len(copied) == 2
    for path in copied:
        original = tmp_path / "driver" / path.name
        assert path.read_bytes() == original.read_bytes()
        assert read_meta(path) == read_meta(original)
    assert fetch_staged(config_for(folder, node), uri, log=lambda *_: None) == [], "an identical copy stays"
    expected_images, expected_labels = read_all(dataset, tmp_path / "driver")

    shutil.rmtree(folder)  # this node has no source data: the staged copy is what it reads
    images, labels = read_all(dataset, node)
    assert images.shape == (12, 8, 8, 3)
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_all(dataset, tmp_path / "bare-node")  # nothing staged there, nothing to read from

    # a file:// URI works the same; a stale local copy (another key) is replaced
    other = tmp_path / "other-node"
    assert len(fetch_staged(config_for(folder, other), f"file://{uri}", log=lambda *_: None)) == 2
    sidecar = other / (copied[0].name + ".json")
    sidecar.write_text(sidecar.read_text().replace(read_meta(copied[0])["key"], "stale"))
    assert [p.name for p in fetch_staged(config_for(folder, other), uri, log=lambda *_: None)] == [copied[0].name]
    assert read_meta(other / copied[0].name) == read_meta(copied[0])


def test_an_incomplete_staged_file_is_not_fetched(tmp_path):
    folder = make_folder(tmp_path / "pets")
    uri = stage_data(config_for(folder, tmp_path / "driver"), str(tmp_path / "storage"), log=lambda *_: None)
    beton = next((tmp_path / "storage" / "_data").glob("*-train.beton"))
    beton.write_bytes(beton.read_bytes()[:1000])  # an upload cut short
    messages = []
    copied = fetch_staged(config_for(folder, tmp_path / "node"), uri, log=messages.append)
    assert [p.name for p in copied] == [beton.name.replace("-train", "-test")]
    assert any("incomplete" in m for m in messages)
    assert not (tmp_path / "node" / beton.name).exists()


def test_nothing_is_staged_without_source_data_or_for_the_torch_loader(tmp_path):
    messages = []
    missing = config_for(tmp_path / "absent", tmp_path / "driver")
    assert stage_data(missing, str(tmp_path / "storage"), log=messages.append) is None
    assert "each worker prepares it" in messages[0]
    torch_config = load_config(None, ["data.dataset=digits", "data.loader=torch"])
    assert stage_data(torch_config, str(tmp_path / "storage"), log=messages.append) is None
    assert not (tmp_path / "storage").exists()


def test_data_stage_puts_the_files_where_a_run_without_the_data_finds_them(tmp_path, capsys):
    """`sslab data stage` (on a machine with the archives) is the documented way data reaches a
    cluster; a run's driver and workers that have no data then read the staged copy."""
    from sslab.cli import main

    folder = make_folder(tmp_path / "pets", shade=7)
    storage = tmp_path / "bucket" / "runs"
    argv = ["data", "stage", "--dataset", f"imagefolder:{folder}", "--storage", str(storage),
            "--cache-dir", str(tmp_path / "laptop"), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert f"in {storage}/_data" in out.out and out.err.count("staging ") == 2
    assert main(argv) == 0 and "staging " not in capsys.readouterr().err  # up to date: nothing copied again
    expected = read_all(f"imagefolder:{folder}", tmp_path / "laptop")

    shutil.rmtree(folder)  # the cluster side: neither the driver nor the node has the source images
    messages = []
    uri = stage_data(config_for(folder, tmp_path / "driver"), str(storage), log=messages.append)
    assert uri == f"{storage}/_data" and "staged in" in messages[-1]
    assert len(fetch_staged(config_for(folder, tmp_path / "node"), uri, log=lambda *_: None)) == 2
    images, labels = read_all(f"imagefolder:{folder}", tmp_path / "node")
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])

    # nothing staged and no data: the driver says so and the workers prepare from their own data root
    messages.clear()
    assert stage_data(config_for(folder, tmp_path / "driver2"), str(tmp_path / "empty"), log=messages.append) is None
    assert "sslab data stage puts it there" in messages[-1]
    # the command itself, without the data: one line, exit 3, nothing staged
    assert main(["data", "stage", "--dataset", f"imagefolder:{folder}", "--storage", str(tmp_path / "s2"),
                 "--cache-dir", str(tmp_path / "c2"), "--quiet"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0]
    assert not (tmp_path / "s2" / "_data").exists() or not any((tmp_path / "s2" / "_data").iterdir())
