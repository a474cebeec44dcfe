"""The exported ONNX models in onnxruntime on the CIFAR-10 test images: latency at one image and throughput in
batches of the early-exit models against the exported full network, and agreement with eecnn's engine.

    python benchmarks/onnx_latency.py --agent results/agent.ckpt --data ../shared/data/cifar10-jpeg.tar.gz \\
        --output results/benchmarks/onnx-latency.json

Three models, written by `eecnn-export --format onnx` as a user would: the agent and its classifier at the agent's
operating point; the classifier with the max-softmax rule tuned on validation to save ``--target`` % of FLOPs
(it answers at exit 1 too, which the shipped agent never does); and the full network (every stage, the final exit
only). One image at a time, each model answers every one of ``--images`` test images, one after another as a
server answering requests does, the models taking turns every 250 images; ``--rounds`` repeats this, and each
image keeps its median time. The speedup is the mean time of the full network over the model's, beside the FLOPs
ratio (the full network's FLOPs over the model's mean FLOPs on the same images). Each of ``--threads`` measures
everything again with that many intra-op threads per session; 0 is onnxruntime's default, a thread per physical
core.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from early_exit.checkpoint import data_args, read_checkpoint
from early_exit.data import CIFAR10DataModule, normalize
from early_exit.engine import EarlyExitResult, describe_device, images_per_second, seconds_per_image
from early_exit.export import EarlyExitGraph, agent_graph, export_onnx, threshold_graph
from early_exit.files import write_json
from early_exit.inference import EarlyExitPredictor


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options)


def answer(model: ort.InferenceSession, images: torch.Tensor) -> dict[str, np.ndarray]:
    return dict(zip(("label", "confidence", "exit", "flops"), model.run(None, {"images": images.numpy()})))


def in_batches(model: ort.InferenceSession, images: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    parts = [answer(model, batch) for batch in images.split(batch_size)]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def one_by_one(models: dict[str, ort.InferenceSession], images: torch.Tensor,
               block: int = 250) -> dict[str, np.ndarray]:
    """Seconds per image for every model, each image run alone; the models take turns a block of images at a time
    (each block after a warm-up image), so that a change in the machine's speed meanwhile reaches them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for chunk in images.split(block):
        for name, model in models.items():
            times[name] += seconds_per_image(lambda image, model=model: answer(model, image), chunk)
    return {name: np.array(seconds) for name, seconds in times.items()}


def measure(paths: dict[str, Path], images: torch.Tensor, labels: torch.Tensor,
            answers: dict[str, dict[str, np.ndarray]], args: argparse.Namespace, threads: int,
            full_flops: float) -> dict[str, dict]:
    """Every model's timings with ``threads`` intra-op threads, and the early-exit ones' against the full network;
    ``answers`` are the models' outputs on ``images``."""
    models = {name: session(path, threads) for name, path in paths.items()}
    singles = images[:args.images]
    times: dict[str, list[np.ndarray]] = {name: [] for name in models}
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, seconds in one_by_one(models, singles).items():
            times[name].append(seconds)
        for name, model in models.items():
            speeds[name].append(images_per_second(lambda batch, model=model: answer(model, batch), images,
                                                  args.batch_size))
    latency = {name: np.median(np.stack(rounds), axis=0) for name, rounds in times.items()}  # per image
    full_mean, full_speed = latency["full network"].mean(), statistics.median(speeds["full network"])
    figures: dict[str, dict] = {}
    for name in models:
        seconds, exits = latency[name], answers[name]["exit"][:len(singles)]
        row = {"mean_ms": 1e3 * seconds.mean(), "median_ms": 1e3 * np.median(seconds),
               "p90_ms": 1e3 * np.quantile(seconds, 0.9), "images_per_s_batch": statistics.median(speeds[name]),
               "accuracy": 100 * (answers[name]["label"] == labels.numpy()).mean()}
        if name != "full network":
            flops_ratio = full_flops / answers[name]["flops"][:len(singles)].mean()
            by_exit = {str(k): {"images": int((exits == k).sum()), "median_ms": 1e3 * np.median(seconds[exits == k])}
                       for k in range(1, exits.max() + 1) if (exits == k).any()}
            row |= {"flops_saved_pct": 100 * (1 - 1 / flops_ratio), "flops_ratio": flops_ratio,
                    "speedup_1_image": full_mean / seconds.mean(),
                    "speedup_share_of_flops_ratio": full_mean / seconds.mean() / flops_ratio,
                    "speedup_batch": row["images_per_s_batch"] / full_speed, "latency_by_exit": by_exit}
            if "1" in by_exit and "4" in by_exit:
                row["exit_1_over_exit_4"] = by_exit["1"]["median_ms"] / by_exit["4"]["median_ms"]
        figures[name] = row
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agent", default="results/agent.ckpt")
    parser.add_argument("--data", required=True, help="a CIFAR-10 folder or archive (its test and validation images)")
    parser.add_argument("--target", type=float, default=40.0, help="FLOPs saved (%%) the threshold rule is tuned to")
    parser.add_argument("--images", type=int, default=10_000, help="test images timed one at a time")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                        help="onnxruntime's intra-op threads, one measurement each (0: its default)")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    data = CIFAR10DataModule(args.data, download=False)
    data.prepare_data()
    data.setup("test")
    images, labels = data.datasets["test"].tensors
    folder = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    graph, classes, metadata = agent_graph(args.agent, None, None, None)
    paths = {"early exit, agent": export_onnx(graph, folder / "agent.onnx", classes, metadata)}
    export_seconds = time.perf_counter() - start
    classifier = data_args(read_checkpoint(args.agent), args.agent)["classifier_ckpt"]
    rule, _, rule_metadata = threshold_graph(classifier, "max_softmax", args.target, args.data)
    paths["early exit, max-softmax rule"] = export_onnx(rule, folder / "rule.onnx", classes, rule_metadata)
    paths["full network"] = export_onnx(EarlyExitGraph(graph.model), folder / "full.onnx", classes, {})

    answers = {name: in_batches(session(path, 0), images, args.batch_size) for name, path in paths.items()}

    # Agreement with eecnn's engine, which `eecnn predict` runs, on every test image.
    engine = EarlyExitPredictor.from_checkpoint(args.agent).engine
    expected = EarlyExitResult.cat([engine(normalize(chunk)) for chunk in images.split(args.batch_size)])
    exported = answers["early exit, agent"]
    same_class, same_exit = exported["label"] == expected.prediction.numpy(), \
        exported["exit"] == expected.exit.numpy() + 1
    print(f"agreement with the engine on {len(images)} test images: classes {100 * same_class.mean():.2f} %, "
          f"exits {100 * same_exit.mean():.2f} %; the agent's model exported in {export_seconds:.1f} s")

    result = {
        "agreement_with_engine": {"class": float(same_class.mean()), "exit": float(same_exit.mean()),
                                  "both": float((same_class & same_exit).mean()), "images": len(images)},
        "agent_export_seconds": export_seconds,
        "policies": {"early exit, agent": metadata["policy"], "early exit, max-softmax rule": rule_metadata["policy"]},
        "images_one_at_a_time": min(args.images, len(images)), "batch_size": args.batch_size, "rounds": args.rounds,
        "device": describe_device(torch.device("cpu")), "onnxruntime": ort.__version__, "torch": torch.__version__,
        "by_threads": {},
    }
    for threads in args.threads:
        figures = measure(paths, images, labels, answers, args, threads, float(graph.model.exit_flops[-1]))
        result["by_threads"][str(threads or "default")] = figures
        print(f"\nonnxruntime, {threads or 'default'} intra-op threads")
        print(f"{'model':<30}{'mean ms':>9}{'median':>9}{'p90':>9}{'img/s':>9}{'speedup':>9}{'FLOPs ratio':>13}")
        for name, row in figures.items():
            print(f"{name:<30}{row['mean_ms']:>9.3f}{row['median_ms']:>9.3f}{row['p90_ms']:>9.3f}"
                  f"{row['images_per_s_batch']:>9.0f}{row.get('speedup_1_image', 1):>8.2f}x"
                  f"{row.get('flops_ratio', 1):>12.2f}x")
            for k, cell in row.get("latency_by_exit", {}).items():
                print(f"  exit {k}: {cell['images']} images, median {cell['median_ms']:.3f} ms")
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
