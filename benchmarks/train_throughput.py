"""Training throughput of `eecnn fit` and the share of step time spent waiting for data.

Builds the trainer exactly as `eecnn fit --config configs/cifar10.yaml` does (same CLI, config and
defaults), then times the training steps after a warm-up:

    python benchmarks/train_throughput.py --data ../shared/data/cifar10-jpeg.tar.gz

"Waiting for data" is the gap between the end of one training step and the start of the next: the
DataLoader fetch, the device transfer and the batched augmentation, plus Lightning's loop overhead.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from early_exit.cli import EarlyExitCLI, default_precision

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


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default=default_precision())
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
                "--checkpoint.save_last", "false",
            ],
            run=False,
        )
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)

    steps = timer.step_times[args.warmup:]
    waits = timer.wait_times[max(0, args.warmup - 1):]  # wait_times[i] is the gap before step i + 1
    busy, waiting = sum(steps), sum(waits)
    figures = {
        "images_per_s": args.batch_size * len(steps) / (busy + waiting),
        "data_wait_pct": 100 * waiting / (busy + waiting),
        "batch_size": args.batch_size,
        "timed_steps": len(steps),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "torch": torch.__version__,
    }
    print(f"\n{'eecnn fit, full model':<34}{'value':>14}")
    print("-" * 48)
    for key, value in figures.items():
        print(f"{key:<34}{value:>14.1f}" if isinstance(value, float) else f"{key:<34}{value!s:>14}")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
