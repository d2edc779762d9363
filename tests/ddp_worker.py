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
from trainers.methods.sdmp import info_nce  # noqa: E402


def global_batch():
    """The same inputs in every process: 12 samples (divisible by 1, 2, 3, 4 ranks)."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1)
    crops = [torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1) for _ in range(4)]
    teacher = [torch.randn(12, 16, generator=g) for _ in range(2)]
    features = torch.nn.functional.normalize(torch.randn(12, 2, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 4, 0, 5, 1])
    return prototypes, crops, teacher, features, labels


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
            "moco": info_nce(crops[0][share], crops[1][share], 0.2)}


if __name__ == "__main__":
    rank, world_size, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.save(compute(rank, world_size), out)
    dist.barrier()
    # gloo's teardown can abort ("terminate called without an active exception") when ranks exit
    # at different moments; the results are saved, so leave without tearing anything down
    sys.stdout.flush()
    os._exit(0)
