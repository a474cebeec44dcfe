"""Exit policies under distribution shift: an agent at its operating point and the max-softmax threshold rule
tuned to save as much on the clean validation images, measured on seeded, corrupted copies of the test split.

    python benchmarks/shift.py results/agent.ckpt --data ../shared/data/cifar10-jpeg.tar.gz \\
        --output results/agent/shift.json

The corruptions follow CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019) in spirit: five of its kinds, at its
severities 1, 3 and 5, made here from the test images at run time with fixed seeds and never written to disk.
Each copy runs once through every exit (as the exit cache does; the engine takes the same exits, which the
tests check), then each policy is read off those outputs. Per copy and policy it prints the test accuracy,
the FLOPs saved, and the share of images answered wrongly at an exit before the last: early exits are where a
misleading confidence costs accuracy. The final exit alone is the reference. ``--output`` writes the rows,
with exit shares, as JSON.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.functional import gaussian_blur

from early_exit.cache import ExitCache, run_exits
from early_exit.checkpoint import data_args, read_checkpoint
from early_exit.errors import InputError
from early_exit.evaluation import (
    ExitOutputs,
    confidence_scores,
    evaluate_exits,
    threshold_exits,
    tune_thresholds,
)
from early_exit.files import write_json
from early_exit.inference import EarlyExitPredictor


def gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    return x + sigma * torch.randn(x.shape, generator=generator)


def blur(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    return gaussian_blur(x, kernel_size=2 * round(3 * sigma) + 1, sigma=sigma)


def contrast(x: Tensor, factor: float, generator: torch.Generator) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def pixelate(x: Tensor, factor: float, generator: torch.Generator) -> Tensor:
    size = x.shape[-1]
    return F.interpolate(F.interpolate(x, size=round(size * factor), mode="area"), size=size, mode="nearest")


def jpeg(x: Tensor, quality: float, generator: torch.Generator) -> Tensor:
    images = list((x * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.stack(decode_jpeg(encode_jpeg(images, quality=int(quality)))).float() / 255


# kind -> (function of [0, 1] float images, its parameter at CIFAR-10-C's severities 1, 3 and 5)
CORRUPTIONS: dict[str, tuple[Callable[[Tensor, float, torch.Generator], Tensor], tuple[float, float, float]]] = {
    "gaussian_noise": (gaussian_noise, (0.04, 0.08, 0.10)),
    "gaussian_blur": (blur, (0.4, 0.7, 1.0)),
    "contrast": (contrast, (0.75, 0.4, 0.15)),
    "pixelate": (pixelate, (0.95, 0.85, 0.65)),
    "jpeg": (jpeg, (80, 58, 40)),
}
SEVERITIES = (1, 3, 5)


def corrupt(images: Tensor, kind: str, severity: int, seed: int = 0) -> Tensor:
    """uint8 (N, 3, H, W) ``images`` with ``kind`` at CIFAR-10-C ``severity`` 1, 3 or 5, drawn with ``seed``."""
    function, levels = CORRUPTIONS[kind]
    generator = torch.Generator().manual_seed(seed)
    corrupted = function(images.float() / 255, levels[SEVERITIES.index(severity)], generator)
    return (corrupted.clamp(0, 1) * 255).round().to(torch.uint8)


def measure(exits: Tensor, outputs: ExitOutputs, costs: Tensor, full_flops: float) -> dict:
    """``evaluate_exits`` and the share (%) of images answered wrongly at an exit before the last."""
    wrong = ~outputs.correct().gather(1, exits[:, None]).squeeze(1)
    early_wrong = 100 * (wrong & (exits < outputs.num_exits - 1)).double().mean().item()
    return evaluate_exits(exits, outputs, costs, full_flops) | {"wrong_early_pct": early_wrong}


def corrupted_mean(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per policy, the mean accuracy, FLOPs saved and wrong-early share over the corrupted copies in ``rows``."""
    corrupted = [row["policies"] for row in rows if row["corruption"] != "clean"]
    keys = ("accuracy", "flops_saved_pct", "wrong_early_pct")
    return {name: {key: sum(p[name][key] for p in corrupted) / len(corrupted) for key in keys}
            for name in corrupted[0]} if corrupted else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("agent", help="an exit agent checkpoint (its classifier beside it, or where it recorded)")
    parser.add_argument("--data", help="the data_dir to read, if not the one the classifier recorded")
    parser.add_argument("--target", type=float,
                        help="the agent's FLOPs-saving target on validation (%%), if not the one it records")
    parser.add_argument("--kinds", nargs="+", default=list(CORRUPTIONS), choices=list(CORRUPTIONS))
    parser.add_argument("--severities", type=int, nargs="+", default=list(SEVERITIES), choices=SEVERITIES)
    parser.add_argument("--cache-dir", default="logs/exit_cache")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    try:
        agent = EarlyExitPredictor.from_checkpoint(args.agent).policy
        given = {"cache_dir": args.cache_dir} | ({"data_dir": args.data} if args.data else {})
        cache = ExitCache(**data_args(read_checkpoint(args.agent), args.agent) | given)
        cache.setup("test")
        images, labels = cache.split_images("test")
        clean = cache.outputs
        if args.target is not None:
            agent.hparams.target_flops_saved = args.target
        agent_weight = agent.operating_weight()
    except (InputError, ValueError) as err:
        sys.exit(f"shift: error: {err}")
    costs, full_flops = cache.costs, cache.full_cost
    val_saved = evaluate_exits(agent.greedy_exits(clean["val"], agent_weight), clean["val"], costs,
                               full_flops)["flops_saved_pct"]
    thresholds = tune_thresholds(confidence_scores(clean["val"].logits, "max_softmax"), clean["val"], costs,
                                 full_flops, val_saved)
    last = clean["test"].num_exits - 1
    policies = {
        "agent": lambda outputs: agent.greedy_exits(outputs, agent_weight),
        "max-softmax threshold": lambda outputs: threshold_exits(confidence_scores(outputs.logits, "max_softmax"),
                                                                 thresholds),
        "final exit alone": lambda outputs: torch.full((len(outputs.labels),), last),
    }
    copies = [("clean", 0, clean["test"])]
    copies += [(kind, severity, None) for kind in args.kinds for severity in args.severities]
    print("| corruption | severity | " + " | ".join(f"{name}: accuracy / FLOPs saved / wrong early"
                                                   for name in policies) + " |")
    print("|---|---:|" + "---:|" * len(policies))
    rows = []

    def print_row(kind: str, severity: str, results: dict[str, dict]) -> None:
        print(f"| {kind} | {severity} | " + " | ".join(
            f"{r['accuracy']:.2f} % / {r['flops_saved_pct']:.1f} % / {r['wrong_early_pct']:.2f} %"
            for r in results.values()) + " |", flush=True)

    for kind, severity, outputs in copies:
        if outputs is None:
            outputs = run_exits(cache.classifier, corrupt(images, kind, severity), labels)
        results = {name: measure(policy(outputs), outputs, costs, full_flops) for name, policy in policies.items()}
        rows.append({"corruption": kind, "severity": severity, "policies": results})
        print_row(kind, str(severity or ""), results)
    if mean := corrupted_mean(rows):
        print_row("mean of the corrupted copies", "", mean)
    if args.output:
        write_json(args.output, {"agent": args.agent, "agent_compute_weight": agent_weight,
                                 "val_flops_saved_pct": val_saved, "thresholds": thresholds.tolist(),
                                 "rows": rows, "corrupted_mean": mean})


if __name__ == "__main__":
    main()
