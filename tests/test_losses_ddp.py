"""Batch-wide quantities under torch.distributed (gloo, CPU): N ranks give what 1 rank gives on the
concatenated batch (Sinkhorn codes, SwAV loss, DINO center, SupCon/SimCLR loss and gradients, SDMP flip
partners, mixed images and soft targets, MoCo v3 InfoNCE, synchronised BatchNorm, the online probe's
averaged gradients)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_worker import compute, global_batch  # noqa: E402

from trainers.losses import sinkhorn  # noqa: E402

pytestmark = pytest.mark.slow  # spawns process groups: `make test-fast` leaves it out

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def run_ranks(world_size, tmp_path, worker=WORKER, extra=()):
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world_size), str(init), str(tmp_path / f"{r}.pt"),
                               *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world_size)]
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output.decode()[-2000:]
    return [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_match_one_process_on_the_whole_batch(world_size, tmp_path):
    single = compute(0, 1)
    ranks = run_ranks(world_size, tmp_path)
    assert torch.allclose(torch.cat([r["codes"] for r in ranks]), single["codes"], atol=1e-6)
    # each rank's loss is its local mean; DDP averages them: equal shards -> the mean is the global loss
    for key in ("swav", "supcon", "simclr", "moco"):
        assert abs(float(sum(r[key] for r in ranks) / world_size) - float(single[key])) < 1e-5, key
    for r in ranks:
        assert torch.allclose(r["center"], single["center"], atol=1e-6)
    # gradients reach every rank's features through the gather; /W is DDP's gradient averaging
    grads = torch.cat([r["supcon_grad"] for r in ranks]) / world_size
    assert torch.allclose(grads, single["supcon_grad"], atol=1e-6)
    for key in ("partners", "mixed", "source_rows", "mixed_rows"):
        assert torch.equal(torch.cat([r[key] for r in ranks]), single[key]), key
    assert torch.equal(single["partners"], torch.arange(12 * 12, dtype=torch.float32).view(12, 3, 2, 2).flip(0))
    # the partner of the first sample on rank 0 lives on the last rank
    assert torch.equal(ranks[0]["partners"][0], single["partners"][0])
    # SyncBatchNorm (gloo: trainers.distributed.CpuSyncBatchNorm): outputs, input gradients and running
    # statistics of each rank's share are those of one BatchNorm over the concatenated batch, two steps running
    for key in ("bn_out", "bn_input_grad"):  # [rows, ...] per rank: their concatenation is the whole batch's
        assert torch.allclose(torch.cat([r[key] for r in ranks]), single[key], atol=1e-5), key
    # parameter gradients: the ranks' sum (DDP averages it: the mean loss of equal shards) is the global one
    assert torch.allclose(sum(r["bn_param_grad"] for r in ranks), single["bn_param_grad"], atol=1e-4)
    for r in ranks:
        assert r["bn_buffers"].keys() == single["bn_buffers"].keys()
        for name, value in single["bn_buffers"].items():
            assert torch.allclose(r["bn_buffers"][name].float(), value.float(), atol=1e-5), name
        assert torch.allclose(r["bn_eval"], single["bn_eval"], atol=1e-5)
        # the online probe: gradients averaged over ranks -> the weights of one probe on the whole batch
        assert torch.allclose(r["probe_weight"], single["probe_weight"], atol=1e-6)
    # without the sync each rank's statistics are its own shard's (the test can fail)
    assert not torch.allclose(ranks[0]["bn_unsynced_buffers"]["1.running_var"], single["bn_buffers"]["1.running_var"],
                              atol=1e-3)
    # and the rank results differ from a naive per-rank computation (the test can fail)
    prototypes, crops, *_ = global_batch()
    naive = sinkhorn(crops[0][: 12 // world_size] @ prototypes.t())
    assert not torch.allclose(naive, ranks[0]["codes"], atol=1e-4)


@pytest.mark.parametrize("sync", [None, False])
def test_two_ranks_train_with_synchronised_batchnorm_and_share_one_probe(sync, tmp_path):
    """The loop under DDP (gloo): model.sync_batchnorm=null (auto: on with 2 workers) converts the
    student's and the teacher's BatchNorm layers; each rank sees other views, so only synchronised
    statistics agree. The probe's averaged gradients keep one probe on every rank."""
    extra = [str(tmp_path / "run"), f"model.sync_batchnorm={'null' if sync is None else 'false'}"]
    ranks = run_ranks(2, tmp_path, Path(__file__).resolve().parent / "ddp_train_worker.py", extra)
    for r in ranks:
        for part in ("student", "teacher"):
            assert len(r["synced"][part]) > 5 and all(r["synced"][part]) == (sync is None), part
        assert torch.equal(r["probe"], ranks[0]["probe"])
    # running statistics agree across ranks only when synchronised (DDP broadcasts rank 0's student buffers
    # before each forward, which then updates them from the rank's own views; the teacher has no DDP), and
    # the teacher is the evaluation backbone: unsynchronised, the ranks measure different accuracies
    for part in ("student_bn", "teacher_bn"):
        assert torch.allclose(ranks[0][part], ranks[1][part], atol=1e-6) == (sync is None), part
    assert (ranks[0]["top1"] == ranks[1]["top1"]) == (sync is None)
