"""Training-batch throughput of the data module's loader: one index per batch against a per-sample DataLoader.

    python benchmarks/loader_throughput.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --output results/benchmarks/loader-throughput.json

One epoch of the 45,000 training images at ``--batch-size``, shuffled, on the CPU, in this process:
- per-sample DataLoader: ``DataLoader(TensorDataset, shuffle=True)``, what the data module used before
  this release: a Python call per image, then collation;
- one index per batch: ``TensorBatches``, what the data module hands out now;
each alone and followed by the batched training augmentation (crop, flip, normalisation, cutout 8).
``--rounds`` repeats every row, interleaved, and keeps the median.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from early_exit.data import CIFAR10DataModule, TensorBatches, augment
from early_exit.engine import describe_device, synchronize
from early_exit.files import write_json

ROOT = Path(__file__).resolve().parents[1]


def images_per_second(loader, augmented: bool) -> float:
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        if augmented:
            augment(images, 4, True, 8)
        seen += len(images)
    synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the images are held and augmented: cpu, cuda ...")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    data = CIFAR10DataModule(args.data, download=False)
    data.prepare_data()
    data.setup("fit")
    train = TensorDataset(*(t.to(args.device) for t in data.datasets["train"].tensors))
    loaders = {"per-sample DataLoader": lambda: DataLoader(train, batch_size=args.batch_size, shuffle=True),
               "one index per batch": lambda: TensorBatches(train, args.batch_size, shuffle=True)}
    rows = {f"{name}{', with augmentation' if augmented else ''}": (make, augmented)
            for augmented in (False, True) for name, make in loaders.items()}
    speeds: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, (make, augmented) in rows.items():
            speeds[name].append(images_per_second(make(), augmented))
    result = {name: statistics.median(values) for name, values in speeds.items()}
    figures = {"images_per_s": result, "speedup_alone": result["one index per batch"] / result["per-sample DataLoader"],
               "batch_size": args.batch_size, "images": len(train), "rounds": args.rounds,
               "device": describe_device(torch.device(args.device)), "torch": torch.__version__}
    width = max(map(len, result)) + 2
    print(f"\n{'training batches, one epoch':<{width}}{'images/s':>12}")
    for name, speed in result.items():
        print(f"{name:<{width}}{speed:>12,.0f}")
    print(f"one index per batch: {figures['speedup_alone']:.1f}x the per-sample DataLoader; {figures['device']}")
    if args.output:
        write_json(args.output, figures)


if __name__ == "__main__":
    main()
