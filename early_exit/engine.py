"""Early-exit inference that really stops computing: each stage runs only on the images still going.

A policy sees, for the images still running, the logits of the exits they have passed, (n, k, classes),
and answers per image whether to stop at exit k. The agent and the threshold rules are such policies;
``evaluation.policy_exits`` applies the same policy to precomputed all-exit logits.
"""

import copy
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from early_exit.evaluation import path_flops
from early_exit.model import EarlyExitCNN

ExitPolicy = Callable[[Tensor], Tensor]


@dataclass
class EarlyExitResult:
    """Per image: predicted class, its softmax confidence, the 0-based exit taken and the FLOPs spent."""

    prediction: Tensor
    confidence: Tensor
    exit: Tensor
    flops: Tensor

    @classmethod
    def cat(cls, results: list["EarlyExitResult"]) -> "EarlyExitResult":
        """Batches' results joined in order, on the CPU."""
        return cls(**{name: torch.cat([getattr(r, name) for r in results]).cpu() for name in vars(results[0])})


def linear_after_batchnorm(norm: nn.BatchNorm1d, linear: nn.Linear) -> nn.Linear:
    """One linear layer that computes ``linear(norm(x))``, ``norm`` in eval mode."""
    scale = (norm.running_var + norm.eps).rsqrt()
    shift = -norm.running_mean * scale
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    fused = copy.deepcopy(linear)
    with torch.no_grad():
        fused.weight.mul_(scale)
        fused.bias = nn.Parameter(linear.weight @ shift + (0 if linear.bias is None else linear.bias))
    return fused


def folded(layers: nn.Sequential) -> nn.Sequential:
    """``layers`` in eval mode without BatchNorm layers (each folded into the conv before it or the linear layer
    after it) or dropout (the identity)."""
    kept: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.BatchNorm2d) and kept and isinstance(kept[-1], nn.Conv2d):
            kept[-1] = fuse_conv_bn_eval(kept[-1], layer)
        elif isinstance(layer, nn.Linear) and kept and isinstance(kept[-1], nn.BatchNorm1d):
            kept[-1] = linear_after_batchnorm(kept[-1], layer)
        elif not isinstance(layer, nn.Dropout | nn.Dropout2d):
            kept.append(layer)
    return nn.Sequential(*kept)


def fold_sequentials(module: nn.Module) -> None:
    """Replace every ``nn.Sequential`` inside ``module`` with its ``folded`` form."""
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            setattr(module, name, folded(child))
        else:
            fold_sequentials(child)


def inference_copy(model: EarlyExitCNN) -> EarlyExitCNN:
    """A frozen channels-last copy of ``model`` with every BatchNorm folded into the conv before it or the linear
    layer after it, and no dropout: the same function in eval mode, without a memory pass per layer that costs
    most where activations are largest, in the first stages every image runs (and traceable with a batch whose
    size depends on the data, which BatchNorm is not)."""
    model = copy.deepcopy(model).eval().requires_grad_(False)
    fold_sequentials(model)
    return model.to(memory_format=torch.channels_last)


class EarlyExitEngine:
    """Runs a batch through ``model`` stage by stage; after exit k the policy decides which images stop,
    and stage k + 1 runs only on the rest. Images are the model's normalised float input. One image takes
    a path of its own, with none of a batch's bookkeeping (which images go on, where answers go)."""

    def __init__(self, model: EarlyExitCNN, policy: ExitPolicy) -> None:
        self.model = inference_copy(model)
        self.policy = policy
        self.costs = path_flops(model)  # FLOPs per image of answering at exit k, as this engine spends them
        self.full_flops = float(model.exit_flops[-1])
        self.device = next(model.parameters()).device

    def to(self, device: torch.device | str) -> "EarlyExitEngine":
        self.model.to(device)
        if isinstance(self.policy, nn.Module):
            self.policy.to(device)
        self.device = torch.device(device)
        return self

    def _prepare(self, images: Tensor) -> Tensor:
        return images.to(self.device).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> EarlyExitResult:
        x = self._prepare(images)
        return self.one_image(x) if len(x) == 1 else self.batch(x)

    def one_image(self, x: Tensor) -> EarlyExitResult:
        last, seen = self.model.num_exits - 1, None
        for k, (stage, head) in enumerate(zip(self.model.stages, self.model.exits)):
            x = stage(x)
            current = head(x).float()[:, None]
            seen = current if seen is None else torch.cat([seen, current], dim=1)
            if k == last or self.policy(seen)[0]:
                break
        confidence, prediction = seen[:, -1].softmax(-1).max(-1)
        return EarlyExitResult(prediction, confidence, torch.tensor([k], device=x.device),
                              self.costs[k:k + 1].to(x.device))

    def batch(self, x: Tensor) -> EarlyExitResult:
        n, last = len(x), self.model.num_exits - 1
        exits = torch.full((n,), last, dtype=torch.long, device=x.device)
        running = torch.arange(n, device=x.device)
        seen = answer = None  # seen: (images still running, exits passed, classes)
        for k, (stage, head) in enumerate(zip(self.model.stages, self.model.exits)):
            x = stage(x)
            current = head(x).float()[:, None]
            if seen is None:
                seen, answer = current, current.new_empty(n, current.shape[-1])
            else:
                seen = torch.cat([seen, current], dim=1)
            stop = torch.ones(len(x), dtype=torch.bool, device=x.device) if k == last else self.policy(seen)
            if not stop.any():  # all go on: no copy of the batch's activations
                continue
            exits[running[stop]] = k
            answer[running[stop]] = seen[stop, -1]
            keep = ~stop
            if not keep.any():
                break
            running, x, seen = running[keep], x[keep], seen[keep]
        confidence, prediction = answer.softmax(-1).max(-1)
        return EarlyExitResult(prediction, confidence, exits, self.costs.to(x.device)[exits])

    @torch.inference_mode()
    def full_network(self, images: Tensor) -> Tensor:
        """The plain network's logits: every stage and the final head only, the cost early exits save on."""
        x = self._prepare(images)
        for stage in self.model.stages:
            x = stage(x)
        return self.model.exits[-1](x)


def describe_device(device: torch.device) -> str:
    """The device's kind and model, so that throughput figures say where they were measured."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"cpu ({names[0] if names else platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize() -> None:
    """Wait for the GPU, if one is in use, so that a timer reads its work as done (and costs nothing otherwise:
    asking whether CUDA is available takes longer than an exit head at one image)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def images_per_second(fn: Callable[[Tensor], object], images: Tensor, batch_size: int) -> float:
    """Throughput of ``fn`` over ``images`` in batches, after one warm-up batch, synchronising CUDA."""
    batches = images.split(batch_size)
    fn(batches[0])
    synchronize()
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    synchronize()
    return len(images) / (time.perf_counter() - start)


def seconds_per_image(fn: Callable[[Tensor], object], images: Tensor) -> list[float]:
    """The latency of ``fn`` on each of ``images`` given one at a time, after one warm-up image."""
    fn(images[:1])
    times = []
    for image in images.split(1):
        start = time.perf_counter()
        fn(image)
        synchronize()
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def stage_seconds(model: EarlyExitCNN, images: Tensor, batch_size: int) -> tuple[list[float], list[float]]:
    """Per image, the seconds each stage and each exit head of ``model`` take at ``batch_size``, timed one by one
    as the full network runs them in order (all exit heads included), after one warm-up batch."""
    device = next(model.parameters()).device
    stages, heads = [0.0] * model.num_exits, [0.0] * model.num_exits
    batches = images.split(batch_size)
    for i, batch in enumerate(batches[:1] + batches):  # the first one warms up
        x = batch.to(device).contiguous(memory_format=torch.channels_last)
        for k, (stage, head) in enumerate(zip(model.stages, model.exits)):
            synchronize()
            start = time.perf_counter()
            x = stage(x)
            synchronize()
            middle = time.perf_counter()
            head(x)
            synchronize()
            if i:
                stages[k] += middle - start
                heads[k] += time.perf_counter() - middle
    return [t / len(images) for t in stages], [t / len(images) for t in heads]


def latency_costs(stages: list[float], heads: list[float]) -> tuple[Tensor, float]:
    """(exits,) seconds per image of answering at exit k through the engine (stages and heads up to k), and the
    full network's (every stage, the final head), from ``stage_seconds``."""
    path = torch.tensor(stages, dtype=torch.float64).add(torch.tensor(heads, dtype=torch.float64)).cumsum(0)
    return path, sum(stages) + heads[-1]


def time_ideal_ratio(stages: list[float], heads: list[float], exits: Tensor) -> float:
    """The full network's time over the mean time of answering each image at its ``exits`` with the
    ``stage_seconds``: what an engine that costs nothing but its stages and heads would gain."""
    path, full = latency_costs(stages, heads)
    return full / path[exits.cpu()].mean().item()
