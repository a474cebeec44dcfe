"""Small generated CIFAR-like data in the layouts the real data comes in."""

import contextlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["circle", "cross", "square", "stripe"]
# One colour per class plus noise: separable by a small CNN within a few epochs.
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])


def make_image_folder(root: Path, train_per_class: int = 48, test_per_class: int = 12, seed: int = 0,
                      classes: list[str] = CLASSES) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                noise = rng.integers(-40, 40, size=(32, 32, 3))
                pixels = np.clip(COLOURS[label % len(COLOURS)] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def make_archive(folder: Path, archive: Path) -> Path:
    """A .tar.gz holding ``folder``'s contents at its top level."""
    with tarfile.open(archive, "w:gz") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
    return archive


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("cifar-like"))


@pytest.fixture
def image_archive(image_folder, tmp_path) -> Path:
    return make_archive(image_folder, tmp_path / "cifar-like.tar.gz")


@pytest.fixture(scope="session")
def trained_run(image_folder, tmp_path_factory) -> Path:
    """A tiny `eecnn fit` run (2 exits, 4 classes): its log folder, holding checkpoints/last.ckpt."""
    from helpers import tiny_fit_args

    from early_exit.cli import main

    workdir = tmp_path_factory.mktemp("fit")
    with contextlib.chdir(workdir):
        main(["fit", *tiny_fit_args(image_folder)])
    return workdir / "logs" / "eecnn" / "version_0"


@pytest.fixture(scope="session")
def trained_agent(trained_run, tmp_path_factory) -> Path:
    """A tiny exit agent trained by `eecnn fit --config configs/agent.yaml` for ``trained_run``: its checkpoint."""
    from early_exit.cli import main

    workdir = tmp_path_factory.mktemp("agent")
    with contextlib.chdir(workdir):
        main(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "agent.yaml"),
              "--data.classifier_ckpt", str(trained_run / "checkpoints" / "last.ckpt"),
              "--trainer.limit_train_batches", "40", "--model.epsilon_decay_steps", "30",
              "--trainer.max_epochs", "2", "--model.target_flops_saved", "null",  # 32 images: coarse savings
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    return workdir / "logs" / "agent" / "version_0" / "checkpoints" / "last.ckpt"
