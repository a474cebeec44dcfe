"""Inference speed on the CIFAR-10 test images: the early-exit engine against the plain network, at
``--batch-size`` and at one image, beside what exiting early could buy at most.

    python benchmarks/inference_throughput.py --agent results/agent.ckpt \\
        --output results/benchmarks/inference-throughput.json

Rows, each after a warm-up, all on the same frozen weights and images in this process, the images normalised and
in the network's channels-last layout beforehand:
- engine: `EarlyExitEngine` with the agent's greedy policy; each stage runs only on the images still going,
  and one image takes the engine's one-image path;
- engine, as before this release: the same engine through its batch path, with a policy that featurises
  every exit passed at every exit (``ExitAgent.stops``): the baseline of this release's changes;
- full network: every stage and the final head;
- seed style: one image at a time, all four exits computed, then the agent's exit chosen, as the seed's
  `evaluate_model` does.

The time-ideal ratio is the full network's time over the mean time of answering each image at its exit,
from each stage's and head's time measured here (``engine.stage_seconds``): the speedup of an engine whose
only cost is its stages and heads. One-image rows time ``--single-images`` images one by one (each row a pass of
its own, as a server answering one request after another runs), and give the median and 90th percentile latency;
``--rounds`` repeats every row, interleaved, and keeps the median.
"""

import argparse
import statistics
from pathlib import Path

import torch

from early_exit.data import CIFAR10DataModule, normalize
from early_exit.engine import describe_device, images_per_second, seconds_per_image, stage_seconds, time_ideal_ratio
from early_exit.evaluation import policy_exits
from early_exit.files import write_json
from early_exit.inference import EarlyExitPredictor

ROOT = Path(__file__).resolve().parents[1]


def seed_style(predictor: EarlyExitPredictor):
    """One image: every exit's logits, then the policy picks the exit (nothing is saved by exiting)."""
    model, policy = predictor.engine.model, predictor.engine.policy

    @torch.inference_mode()
    def run(image: torch.Tensor) -> torch.Tensor:
        logits = torch.stack(model(image.contiguous(memory_format=torch.channels_last)), dim=1)
        return logits[0, policy_exits(policy, logits)[0]].argmax()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", default=str(ROOT / "results" / "agent.ckpt"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--single-images", type=int, default=2000,
                        help="images timed one at a time (the one-image rows run this many, not all 10,000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the engine runs: cpu, cuda ...")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    predictor = EarlyExitPredictor.from_checkpoint(args.agent, device=args.device)
    engine, agent = predictor.engine, predictor.policy
    weight = agent.operating_weight()
    before = type(engine)(predictor.classifier.model, lambda seen: agent.stops(seen, weight)[:, -1])
    data = CIFAR10DataModule(args.data, download=False)
    data.prepare_data()
    data.setup("test")
    # In the engine's memory layout, as a serving pipeline would decode them: no row then pays for a conversion
    images = normalize(data.datasets["test"].tensors[0].to(args.device)).contiguous(memory_format=torch.channels_last)
    singles = images[:args.single_images]
    batch = args.batch_size

    exits = torch.cat([engine(chunk).exit for chunk in images.split(batch)])
    single_exits = torch.cat([engine(image).exit for image in singles.split(1)])
    assert torch.equal(single_exits, exits[:len(singles)]), "the one-image path must take the batch path's exits"
    costs = engine.costs[exits]
    speed_rows = {
        f"early-exit engine, batch {batch}": lambda: images_per_second(engine, images, batch),
        f"early-exit engine as before, batch {batch}": lambda: images_per_second(before, images, batch),
        f"full network, batch {batch}": lambda: images_per_second(engine.full_network, images, batch),
        "seed style: 1 image, all exits, then choose": lambda: images_per_second(seed_style(predictor), singles, 1),
    }
    latency_rows = {
        "early-exit engine, 1 image": lambda: seconds_per_image(engine, singles),
        "early-exit engine as before, 1 image": lambda: seconds_per_image(before.batch, singles),
        "full network, 1 image": lambda: seconds_per_image(engine.full_network, singles),
    }
    profiles = {batch: lambda: stage_seconds(engine.model, images, batch),
                1: lambda: stage_seconds(engine.model, singles, 1)}
    speeds: dict[str, list[float]] = {name: [] for name in speed_rows}
    latencies: dict[str, list[list[float]]] = {name: [] for name in latency_rows}
    ideals: dict[int, list[float]] = {size: [] for size in profiles}
    for _ in range(args.rounds):
        for name, measure in speed_rows.items():
            speeds[name].append(measure())
        for name, measure in latency_rows.items():
            latencies[name].append(measure())
        for size, measure in profiles.items():
            ideals[size].append(time_ideal_ratio(*measure(), exits if size == batch else exits[:len(singles)]))

    def mean_seconds(name: str) -> float:
        return statistics.median(statistics.mean(times) for times in latencies[name])

    rows = {name: statistics.median(values) for name, values in speeds.items()}
    rows |= {name: 1 / mean_seconds(name) for name in latency_rows}
    pooled = {name: [t for times in rounds for t in times] for name, rounds in latencies.items()}
    percentiles = {name: {"median_ms": 1e3 * statistics.median(times),
                          "p90_ms": 1e3 * statistics.quantiles(times, n=10)[-1]} for name, times in pooled.items()}
    speedup = {f"batch {batch}": rows[f"early-exit engine, batch {batch}"] / rows[f"full network, batch {batch}"],
               "1 image": rows["early-exit engine, 1 image"] / rows["full network, 1 image"]}
    ideal = {f"batch {batch}": statistics.median(ideals[batch]), "1 image": statistics.median(ideals[1])}
    figures = {
        "images_per_s": rows,
        "latency": percentiles,
        "engine_speedup_over_full_network": speedup,
        "time_ideal_ratio": ideal,
        "speedup_share_of_time_ideal": {key: speedup[key] / ideal[key] for key in speedup},
        "flops_ratio": engine.full_flops / costs.double().mean().item(),
        "flops_saved_pct": 100 * (1 - costs.double().mean().item() / engine.full_flops),
        "exit_distribution": (torch.bincount(exits, minlength=4).double() / len(exits)).tolist(),
        "test_images": len(images),
        "single_image_rows_images": len(singles),
        "rounds": args.rounds,
        "device": describe_device(next(engine.model.parameters()).device),
        "torch": torch.__version__,
        "agent": args.agent,
    }
    width = max(map(len, rows)) + 2
    full = {name: rows[f"full network, {'1 image' if '1 image' in name else f'batch {batch}'}"] for name in rows}
    print(f"\n{'inference on the CIFAR-10 test images':<{width}}{'images/s':>10}{'vs full':>10}"
          f"{'median ms':>11}{'p90 ms':>9}")
    print("-" * (width + 40))
    for name, speed in rows.items():
        latency = percentiles.get(name)
        times = f"{latency['median_ms']:>11.2f}{latency['p90_ms']:>9.2f}" if latency else ""
        print(f"{name:<{width}}{speed:>10.0f}{speed / full[name]:>9.2f}x{times}")
    for key, gain in speedup.items():
        print(f"{key}: engine {gain:.2f}x the full network, time-ideal {ideal[key]:.2f}x "
              f"({100 * gain / ideal[key]:.0f} % of it)")
    print(f"FLOPs ratio {figures['flops_ratio']:.2f}x ({figures['flops_saved_pct']:.1f} % of FLOPs saved); "
          f"{figures['device']}")
    if args.output:
        write_json(args.output, figures)


if __name__ == "__main__":
    main()
