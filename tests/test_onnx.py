"""The ONNX export: onnxruntime answers as the early-exit engine does, skips the stages the engine skips, and runs
the README's example."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from early_exit import EarlyExitCNN, EarlyExitPredictor
from early_exit.cache import load_classifier
from early_exit.data import normalize, read_image_files
from early_exit.engine import EarlyExitEngine
from early_exit.evaluation import ThresholdPolicy, confidence_scores
from early_exit.export import EarlyExitGraph, export_onnx
from early_exit.export import main as export

README = Path(__file__).parents[1] / "README.md"


def run(session: ort.InferenceSession, images: torch.Tensor) -> dict[str, np.ndarray]:
    return dict(zip(("label", "confidence", "exit", "flops"), session.run(None, {"images": images.numpy()})))


def one_by_one(session: ort.InferenceSession, images: torch.Tensor) -> dict[str, np.ndarray]:
    answers = [run(session, image) for image in images.split(1)]
    return {name: np.concatenate([a[name] for a in answers]) for name in answers[0]}


def assert_answers_like(answers: dict[str, np.ndarray], engine: EarlyExitEngine, images: torch.Tensor) -> None:
    expected = engine(normalize(images))
    np.testing.assert_array_equal(answers["label"], expected.prediction.numpy())
    np.testing.assert_array_equal(answers["exit"], expected.exit.numpy() + 1)  # 1-based, as `eecnn predict` prints
    np.testing.assert_array_equal(answers["flops"], expected.flops.numpy())
    np.testing.assert_allclose(answers["confidence"], expected.confidence.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def four_exits(tmp_path_factory) -> tuple[Path, EarlyExitEngine, torch.Tensor]:
    """A small four-stage CNN with a max-softmax rule whose thresholds stop about a quarter of ``images`` at each
    exit, exported: its file, the engine with the same rule, and the images."""
    torch.manual_seed(0)
    model = EarlyExitCNN(num_classes=10, width=0.125).eval()
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        scores = confidence_scores(torch.stack(model(normalize(images)), dim=1), "max_softmax")
    thresholds = [scores[:, k].quantile(1 - 1 / (4 - k)).item() for k in range(3)]
    policy = ThresholdPolicy(thresholds)
    path = export_onnx(EarlyExitGraph(model, policy), tmp_path_factory.mktemp("onnx") / "four.onnx", ["x"] * 10, {})
    return path, EarlyExitEngine(model, policy), images


def test_onnxruntime_takes_the_engines_exits_one_image_at_a_time_and_in_batches(four_exits):
    path, engine, images = four_exits
    session = ort.InferenceSession(path)
    answers = run(session, images)
    assert set(answers["exit"].tolist()) == {1, 2, 3, 4}
    assert_answers_like(answers, engine, images)
    assert_answers_like(one_by_one(session, images), engine, images)
    assert len(run(session, images[:0])["label"]) == 0


def test_stages_after_an_images_exit_run_on_nothing(four_exits, tmp_path):
    path, _, images = four_exits
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "profile")
    session = ort.InferenceSession(path, options)
    exits = [int(run(session, image)["exit"][0]) for image in images[:12].split(1)]
    events = json.loads(Path(session.end_profiling()).read_text())
    conv_batches = [event["args"]["input_type_shape"][0]["float"][0] for event in events
                    if event.get("cat") == "Node" and event["args"].get("op_name") == "Conv"]
    per_image = np.array(conv_batches[len(conv_batches) - 8 * len(exits):]).reshape(len(exits), 8)  # 2 per stage
    assert (per_image.sum(1) == 2 * np.array(exits)).all()  # the convs of the stages up to the exit, once each
    assert len(set(exits)) > 1


def test_an_exported_agent_answers_as_eecnn_predict(trained_agent, trained_run, image_folder, tmp_path, capsys):
    target = tmp_path / "agent.onnx"
    classifier = trained_run / "checkpoints" / "last.ckpt"
    export(["--format", "onnx", str(trained_agent), str(target), "--classifier-ckpt", str(classifier)])
    assert "exit agent at compute weight 0.5" in capsys.readouterr().out  # the weight it recorded
    session = ort.InferenceSession(target)
    files, images, _ = read_image_files([str(image_folder / "test")])
    predictor = EarlyExitPredictor.from_checkpoint(trained_agent, classifier_ckpt=classifier)
    answers = run(session, images)
    assert_answers_like(answers, predictor.engine, images)
    assert_answers_like(one_by_one(session, images), predictor.engine, images)
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    assert [classes[label] for label in answers["label"]] == [row["class"] for row in predictor.predict(files)]


def test_a_classifier_exports_with_a_threshold_rule_tuned_on_validation(trained_run, image_folder, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    export(["--format", "onnx", str(trained_run / "checkpoints" / "last.ckpt"), "rule.onnx", "--policy", "max_softmax",
            "--target-flops-saved", "30", "--data-dir", str(image_folder)])
    thresholds = json.loads(re.search(r"max_softmax >= (\[.*?\])", capsys.readouterr().out).group(1))
    session = ort.InferenceSession("rule.onnx")
    assert thresholds == json.loads(re.search(r"(\[.*?\])", session.get_modelmeta().custom_metadata_map["policy"])
                                    .group(1))
    _, images, _ = read_image_files([str(image_folder / "test")])
    model = load_classifier(trained_run / "checkpoints" / "last.ckpt")[0].model
    expected = EarlyExitEngine(model, ThresholdPolicy(thresholds))(normalize(images))
    answers = run(session, images)
    np.testing.assert_array_equal(answers["exit"], expected.exit.numpy() + 1)
    np.testing.assert_array_equal(answers["label"], expected.prediction.numpy())


@pytest.mark.parametrize("args, error", [
    (["{classifier}", "x.onnx", "--format", "onnx"], "pass --target-flops-saved"),
    (["{agent}", "x.ckpt", "--policy", "entropy"], "only --format onnx takes --policy"),
    (["{agent}", "x.pt", "--format", "onnx"], "should end in .onnx"),
    (["{agent}", "x.onnx", "--format", "onnx", "--policy", "entropy"], "is an exit agent"),
    (["{classifier}", "x.onnx", "--format", "onnx", "--compute-weight", "0.2"], "is a classifier"),
    (["{agent}", "x.onnx", "--format", "onnx", "--half"], "drop it with --format onnx"),
])
def test_export_refuses_options_that_do_not_fit_in_one_line(args, error, trained_run, trained_agent, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = {"classifier": trained_run / "checkpoints" / "last.ckpt", "agent": trained_agent}
    with pytest.raises(SystemExit) as exit_info:
        export([arg.format(**paths) for arg in args])
    message = str(exit_info.value.code)
    assert message.startswith("eecnn-export: error: ") and error in message and "\n" not in message
    assert not list(tmp_path.iterdir())  # nothing written, not even a partial file


def test_the_readme_example_prints_every_images_class_and_exit(trained_agent, trained_run, image_folder, tmp_path):
    example = re.search(r"## Deploy with ONNX.*?```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    assert len([line for line in example.splitlines() if line.strip()]) <= 10
    (tmp_path / "example.py").write_text(example)
    export(["--format", "onnx", str(trained_agent), str(tmp_path / "eecnn.onnx"),
            "--classifier-ckpt", str(trained_run / "checkpoints" / "last.ckpt")])
    files = sorted(str(file) for file in image_folder.glob("test/*/*.jpg"))[::6]
    out = subprocess.run([sys.executable, "example.py", *files], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    predictor = EarlyExitPredictor.from_checkpoint(trained_agent, trained_run / "checkpoints" / "last.ckpt")
    assert [(line.split(":")[0], line.split()[1]) for line in out] == \
        [(row["file"], row["class"]) for row in predictor.predict(files)]


def test_another_operating_point_exports_as_the_predictor_takes_it(trained_agent, trained_run, image_folder, tmp_path,
                                                                  capsys):
    classifier = trained_run / "checkpoints" / "last.ckpt"
    export(["--format", "onnx", str(trained_agent), str(tmp_path / "a.onnx"), "--classifier-ckpt", str(classifier),
            "--model.compute_weight", "-0.25"])
    assert "exit agent at compute weight -0.25" in capsys.readouterr().out
    predictor = EarlyExitPredictor.from_checkpoint(trained_agent, classifier, compute_weight=-0.25)
    assert predictor.policy.operating_weight() == -0.25
    _, images, _ = read_image_files([str(image_folder / "test")])
    assert_answers_like(run(ort.InferenceSession(tmp_path / "a.onnx"), images), predictor.engine, images)
