"""The curves a classifier run logged: read from its TensorBoard events, or from the small CSV file that
``eecnn-export`` writes beside a shipped checkpoint so that the report can still plot how it trained."""

import csv
import io
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from early_exit.files import write_text

Curves = dict[str, tuple[list[int], list[float]]]  # tag -> (steps, values), in step order

SHIPPED = ("train/loss_step", "val/loss", "val/acc_exit")  # tag prefixes: the loss, each exit's val loss and accuracy


def read_scalars(run_dir: str | Path) -> Curves:
    """Every scalar tag in a run's TensorBoard event files."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
            for tag in events.Tags()["scalars"]}


def curves_path(checkpoint: str | Path) -> Path:
    """Where a shipped checkpoint's curves file lies: ``classifier.ckpt`` -> ``classifier-curves.csv``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}-curves.csv")


def run_folder(checkpoint: str | Path) -> Path | None:
    """The folder with the TensorBoard events of the run that wrote a checkpoint: Lightning puts checkpoints
    in ``<run>/checkpoints/``."""
    path = Path(checkpoint).resolve()
    return next((folder for folder in (path.parent, path.parent.parent)
                 if any(folder.glob("events.out.tfevents.*"))), None)


def write_curves(curves: Curves, path: Path) -> None:
    """``curves`` as ``tag,step,value`` rows, written atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("tag", "step", "value"))
    for tag, (steps, values) in curves.items():
        writer.writerows((tag, step, f"{value:.6g}") for step, value in zip(steps, values))
    write_text(path, text.getvalue())


def ship_curves(source: str | Path, target: str | Path) -> Path | None:
    """The loss and per-exit validation curves of the run that wrote checkpoint ``source``, in a file beside its
    shipped copy ``target``; None if that run logged none (an agent's run, or a checkpoint moved from its run)."""
    run = run_folder(source)
    curves = {tag: c for tag, c in read_scalars(run).items() if tag.startswith(SHIPPED)} if run is not None else {}
    if not curves:
        return None
    write_curves(curves, path := curves_path(target))
    return path


def read_curves(path: Path) -> Curves:
    curves: Curves = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            steps, values = curves.setdefault(row["tag"], ([], []))
            steps.append(int(row["step"]))
            values.append(float(row["value"]))
    return curves


def training_curves(checkpoint: str | Path) -> Curves | None:
    """A classifier checkpoint's logged curves: its curves file if it was shipped with one, else its run's
    TensorBoard events, else None."""
    if (shipped := curves_path(checkpoint)).is_file():
        return read_curves(shipped)
    run = run_folder(checkpoint)
    return read_scalars(run) if run is not None else None


def time_to_accuracy(run_dir: str | Path, targets: tuple[float, ...] = (0.85, 0.90), tag: str = "val/acc") -> dict:
    """When a run's ``tag`` (by default the final exit's validation accuracy) first reached each target, read
    from its TensorBoard events: the epoch (1-based) and the training time in seconds. Also the run's epochs,
    its training time to the last validation and the best value. Each session (one events file, from the
    first event Lightning writes once training starts) counts up to its last ``tag`` event, so a run resumed
    from a checkpoint counts neither the pause nor the part of an epoch lost to the interruption."""
    sessions = []
    for file in Path(run_dir).glob("events.out.tfevents.*"):
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        tags = events.Tags()["scalars"]
        if tag in tags:
            sessions.append((min(events.Scalars(t)[0].wall_time for t in tags), events, "epoch" in tags))
    if not sessions:
        raise ValueError(f"{run_dir} has no {tag!r} scalars: is it an eecnn classifier run's log folder?")
    values, epoch_at, elapsed = [], {}, 0.0
    for start, events, has_epoch in sorted(sessions, key=lambda session: session[0]):
        values += [(e.step, elapsed + e.wall_time - start, e.value) for e in events.Scalars(tag)]
        epoch_at |= {e.step: int(e.value) for e in events.Scalars("epoch")} if has_epoch else {}
        elapsed = values[-1][1]

    def when(step: int, seconds: float, value: float) -> dict:
        return {"epoch": epoch_at.get(step, -1) + 1, "seconds": seconds, "value": value}

    reached = {f"{target:g}": next((when(*v) for v in values if v[2] >= target), None) for target in targets}
    return {"run": str(run_dir), "epochs": epoch_at.get(values[-1][0], -1) + 1, "seconds": elapsed,
            "best": max(v[2] for v in values), "reached": reached}
