import json

import pytest

from early_exit import ExitAgent, ExitCache
from early_exit.evaluation import evaluate_exits
from early_exit.sweep import best_threshold_at, main


@pytest.mark.slow
def test_sweep_measures_one_agent_per_seed_along_the_curve_against_thresholds(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    main(["--classifier-ckpt", ckpt, "--seeds", "0", "1", "--targets", "20", "40", "--fixed-weights", "0.5",
          "--output", "out", "--", "--trainer.limit_train_batches", "40",
          "--model.epsilon_decay_steps", "30", "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false"])
    result = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 10_000
    assert "| 20 |" in (tmp_path / "out" / "sweep.md").read_text()
    runs, rows = result["runs"], result["rows"]
    assert [r["name"] for r in runs] == ["out/seed_0", "out/seed_1", "out/fixed_0.5"]
    names = [row["name"] for row in rows]
    expected = {"always exit 1", "always exit 2", "oracle", "max_softmax >= 40% saved", "entropy >= 20% saved"}
    assert expected <= set(names)
    assert "agent trained at compute weight 0.5 only" in names
    for run in runs[:2]:  # each seed's rows are the shared evaluation of its best checkpoint at each target
        agent = ExitAgent.load_from_checkpoint(run["checkpoint"], map_location="cpu")
        cache = ExitCache(ckpt)
        cache.setup("test")
        test = cache.outputs["test"]
        for row in (r for r in rows if r.get("seed") == int(run["name"][-1])):
            agent.hparams.target_flops_saved = row["target"]
            exits = agent.greedy_exits(test, agent.operating_weight(clamp=True))
            expected = evaluate_exits(exits, test, cache.costs, cache.full_cost)
            assert row["accuracy"] == expected["accuracy"] and row["flops_saved_pct"] == expected["flops_saved_pct"]
    for summary in result["summary"]:
        points = [r for r in rows if r.get("target") == summary["target_flops_saved"]]
        assert summary["seeds"] == len(points) == 2
        assert summary["agent_accuracy"] == pytest.approx(sum(p["accuracy"] for p in points) / 2)
        leads = [p["accuracy"] - best_threshold_at(rows, p["flops_saved_pct"]) for p in points]
        assert summary["lead_over_best_threshold"] == pytest.approx(sum(leads) / 2)
        ceiling = [p["accuracy"] - best_threshold_at(result["tuned_on_test"], p["flops_saved_pct"]) for p in points]
        assert summary["lead_over_test_tuned_threshold"] == pytest.approx(sum(ceiling) / 2)
    for row in rows:
        assert sum(row["exit_distribution"]) == pytest.approx(1.0)
