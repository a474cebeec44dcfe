import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from early_exit.curves import time_to_accuracy
from early_exit.evaluation import ExitOutputs

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_time_to_accuracy_finds_the_first_epoch_at_each_target(trained_run):
    result = time_to_accuracy(trained_run, targets=(0.0, 1.01))
    assert result["epochs"] == 5 and 0 < result["seconds"] and 0 < result["best"] <= 1
    first = result["reached"]["0"]
    assert first["epoch"] == 1 and 0 <= first["seconds"] <= result["seconds"]
    assert result["reached"]["1.01"] is None


def test_a_resumed_run_counts_its_sessions_not_the_pause_or_the_epoch_lost_to_the_kill(tmp_path):
    def session(scalars):  # (tag, value, step, wall time) as Lightning would log them
        with SummaryWriter(tmp_path) as writer:
            for tag, value, step, wall_time in scalars:
                writer.add_scalar(tag, value, step, walltime=wall_time)

    session([("train/loss", 2.0, 0, 1000.0), ("epoch", 0, 9, 1100.0), ("val/acc", 0.5, 9, 1100.0),
             ("epoch", 1, 19, 1200.0), ("val/acc", 0.8, 19, 1200.0),
             ("train/loss", 1.0, 25, 1260.0)])  # killed in the third epoch, resumed from the end of the second
    session([("train/loss", 1.0, 20, 9000.0), ("epoch", 2, 29, 9100.0), ("val/acc", 0.9, 29, 9100.0)])
    result = time_to_accuracy(tmp_path, targets=(0.8, 0.85))
    assert result["reached"]["0.8"]["epoch"] == 2 and result["reached"]["0.8"]["seconds"] == 200.0
    assert result["reached"]["0.85"]["epoch"] == 3 and result["reached"]["0.85"]["seconds"] == 300.0
    assert result["epochs"] == 3 and result["seconds"] == 300.0


def test_time_to_accuracy_script_prints_a_table_and_refuses_a_folder_without_a_run(trained_run, tmp_path):
    script = str(BENCHMARKS / "time_to_accuracy.py")
    out = subprocess.run([sys.executable, script, str(trained_run), "--targets", "0", "101"],
                         capture_output=True, text=True, check=True).stdout
    assert "| 1, " in out and "not reached" in out
    bad = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "no 'val/acc' scalars" in bad.stderr


def test_exit_recipes_measures_every_exit_and_the_threshold_rule(trained_run, image_folder, tmp_path):
    output = tmp_path / "recipes.json"

    def measure(*flags: str, run: Path = trained_run) -> list[dict]:
        subprocess.run([sys.executable, str(BENCHMARKS / "exit_recipes.py"), str(run), "--data",
                        str(image_folder), "--saved", "20", "30", "--cache-dir", str(tmp_path / "cache"), "--output",
                        str(output), *flags], capture_output=True, text=True, check=True)
        return json.loads(output.read_text())

    [row] = measure()
    assert row["epochs"] == 5 and len(row["test_accuracy"]) == len(row["test_ece"]) == 2
    assert all(0 <= a <= 100 for a in row["test_accuracy"] + row["test_ece"])
    assert row["thresholds"]["20"]["flops_saved_pct"] >= 20
    assert row["thresholds"]["30"]["flops_saved_pct"] >= 30
    # A checkpoint file (a shipped classifier) is measured the same, without a training time to read.
    [shipped] = measure(run=trained_run / "checkpoints" / "last.ckpt")
    assert shipped["epochs"] is shipped["seconds"] is None
    assert shipped["test_accuracy"] == row["test_accuracy"] and shipped["thresholds"] == row["thresholds"]
    # A round rerun replaces its own rows in the ablation file and keeps the other rounds'.
    others = [{"round": 3, "run": "later"}, {"round": 2, "run": "stale"}, {"round": 1, "run": "a"}]
    output.write_text(json.dumps(others))
    assert [(r["round"], r["run"]) for r in measure("--round", "2")] == [(1, "a"), (2, row["run"]), (3, "later")]


def test_combined_exits_never_fit_worse_than_the_exits_as_trained_and_print_each_variant(trained_run, image_folder,
                                                                                         tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    from combined_exits import combine, fit_combination

    generator = torch.Generator().manual_seed(0)
    outputs = ExitOutputs(torch.randn(200, 3, 10, generator=generator) * 3,
                          torch.randint(10, (200,), generator=generator))
    labels = outputs.labels.repeat_interleave(3)
    loss = lambda weights, biases: F.cross_entropy(combine(outputs.logits, weights, biases).flatten(0, 1), labels)
    for earlier_exits in (False, True):
        weights, biases = fit_combination(outputs, earlier_exits)
        assert (weights.triu(1) == 0).all() and (earlier_exits or (weights.tril(-1) == 0).all())
        assert loss(weights, biases) <= loss(torch.eye(3), torch.zeros(3, 10))

    script, checkpoint = str(BENCHMARKS / "combined_exits.py"), str(trained_run / "checkpoints" / "last.ckpt")
    out = subprocess.run([sys.executable, script, checkpoint, "--data", str(image_folder), "--saved", "20",
                          "--cache-dir", str(tmp_path), "--output", str(tmp_path / "combined.json")],
                         capture_output=True, text=True, check=True).stdout
    rows = json.loads((tmp_path / "combined.json").read_text())
    assert [row["exits"] for row in rows] == \
        ["as trained", "one temperature per exit", "geometric ensemble of exits 1..k"]
    assert all(len(row["test_accuracy"]) == 2 and row["thresholds"]["20.0"]["flops_saved_pct"] >= 20 for row in rows)
    assert all(f"| {row['exits']} | " in out for row in rows)


def test_exits_alone_are_measured_against_the_shared_exits_and_spliced_into_them(trained_run, image_folder, tmp_path):
    from helpers import tiny_fit_args

    from early_exit.cli import main

    with contextlib.chdir(tmp_path):  # exit 1 trained alone: the network cut after its first stage
        main(["fit", *tiny_fit_args(image_folder, epochs=2), "--model.num_stages", "1", "--model.exit_weights", "[1]"])
    alone = tmp_path / "logs" / "eecnn" / "version_0" / "checkpoints" / "last.ckpt"
    shared = trained_run / "checkpoints" / "last.ckpt"
    script, output = str(BENCHMARKS / "exits_alone.py"), tmp_path / "alone.json"
    common = ["--data", str(image_folder), "--saved", "20", "30", "--cache-dir", str(tmp_path / "cache")]
    out = subprocess.run([sys.executable, script, str(shared), str(shared), str(alone), *common,
                          "--output", str(output)], capture_output=True, text=True, check=True).stdout
    result = json.loads(output.read_text())
    itself, first = result["exits"]  # the shared run's own last exit, as if trained alone, equals itself
    assert itself["exit"] == 2 and itself["alone"] == itself["shared"] and first["exit"] == 1
    assert list(result["thresholds"]) == ["shared", "exit 2", "exit 1", "all"]
    assert result["thresholds"]["exit 2"] == result["thresholds"]["shared"]  # spliced into itself: the same exits
    assert result["thresholds"]["shared"]["20.0"]["flops_saved_pct"] >= 20 and "| 1 | " in out
    bad = subprocess.run([sys.executable, script, str(alone), str(shared), *common], capture_output=True, text=True,
                         check=False)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "has 2 exits: give one" in bad.stderr



def test_each_corruption_is_seeded_and_moves_the_images_further_the_higher_its_severity():
    sys.path.insert(0, str(BENCHMARKS))
    from shift import CORRUPTIONS, corrupt

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    for kind in CORRUPTIONS:
        copies = [corrupt(images, kind, severity) for severity in (1, 3, 5)]
        assert all(c.dtype == torch.uint8 and c.shape == images.shape for c in copies), kind
        assert torch.equal(copies[2], corrupt(images, kind, 5)), kind  # the same copy on every run
        distance = [(c.float() - images.float()).abs().mean().item() for c in copies]
        assert 0 < distance[0] < distance[1] < distance[2], (kind, distance)


def test_shift_benchmark_measures_the_agent_as_eecnn_test_reports_it_on_clean_images(trained_agent, image_folder,
                                                                                    tmp_path):
    from early_exit.cli import main

    with contextlib.chdir(tmp_path):
        main(["test", "--ckpt_path", str(trained_agent), "--data.data_dir", str(image_folder),
              "--trainer.enable_progress_bar", "false"])
    report = json.loads((tmp_path / "logs" / "eecnn" / "version_0" / "report.json").read_text())
    output = tmp_path / "shift.json"
    out = subprocess.run([sys.executable, str(BENCHMARKS / "shift.py"), str(trained_agent), "--data",
                          str(image_folder), "--kinds", "contrast", "jpeg", "--severities", "1", "5", "--cache-dir",
                          str(tmp_path / "logs" / "exit_cache"), "--output", str(output)],  # as eecnn test left it
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(output.read_text())
    assert [(r["corruption"], r["severity"]) for r in result["rows"]] == \
        [("clean", 0), ("contrast", 1), ("contrast", 5), ("jpeg", 1), ("jpeg", 5)]
    clean = result["rows"][0]["policies"]
    assert clean["agent"]["accuracy"] == pytest.approx(report["accuracy"])  # the engine's figures, read off the cache
    assert clean["agent"]["flops_saved_pct"] == pytest.approx(report["flops_saved_pct"])
    assert clean["final exit alone"]["accuracy"] == pytest.approx(report["per_exit_accuracy"][-1])
    assert result["val_flops_saved_pct"] == pytest.approx(report["val_flops_saved_pct"])
    assert "| mean of the corrupted copies |" in out


def test_the_gpu_training_script_trains_times_and_tests_the_recipe(image_folder, tmp_path):
    # the script a lent GPU runs, tried on the CPU with tiny settings after its "--"
    tiny = ["--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
            "--data.download", "false", "--data.val_size", "32", "--data.batch_size", "32", "--model.num_classes", "4",
            "--model.num_stages", "2", "--model.width", "0.125", "--model.exit_weights", "[1,1]"]
    subprocess.run([sys.executable, str(BENCHMARKS / "gpu_training.py"), "--data", str(image_folder), "--output",
                    str(tmp_path / "gpu.json"), "--", *tiny], capture_output=True, text=True, check=True, cwd=tmp_path)
    figures = json.loads((tmp_path / "gpu.json").read_text())
    assert figures["epochs"] == 2 and len(figures["epoch_seconds"]) == 2 and figures["train_images_per_s"] > 0
    assert len(figures["test_accuracy_per_exit"]) == 2 and all(0 <= a <= 100 for a in figures["test_accuracy_per_exit"])
    assert figures["device"].startswith("cpu")


def test_onnx_latency_times_the_exported_models_and_checks_them_against_the_engine(trained_agent, image_folder,
                                                                                  tmp_path):
    output = tmp_path / "onnx.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "onnx_latency.py"), "--agent", str(trained_agent), "--data",
                    str(image_folder), "--target", "30", "--images", "8", "--rounds", "1", "--threads", "1",
                    "--output", str(output)], cwd=tmp_path, capture_output=True, text=True, check=True)
    result = json.loads(output.read_text())
    assert result["agreement_with_engine"] == {"class": 1.0, "exit": 1.0, "both": 1.0, "images": 48}
    models = result["by_threads"]["1"]
    assert set(models) == {"early exit, agent", "early exit, max-softmax rule", "full network"}
    agent = models["early exit, agent"]
    assert sum(cell["images"] for cell in agent["latency_by_exit"].values()) == 8
    assert agent["flops_ratio"] > 1 and agent["speedup_1_image"] > 0 and 0 < agent["accuracy"] <= 100
