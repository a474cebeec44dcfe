"""Time to accuracy: how long a user waits for a classifier run to reach a final-exit validation accuracy.

    python benchmarks/time_to_accuracy.py logs/classifier/version_0 [more run folders] [--targets 85 90]

Reads each run's TensorBoard events (nothing is re-run) and prints, per target, the epoch and the training
time at which the final exit's validation accuracy (``val/acc``) first reached it, so recipes compare by
the time they take, not by epochs. Times are wall times on the machine that trained the run, from the
first logged step; a run resumed from a checkpoint counts each session, not the pause between them.
"""

import argparse
import sys
from pathlib import Path

from early_exit.curves import time_to_accuracy
from early_exit.files import write_json


def format_table(rows: list[dict], targets: list[float]) -> str:
    header = ["run", "epochs", "wall time", "best val acc"] + [f"{t:g} %: epoch, time" for t in targets]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        cells = [row["run"], str(row["epochs"]), f"{row['seconds'] / 60:.1f} min", f"{100 * row['best']:.2f} %"]
        for target in targets:
            hit = row["reached"][f"{target / 100:g}"]
            cells.append(f"{hit['epoch']}, {hit['seconds'] / 60:.1f} min" if hit else "not reached")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding TensorBoard events")
    parser.add_argument("--targets", type=float, nargs="+", default=[85.0, 90.0], help="accuracies in %%")
    parser.add_argument("--output", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    try:
        rows = [time_to_accuracy(run, tuple(t / 100 for t in args.targets)) for run in args.runs]
    except ValueError as err:
        sys.exit(f"time_to_accuracy: error: {err}")
    print(format_table(rows, args.targets))
    if args.output:
        write_json(args.output, rows)


if __name__ == "__main__":
    main()
