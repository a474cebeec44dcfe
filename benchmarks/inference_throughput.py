"""Inference throughput on the CIFAR-10 test images: the early-exit engine against the plain network and
against a loop in the seed's style.

    python benchmarks/inference_throughput.py --agent results/agent.ckpt \\
        --output results/benchmarks/inference-throughput.json

- engine: batches of ``--batch-size`` through `EarlyExitEngine` with the agent; each stage runs only on
  the images still going;
- full network: the same batches through every stage and the final head;
- seed style: one image at a time, all four exits computed, then the agent's exit chosen, as the seed's
  `evaluate_model` does;
- engine, one image at a time: separates what batching buys from what exiting early buys.

All run the same frozen weights on the same images in this process; each after a warm-up.
"""

import argparse
from pathlib import Path

import torch

from early_exit.data import CIFAR10DataModule, normalize
from early_exit.engine import images_per_second
from early_exit.evaluation import policy_exits
from early_exit.files import write_json
from early_exit.inference import EarlyExitPredictor
from early_exit.report import describe_device

ROOT = Path(__file__).resolve().parents[1]


def seed_style(predictor: EarlyExitPredictor):
    """One image: every exit's logits, then the policy picks the exit (nothing is saved by exiting)."""
    model, agent = predictor.engine.model, predictor.policy

    @torch.inference_mode()
    def run(image: torch.Tensor) -> torch.Tensor:
        logits = torch.stack(model(image.contiguous(memory_format=torch.channels_last)), dim=1)
        return logits[0, policy_exits(agent, logits)[0]].argmax()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", default=str(ROOT / "results" / "agent.ckpt"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--single-images", type=int, default=2000,
                        help="images timed one at a time (the one-image rows run this many, not all 10,000)")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    predictor = EarlyExitPredictor.from_checkpoint(args.agent)
    engine = predictor.engine
    data = CIFAR10DataModule(args.data, download=False)
    data.prepare_data()
    data.setup("test")
    images = normalize(data.datasets["test"].tensors[0])
    singles = images[:args.single_images]

    mean_flops = torch.cat([engine(batch).flops for batch in images.split(args.batch_size)]).double().mean().item()
    rows = {
        f"early-exit engine, batch {args.batch_size}": images_per_second(engine, images, args.batch_size),
        f"full network, batch {args.batch_size}": images_per_second(engine.full_network, images, args.batch_size),
        "seed style: 1 image, all exits, then choose": images_per_second(seed_style(predictor), singles, 1),
        "early-exit engine, 1 image": images_per_second(engine, singles, 1),
    }
    full = rows[f"full network, batch {args.batch_size}"]
    figures = {
        "images_per_s": rows,
        "engine_speedup_over_full_network": rows[f"early-exit engine, batch {args.batch_size}"] / full,
        "flops_ratio": engine.full_flops / mean_flops,
        "flops_saved_pct": 100 * (1 - mean_flops / engine.full_flops),
        "test_images": len(images),
        "single_image_rows_images": len(singles),
        "device": describe_device(next(engine.model.parameters()).device),
        "torch": torch.__version__,
        "agent": args.agent,
    }
    width = max(map(len, rows)) + 2
    print(f"\n{'inference on the CIFAR-10 test images':<{width}}{'images/s':>10}{'vs full':>10}")
    print("-" * (width + 20))
    for name, speed in rows.items():
        print(f"{name:<{width}}{speed:>10.0f}{speed / full:>9.2f}x")
    print(f"\nengine speedup {figures['engine_speedup_over_full_network']:.2f}x for a FLOPs ratio of "
          f"{figures['flops_ratio']:.2f}x ({figures['flops_saved_pct']:.1f} % of FLOPs saved); {figures['device']}")
    if args.output:
        write_json(args.output, figures)


if __name__ == "__main__":
    main()
