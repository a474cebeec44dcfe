"""Shared helpers: the tiny model and data settings the CLI tests train with, the CLI's one-line errors, and
TensorBoard reading."""

from pathlib import Path

import pytest

from early_exit.cli import main
from early_exit.curves import read_scalars


def tiny_fit_args(data_dir: Path, epochs: int = 5) -> list[str]:
    return [
        "--data.data_dir", str(data_dir), "--data.download", "false", "--data.val_size", "32",
        "--data.batch_size", "32",
        "--model.num_classes", "4", "--model.num_stages", "2", "--model.width", "0.125",
        "--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "0.01",
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.log_every_n_steps", "1",
    ]


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar tag in a run's TensorBoard event files, with its values in step order."""
    return {tag: values for tag, (_, values) in read_scalars(run_dir).items()}


def error_of(args: list[str]) -> str:
    """The one-line error `eecnn ARGS` exits with."""
    with pytest.raises(SystemExit) as exit:
        main(args)
    message = str(exit.value.code)
    assert message.startswith("eecnn: error: ") and "\n" not in message
    return message
