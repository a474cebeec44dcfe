"""The teacher: a residual network trained through `eecnn fit`, whose cached predictions every exit distils."""

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import error_of, scalars, tiny_fit_args

from early_exit.cache import ExitCache
from early_exit.classifier import EarlyExitClassifier
from early_exit.cli import main
from early_exit.data import CIFAR10DataModule
from early_exit.errors import InputError
from early_exit.export import export_checkpoint
from early_exit.teacher import ResidualNet, TeacherClassifier, load_teacher, teacher_log_probs

CONFIGS = Path(__file__).parents[1] / "configs"


def teacher_args(data_dir: Path) -> list[str]:
    """The tiny settings, less the early-exit CNN's, with the teacher's config on top."""
    args = tiny_fit_args(data_dir, epochs=3)
    start = args.index("--model.num_stages")
    del args[start:start + 4]  # --model.num_stages 2 --model.width 0.125
    return ["--config", str(CONFIGS / "teacher.yaml"), *args, "--model.width", "0.125"]


@pytest.fixture(scope="module")
def teacher(image_folder, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("teacher")
    with contextlib.chdir(workdir):
        main(["fit", *teacher_args(image_folder)])
    return workdir / "logs" / "teacher" / "version_0"


def test_the_teacher_trains_through_eecnn_fit_and_logs_its_mirrored_accuracy(teacher):
    logged = scalars(teacher)
    assert logged["train/loss_epoch"][-1] < logged["train/loss_epoch"][0]
    assert logged["val/acc"][-1] >= 0.5  # four colours: a trained network tells them apart
    assert {"val/acc_flip", "val/ece"} <= logged.keys()


def test_teacher_predictions_average_each_image_with_its_mirror_and_the_teachers(teacher, trained_run):
    paths = [str(teacher / "checkpoints" / "last.ckpt"), str(trained_run / "checkpoints" / "last.ckpt")]
    images = torch.randn(6, 3, 32, 32)
    networks = [load_teacher(path) for path in paths]
    both = teacher_log_probs(networks, images)
    assert both.shape == (6, 4)
    assert torch.allclose(both.exp().sum(-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(both, teacher_log_probs(networks, images.flip(-1)), atol=1e-5)
    alone = [teacher_log_probs([network], images).exp() for network in networks]
    assert torch.allclose(both.exp(), (alone[0] + alone[1]) / 2, atol=1e-5)  # the ensemble: mean probabilities


def test_a_student_distils_the_cached_teacher_into_every_exit(teacher, image_folder, tmp_path):
    ckpt = str(teacher / "checkpoints" / "last.ckpt")
    args = ["fit", *tiny_fit_args(image_folder, epochs=1), "--data.teacher_ckpts", f"[{ckpt}]",
            "--model.distillation_weight", "0.5"]
    with contextlib.chdir(tmp_path):
        main(args)
        cached = list((tmp_path / "logs" / "teacher_cache").glob("teacher-*.pt"))
        assert len(cached) == 1
        stamp = cached[0].stat().st_mtime_ns
        main(args)  # a second run reads the cache instead of running the teacher again
        assert cached[0].stat().st_mtime_ns == stamp
    data = CIFAR10DataModule(str(image_folder), download=False, val_size=32, teacher_ckpts=[ckpt],
                             teacher_cache_dir=str(tmp_path / "logs" / "teacher_cache"))
    data.setup("fit")
    _, labels, log_probs = data.datasets["train"].tensors
    assert log_probs.shape == (len(labels), 4)
    assert torch.equal(log_probs, torch.load(cached[0], weights_only=True))


def test_a_distilled_classifier_serves_agents_and_ships_without_its_teacher(teacher, image_folder, tmp_path):
    ckpt = tmp_path / "teacher.ckpt"
    shutil.copy(teacher / "checkpoints" / "last.ckpt", ckpt)
    with contextlib.chdir(tmp_path):
        main(["fit", *tiny_fit_args(image_folder, epochs=1), "--data.teacher_ckpts", f"[{ckpt}]",
              "--model.distillation_weight", "0.5"])
    ckpt.unlink()  # another machine: the teacher stayed where the classifier was trained
    student = tmp_path / "logs" / "eecnn" / "version_0" / "checkpoints" / "last.ckpt"
    cache = ExitCache(str(student), data_dir=str(image_folder), val_size=32, cache_dir=str(tmp_path / "cache"))
    cache.setup("fit")
    assert cache.outputs["val"].logits.shape[:2] == (32, 2)
    shipped = export_checkpoint(student, tmp_path / "classifier.ckpt", half=True)
    recorded = torch.load(shipped, weights_only=True)["datamodule_hyper_parameters"]
    assert recorded["val_size"] == 32 and not {"teacher_ckpts", "teacher_cache_dir"} & recorded.keys()


def test_with_a_teacher_every_exit_learns_from_it_and_the_final_exit_teaches_none():
    model = EarlyExitClassifier(num_classes=4, num_stages=2, width=0.125, distillation_weight=1.0)
    teacher = torch.randn(3, 4).log_softmax(-1)
    final = teacher.clone().requires_grad_()  # agrees with the teacher: nothing to learn
    early = (-teacher).requires_grad_()
    losses = model.exit_losses([early, final], torch.tensor([0, 1, 2]), teacher)
    assert losses[1].abs() < 1e-5 < losses[0]
    losses[0].backward()
    assert final.grad is None or not final.grad.any()  # the early exit learns from the teacher, not the final exit


def test_a_missing_teacher_or_a_zero_weight_is_a_one_line_error(teacher, image_folder, trained_agent, tmp_path):
    ckpt = str(teacher / "checkpoints" / "last.ckpt")
    cases = (("[missing.ckpt]", "0.5", "missing.ckpt does not exist: check --data.teacher_ckpts"),
             (f"[{ckpt}]", "0", "--model.distillation_weight is 0"))
    for teachers, weight, error in cases:
        with contextlib.chdir(tmp_path):
            message = error_of(["fit", *tiny_fit_args(image_folder, epochs=1), "--data.teacher_ckpts", teachers,
                                 "--model.distillation_weight", weight])
        assert error in message
    with pytest.raises(InputError, match="not a classifier that can teach"):
        load_teacher(trained_agent)


def test_the_residual_network_halves_the_map_three_times_and_scales_its_logits():
    network = ResidualNet(num_classes=10, width=0.25).eval()
    logits = network(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert logits.abs().max() < 5  # scaled by 1/8: a network at random starts unsure


def test_the_teacher_benchmark_sets_each_teacher_and_their_ensemble_beside_the_reference(teacher, trained_run,
                                                                                       image_folder, tmp_path):
    ckpt, reference = str(teacher / "checkpoints" / "last.ckpt"), str(trained_run / "checkpoints" / "last.ckpt")
    output = tmp_path / "teacher.json"
    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "teacher.py"), ckpt, reference,
                    "--data", str(image_folder), "--val-size", "32", "--reference", reference, "--output",
                    str(output)], check=True, capture_output=True, text=True)
    figures = json.loads(output.read_text())
    for split in ("val", "test"):
        rows = figures[split]
        assert set(rows) == {ckpt, reference, f"ensemble of {ckpt}, {reference}"}
        assert rows[f"ensemble of {ckpt}, {reference}"]["plain"] is None
        assert all(0 <= row["taught"] <= 100 for row in rows.values())


def test_the_teacher_predicts_each_image_class_and_confidence():
    model = TeacherClassifier(num_classes=4, width=0.125).eval()
    images = torch.randn(5, 3, 32, 32)
    out = model.predict_step((images, torch.zeros(5)), 0)
    probs = model(images).softmax(-1)
    assert torch.equal(out["prediction"], probs.argmax(-1))
    assert torch.allclose(out["confidence"], probs.max(-1).values)
