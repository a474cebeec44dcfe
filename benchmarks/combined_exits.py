"""Would exits that reuse the earlier exits' answers be worth building? Measured after the fact, on cached outputs.

    python benchmarks/combined_exits.py results/classifier.ckpt --data ../shared/data/cifar10-jpeg.tar.gz

Zero Time Waste (Wołczyk et al., NeurIPS 2021) lets exit k answer with a learned geometric ensemble of exits
1..k: ``sum_j w_kj log_softmax(z_j) + b_k``. This fits those weights (and, as a control, one temperature per exit
alone) on the frozen classifier's validation outputs, the split exit policies are tuned on, and prints each
variant's test accuracy per exit and the test accuracy of the max-softmax threshold rule tuned on validation.
Exit outputs are cached like the agent's (``logs/exit_cache``); ``--output`` also writes the rows as JSON.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from early_exit.cache import ExitCache
from early_exit.errors import InputError
from early_exit.evaluation import ExitOutputs, max_softmax_rules
from early_exit.files import write_json


def fit_combination(outputs: ExitOutputs, earlier_exits: bool) -> tuple[Tensor, Tensor]:
    """Weights (exits, exits) and biases (exits, classes) minimising every exit's cross-entropy on ``outputs``:
    lower-triangular weights and biases if ``earlier_exits``, else a diagonal (one temperature per exit)."""
    exits, classes = outputs.logits.shape[1:]
    mask = torch.ones(exits, exits).tril() if earlier_exits else torch.eye(exits)
    weights, biases = torch.eye(exits, requires_grad=True), torch.zeros(exits, classes, requires_grad=earlier_exits)
    labels = outputs.labels.repeat_interleave(exits)
    optimizer = torch.optim.LBFGS([weights, biases], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(combine(outputs.logits, weights * mask, biases).flatten(0, 1), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return (weights * mask).detach(), biases.detach()


def combine(logits: Tensor, weights: Tensor, biases: Tensor) -> Tensor:
    """(N, exits, classes) logits of exit k as ``sum_j weights[k, j] log_softmax(logits[:, j]) + biases[k]``."""
    return torch.einsum("kj,njc->nkc", weights, logits.float().log_softmax(-1)) + biases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an EarlyExitClassifier checkpoint")
    parser.add_argument("--data", help="the data_dir to read, if not the one the checkpoint recorded")
    parser.add_argument("--saved", type=float, nargs="+", default=[40.0, 50.0, 60.0],
                        help="FLOPs the threshold rule must save (%%)")
    parser.add_argument("--cache-dir", default="logs/exit_cache")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    try:
        cache = ExitCache(args.checkpoint, data_dir=args.data, cache_dir=args.cache_dir)
        cache.setup("test")
    except (InputError, ValueError) as err:
        sys.exit(f"combined_exits: error: {err}")
    outputs, costs, full_flops = cache.outputs, cache.costs, cache.full_cost
    print("| exits | test accuracy per exit (%) | " + " | ".join(f"max-softmax, ≥ {s:g} % saved" for s in args.saved)
          + " |\n|---|---|" + "---:|" * len(args.saved))
    rows = []
    for name, earlier_exits in (("as trained", None), ("one temperature per exit", False),
                                ("geometric ensemble of exits 1..k", True)):
        val, test = outputs["val"], outputs["test"]
        if earlier_exits is not None:
            weights, biases = fit_combination(val, earlier_exits)
            val, test = (ExitOutputs(combine(o.logits, weights, biases), o.labels) for o in (val, test))
        accuracy = (100 * test.correct().double().mean(0)).tolist()
        rules = max_softmax_rules(val, test, costs, full_flops, tuple(args.saved))
        rows.append({"exits": name, "test_accuracy": accuracy, "thresholds": dict(zip(map(str, args.saved), rules))})
        print(f"| {name} | {' / '.join(f'{a:.2f}' for a in accuracy)} | "
              + " | ".join(f"{p['accuracy']:.2f} % at {p['flops_saved_pct']:.1f} %" for p in rules) + " |")
    if args.output:
        write_json(args.output, rows)


if __name__ == "__main__":
    main()
