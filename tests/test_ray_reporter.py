"""What a Ray worker reports (no Ray started): every kNN metric the run will compute is in every report,
and checkpoints rank by the first k's top-1, named as the loop names it."""

from orchestrator.train import RayReporter, checkpoint_score
from trainers.config import load_config


def test_reports_carry_every_knn_name_of_the_run_and_checkpoints_rank_by_the_first(tmp_path):
    config = load_config(None, ["knn.k=[200, 20]", "knn.temperature=0.1"])
    assert checkpoint_score(config) == "knn_top1_k200_t0.1"
    reporter = RayReporter({"config": config.to_dict(), "name": "r"}, rank=1, out_dir=tmp_path)
    assert reporter.held_out_defaults == ["knn_top1_k200_t0.1", "knn_top5_k200_t0.1", "knn_top1_k20_t0.1",
                                          "knn_top5_k20_t0.1"]
    default = load_config(None, [])
    assert checkpoint_score(default) == "knn_top1_k20"  # k [20, 200] at T=0.07
    assert "knn_top1_k20" in RayReporter({"config": default.to_dict(), "name": "r"}, rank=1,
                                         out_dir=tmp_path).held_out_defaults
