"""One rank of a gloo process group for tests/test_finetune_ddp.py: the augmented linear probe and
semi-supervised fine-tuning on digits, streamed from the torch loader, data-parallel over the group;
saves the metrics and the trained weights. Usage: ddp_finetune_worker.py RANK WORLD_SIZE INIT_FILE OUT [SEED].
RANK 0 WORLD_SIZE 1 without a process group is the one-process reference."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers.evaluate import BackboneSpec, FinetuneSettings, LinearSettings, stratified_subset  # noqa: E402
from trainers.finetune import LoaderImages, augmented_linear_probe, finetune  # noqa: E402

SPEC = BackboneSpec(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"), 64)


def backbone() -> torch.nn.Module:
    """conv -> BatchNorm -> ReLU -> pool: 6 features; BatchNorm makes the global batch matter."""
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def run(seed: int = 0) -> dict:
    train = LoaderImages("digits", "train", loader="torch", num_workers=0, log=lambda *_: None)
    test = LoaderImages("digits", "test", loader="torch", num_workers=0, log=lambda *_: None)
    subset = stratified_subset(train.labels.numpy(), 0.1, seed=0)[:134]  # 134 labels: even, a partial last batch
    tune = FinetuneSettings.for_fraction("swav", "digits", 0.1, epochs=3, batch_size=32, min_steps=0, seed=seed)
    net = backbone()
    semi = finetune(net, 6, train, subset, test, SPEC, tune)
    probe_net = backbone().eval()
    probe = LinearSettings.for_protocol("augmented", "digits", epochs=2, batch_size=64, standardize=True, seed=seed)
    losses = []
    linear = augmented_linear_probe(probe_net, 6, train, test, SPEC, probe, indices=range(0, 1346),
                                    progress=lambda epoch, loss, lr: losses.append(loss))
    return {"semi_top1": semi["semi_top1"], "semi_top5": semi["semi_top5"], "plan": semi["plan"],
            "linear_top1": linear["linear_top1"], "linear_losses": losses,
            "trunk": torch.cat([p.detach().reshape(-1) for p in net.parameters()]),
            "bn": torch.cat([net[1].running_mean, net[1].running_var])}


if __name__ == "__main__":
    rank, world_size, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    result = run(seed)
    torch.save(result, out)
    if world_size > 1:
        dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # as tests/ddp_worker.py: leave without gloo's teardown
