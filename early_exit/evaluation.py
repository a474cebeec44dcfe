"""Measuring exit policies on cached exit outputs, with one function for the agent and every baseline.

A policy is a (N, exits) boolean "stop here" mask; the exit taken is the first exit where it is
true (the last exit always stops). Costs are what an early-exit engine really spends to answer at
exit k: stages 1..k and heads 1..k, relative to the plain network (all stages, final head only).
"""

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from early_exit.model import EarlyExitCNN


@dataclass
class ExitOutputs:
    """One split's exit outputs: ``logits`` (N, exits, classes) and ``labels`` (N,)."""

    logits: Tensor
    labels: Tensor

    @property
    def num_exits(self) -> int:
        return self.logits.shape[1]

    def predictions(self) -> Tensor:
        return self.logits.argmax(-1)

    def correct(self) -> Tensor:
        """(N, exits) bool: whether each exit's prediction is right."""
        return self.predictions() == self.labels[:, None]


def normalized_entropy(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dimension, divided by its maximum, log(classes): in [0, 1]."""
    return probability_entropy(logits.float().softmax(-1))


def probability_entropy(probs: Tensor) -> Tensor:
    """``normalized_entropy`` of probabilities (the last dimension) already computed."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(probs.shape[-1])


def path_flops(model: EarlyExitCNN) -> Tensor:
    """(exits,) FLOPs per image of answering at exit k through the engine: stages and heads 1..k."""
    return (torch.tensor(model.stage_flops, dtype=torch.float64) + torch.tensor(model.head_flops)).cumsum(0)


def first_exit(stop: Tensor) -> Tensor:
    """(N,) 0-based exit taken: the first exit whose ``stop`` is true, the last exit if none is."""
    stop = stop.clone()
    stop[..., -1] = True
    return stop.float().argmax(-1)  # argmax returns the first maximum


def evaluate_exits(exits: Tensor, outputs: ExitOutputs, costs: Tensor, full_flops: float) -> dict:
    """Accuracy (%), FLOPs saved (% of ``full_flops``) and exit distribution of a policy's exits."""
    correct = outputs.correct().gather(1, exits[:, None]).squeeze(1)
    mean_flops = costs[exits].mean().item()
    distribution = torch.bincount(exits, minlength=outputs.num_exits).double() / len(exits)
    return {
        "accuracy": 100 * correct.double().mean().item(),
        "flops_saved_pct": 100 * (1 - mean_flops / full_flops),
        "mean_flops": mean_flops,
        "exit_distribution": distribution.tolist(),
    }


SAVINGS = torch.linspace(0, 100, 1001, dtype=torch.float64)  # the FLOPs savings (%) an operating curve has a row for


def operating_curve(switch: Tensor, correct: Tensor, costs: Tensor, full_flops: float, start: float) -> Tensor:
    """(len(SAVINGS), 3) rows of (parameter, FLOPs saved %, accuracy %): for each saving in ``SAVINGS``, the
    smallest value from ``start`` on of a policy's scalar parameter at which it saves at least that much, NaN
    where no value does. The policy stops image n at exit k or before for every value from ``switch[n, k]``
    on ((N, exits - 1), non-increasing along k, inf where never); ``correct`` (N, exits) says which exits
    are right. Exact on these images: every value where a decision changes is a candidate."""
    switch, n = switch.double(), len(switch)
    columns = switch.T.contiguous().sort(dim=-1).values  # per exit k: the values from which images stop by k
    candidates = torch.cat([switch.flatten(), torch.tensor([start], dtype=torch.float64)])
    candidates = candidates[candidates.isfinite() & (candidates >= start)].unique()  # sorted
    going_on = 1 - torch.searchsorted(columns, candidates.expand(len(columns), -1).contiguous(), right=True) / n
    saved = 100 * (1 - (costs[0] + costs.diff().double() @ going_on.double()) / full_flops)  # non-decreasing in it
    first = torch.searchsorted(saved, SAVINGS)
    reached, first = first < len(candidates), first.clamp(max=len(candidates) - 1)
    exits = (switch[None] > candidates[first, None, None]).sum(-1)  # (rows, N) exits passed before stopping
    accuracy = 100 * correct.T[exits, torch.arange(n)].double().mean(-1)
    rows = torch.stack([candidates[first], saved[first], accuracy], dim=-1)
    return torch.where(reached[:, None], rows, torch.nan)


def confidence_scores(logits: Tensor, kind: str) -> Tensor:
    """(N, exits) scores for (N, exits, classes) logits, higher meaning "confident enough to stop":
    max softmax or minus normalised entropy."""
    if kind == "max_softmax":
        return logits.float().softmax(-1).max(-1).values
    if kind == "entropy":
        return -normalized_entropy(logits)
    raise ValueError(f"unknown confidence score {kind!r}: use 'max_softmax' or 'entropy'")


def policy_exits(policy: Callable[[Tensor], Tensor], logits: Tensor) -> Tensor:
    """(N,) exits an engine policy takes, computed from all exits' (N, exits, classes) logits at once:
    what the early-exit engine must reproduce while computing only the exits it reaches."""
    stop = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    for k in range(logits.shape[1] - 1):
        stop[:, k] = policy(logits[:, :k + 1])
    return first_exit(stop)


class ThresholdPolicy:
    """Stop at the first exit whose confidence score reaches that exit's threshold, as an engine policy."""

    def __init__(self, thresholds: Sequence[float], kind: str = "max_softmax") -> None:
        self.thresholds, self.kind = torch.as_tensor(thresholds, dtype=torch.float32), kind

    def __call__(self, logits: Tensor) -> Tensor:
        score = confidence_scores(logits[:, -1:], self.kind)[:, 0]
        return score >= self.thresholds[logits.shape[1] - 1].to(score.device)


def tune_thresholds(scores: Tensor, outputs: ExitOutputs, costs: Tensor, full_flops: float,
                    min_flops_saved: float, grid: int = 16) -> Tensor:
    """Per-exit thresholds that maximise accuracy on ``outputs`` while saving at least ``min_flops_saved`` %
    (or, if no thresholds save that much, the ones that save the most).

    Searches every combination of per-exit score quantiles (``grid`` per exit, plus "never stop"),
    evaluated as batches of tensor ops.
    """
    quantiles = torch.linspace(0, 1, grid + 1, dtype=scores.dtype)
    never = torch.full((1,), float("inf"), dtype=scores.dtype)
    options = [torch.cat([scores[:, k].quantile(quantiles), never]) for k in range(scores.shape[1] - 1)]
    if not options:  # one exit: nothing to tune, and one policy
        return scores.new_empty(0)
    candidates = torch.tensor(list(itertools.product(*[range(len(o)) for o in options])))
    thresholds = torch.stack([options[k][candidates[:, k]] for k in range(len(options))], dim=1)
    correct = outputs.correct()
    accuracy, saved = [], []
    for chunk in thresholds.split(512):
        exits = threshold_exits(scores, chunk)  # (candidates, N)
        saved.append(100 * (1 - costs[exits].mean(-1) / full_flops))
        accuracy.append(correct.gather(1, exits.T).T.double().mean(-1))
    accuracy, saved = torch.cat(accuracy), torch.cat(saved)
    feasible = saved >= min_flops_saved
    if not feasible.any():
        return thresholds[saved.argmax()]
    return thresholds[torch.where(feasible, accuracy, -1.0).argmax()]


def threshold_exits(scores: Tensor, thresholds: Tensor) -> Tensor:
    """Exits of the rule "stop at the first exit whose score reaches its threshold" for (N, exits)
    ``scores`` and (..., exits - 1) ``thresholds``: one policy, or a batch of candidate policies."""
    stop = scores[:, :-1] >= thresholds[..., None, :]
    return first_exit(torch.cat([stop, stop.new_ones(*stop.shape[:-1], 1)], dim=-1))


def oracle_exits(outputs: ExitOutputs) -> Tensor:
    """The cheapest exit whose prediction is right, else the last: an upper bound for any policy."""
    return first_exit(outputs.correct())


def baselines(val: ExitOutputs, test: ExitOutputs, costs: Tensor, full_flops: float,
              targets: tuple[float, ...] = (20.0, 30.0, 40.0, 50.0, 60.0),
              kinds: tuple[str, ...] = ("max_softmax", "entropy"),
              tuning: tuple[Tensor, float] | None = None) -> list[dict]:
    """Fixed-exit, oracle and threshold policies (one per confidence score in ``kinds``), thresholds tuned on
    ``val`` to save ``targets`` % of ``costs`` (of another cost, e.g. seconds, with ``tuning``: its costs and
    full network's) and measured on ``test``."""
    results = [{"name": f"always exit {k + 1}",
                **evaluate_exits(torch.full((len(test.labels),), k), test, costs, full_flops)}
               for k in range(test.num_exits)]
    results.append({"name": "oracle", **evaluate_exits(oracle_exits(test), test, costs, full_flops)})
    for kind in kinds:
        val_scores, test_scores = confidence_scores(val.logits, kind), confidence_scores(test.logits, kind)
        for target in targets:
            thresholds = tune_thresholds(val_scores, val, *(tuning or (costs, full_flops)), target)
            exits = threshold_exits(test_scores, thresholds)
            saving = "saved" if tuning is None else "of time saved"
            results.append({"name": f"{kind} >= {target:g}% {saving}", "thresholds": thresholds.tolist(),
                            **evaluate_exits(exits, test, costs, full_flops)})
    return results


def max_softmax_rules(val: ExitOutputs, test: ExitOutputs, costs: Tensor, full_flops: float,
                      targets: tuple[float, ...]) -> list[dict]:
    """The max-softmax threshold rule tuned on ``val`` to save at least each of ``targets`` % of FLOPs: its test
    accuracy and FLOPs saved, one dict per target."""
    return [{key: p[key] for key in ("accuracy", "flops_saved_pct")}
            for p in baselines(val, test, costs, full_flops, targets, kinds=("max_softmax",))
            if p["name"].startswith("max_softmax")]
