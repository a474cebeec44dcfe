"""What each exit reaches when the network is trained for it alone, against the same exit in a network trained for
all of them, and what the threshold rule would get if every exit reached that at once.

    python benchmarks/exits_alone.py results/classifier.ckpt \
        logs/alone/e30-exit1/checkpoints/last.ckpt ... --data ../shared/data/cifar10-jpeg.tar.gz

The first checkpoint is the shared classifier: every exit trained on one trunk. Each further one was trained for one
exit alone: the same recipe on the network cut after stage k (``--model.num_stages k``) with exit k alone in the
loss, or the whole network with the final exit alone; its last exit is exit k trained for itself. For each, this
prints exit k's test accuracy in both, then the max-softmax threshold rule (tuned on validation, at the shared
network's costs) on the shared exits, and on them with each exit trained alone spliced in, one at a time and all
together. No one network has spliced exits: they come from networks that share no stages, whose mistakes overlap
less than one network's exits do, so those rows are what exits this good would buy at best, not results.
Exit outputs are cached like the agent's (``logs/exit_cache``); ``--output`` also writes the figures as JSON.
"""

import argparse
import sys
from pathlib import Path

import torch

from early_exit.cache import ExitCache
from early_exit.errors import InputError
from early_exit.evaluation import ExitOutputs, max_softmax_rules
from early_exit.files import write_json


def accuracy(outputs: ExitOutputs, exit_index: int) -> float:
    return 100 * outputs.correct()[:, exit_index].double().mean().item()


def splice(shared: dict[str, ExitOutputs], alone: dict[int, dict[str, ExitOutputs]]) -> dict[str, ExitOutputs]:
    """The shared classifier's outputs with exit k replaced by the last exit of ``alone[k]``, on every split."""
    spliced = {}
    for split, outputs in shared.items():
        logits = outputs.logits.clone()
        for k, exits in alone.items():
            logits[:, k] = exits[split].logits[:, -1]
        spliced[split] = ExitOutputs(logits, outputs.labels)
    return spliced


def cached(checkpoint: str, data_dir: str | None, cache_dir: str) -> ExitCache:
    cache = ExitCache(str(checkpoint), data_dir=data_dir, cache_dir=cache_dir)
    cache.setup("test")
    return cache


def measure(shared_ckpt: str, alone_ckpts: list[str], data_dir: str | None, saved: tuple[float, ...],
            cache_dir: str) -> dict:
    cache = cached(shared_ckpt, data_dir, cache_dir)
    shared, alone, exits = cache.outputs, {}, []
    for path in alone_ckpts:
        outputs = cached(path, data_dir, cache_dir).outputs
        k = outputs["test"].num_exits - 1
        if k >= shared["test"].num_exits or k in alone:
            raise InputError(f"{path} has {k + 1} exits: give one checkpoint per exit of the shared classifier's "
                             f"{shared['test'].num_exits}, each cut after the exit it was trained for")
        if any(not torch.equal(outputs[split].labels, shared[split].labels) for split in shared):
            raise InputError(f"{path} was validated on other images than {shared_ckpt}: train both with the same "
                             "--data.val_size and --data.split_seed")
        alone[k] = outputs
        exits.append({"exit": k + 1, "run": str(path), "shared": accuracy(shared["test"], k),
                      "alone": accuracy(outputs["test"], -1)})
    variants = {"shared": shared} | {f"exit {k + 1}": splice(shared, {k: alone[k]}) for k in alone}
    variants["all"] = splice(shared, alone)
    costs, full_flops = cache.costs, cache.full_cost
    rules = {name: dict(zip(map(str, saved), max_softmax_rules(o["val"], o["test"], costs, full_flops, saved)))
             for name, o in variants.items()}
    return {"exits": exits, "thresholds": rules}


def markdown(result: dict, saved: tuple[float, ...]) -> str:
    lines = ["| exit | trained with the others | trained alone | gain |", "|---:|---:|---:|---:|"]
    lines += [f"| {e['exit']} | {e['shared']:.2f} % | {e['alone']:.2f} % | {e['alone'] - e['shared']:+.2f} |"
              for e in result["exits"]]
    lines += ["", "| exits | " + " | ".join(f"max-softmax, ≥ {s:g} % saved" for s in saved) + " |",
              "|---|" + "---:|" * len(saved)]
    for name, rules in result["thresholds"].items():
        label = {"shared": "the shared classifier's", "all": "with every exit trained alone spliced in"}.get(
            name, f"with {name} trained alone spliced in")
        lines.append(f"| {label} | " + " | ".join(f"{r['accuracy']:.2f} % at {r['flops_saved_pct']:.1f} %"
                                                  for r in rules.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shared", help="an EarlyExitClassifier checkpoint trained for every exit")
    parser.add_argument("alone", nargs="+", help="checkpoints each trained for its last exit alone")
    parser.add_argument("--data", help="the data_dir to read, if not the one each checkpoint recorded")
    parser.add_argument("--saved", type=float, nargs="+", default=[40.0, 50.0, 60.0],
                        help="FLOPs the threshold rule must save (%%)")
    parser.add_argument("--cache-dir", default="logs/exit_cache")
    parser.add_argument("--output", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    saved = tuple(args.saved)
    try:
        result = measure(args.shared, args.alone, args.data, saved, args.cache_dir)
    except (InputError, ValueError) as err:
        sys.exit(f"exits_alone: error: {err}")
    print(markdown(result, saved))
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
