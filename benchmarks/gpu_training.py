"""The shipped classifier's recipe trained, timed and tested on one GPU, in one call: what a lent GPU is for.

    python benchmarks/gpu_training.py --data cifar10-jpeg.tar.gz --output $OUT/gpu-training.json

Trains `configs/cifar10.yaml` + `configs/cifar10-30ep-cutout.yaml` (30 epochs) through the same CLI as
`eecnn fit`, on whatever accelerator Lightning picks (flags after ``--`` go to the run, e.g.
``--model.compile true`` or, to try it on a CPU, ``--trainer.max_epochs 1``), then tests the last checkpoint.
Writes each epoch's training time (validation excluded), the training images/s of the median epoch, the
total wall time and each exit's test accuracy as JSON.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from early_exit.cli import EarlyExitCLI
from early_exit.engine import describe_device
from early_exit.files import write_json

ROOT = Path(__file__).resolve().parents[1]


class EpochTimer(Callback):
    """Seconds of each training epoch, from its first batch to its last (validation is not in it)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.start)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the data_dir: an image-folder copy, its .tar.gz, or data/")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as workdir:
        cli = EarlyExitCLI(args=["--config", str(ROOT / "configs" / "cifar10.yaml"),
                                 "--config", str(ROOT / "configs" / "cifar10-30ep-cutout.yaml"),
                                 "--data.data_dir", args.data, "--trainer.logger.save_dir", workdir,
                                 "--trainer.enable_progress_bar", "false", *extra], run=False)
        cli.trainer.callbacks.append(timer)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, cli.datamodule)
        wall = time.perf_counter() - start
        [metrics] = cli.trainer.test(cli.model, cli.datamodule, ckpt_path="last", verbose=False)
    exits = sorted(k for k in metrics if k.startswith("test/acc_exit"))
    train_images = len(cli.datamodule.datasets["train"])
    figures = {
        "epochs": len(timer.seconds),
        "epoch_seconds": timer.seconds,
        "train_images_per_s": train_images / statistics.median(timer.seconds),
        "fit_wall_seconds": wall,
        "test_accuracy_per_exit": [100 * metrics[k] for k in exits],
        "precision": str(cli.trainer.precision),
        "device": describe_device(cli.trainer.strategy.root_device),
        "torch": torch.__version__,
        "flags": extra,
    }
    write_json(args.output, figures)
    print(f"{figures['epochs']} epochs, median {statistics.median(timer.seconds):.1f} s "
          f"({figures['train_images_per_s']:.0f} images/s), test accuracy per exit "
          f"{' / '.join(f'{a:.2f}' for a in figures['test_accuracy_per_exit'])} % on {figures['device']}")


if __name__ == "__main__":
    main()
