import json

import pytest
import torch

from early_exit import EarlyExitPredictor
from early_exit.cache import load_classifier
from early_exit.cli import main
from early_exit.export import main as export


def test_exported_checkpoints_are_slim_and_test_and_predict_like_the_originals(trained_run, trained_agent,
                                                                               image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = trained_run / "checkpoints" / "last.ckpt"
    export([str(source), "shipped/classifier.ckpt", "--half"])
    export([str(trained_agent), "shipped/agent.ckpt"])
    shipped = tmp_path / "shipped" / "classifier.ckpt"
    assert shipped.stat().st_size < 0.6 * source.stat().st_size  # fp16 weights, no optimiser state
    saved = torch.load(shipped, weights_only=True)
    assert "optimizer_states" not in saved and saved["CIFAR10DataModule"]["classes"]
    assert "data_dir" not in saved["datamodule_hyper_parameters"]  # this machine's path: users pass --data.data_dir

    images = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8).float() / 255
    original, half = (torch.stack(load_classifier(path)[0](images), dim=1) for path in (source, shipped))
    assert torch.allclose(original, half, atol=0.05)

    main(["test", "--ckpt_path", "shipped/agent.ckpt", "--data.classifier_ckpt", "shipped/classifier.ckpt",
          "--data.data_dir", str(image_folder), "--trainer.enable_progress_bar", "false"])
    report = json.loads((tmp_path / "logs" / "eecnn" / "version_0" / "report.json").read_text())
    assert report["accuracy"] > 50  # 4 well-separated classes; chance is 25 %

    # Predicting the test files one by one gets the figures `eecnn test` reported on the same images.
    files = sorted((image_folder / "test").glob("*/*.jpg"))
    predictor = EarlyExitPredictor.from_checkpoint("shipped/agent.ckpt", classifier_ckpt="shipped/classifier.ckpt")
    rows = predictor.predict(files)
    accuracy = 100 * sum(row["class"] == file.parent.name for row, file in zip(rows, files)) / len(files)
    assert abs(accuracy - report["accuracy"]) < 0.01
    mean_flops = sum(row["flops"] for row in rows) / len(rows)
    assert abs(mean_flops - report["mean_flops"]) / report["full_flops"] < 1e-6


def test_a_shipped_agent_finds_its_classifier_beside_it_from_any_folder(trained_run, trained_agent, image_folder,
                                                                        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    export([str(trained_run / "checkpoints" / "last.ckpt"), "shipped/classifier.ckpt", "--half"])
    export([str(trained_agent), "shipped/agent.ckpt"])
    saved = torch.load("shipped/agent.ckpt", weights_only=True)
    saved["datamodule_hyper_parameters"]["classifier_ckpt"] = "results/classifier.ckpt"  # as in the repository root
    torch.save(saved, "shipped/agent.ckpt")
    image = next((image_folder / "test" / "cross").iterdir())
    monkeypatch.chdir(tmp_path / "shipped")  # where results/classifier.ckpt does not exist
    main(["predict", "--ckpt_path", "agent.ckpt", str(image), "--trainer.enable_progress_bar", "false"])
    assert "cross" in capsys.readouterr().out
    assert EarlyExitPredictor.from_checkpoint("agent.ckpt").predict(image)[0]["class"] == "cross"


def test_an_agent_whose_classifier_moved_is_not_taken_for_its_own_classifier(trained_agent, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the classifier's recorded path does not exist
    saved = torch.load(trained_agent, weights_only=True)
    saved["datamodule_hyper_parameters"]["classifier_ckpt"] = "gone/checkpoints/last.ckpt"  # named as the agent is
    torch.save(saved, tmp_path / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--ckpt_path", "last.ckpt", "--trainer.enable_progress_bar", "false"])
    assert "gone/checkpoints/last.ckpt does not exist" in str(exit_info.value.code)
