"""Exporting what eecnn trained: slim checkpoints that `eecnn test` and `eecnn predict` load, and ONNX models
that run the early-exit engine without eecnn, PyTorch or Lightning.

The ONNX model is one graph: uint8 images in, normalised inside; per image the class index, its confidence,
the exit taken and the FLOPs spent out; the class names and the operating point in its metadata. Its exits
are real: each stage runs only on the images still going, as in the engine, so the batch shrinks inside the
graph (a data-dependent shape). ``torch.cond`` (ONNX ``If``) was measured as the other way to skip stages and
was slower in onnxruntime (docs/benchmarks.md#onnx-runtime).
"""

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from early_exit.agent import ExitAgent
from early_exit.cache import ExitCache
from early_exit.checkpoint import MACHINE_KEYS, TEACHER_KEYS, read_checkpoint
from early_exit.curves import ship_curves
from early_exit.data import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SIZE
from early_exit.engine import ExitPolicy, inference_copy
from early_exit.errors import InputError
from early_exit.evaluation import ThresholdPolicy, confidence_scores, path_flops, tune_thresholds
from early_exit.files import write_atomic
from early_exit.inference import EarlyExitPredictor
from early_exit.model import EarlyExitCNN

SHIPPED_KEYS = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters", "pytorch-lightning_version",
                "exit_sizes")  # an exit agent's: what its Q-network is built for
FORMATS = ("checkpoint", "onnx")
THRESHOLD_RULES = ("max_softmax", "entropy")
ONNX_OUTPUTS = ("label", "confidence", "exit", "flops")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def export_checkpoint(source: str | Path, target: str | Path, half: bool = False) -> Path:
    """A slim copy of an eecnn checkpoint for shipping: the weights (floating-point ones in fp16 with
    ``half``), the model and data settings and the datamodule's state (class names), without the
    optimiser, loop and callback state that only resuming training needs, nor the data path and the
    distillation teachers of the machine that trained it. Written atomically; a classifier's training curves go
    beside it (``<target>-curves.csv``), for the report's plot."""
    checkpoint = read_checkpoint(source)
    slim = {key: checkpoint[key] for key in SHIPPED_KEYS if key in checkpoint}
    slim |= {key: value for key, value in checkpoint.items() if key.endswith("DataModule")}  # datamodule states
    if "datamodule_hyper_parameters" in slim:  # a user's machine has its own data (--data.data_dir), and no teachers
        slim["datamodule_hyper_parameters"] = {key: value for key, value in slim["datamodule_hyper_parameters"].items()
                                               if key not in MACHINE_KEYS + TEACHER_KEYS}
    if half:
        slim["state_dict"] = {name: t.half() if t.is_floating_point() else t for name, t in slim["state_dict"].items()}
    target = Path(target)
    write_atomic(target, lambda file: torch.save(slim, file))
    ship_curves(source, target)
    return target


class EarlyExitGraph(nn.Module):
    """The early-exit engine as one traceable module: for uint8 (N, 3, 32, 32) images, per image the class index,
    its softmax confidence, the exit taken (1-based, as `eecnn predict` prints it) and the FLOPs spent. After exit
    k the ``policy`` (an engine policy: the agent's ``GreedyPolicy`` or a ``ThresholdPolicy``) stops some images,
    and stage k + 1 runs on the others only; once none is left, the rest runs on an empty batch. Without a policy
    it is the plain network the early exits save on: every stage, the final exit only."""

    def __init__(self, model: EarlyExitCNN, policy: ExitPolicy | None = None) -> None:
        super().__init__()
        self.model, self.policy = inference_copy(model).to(memory_format=torch.contiguous_format), policy
        self.register_buffer("mean", 255 * torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))  # for uint8 input
        self.register_buffer("std", 255 * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
        self.register_buffer("flops", path_flops(model).long())  # of answering at exit k, as the engine counts

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = (images.float() - self.mean) / self.std
        stages, heads = self.model.stages, self.model.exits
        if self.policy is None:
            for stage in stages:
                x = stage(x)
            confidence, label = heads[-1](x).softmax(-1).max(-1)
            exits = torch.full_like(label, len(stages))
            return label, confidence, exits, torch.full_like(label, self.model.exit_flops[-1])
        running = torch.arange(x.shape[0], device=x.device)  # the images still going, by their place in the batch
        for k, (stage, head) in enumerate(zip(stages, heads)):
            x = stage(x)
            logits = head(x)
            if k == 0:  # every image answers at the first exit
                answer, exits, seen = logits, torch.ones_like(running), logits[:, None]
            else:  # and the images still going answer again here
                answer = answer.index_copy(0, running, logits)
                exits = exits.index_fill(0, running, k + 1)
                seen = torch.cat([seen, logits[:, None]], dim=1)
            if k < len(stages) - 1:
                going = self.policy(seen).logical_not().nonzero().squeeze(1)
                x, seen, running = x.index_select(0, going), seen.index_select(0, going), running.index_select(0, going)
        confidence, label = answer.softmax(-1).max(-1)
        return label, confidence, exits, self.flops[exits - 1]


def agent_graph(path: str | Path, classifier_ckpt: str | None, compute_weight: float | None,
                target_flops_saved: float | None) -> tuple[EarlyExitGraph, list[str], dict[str, str]]:
    """The early-exit graph of an agent and its classifier, the class names and the operating point, as for
    `eecnn test`: the agent's recorded one, else ``compute_weight`` or ``target_flops_saved`` (read off its
    validation curve)."""
    predictor = EarlyExitPredictor.from_checkpoint(path, classifier_ckpt, compute_weight=compute_weight,
                                                   target_flops_saved=target_flops_saved)
    agent = predictor.policy
    weight, target = agent.operating_weight(), agent.hparams.target_flops_saved
    point = f"exit agent at compute weight {weight:.4g}" + \
        (f" (saves {target:g} % of FLOPs on validation)" if target is not None else "")
    graph = EarlyExitGraph(predictor.classifier.model, agent.greedy_policy(weight))
    return graph, predictor.classes, {"policy": point}


def threshold_graph(path: str | Path, rule: str, target_flops_saved: float | None,
                    data_dir: str | None) -> tuple[EarlyExitGraph, list[str], dict[str, str]]:
    """The early-exit graph of a classifier with a confidence threshold per exit, tuned on the validation split
    (as `eecnn test` tunes its baselines) to save ``target_flops_saved`` % of FLOPs at the best accuracy."""
    if target_flops_saved is None or not 0 < target_flops_saved < 100:
        raise InputError("a classifier exports with a threshold rule tuned on validation: pass --target-flops-saved, "
                         "a percentage between 0 and 100")
    cache = ExitCache(str(path), data_dir=data_dir)
    cache.setup("validate")
    val = cache.outputs["val"]
    thresholds = tune_thresholds(confidence_scores(val.logits, rule), val, cache.costs, cache.full_cost,
                                 target_flops_saved)
    point = f"{rule} >= {[round(t, 4) for t in thresholds.tolist()]} at exits 1-{len(thresholds)}, tuned to save " \
            f"{target_flops_saved:g} % of FLOPs on validation"
    return EarlyExitGraph(cache.model, ThresholdPolicy(thresholds, rule)), cache.classes, {"policy": point}


@contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` meanwhile."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def check_onnx_installed() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"--format onnx needs {', '.join(missing)}: pip install -e '.[onnx]'")


def export_onnx(graph: EarlyExitGraph, target: str | Path, classes: list[str], metadata: dict[str, str]) -> Path:
    """Write ``graph`` as an ONNX model for any batch size, with the class names and FLOPs in its metadata."""
    check_onnx_installed()
    example = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)  # two: a batch of one is specialised
    with torch.no_grad(), quiet("onnx_ir"):  # its notes on empty attributes in torch's ops are for their authors
        onnx_program = torch.onnx.export(graph.eval(), (example,), dynamo=True, verbose=False, input_names=["images"],
                                         output_names=list(ONNX_OUTPUTS),
                                         dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    onnx_program.model.metadata_props.update({
        "classes": json.dumps(classes), "exit_flops": json.dumps(graph.flops.tolist()),
        "full_flops": str(graph.model.exit_flops[-1]), **metadata,
        "usage": "images: uint8 (N, 3, 32, 32) RGB; label: index into classes; confidence: its softmax probability; "
                 "exit: 1-based exit taken; flops: FLOPs spent on the image"})
    target = Path(target)
    write_atomic(target, lambda file: file.write(onnx_program.model_proto.SerializeToString()))
    return target


def export(args: argparse.Namespace) -> str:
    """Run ``eecnn-export`` on parsed ``args``; what it wrote, in a line."""
    if args.format == "checkpoint":
        policy = {"--policy": args.policy, "--target-flops-saved": args.target_flops_saved,
                  "--compute-weight": args.compute_weight, "--classifier-ckpt": args.classifier_ckpt,
                  "--data-dir": args.data_dir}
        if given := [flag for flag, value in policy.items() if value is not None]:
            raise InputError(f"only --format onnx takes {' and '.join(given)} (the exported model's exit policy)")
        target = export_checkpoint(args.source, args.target, args.half)
        return f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB)"
    if args.half:
        raise InputError("--half stores a checkpoint's weights in fp16: drop it with --format onnx")
    if Path(args.target).suffix != ".onnx":
        raise InputError(f"{args.target} should end in .onnx with --format onnx")
    check_onnx_installed()
    kind = read_checkpoint(args.source)["hyper_parameters"]["_class_path"].rsplit(".", 1)[-1]
    if kind == ExitAgent.__name__:
        if args.policy is not None or args.data_dir is not None:
            raise InputError(f"{args.source} is an exit agent, whose policy it exports: drop --policy and --data-dir "
                             "(they tune a threshold rule for a classifier checkpoint)")
        graph, classes, metadata = agent_graph(args.source, args.classifier_ckpt, args.compute_weight,
                                               args.target_flops_saved)
    else:
        if args.compute_weight is not None or args.classifier_ckpt is not None:
            raise InputError(f"{args.source} is a classifier: --compute-weight and --classifier-ckpt are for an exit "
                             "agent's checkpoint")
        rule = args.policy or THRESHOLD_RULES[0]
        graph, classes, metadata = threshold_graph(args.source, rule, args.target_flops_saved, args.data_dir)
    target = export_onnx(graph, args.target, classes, metadata)
    return f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB): {metadata['policy']}"


def main(argv: list[str] | None = None) -> None:
    """``eecnn-export SOURCE TARGET``: ship a checkpoint that `eecnn test` and `eecnn predict` load, or with
    ``--format onnx`` an ONNX model of the classifier and its exit policy that onnxruntime runs alone."""
    parser = argparse.ArgumentParser(prog="eecnn-export", description=main.__doc__)
    parser.add_argument("source", help="a checkpoint written by `eecnn fit`: an exit agent's, or a classifier's")
    parser.add_argument("target", help="where to write the slim checkpoint, or the .onnx model")
    parser.add_argument("--format", choices=FORMATS, default=FORMATS[0], help="what to write (default: checkpoint)")
    parser.add_argument("--half", action="store_true", help="checkpoint: store floating-point weights in fp16")
    parser.add_argument("--target-flops-saved", "--model.target_flops_saved", dest="target_flops_saved", type=float,
                        help="onnx: the share of FLOPs (%%) the policy saves on validation; an agent's default is "
                             "the one it recorded, a classifier's threshold rule needs one")
    parser.add_argument("--compute-weight", "--model.compute_weight", dest="compute_weight", type=float,
                        help="onnx, agent: the compute weight the agent answers at, instead of a target")
    parser.add_argument("--classifier-ckpt", "--data.classifier_ckpt", dest="classifier_ckpt",
                        help="onnx, agent: its classifier, if not where the agent recorded it nor beside it")
    parser.add_argument("--policy", choices=THRESHOLD_RULES,
                        help="onnx, classifier: the confidence score of the threshold rule (default: max_softmax)")
    parser.add_argument("--data-dir", "--data.data_dir", dest="data_dir",
                        help="onnx, classifier: the images whose validation split tunes the thresholds (default: "
                             "the classifier's recorded data, else torchvision's CIFAR-10)")
    try:
        print(export(parser.parse_args(argv)))
    except InputError as err:
        sys.exit(f"eecnn-export: error: {err}")
