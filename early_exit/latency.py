"""Latency profiles: the seconds each stage and exit head of a classifier take per image, at one batch size on
one device, measured once and saved, so that an exit agent can trade accuracy against time instead of FLOPs.

    eecnn-latency results/classifier.ckpt latency.json --batch-size 1
    eecnn fit --config configs/agent.yaml --data.classifier_ckpt results/classifier.ckpt --data.costs latency.json

A CNN's time does not depend on what its images show, so the profile times random images.
"""

import argparse
import sys
from pathlib import Path

import torch

from early_exit.cache import load_classifier
from early_exit.engine import describe_device, inference_copy, latency_costs, stage_seconds
from early_exit.errors import InputError
from early_exit.evaluation import path_flops
from early_exit.files import write_json


def measure_profile(classifier_ckpt: str, batch_size: int, device: str, images: int, seed: int = 0) -> dict:
    """The profile of the classifier at ``classifier_ckpt`` as the engine runs it (``engine.stage_seconds``)."""
    classifier, _, _ = load_classifier(classifier_ckpt, option="CLASSIFIER_CKPT")
    model = inference_copy(classifier.model).to(device)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(max(images, batch_size), 3, 32, 32, generator=generator)
    stages, heads = stage_seconds(model, inputs, batch_size)
    path, full = latency_costs(stages, heads)
    flops = path_flops(model) / float(model.exit_flops[-1])  # as the engine spends them, heads passed included
    return {"stage_seconds": stages, "head_seconds": heads, "exit_seconds": path.tolist(), "full_seconds": full,
            "flops_share": flops.tolist(),
            "batch_size": batch_size, "images": len(inputs), "device": describe_device(torch.device(device)),
            "torch": torch.__version__, "classifier_ckpt": str(classifier_ckpt)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eecnn-latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("classifier_ckpt", help="an EarlyExitClassifier checkpoint")
    parser.add_argument("output", type=Path, help="the profile to write (.json)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per engine call it is measured at")
    parser.add_argument("--device", default="cpu", help="where it is measured: cpu, cuda, cuda:1 ...")
    parser.add_argument("--images", type=int, default=1000, help="how many images are timed")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1 or args.images < 1:
            raise InputError("--batch-size and --images must be at least 1")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: no CUDA device here")
        profile = measure_profile(args.classifier_ckpt, args.batch_size, args.device, args.images)
    except InputError as err:
        sys.exit(f"eecnn-latency: error: {err}")
    write_json(args.output, profile)
    path = " / ".join(f"{1e3 * s:.3f}" for s in profile["exit_seconds"])
    print(f"answering at exit 1..{len(profile['exit_seconds'])}: {path} ms per image at batch {args.batch_size} "
          f"({profile['device']}); wrote {args.output}")


if __name__ == "__main__":
    main()
