import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES
from helpers import scalars
from PIL import Image

from early_exit.cache import load_classifier
from early_exit.cli import main
from early_exit.evaluation import path_flops

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = {
    "accuracy", "flops_saved_pct", "mean_flops", "full_flops", "exit_distribution", "exit_accuracy",
    "per_exit_accuracy", "per_class_accuracy", "per_class_exit_accuracy", "confidence", "effectiveness",
    "prediction_changes", "baselines", "throughput", "val_flops_saved_pct",
}
PLOTS = ("exit_distribution", "confidence", "per_class_accuracy", "class_exit_accuracy", "tradeoff", "training_curves")


def classifier_of(agent_ckpt: Path):
    import torch

    checkpoint = torch.load(agent_ckpt, weights_only=True)
    return load_classifier(checkpoint["datamodule_hyper_parameters"]["classifier_ckpt"])[0]


def test_eecnn_test_on_an_agent_writes_a_consistent_report_and_plots(trained_agent, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["test", "--ckpt_path", str(trained_agent), "--trainer.enable_progress_bar", "false"])
    folder = tmp_path / "logs" / "eecnn" / "version_0"
    report = json.loads((folder / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    shares, costs = report["exit_distribution"], path_flops(classifier_of(trained_agent).model).tolist()
    assert sum(shares) == pytest.approx(1.0)
    mean_flops = sum(p * c for p, c in zip(shares, costs))
    assert report["mean_flops"] == pytest.approx(mean_flops)
    assert report["flops_saved_pct"] == pytest.approx(100 * (1 - mean_flops / report["full_flops"]))
    assert report["effectiveness"] == pytest.approx(report["accuracy"] * report["flops_saved_pct"] / 100)
    taken = [(p, a) for p, a in zip(shares, report["exit_accuracy"]) if p > 0]
    assert report["accuracy"] == pytest.approx(sum(p * a for p, a in taken))  # the exits' accuracies add up
    assert list(report["per_class_accuracy"]) == CLASSES  # balanced test split: the class mean is the accuracy
    assert np.mean(list(report["per_class_accuracy"].values())) == pytest.approx(report["accuracy"])
    assert all(len(row) == 2 for row in report["per_class_exit_accuracy"].values())
    per_class_exit = list(report["per_class_exit_accuracy"].values())
    assert np.mean(per_class_exit, axis=0) == pytest.approx(report["per_exit_accuracy"])
    assert [set(c) for c in report["confidence"]] == [{"mean", "std"}] * 2  # one entry per exit
    assert len(report["prediction_changes"]) == 1 and 0 <= report["prediction_changes"][0] <= 48
    assert {"always exit 1", "always exit 2", "oracle"} <= {b["name"] for b in report["baselines"]}
    throughput = report["throughput"]
    assert throughput["engine_images_per_s"] > 0 and throughput["full_network_images_per_s"] > 0
    assert throughput["batch_size"] == 32  # the classifier's --data.batch_size
    assert throughput["device"].startswith("cpu")
    for plot in PLOTS:
        assert (folder / f"{plot}.png").stat().st_size > 5_000, plot
    tags = scalars(folder)
    assert tags["report/accuracy"] == [pytest.approx(report["accuracy"])]
    assert tags["test/flops_saved_pct"] == [pytest.approx(report["flops_saved_pct"])]  # the two printed tables agree
    assert "FLOPs saved" in capsys.readouterr().out  # the printed summary table


def image_files(folder: Path) -> dict[str, str]:
    """Images in every awkward form users have, and two files that are not images; name -> what it is."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(pixels).convert("L").save(folder / "gray.png")
    Image.fromarray(pixels).convert("P").save(folder / "palette.gif")
    Image.fromarray(rng.integers(0, 255, size=(700, 1000, 3), dtype=np.uint8)).save(folder / "large.jpg")
    Image.fromarray(pixels).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    return {"gray.png": "ok", "large.jpg": "ok", "palette.gif": "ok", "rgba.png": "ok", "text.jpg": "bad",
            "truncated.jpg": "bad", "whole.jpg": "ok"}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_predict_reports_each_bad_file_and_predicts_the_rest(trained_agent, tmp_path, monkeypatch, capsys, suffix):
    monkeypatch.chdir(tmp_path)
    kinds = image_files(tmp_path / "images")
    output = tmp_path / f"predictions{suffix}"
    with pytest.raises(SystemExit) as exit:
        main(["predict", "--ckpt_path", str(trained_agent), str(tmp_path / "images"), "--output", str(output),
              "--trainer.enable_progress_bar", "false"])
    assert exit.value.code == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("eecnn: error:")]
    assert sorted(re.search(r"/images/(\S+?\.jpg)", line).group(1) for line in errors) == ["text.jpg", "truncated.jpg"]
    text = output.read_text()
    lines = text.splitlines()
    rows = [json.loads(line) for line in lines] if suffix == ".jsonl" else list(csv.DictReader(lines))
    good = sorted(name for name, kind in kinds.items() if kind == "ok")
    assert [Path(row["file"]).name for row in rows] == good
    costs = path_flops(classifier_of(trained_agent).model).tolist()
    for row in rows:
        assert row["class"] in CLASSES and int(row["exit"]) in (1, 2)
        assert float(row["flops"]) == pytest.approx(costs[int(row["exit"]) - 1])  # what reaching its exit costs
        assert Path(row["file"]).name in captured.out  # the printed table has a row per image


def test_predict_takes_files_and_globs_and_exits_zero_when_all_are_read(trained_agent, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image_files(tmp_path / "images")
    main(["predict", "--ckpt_path", str(trained_agent), "images/whole.jpg", "images/*.png",
          "--trainer.enable_progress_bar", "false"])
    table = capsys.readouterr().out
    assert all(name in table for name in ("whole.jpg", "rgba.png", "gray.png")) and "palette.gif" not in table


def test_predicts_stdout_is_its_table_and_folder_summary_alone_with_the_progress_bar_on(trained_agent, tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    eecnn = Path(sys.executable).parent / "eecnn"  # the installed console script, as a user runs it
    result = subprocess.run([str(eecnn), "predict", "--ckpt_path", str(trained_agent), "shots"], cwd=tmp_path,
                            capture_output=True, text=True, check=True)
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["file", "class", "confidence", "exit", "MFLOPs"]
    assert [row[0] for row in lines[1:4]] == ["shots/0.png", "shots/1.png", "shots/2.png"]
    assert all(row[1] in CLASSES and float(row[2]) > 0 and row[3] in ("1", "2") for row in lines[1:4])
    assert lines[4:] == [["folder", "images", "mean", "exit", "accuracy"], ["shots", "3", lines[5][2], "-"]]
    assert "Predicting" in result.stderr  # the progress bar is still there, on standard error


def test_predict_on_a_tree_of_class_folders_predicts_every_image_and_scores_each_folder(
        trained_agent, image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "predictions.jsonl"
    main(["predict", "--ckpt_path", str(trained_agent), str(image_folder / "test"), "--output", str(output),
          "--trainer.enable_progress_bar", "false"])
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(Path(row["file"]) for row in rows) == sorted((image_folder / "test").glob("*/*.jpg"))
    out = capsys.readouterr().out
    for name in CLASSES:
        group = [row for row in rows if Path(row["file"]).parent.name == name]
        accuracy = 100 * sum(row["class"] == name for row in group) / len(group)
        assert re.search(rf"test/{name}\s+12\s+\d\.\d\d\s+{accuracy:.2f} %", out), name
    overall = 100 * sum(row["class"] == Path(row["file"]).parent.name for row in rows) / len(rows)
    assert re.search(rf"all class folders\s+48\s+{overall:.2f} %", out)


def test_predict_bad_output_and_no_inputs_are_one_line_errors(trained_agent, tmp_path):
    for args, problem in (([str(tmp_path)], "--output"), ([], "needs image files")):
        with pytest.raises(SystemExit) as exit:
            main(["predict", "--ckpt_path", str(trained_agent), *args, "--output", str(tmp_path / "p.txt")]
                 if problem == "--output" else ["predict", "--ckpt_path", str(trained_agent)])
        assert str(exit.value.code).startswith("eecnn: error: ") and problem in str(exit.value.code)


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", text, re.DOTALL).group(1)


def test_readme_python_example_runs(trained_agent, image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    shutil.copy(trained_agent, tmp_path / "results" / "agent.ckpt")
    shutil.copy(next((image_folder / "test" / "circle").iterdir()), tmp_path / "cat.png")
    (tmp_path / "data").symlink_to(image_folder)
    exec(compile(readme_python_example(), "README.md", "exec"), {})  # noqa: S102 - the README's own example
    out = capsys.readouterr().out
    assert "'class': 'circle'" in out and re.search(r"\d+\.\d+ % accurate, -?\d+\.\d % of FLOPs saved", out)


def test_the_python_apis_evaluate_with_validation_images_is_the_report_eecnn_test_writes(trained_agent, tmp_path,
                                                                                         monkeypatch):
    import torch

    from early_exit import EarlyExitPredictor, ExitCache
    from early_exit.checkpoint import data_args

    monkeypatch.chdir(tmp_path)
    main(["test", "--ckpt_path", str(trained_agent), "--trainer.enable_progress_bar", "false"])
    report = json.loads((tmp_path / "logs" / "eecnn" / "version_0" / "report.json").read_text())
    predictor = EarlyExitPredictor.from_checkpoint(trained_agent)
    data = ExitCache(**data_args(torch.load(trained_agent, weights_only=True), trained_agent)).images
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    ours = predictor.evaluate(data.test_dataloader(), data.val_dataloader())
    for key in ("accuracy", "flops_saved_pct", "val_flops_saved_pct", "exit_distribution", "per_exit_accuracy"):
        assert ours[key] == pytest.approx(report[key]), key
    assert ours["baselines"] == report["baselines"]
