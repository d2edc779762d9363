"""train.compile_step (issue 19 item 4): the whole training step through torch.compile (two graphs: forward,
loss, backward and clipping; weight decay, optimizer and EMA teacher) gives the eager losses and weights on the CPU. Measured 2026-12-07 (2 shared cores, torch 2.14.1, 4 steps, resnet_mini, 2x16(+2x8)
crops, batch 32): see the bounds below."""

import time

import pytest
import torch

from test_loop import tiny_config
from trainers.config import load_config
from trainers.errors import ConfigError
from trainers.loop import Trainer, check_config

STEPS = 4
# (loss, state) bounds per case: max |compiled - eager| over the 4 losses / over every float tensor of the
# method's state dict. Measured (NCHW, optimizer and EMA compiled too): SwAV 2.0e-4 / 4.5e-4 (Sinkhorn's
# exp(score / 0.05) amplifies float noise step by step: 4.8e-7 at step 0), DINO 2.2e-6 / 1.7e-5, SupCon
# 9.5e-7 / 8.0e-6, DINO + AdamW 1.4e-6 / 9.5e-7, SwAV + LARS 4.8e-7 / 5.6e-6; the bounds are ~10-400x those,
# far below what a capture bug does (a skipped hook, a stale schedule value or a missed weight decay: > 1e-2)
BOUNDS = {"swav": (4e-3, 1e-2), "dino": (2e-5, 4e-4), "supcon": (2e-5, 2e-4),
          "dino-adamw": (2e-5, 4e-4), "swav-lars": (4e-3, 1e-2)}
# the other optimizers' compiled updates (LARS with the clipped trust ratio; AdamW, capturable, its decoupled
# decay folded out): DINO's weight decay follows a schedule, every rate changes every step
VARIANTS = {"dino-adamw": ("dino", "optim.name=adamw", "optim.lr=0.001"),
            "swav-lars": ("swav", "optim.name=lars", "optim.lars_clip_lr=true")}


def trainer(method, out_dir, *extra):
    queue = ["method.queue_length=0"] if method == "swav" else []  # SwAV without its queue (batch-4096 recipe)
    # NCHW: with channels_last the compiled backward's gradients differ from eager's by ~0.5% already at step 0
    # on this CPU (torch 2.14.1; ~5e-6 in NCHW), too coarse to tell a capture bug from layout noise
    config = tiny_config(method, out_dir, "probe.online_linear=false", "train.resume=null", "train.device=cpu",
                         "train.channels_last=false", *queue, *extra)
    built = Trainer(config, progress=False, log=lambda *_: None)
    built.setup()
    built.method.train()
    return built


@pytest.mark.slow  # one torch.compile per method: 48-73 s each on 2 CPU cores (cold cache)
@pytest.mark.parametrize("case", ["swav", "dino", "supcon", "dino-adamw", "swav-lars"])
def test_the_compiled_whole_step_trains_as_the_eager_one(case, tmp_path):
    """Both graphs (forward + loss + backward + clipping; weight decay + optimizer + EMA teacher) against the
    eager step; the learning rate (warm-up), weight decay (DINO's schedule) and EMA momentum change every step
    and compile nothing new after the second step (the optimizer's state appears at the first)."""
    from torch._dynamo.utils import counters

    method, *extra = VARIANTS.get(case, (case,))
    eager = trainer(method, tmp_path / "eager", *extra)
    compiled = trainer(method, tmp_path / "compiled", "train.compile_step=true", *extra)
    assert eager._compiled_step is None and compiled._compiled_step is not None
    batches = []
    for batch in eager.loader.iterate(0):
        batches.append((batch.views, batch.labels))
        if len(batches) == STEPS:
            break
    eager_losses, compiled_losses, graphs = [], [], []
    started = time.perf_counter()
    for step, (views, labels) in enumerate(batches):
        eager_losses.append(float(eager.train_step(views, labels, step)[0]))
        compiled_losses.append(float(compiled.train_step(views, labels, step)[0]))
        graphs.append(counters["stats"]["unique_graphs"])
        if step == 0:
            print(f"{case}: first compiled step (compilation) {time.perf_counter() - started:.1f} s")
    rates = [(float(eager.lr_schedule[s]), float(eager.wd_schedule[s])) for s in range(STEPS)]
    assert len(set(rates)) == STEPS  # a new learning rate every step
    if method != "swav":  # (SwAV's prototypes unfreeze at step 3: one recompilation, as it should)
        assert graphs[1] == graphs[-1], graphs
    loss_gap = max(abs(a - b) for a, b in zip(eager_losses, compiled_losses))
    ours, theirs = eager.method.state_dict(), compiled.method.state_dict()
    assert ours.keys() == theirs.keys()
    floats = [k for k in ours if ours[k].is_floating_point() and ours[k].numel()]
    state_gap = max(float((ours[k] - theirs[k]).abs().max()) for k in floats)
    print(f"{case}: losses {eager_losses} vs {compiled_losses}; max loss gap {loss_gap:.3g}, "
          f"max state gap {state_gap:.3g}")
    assert len(set(eager_losses)) == STEPS  # the weights moved: every step's loss differs
    loss_bound, state_bound = BOUNDS[case]
    assert loss_gap < loss_bound, (eager_losses, compiled_losses)
    assert state_gap < state_bound
    # the weights changed from their start by far more than the gap: the comparison can tell them apart
    start = trainer(method, tmp_path / "start", *extra).method.state_dict()
    moved = max(float((start[k] - ours[k]).abs().max()) for k in floats)
    assert moved > 10 * state_bound, moved


def test_compile_step_values_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="train.compile_step 'fast' must be true, false or a torch.compile "
                                          "mode: default, reduce-overhead"):
        load_config(None, ["train.compile_step=fast"]).train.check()
    with pytest.raises(ConfigError, match="set train.compile=false"):
        load_config(None, ["train.compile_step=true", "train.compile=true"]).train.check()
    for value in ("true", "default", "reduce-overhead", "false"):
        load_config(None, [f"train.compile_step={value}"]).train.check()
    with pytest.raises(ConfigError, match="does not support sdmp"):
        check_config(tiny_config("sdmp", tmp_path, "train.compile_step=true"))
    with pytest.raises(ConfigError, match="under DDP"):
        check_config(tiny_config("supcon", tmp_path, "train.compile_step=true"), world_size=2)


@pytest.mark.slow  # one compilation
def test_a_compiled_runs_checkpoint_resumes_eagerly(tmp_path):
    """The compiled update leaves tensors and AdamW's capturable flag in the optimizer's groups; an eager run
    resuming its checkpoint takes floats again (capturable AdamW refuses CPU tensors when eager), and a compiled
    run resuming an eager one's takes tensors again."""
    common = ["probe.online_linear=false", "train.device=cpu", "train.channels_last=false", "optim.name=adamw",
              "optim.lr=0.001"]
    first = Trainer(tiny_config("dino", tmp_path, *common, "train.compile_step=true", "train.epochs=1"),
                    progress=False, log=lambda *_: None).fit()
    assert first.steps == 8
    resumed = Trainer(tiny_config("dino", tmp_path, *common, "train.epochs=2", "train.resume=auto"),
                      progress=False, log=lambda *_: None)
    result = resumed.fit()
    assert result.steps == 16 and 0 < result.metrics["loss"] < 10
    groups = resumed.optimizer.param_groups
    assert all(isinstance(g["lr"], float) and not g["capturable"] and "folded_weight_decay" not in g for g in groups)
    # and back: the eager run's checkpoint resumed compiled (tensors and capturable again)
    again = Trainer(tiny_config("dino", tmp_path, *common, "train.compile_step=true", "train.epochs=3",
                                "train.resume=auto"), progress=False, log=lambda *_: None)
    result = again.fit()
    assert result.steps == 24 and 0 < result.metrics["loss"] < 10
    assert all(isinstance(g["lr"], torch.Tensor) and g["capturable"] for g in again.optimizer.param_groups)
