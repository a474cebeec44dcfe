"""The recipe ablation table: what each classifier run's exits are worth to an exit policy.

    python benchmarks/exit_recipes.py logs/ablation/run-a logs/ablation/run-b --data ../shared/data/cifar10-jpeg.tar.gz

For each run folder (its ``checkpoints/last.ckpt`` and TensorBoard events) it prints one markdown row:
epochs and training wall time (from the events; left blank for a checkpoint file given instead of a run folder,
such as a shipped classifier), every exit's accuracy and expected calibration error on
the test split, and the test accuracy of the max-softmax threshold rule tuned on the validation split to
save at least ``--saved`` % of FLOPs (a column per value given, ``thresholds`` in the JSON). Exit
outputs are cached like the agent's (``logs/exit_cache``). With ``--round``, the rows join an ablation file of
several rounds (``results/recipe/ablation.json``).
"""

import argparse
import json
import sys
from pathlib import Path

from torchmetrics.functional.classification import multiclass_calibration_error

from early_exit.cache import ExitCache
from early_exit.curves import time_to_accuracy
from early_exit.errors import InputError
from early_exit.evaluation import max_softmax_rules
from early_exit.files import write_json


def measure(run: Path, data_dir: str | None, saved: list[float], cache_dir: str) -> dict:
    ckpt = run if run.is_file() else run / "checkpoints" / "last.ckpt"
    cache = ExitCache(str(ckpt), data_dir=data_dir, cache_dir=cache_dir)
    cache.setup("test")
    val, test = cache.outputs["val"], cache.outputs["test"]
    thresholds = max_softmax_rules(val, test, cache.costs, cache.full_cost, saved)
    timing = {"epochs": None, "seconds": None} if run.is_file() else time_to_accuracy(run)
    classes = test.logits.shape[-1]
    return {
        "run": run.stem if run.is_file() else run.name,
        "epochs": timing["epochs"],
        "seconds": timing["seconds"],
        "test_accuracy": (100 * test.correct().double().mean(0)).tolist(),
        "test_ece": [100 * multiclass_calibration_error(test.logits[:, k], test.labels, classes, n_bins=15).item()
                     for k in range(test.num_exits)],
        "thresholds": {f"{target:g}": rule for target, rule in zip(saved, thresholds)},
    }


def markdown(rows: list[dict], saved: list[float]) -> str:
    thresholds = " | ".join(f"max-softmax, ≥ {target:g} % saved" for target in saved)
    lines = [f"| run | epochs | wall time | test accuracy per exit (%) | ECE per exit (%) | {thresholds} |",
             "|---|---:|---:|---|---|" + "---|" * len(saved)]
    for r in rows:
        rules = " | ".join(f"{t['accuracy']:.2f} % at {t['flops_saved_pct']:.1f} %" for t in r["thresholds"].values())
        minutes = "" if r["seconds"] is None else f"{r['seconds'] / 60:.0f} min"
        lines.append(f"| {r['run']} | {r['epochs'] or ''} | {minutes} | "
                     f"{' / '.join(f'{a:.1f}' for a in r['test_accuracy'])} | "
                     f"{' / '.join(f'{e:.1f}' for e in r['test_ece'])} | {rules} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path,
                        help="classifier run folders (checkpoints/last.ckpt inside), or checkpoint files")
    parser.add_argument("--data", help="the data_dir to read, if not the one each run recorded")
    parser.add_argument("--saved", type=float, nargs="+", default=[50.0],
                        help="FLOPs the threshold rule must save (%%), one column each")
    parser.add_argument("--cache-dir", default="logs/exit_cache")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON")
    parser.add_argument("--round", type=int, help="tag the rows with this ablation round, and replace only that "
                                                  "round's rows in --output (docs/recipe.md's table is one file)")
    args = parser.parse_args()
    try:
        rows = [measure(run, args.data, args.saved, args.cache_dir) for run in args.runs]
    except (InputError, ValueError) as err:
        sys.exit(f"exit_recipes: error: {err}")
    print(markdown(rows, args.saved))
    if args.output and args.round is not None:
        others = json.loads(args.output.read_text()) if args.output.is_file() else []
        rows = sorted([r for r in others if r["round"] != args.round] + [{"round": args.round, **r} for r in rows],
                      key=lambda r: r["round"])
    if args.output:
        write_json(args.output, rows)


if __name__ == "__main__":
    main()
