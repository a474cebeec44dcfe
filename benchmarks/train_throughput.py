"""Training throughput of `eecnn fit` against a bare PyTorch loop on the same model, data and precision.

Builds the trainer exactly as `eecnn fit --config configs/cifar10.yaml` does (same CLI, config and
defaults) and times its training steps after a warm-up; then runs a plain loop over a fresh copy of
the same model, with the same DataLoader, batched augmentation, optimiser, schedule and precision:

    python benchmarks/train_throughput.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --output results/benchmarks/train-throughput.json

"Waiting for data" is the gap between the end of one training step and the start of the next: the
DataLoader fetch, the device transfer and the batched augmentation, plus Lightning's loop overhead.
The difference between the two images/s figures is what Lightning costs.
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from early_exit.cli import EarlyExitCLI, default_precision
from early_exit.data import augment
from early_exit.engine import describe_device
from early_exit.files import write_json

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(Callback):
    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.wait_times: list[float] = []
        self._start = self._end = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()
        if self._end is not None:
            self.wait_times.append(self._start - self._end)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._end = time.perf_counter()
        self.step_times.append(self._end - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default=default_precision())
    parser.add_argument("--compile", action="store_true", help="train with --model.compile true (the bare loop: not)")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI below gets its arguments from args=, not from this script's flags

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as workdir:
        cli = EarlyExitCLI(
            args=[
                "--config", str(ROOT / "configs" / "cifar10.yaml"),
                "--data.data_dir", args.data,
                "--data.batch_size", str(args.batch_size),
                "--trainer.precision", args.precision,
                "--trainer.max_steps", str(args.warmup + args.steps),
                "--trainer.limit_val_batches", "0",
                "--trainer.num_sanity_val_steps", "0",
                "--trainer.logger.save_dir", workdir,
                "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", workdir,
                "--checkpoint.monitor", "null",
                "--last_checkpoint.save_top_k", "0",
                "--model.compile", str(args.compile).lower(),
            ],
            run=False,
        )
        fresh_model = copy.deepcopy(cli.model)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
    bare_step_times = bare_loop(fresh_model, cli.datamodule, args.precision, args.warmup + args.steps)

    steps = timer.step_times[args.warmup:]
    waits = timer.wait_times[max(0, args.warmup - 1):]  # wait_times[i] is the gap before step i + 1
    busy, waiting = sum(steps), sum(waits)
    # Medians, not means: on a shared 2-core machine one slow step from elsewhere would swing a mean.
    fit_speed = args.batch_size / statistics.median(s + w for s, w in zip(steps, waits))
    bare_speed = args.batch_size / statistics.median(bare_step_times[args.warmup:])
    figures = {
        "fit_images_per_s": fit_speed,
        "bare_loop_images_per_s": bare_speed,
        "lightning_overhead_pct": 100 * (bare_speed / fit_speed - 1),
        "fit_data_wait_pct": 100 * waiting / (busy + waiting),
        "batch_size": args.batch_size,
        "timed_steps": len(steps),
        "precision": args.precision,
        "compile": args.compile,
        "device": describe_device(torch.device("cpu")),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "torch": torch.__version__,
    }
    print(f"\n{'training, full model':<34}{'value':>14}")
    print("-" * 48)
    for key, value in figures.items():
        print(f"{key:<34}{value:>14.1f}" if isinstance(value, float) else f"{key:<34}{value!s:>14}")
    if args.output:
        write_json(args.output, figures)


def bare_loop(model, datamodule, precision: str, steps: int) -> list[float]:
    """Seconds per training step (data fetch included) of a plain PyTorch loop doing what `eecnn fit` does
    per step: augment, normalise, forward all exits, the weighted exit loss, backward, step, schedule."""
    optimizer = model.optimizer(model.parameters())
    peak = [group["lr"] for group in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=steps,
                                                    pct_start=model.hparams.warmup_fraction)
    hp = datamodule.hparams
    bf16 = precision.startswith("bf16")
    model.train()
    times, batches = [], iter(datamodule.train_dataloader())
    for _ in range(steps):
        start = time.perf_counter()
        images, labels = next(batches)
        images = augment(images, hp.crop_padding, bool(hp.horizontal_flip), hp.cutout)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = model.exit_losses(model(images), labels)
        loss = (model.current_exit_weights() * losses).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
