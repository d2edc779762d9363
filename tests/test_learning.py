"""Learning on real data: a short CPU pretraining on CIFAR-10 gives kNN accuracy clearly above the
same network at random initialisation, for every method.

Why CIFAR-10 at 16 px and not Fashion-MNIST: random conv features already reach ~78% kNN top-1 on
Fashion-MNIST (pixels alone ~85%), so a few minutes of CPU training cannot rise clearly above them;
on CIFAR-10 random init gives 29.1% and the methods move within 300 steps.

Measured on 2 CPU cores with bench/learning_spread.py (this file's settings; 300 steps, kNN k=20 with
5,000 training images as the bank and 2,000 test images; 2026-12-06), top-1 gain over random init
(~29.5%) per seed:
  swav    batch 256, 2x16, CIFAR jitter: +4.15 / +4.45 / +3.75 (seeds 0/1/2), mean +4.12, sd 0.35 -> margin 1.5
  dino    batch 256, 2x16, CIFAR jitter, BN head: +4.70 / +3.40 / +5.50, mean +4.53, sd 1.06 -> margin 1.0
  sdmp    MoCo v3 base, preset augmentation: +7.85 / +5.65 / +6.15, mean +6.55, sd 1.15 -> margin 2.0
  supcon  labels, preset augmentation: +7.75 / +6.90 / +6.20, mean +6.95, sd 0.78 -> margin 3.5
Each margin sits at least 3.3 sd below its method's mean gain (SwAV 7.5, DINO 3.3, SDMP 3.9, SupCon 4.4).
SDMP's and SupCon's margins were 5 until 2026-12-06, set from one seed (+10.0 / +9.8 with 1,000 test
images, 2026-11-22); three seeds at 2,000 test images put 5 within 1.4 and 2.5 sd of their means, a
flake waiting for another CPU, so they were re-set from the measured spread (settings unchanged).
What did not work (kept for the next person who tunes this): SwAV at batch 128 with 2x16+2x8 gave
+4.3 / +2.75 at 300 steps and +6.25 / +6.5 / +1.3 at 900 steps (seed 2 stayed on its ln K plateau);
ImageNet-strength jitter (0.8/0.8/0.8/0.2) keeps SwAV there (BENCHMARKS.md, learning parity); DINO at batch 128 with
2x16+2x8: +4.15 / +1.65. Batch 256 (about one image per SwAV prototype) made both leave the plateau in
every seed measured. 200 steps instead of 300 (to save ~2 min of CI, 2026-12-07, same script with
--steps 200, bench/results/learning-spread-cpu-200steps-*.json): swav +6.40 / +2.65 / +3.15, dino +3.75 /
+2.40 / +3.55, sdmp +8.80 / +4.25 / +5.50, supcon +6.25 / +8.75 / +3.20: the spread grows to 1.7-2.8 points
and supcon's seed 2 falls below its margin, so the test stays at 300. A method that does not learn (a broken loss, a collapsed head, SwAV with fewer
prototypes than embedding dimensions) stays within about a point of random init and fails.
"""

import pytest

from trainers.config import load_config
from trainers.loop import Trainer

pytestmark = pytest.mark.slow  # trains every method for hundreds of steps: `make test-fast` leaves it out

STEPS = 300
AUGMENT = "{jitter: [0.4, 0.4, 0.4, 0.1], blur_p: 0.0}"
COMMON = ["data.dataset=cifar10", "data.batch_size=128", "model.backbone=resnet_mini", "train.epochs=20",
          "optim.warmup_epochs=0.05", "train.log_every=50", "knn.every_epochs=1",
          "knn.max_train=5000", "knn.max_test=2000", "knn.k=[20]", "probe.online_linear=false"]
# SwAV and DINO: CIFAR-strength colour (lightly's CIFAR-10 benchmark, 0.4/0.4/0.4/0.1), no blur at 16 px and
# batch 256 (SwAV: about one image per prototype for Sinkhorn). With ImageNet-strength jitter SwAV stays on
# its ln K plateau; at batch 128 SwAV and DINO leave their plateau in some seeds only (bench/learning_spread.py)
PLATEAU = ["data.crops=2x16", "data.batch_size=256", f"data.global_augment={AUGMENT}"]
SETTINGS = {
    "swav": [*PLATEAU, "method.prototypes=300", "method.freeze_prototypes_steps=20", "optim.lr=0.15"],
    "dino": [*PLATEAU, "method.out_dim=1024", "method.hidden_dim=512", "method.bottleneck_dim=128",
             "method.head_batch_norm=true", "method.teacher_momentum=0.99", "optim.lr=0.12", "optim.clip_grad=3.0",
             "optim.clip_mode=per_parameter"],
    "sdmp": ["data.crops=2x16", "method.moco_hidden_dim=512", "method.moco_out_dim=128",
             "method.moco_predictor_hidden_dim=512", "optim.lr=0.12"],
    "supcon": ["data.crops=2x16", "optim.lr=0.15"],
}
MARGINS = {"swav": 0.015, "dino": 0.01, "sdmp": 0.02, "supcon": 0.035}  # from the seed spreads above
METRIC = "knn_top1_k20"


def overrides(method: str, seed: int, out_dir) -> list[str]:
    """The test's config for ``method`` (bench/learning_spread.py measures its seed spread with it)."""
    return [f"method.name={method}", *COMMON, f"train.max_steps={STEPS}", f"train.seed={seed}",
            f"train.out_dir={out_dir}", *SETTINGS[method]]


@pytest.mark.parametrize("method", list(SETTINGS))
def test_short_pretraining_beats_random_init(method, tmp_path):
    config = load_config(None, overrides(method, 0, tmp_path))
    trainer = Trainer(config, progress=False, log=lambda *_: None)
    trainer.setup()
    before = trainer.knn()[METRIC]
    result = trainer.fit()
    after = result.metrics[METRIC]
    print(f"{method}: kNN top-1 {before:.4f} at random init -> {after:.4f} after {STEPS} steps")
    assert result.steps == STEPS
    assert 0.25 < before < 0.33, "random-init reference moved: re-measure the margins"
    assert after - before > MARGINS[method], (before, after)
