import json

import pytest

from early_exit import ExitAgent
from early_exit.evaluation import evaluate_exits
from early_exit.sweep import main


@pytest.mark.slow
def test_sweep_writes_a_table_and_plot_measured_by_the_shared_evaluation(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    main(["--classifier-ckpt", ckpt, "--compute-weights", "0.1", "2", "--output", "out", "--",
          "--model.num_exits", "2", "--model.steps_per_epoch", "40", "--model.epsilon_decay_steps", "30",
          "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 10_000
    assert "| agent, compute_weight 0.1 |" in (tmp_path / "out" / "sweep.md").read_text()
    names = [row["name"] for row in rows]
    assert names[:2] == ["agent, compute_weight 0.1", "agent, compute_weight 2"]
    assert {"always exit 1", "always exit 2", "oracle"} <= set(names)
    assert any(n.startswith("max_softmax") for n in names) and any(n.startswith("entropy") for n in names)
    for row in rows[:2]:  # the table's agent figures are the shared evaluation of the saved greedy policy
        agent = ExitAgent.load_from_checkpoint(row["checkpoint"], map_location="cpu")
        agent.setup("test")
        expected = evaluate_exits(agent.greedy_exits(agent.outputs["test"]), agent.outputs["test"], agent.costs,
                                  agent.full_flops)
        assert row["accuracy"] == expected["accuracy"] and row["flops_saved_pct"] == expected["flops_saved_pct"]
        assert row["env_steps_per_s"] > 0 and row["updates_per_s"] > 0
    for row in rows:
        assert sum(row["exit_distribution"]) == pytest.approx(1.0)
