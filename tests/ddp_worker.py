"""One rank of a gloo process group for tests/test_losses_ddp.py: computes the batch-wide quantities on
its shard of a fixed global batch and saves them. Usage: ddp_worker.py RANK WORLD_SIZE INIT_FILE OUT."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers.losses import sinkhorn, supcon_loss, swav_loss  # noqa: E402
from trainers.distributed import all_gather_cat_no_grad, flip_partner_rows  # noqa: E402
from trainers.losses import sdmp_targets  # noqa: E402
from trainers.methods.dino import update_center  # noqa: E402
from trainers.methods.mixing import mixup  # noqa: E402
from trainers.losses import info_nce  # noqa: E402
from trainers.distributed import convert_sync_batchnorm  # noqa: E402
from trainers.probe import OnlineLinearProbe  # noqa: E402


def global_batch():
    """The same inputs in every process: 12 samples (divisible by 1, 2, 3, 4 ranks)."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    crops = [torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1) for _ in range(4)]
    teacher = [torch.randn(12, 16, generator=g) for _ in range(2)]
    features = torch.nn.functional.normalize(torch.randn(12, 2, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 4, 0, 5, 1])
    return prototypes, crops, teacher, features, labels


def bn_net(sync: bool) -> torch.nn.Module:
    """conv -> BN2d -> ReLU -> pool -> linear -> BN1d, the same weights everywhere (BN affine not 1/0)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5),
                              torch.nn.BatchNorm1d(5))
    with torch.no_grad():
        for module in net:
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return convert_sync_batchnorm(net, "cpu")[0] if sync else net


def batch_norm_results(share: slice, sync: bool) -> dict:
    """Two training steps' forward/backward of ``bn_net`` on this rank's share of 12 images."""
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 12, 3, 4, 4, generator=g) * 3 + 1  # mean and scale far from 0 / 1
    weights = torch.randn(2, 12, 5, generator=g)  # a loss that is a sum over samples
    net = bn_net(sync)
    grads, outputs, input_grads = [], [], []
    for step in range(2):
        x = images[step, share].clone().requires_grad_()
        out = net(x)
        (out * weights[step, share]).sum().backward()
        outputs.append(out.detach())
        input_grads.append(x.grad)
    grads = torch.cat([p.grad.reshape(-1) for p in net.parameters()])  # summed over both steps
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    return {"bn_out": torch.cat(outputs, dim=1), "bn_input_grad": torch.cat(input_grads, dim=1),
            "bn_param_grad": grads, "bn_buffers": buffers,
            "bn_eval": net.eval()(images[0]).detach()}  # eval mode: the running statistics, no sync


def compute(rank: int, world_size: int) -> dict:
    prototypes, crops, teacher, features, labels = global_batch()
    share = slice(rank * 12 // world_size, (rank + 1) * 12 // world_size)
    scores = [c[share] @ prototypes.t() for c in crops]
    local_features = features[share].clone().requires_grad_()
    loss = supcon_loss(local_features, labels[share])
    loss.backward()
    simclr = supcon_loss(features[share], None)
    # SDMP: flip partners come from the global batch; targets are rows of the global target matrix
    images = torch.arange(12 * 3 * 2 * 2, dtype=torch.float32).view(12, 3, 2, 2)
    lam = torch.linspace(0.05, 0.95, 12)
    partners = flip_partner_rows(images[share])
    mixed, _ = mixup(images[share], partners, lam[share])
    source, mixed_targets = sdmp_targets(all_gather_cat_no_grad(lam[share]))
    return {"codes": sinkhorn(scores[0], 0.05, 3), "swav": swav_loss(scores),
            "center": update_center(torch.zeros(16), [t[share] for t in teacher], 0.9),
            "supcon": loss.detach(), "supcon_grad": local_features.grad, "simclr": simclr,
            "partners": partners, "mixed": mixed, "source_rows": source[share], "mixed_rows": mixed_targets[share],
            "moco": info_nce(crops[0][share], crops[1][share], 0.2),
            **batch_norm_results(share, sync=world_size > 1),
            "bn_unsynced_buffers": batch_norm_results(share, sync=False)["bn_buffers"],
            "probe_weight": probe_after_two_steps(features[share], labels[share])}


def probe_after_two_steps(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The online probe's weights after two SGD steps (momentum 0.9) on two views of this rank's share."""
    probe = OnlineLinearProbe(8, 6, lr=0.5, momentum=0.9, seed=0)
    views = torch.cat([features[:, 0], features[:, 1]])  # [V*B, D], view-major as the loop passes them
    for _ in range(2):
        probe.train_step(views * 3, labels, lr=0.5)
    return torch.cat([probe.linear.weight.detach().reshape(-1), probe.linear.bias.detach()])


if __name__ == "__main__":
    rank, world_size, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.save(compute(rank, world_size), out)
    dist.barrier()
    # gloo's teardown can abort ("terminate called without an active exception") when ranks exit
    # at different moments; the results are saved, so leave without tearing anything down
    sys.stdout.flush()
    os._exit(0)
