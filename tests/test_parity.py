"""bench/parity.py: both sides get the shared recipe, and one deterministic evaluator scores them.

No data and no training: the recipe read back from our config (the call the Trainer's loader makes) and
from our method modules, the shared kNN scorer on synthetic images, the report's table. The lightly side's
readback runs only where lightly is installed (a bench-only tool, not in CI).
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_parity():
    spec = importlib.util.spec_from_file_location("bench_parity", ROOT / "bench" / "parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parity = load_parity()
SMALL = ["--steps", "5", "--subset", "512"]


@pytest.mark.parametrize("method", parity.METHODS)
def test_our_config_gives_every_view_the_shared_recipe(method):
    config = parity.ours_config(method, 0, parity.parse_args(SMALL))
    views = parity.ours_views(config)
    assert views == parity.shared_views(method)
    assert [v["blur_p"] for v in views] == [0.0, 0.0]
    assert [v["jitter"] for v in views] == [(0.4, 0.4, 0.4, 0.1)] * 2
    expected_solarize = [0.0, 0.2] if method == "dino" else [0.0, 0.0]  # DINO's second view only
    assert [v["solarize_p"] for v in views] == expected_solarize
    # without data.global_augment the method's own preset applies, and the readback sees it
    config.data.global_augment = None
    assert parity.ours_views(config) != parity.shared_views(method)


@pytest.mark.parametrize("method, heads", [
    ("swav", {"head (Linear in, out)": [(256, 256), (256, 128)], "prototypes (Linear in, out)": [(128, 512)],
              "prototypes frozen (steps)": 0, "queue": 0, "temperature": 0.1}),
    ("dino", {"head (Linear in, out)": [(256, 2048), (2048, 2048), (2048, 256), (256, 2048)],
              "head BatchNorm": True, "last layer frozen (epochs)": 0, "student temperature": 0.1}),
    ("simclr", {"head (Linear in, out)": [(256, 256), (256, 128)], "temperature": 0.5, "loss scale": 1.0}),
])
def test_our_method_modules_have_the_shared_head_sizes(method, heads):
    config = parity.ours_config(method, 0, parity.parse_args(SMALL))
    knobs = parity.ours_knobs(method, parity.ours_method(method, config))
    assert {key: knobs[key] for key in heads} == heads


def test_the_plan_is_the_trainers_schedule_for_the_default_measurement():
    p = parity.plan(312, 10_000, 128, 0.5, 0.06)
    assert (p["steps_per_epoch"], p["epochs"], p["total_steps"], p["warmup_steps"]) == (78, 4, 312, 39)
    lr = p["lr_schedule"]
    assert lr[0] == 0.0 and lr[39] == pytest.approx(0.06) and lr[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(lr[:40]) > 0) and np.all(np.diff(lr[39:]) <= 0)


def test_lightly_side_reads_back_the_same_settings():
    pytest.importorskip("lightly")
    args = parity.parse_args(SMALL)
    p = parity.plan(args.steps, args.subset, args.batch, args.warmup_epochs, args.lr)
    for method in parity.METHODS:
        side = parity.LightlySide(method, parity.random_init(0), 256, p)
        rows = parity.settings_rows(method, parity.ours_config(method, 0, args), side, p)
        assert [row for row in rows if not row[3]] == [], method


def synthetic(count_per_class: int, seed: int):
    """Images of 10 classes, each a fixed 2x2 pattern of colours plus a little noise."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(0).integers(0, 256, size=(10, 2, 2, 3))
    labels = np.repeat(np.arange(10), count_per_class)
    images = np.kron(palette[labels], np.ones((1, 16, 16, 1))) + rng.integers(-3, 4, size=(len(labels), 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def test_shared_evaluator_is_deterministic_and_tells_features_apart():
    bank, bank_labels = synthetic(20, seed=1)
    test, test_labels = synthetic(10, seed=2)
    knn = parity.SharedKnn(bank, bank_labels, test, test_labels, k=20, temperature=0.07)
    backbone = parity.random_init(0)
    first, second = knn.score(backbone), knn.score(backbone)
    assert first == second
    assert backbone.training  # the scorer leaves the module's mode as it found it
    assert parity.same_weights(parity.random_init(0), backbone)
    assert not parity.same_weights(parity.random_init(1), backbone)
    pooled = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())  # sees the colour pattern
    assert knn.score(pooled) == 1.0
    shuffled = parity.SharedKnn(bank, np.random.default_rng(3).permutation(bank_labels), test, test_labels)
    assert shuffled.score(pooled) < 0.5


def test_report_table_has_mean_sd_per_side_and_the_paired_difference():
    runs = []
    for seed, (random, ours, theirs) in enumerate([(0.30, 0.40, 0.38), (0.32, 0.42, 0.43)]):
        runs += [{"method": "swav", "seed": seed, "side": side, "knn_top1": value}
                 for side, value in (("random", random), ("ours", ours), ("lightly", theirs))]
    summary = parity.summarize(runs, ["swav", "dino"], [0, 1])
    assert [row["method"] for row in summary] == ["swav"]  # dino has no runs yet
    facts = {"k": 20, "temperature": 0.07, "bank": 10_000, "test_images": 2_000, "backbone": "resnet_mini",
             "steps": 312, "batch": 128, "subset": 10_000}
    table = parity.markdown(summary, facts).splitlines()
    assert table[-1] == "| swav | 0,1 | 31.0 ± 1.4 | 41.0 ± 1.4 | 40.5 ± 3.5 | +0.5 ± 2.1 |"


def test_merge_takes_ours_only_from_runs_made_the_same_way(tmp_path):
    """--merge: random init and lightly from any file; ours only from files of the asked forward_views, and
    for SwAV/DINO under 'each' only from files whose heads ran per view too (older 'each' files ran the
    head over both views: a different measurement)."""
    import json

    def runs(method, seed, ours):
        return [{"method": method, "seed": seed, "side": "random", "knn_top1": 30.0},
                {"method": method, "seed": seed, "side": "lightly", "knn_top1": 37.0},
                {"method": method, "seed": seed, "side": "ours", "knn_top1": ours}]

    files = {
        "by_size.json": ({"forward_views": "by_size"}, runs("swav", 0, 1.0) + runs("simclr", 0, 2.0)),
        "old_each.json": ({"forward_views": "each"}, runs("swav", 0, 3.0) + runs("simclr", 0, 4.0)),
        "new_each.json": ({"forward_views": "each", "heads_per_view": True}, runs("swav", 1, 5.0)),
    }
    common = {"k": 20, "temperature": 0.07, "bank": 100, "test_images": 50, "backbone": "resnet_mini", "steps": 5,
              "batch": 8, "subset": 64}
    for name, (facts, rows) in files.items():
        (tmp_path / name).write_text(json.dumps({"facts": {**common, **facts}, "runs": rows}))
    out = tmp_path / "merged.json"
    args = parity.parse_args(["--methods", "swav,simclr", "--seeds", "0,1", "--forward-views", "each", "--out",
                              str(out), "--merge", *(str(tmp_path / n) for n in files)])
    assert parity.merge(args) == 0
    merged = json.loads(out.read_text())
    ours = {(r["method"], r["seed"]): r["knn_top1"] for r in merged["runs"] if r["side"] == "ours"}
    assert ours == {("simclr", 0): 4.0, ("swav", 1): 5.0}, "by_size runs and the old SwAV 'each' run stay out"
    assert merged["facts"]["heads_per_view"] is True


def test_jitter_order_reaches_our_views_and_merge_keeps_the_orders_apart(tmp_path):
    """--jitter-order image: our config draws the jitter order per image; --merge takes ours (and lightly's
    step on our views) only from files of the asked order, lightly's own transforms from any."""
    import json

    config = parity.ours_config("swav", 0, parity.parse_args(SMALL + ["--jitter-order", "image"]))
    assert parity.ours_views(config) == parity.shared_views("swav")  # the recipe itself is unchanged
    assert config.data.global_augment["jitter_order"] == "image"
    assert parity.ours_config("swav", 0, parity.parse_args(SMALL)).data.global_augment["jitter_order"] == "batch"

    def runs(seed, ours, lightly):
        return [{"method": "swav", "seed": seed, "side": "random", "knn_top1": 30.0},
                {"method": "swav", "seed": seed, "side": "lightly", "knn_top1": lightly},
                {"method": "swav", "seed": seed, "side": "ours", "knn_top1": ours}]

    common = {"k": 20, "temperature": 0.07, "bank": 100, "test_images": 50, "backbone": "resnet_mini", "steps": 5,
              "batch": 8, "subset": 64, "forward_views": "each", "heads_per_view": True, "lightly_heads": "ours"}
    files = {"before.json": ({}, runs(0, 1.0, 37.0)),  # from before the option: per batch
             "image.json": ({"jitter_order": "image"}, runs(0, 2.0, 38.0)),
             "swap.json": ({"jitter_order": "batch", "lightly_data": "ours"}, runs(1, 3.0, 39.0)),
             "swap_image.json": ({"jitter_order": "image", "lightly_data": "ours"}, runs(1, 4.0, 40.0))}
    for name, (facts, rows) in files.items():
        (tmp_path / name).write_text(json.dumps({"facts": {**common, **facts}, "runs": rows}))
    for order, data, expected in [("batch", "own", {(0, "ours"): 1.0, (1, "ours"): 3.0, (0, "lightly"): 37.0}),
                                  ("image", "own", {(0, "ours"): 2.0, (1, "ours"): 4.0, (0, "lightly"): 37.0}),
                                  ("image", "ours", {(0, "ours"): 2.0, (1, "ours"): 4.0, (1, "lightly"): 40.0})]:
        out = tmp_path / f"merged-{order}-{data}.json"
        args = parity.parse_args(["--methods", "swav", "--seeds", "0,1", "--forward-views", "each", "--jitter-order",
                                  order, "--lightly-data", data, "--out", str(out),
                                  "--merge", *(str(tmp_path / n) for n in files)])
        assert parity.merge(args) == 0
        merged = json.loads(out.read_text())
        got = {(r["seed"], r["side"]): r["knn_top1"] for r in merged["runs"] if r["side"] != "random"}
        assert got == expected, (order, data)
        assert merged["facts"]["jitter_order"] == order


def test_merge_takes_lightly_only_from_runs_with_the_same_head_pairing(tmp_path):
    """--lightly-heads ours (the default): lightly's runs only from files whose lightly heads started from our
    weights; files from before the option drew lightly's own heads."""
    import json

    def runs(seed, lightly):
        return [{"method": "swav", "seed": seed, "side": "random", "knn_top1": 30.0},
                {"method": "swav", "seed": seed, "side": "lightly", "knn_top1": lightly},
                {"method": "swav", "seed": seed, "side": "ours", "knn_top1": 36.0}]

    facts = {"k": 20, "temperature": 0.07, "bank": 100, "test_images": 50, "backbone": "resnet_mini", "steps": 5,
             "batch": 8, "subset": 64, "forward_views": "each", "heads_per_view": True}
    (tmp_path / "own.json").write_text(json.dumps({"facts": facts, "runs": runs(0, 1.0) + runs(1, 2.0)}))
    (tmp_path / "paired.json").write_text(json.dumps({"facts": {**facts, "lightly_heads": "ours"},
                                                      "runs": runs(0, 3.0)}))
    for pairing, expected in (("ours", {0: 3.0}), ("own", {0: 1.0, 1: 2.0})):
        out = tmp_path / f"merged-{pairing}.json"
        args = parity.parse_args(["--methods", "swav", "--seeds", "0,1", "--forward-views", "each", "--lightly-heads",
                                  pairing, "--out", str(out), "--merge", str(tmp_path / "own.json"),
                                  str(tmp_path / "paired.json")])
        assert parity.merge(args) == 0
        merged = json.loads(out.read_text())
        assert {r["seed"]: r["knn_top1"] for r in merged["runs"] if r["side"] == "lightly"} == expected, pairing
        assert merged["facts"]["lightly_heads"] == pairing


def test_copy_layers_gives_lightlys_layout_our_head_function():
    """Pairing the heads (--lightly-heads ours): our DINO head (a zero bias before each BatchNorm, torch's
    parametrized weight norm) copied onto lightly's layout (no bias before BatchNorm, the old weight_norm
    hooks) computes the same function; our SwAV prototypes onto a layer with a bias keep that bias; a
    different layout is refused."""
    import warnings

    from torch import nn

    from trainers.heads import DINOHead, Prototypes

    torch.manual_seed(0)
    ours = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, batch_norm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        last = nn.utils.weight_norm(nn.Linear(8, 32, bias=False))

    class LightlyLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(16, 24, bias=False), nn.BatchNorm1d(24), nn.GELU(),
                                     nn.Linear(24, 24, bias=False), nn.BatchNorm1d(24), nn.GELU(), nn.Linear(24, 8))
            self.last_layer = last

        def forward(self, x):
            return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1))

    theirs = LightlyLike()
    x = torch.randn(6, 16)
    ours.train(), theirs.train()
    assert not torch.allclose(ours(x), theirs(x), atol=1e-3)
    parity.copy_layers(ours, theirs)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)

    prototypes, with_bias = Prototypes(8, 5), nn.Linear(8, 5)
    bias = with_bias.bias.detach().clone()
    parity.copy_layers(prototypes.layer, with_bias, keep_target_bias=True)
    assert torch.equal(with_bias.weight, prototypes.layer.weight) and torch.equal(with_bias.bias, bias)
    with pytest.raises(RuntimeError, match="has a bias ours has not"):
        parity.copy_layers(prototypes.layer, nn.Linear(8, 5))  # lightly's bias would go unnoticed
    with pytest.raises(RuntimeError, match="head layouts differ"):
        parity.copy_layers(ours, nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8)))


def test_lightly_heads_start_from_ours_for_the_seed():
    pytest.importorskip("lightly")
    args = parity.parse_args(SMALL)
    p = parity.plan(args.steps, args.subset, args.batch, args.warmup_epochs, args.lr)
    for method in parity.METHODS:
        side = parity.LightlySide(method, parity.random_init(1), 256, p)
        parity.pair_heads(method, 1, args, side)  # checks the backbone, then the heads' outputs, itself
        if method == "swav":
            parity.drop_prototype_bias(side)
            bias = [layer.bias for layer in side.student["prototypes"].heads]
            assert all(not b.any() and not b.requires_grad for b in bias)


def merged_lightly_scores(tmp_path, option: str, fact: str, files: dict, choice: str) -> dict:
    """--merge of one SwAV seed from ``files`` (name -> (fact value or None for a file from before the
    option, lightly's score)) with ``--<option> choice``: the merged file."""
    import json

    facts = {"k": 20, "temperature": 0.07, "bank": 100, "test_images": 50, "backbone": "resnet_mini", "steps": 5,
             "batch": 8, "subset": 64, "forward_views": "each", "heads_per_view": True, "lightly_heads": "ours"}
    rows = [{"method": "swav", "seed": 0, "side": "random", "knn_top1": 30.0},
            {"method": "swav", "seed": 0, "side": "ours", "knn_top1": 36.0}]
    for name, (value, score) in files.items():
        extra = {} if value is None else {fact: value}
        (tmp_path / name).write_text(json.dumps({"facts": {**facts, **extra}, "runs": rows + [
            {"method": "swav", "seed": 0, "side": "lightly", "knn_top1": score}]}))
    out = tmp_path / f"merged-{choice}.json"
    args = parity.parse_args(["--methods", "swav", "--seeds", "0", "--forward-views", "each", f"--{option}", choice,
                              "--out", str(out), "--merge", *(str(tmp_path / name) for name in files)])
    assert parity.merge(args) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("option, fact, files, expected", [
    # files from before --lightly-prototype-bias: bias on
    ("lightly-prototype-bias", "lightly_prototype_bias", {"with.json": (None, 38.0), "without.json": ("off", 36.5)},
     {"on": 38.0, "off": 36.5}),
    # files from before --lightly-data: lightly's own transforms
    ("lightly-data", "lightly_data", {"own.json": (None, 38.0), "ours.json": ("ours", 36.4)},
     {"own": 38.0, "ours": 36.4}),
])
def test_merge_keeps_lightly_runs_of_another_variant_apart(tmp_path, option, fact, files, expected):
    for choice, score in expected.items():
        merged = merged_lightly_scores(tmp_path, option, fact, files, choice)
        assert [r["knn_top1"] for r in merged["runs"] if r["side"] == "lightly"] == [score], choice
        assert merged["facts"][fact] == choice


def test_our_views_give_lightlys_loop_a_new_epoch_on_every_pass():
    """--lightly-data ours: lightly's loop reads our loader as a DataLoader (views, labels), and each pass
    is the next epoch of our loader (its shuffle), as the Trainer drives it."""
    from types import SimpleNamespace

    class Loader:
        def __init__(self):
            self.epochs = []

        def __len__(self):
            return 2

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

        def iterate(self, skip):
            assert skip == 0
            for i in range(2):
                view = torch.full((1, 4, 4, 3), float(i)).permute(0, 3, 1, 2)  # channels_last-like strides
                yield SimpleNamespace(views=[view, view + 1], labels=torch.tensor([i]))

    loader = Loader()
    views = parity.OurViews(loader)
    assert len(views) == 2
    first = list(views)
    list(views)
    assert loader.epochs == [0, 1]
    assert [float(v[0].mean()) for v, _ in first] == [0.0, 1.0]
    assert all(x.is_contiguous() for v, _ in first for x in v)
