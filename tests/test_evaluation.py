import pytest
import torch

from early_exit.evaluation import (
    ExitOutputs,
    baselines,
    confidence_scores,
    evaluate_exits,
    path_flops,
    threshold_exits,
    tune_thresholds,
)
from early_exit.model import EarlyExitCNN

MODEL = EarlyExitCNN()
COSTS = path_flops(MODEL)
FULL = float(MODEL.exit_flops[-1])


def outputs(n: int = 400, seed: int = 0) -> ExitOutputs:
    """Exits that get more accurate with depth; confident exits are right more often."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(10, (n,), generator=g)
    logits = torch.randn(n, 4, 10, generator=g)
    boost = torch.rand(n, 4, generator=g) * torch.tensor([2.0, 3.0, 4.0, 6.0])
    logits.scatter_add_(2, labels[:, None, None].expand(n, 4, 1), boost[..., None])
    return ExitOutputs(logits, labels)


def test_flops_saved_recomputes_from_the_exit_distribution():
    out = outputs()
    exits = torch.randint(4, (400,))
    result = evaluate_exits(exits, out, COSTS, FULL)
    assert sum(result["exit_distribution"]) == pytest.approx(1.0)
    mean = sum(p * float(c) for p, c in zip(result["exit_distribution"], COSTS))
    assert result["flops_saved_pct"] == pytest.approx(100 * (1 - mean / FULL))


def test_tuned_thresholds_meet_their_flops_target():
    out = outputs()
    scores = confidence_scores(out.logits, "max_softmax")
    for target in (20.0, 40.0, 60.0):
        result = evaluate_exits(threshold_exits(scores, tune_thresholds(scores, out, COSTS, FULL, target)),
                                out, COSTS, FULL)
        assert result["flops_saved_pct"] >= target


def test_an_unreachable_target_gives_the_thresholds_that_save_the_most():
    out = outputs()
    scores = confidence_scores(out.logits, "entropy")
    exits = threshold_exits(scores, tune_thresholds(scores, out, COSTS, FULL, min_flops_saved=99.0))
    assert (exits == 0).all()  # always exit 1: the cheapest policy there is


def test_baselines_include_every_policy_kind():
    names = [row["name"] for row in baselines(outputs(seed=1), outputs(seed=2), COSTS, FULL, targets=(30.0,))]
    assert names == ["always exit 1", "always exit 2", "always exit 3", "always exit 4", "oracle",
                     "max_softmax >= 30% saved", "entropy >= 30% saved"]
    names = [row["name"] for row in baselines(outputs(seed=1), outputs(seed=2), COSTS, FULL, (30.0,), ("entropy",))]
    assert names[-1] == "entropy >= 30% saved" and not any(name.startswith("max_softmax") for name in names)


def test_a_network_with_one_exit_has_one_threshold_policy_always_exit_1():
    model = EarlyExitCNN(num_stages=1)
    costs, full = path_flops(model), float(model.exit_flops[-1])
    out = outputs()
    one_exit = ExitOutputs(out.logits[:, :1], out.labels)
    rules = [row for row in baselines(one_exit, one_exit, costs, full, targets=(50.0,)) if "saved" in row["name"]]
    assert [row["exit_distribution"] for row in rules] == [[1.0], [1.0]]
    assert rules[0]["accuracy"] == pytest.approx(100 * one_exit.correct().double().mean().item())
