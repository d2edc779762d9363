"""One rank of a 2-rank gloo run of the training loop for tests/test_losses_ddp.py: DINO on digits
with synchronised BatchNorm and the online probe, a few steps; saves what the ranks must share.
Usage: ddp_train_worker.py RANK WORLD_SIZE INIT_FILE OUT RUN_DIR [--set key=value ...]."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers.config import load_config  # noqa: E402
from trainers.distributed import CpuSyncBatchNorm  # noqa: E402
from trainers.loop import Trainer  # noqa: E402

if __name__ == "__main__":
    rank, world_size, init_file, out, run_dir = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    config = load_config(None, [
        "method.name=dino", "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
        "data.dataset=digits", "data.crops=2x8", "data.batch_size=32", "data.num_workers=1", "data.loader=torch",
        "model.backbone=resnet_mini", "train.epochs=1", "train.max_steps=3", "optim.warmup_epochs=0",
        "knn.every_epochs=0", "knn.max_test=100", "train.resume=null", f"train.out_dir={run_dir}", *sys.argv[6:]])
    trainer = Trainer(config, rank=rank, world_size=world_size, device="cpu", progress=False, log=lambda *_: None)
    result = trainer.fit()
    method = trainer.method
    bn = {part: [m for m in getattr(method, part).modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
          for part in ("student", "teacher")}
    torch.save({"synced": {part: [isinstance(m, CpuSyncBatchNorm) for m in layers] for part, layers in bn.items()},
                "teacher_bn": torch.cat([torch.cat([m.running_mean, m.running_var]) for m in bn["teacher"]]),
                "student_bn": torch.cat([torch.cat([m.running_mean, m.running_var]) for m in bn["student"]]),
                "probe": torch.cat([p.detach().reshape(-1) for p in trainer.probe.linear.parameters()]),
                "top1": result.metrics["online_linear_top1"]}, out)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # as tests/ddp_worker.py: leave without gloo's teardown
