"""Brief training on the real CIFAR-10 copy, when ../shared holds it."""

from pathlib import Path

import lightning as L
import pytest

from early_exit import CIFAR10DataModule, EarlyExitClassifier

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"no CIFAR-10 copy at {ARCHIVE}")
def test_trains_on_a_slice_of_the_real_archive():
    L.seed_everything(0)
    data = CIFAR10DataModule(str(ARCHIVE), download=False, batch_size=64)
    model = EarlyExitClassifier(width=0.25, stage_dropout=[0] * 4, head_dropout=[0] * 4,
                                exit_weights=[1, 1, 1, 1], label_smoothing=0.1)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=80, limit_val_batches=10, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, data)
    assert data.classes == CIFAR10_CLASSES
    assert (len(data.datasets["train"]), len(data.datasets["val"])) == (45_000, 5_000)
    metrics = trainer.validate(model, data, verbose=False)[0]
    assert metrics["val/acc"] > 0.15 and metrics["val/acc_exit1"] > 0.15  # 80 steps in: above chance (0.10)
