"""The evaluation report of an early-exit policy: the figures users of early-exit models ask for, as JSON,
plots, TensorBoard scalars and a printed summary.

Accuracy, exits and FLOPs come from the early-exit engine, which computes only the exits it reaches;
per-exit statistics (every exit's accuracy and confidence on every image) come from all exits' outputs
on the same images, and the throughput from timing the engine against the plain network.
"""

import itertools
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor

from early_exit.curves import Curves, training_curves
from early_exit.data import normalize
from early_exit.engine import EarlyExitEngine, EarlyExitResult, describe_device, images_per_second
from early_exit.evaluation import ExitOutputs, baselines, evaluate_exits, policy_exits
from early_exit.files import write_atomic, write_json


def run_engine(engine: EarlyExitEngine, images: Tensor, batch_size: int = 256) -> tuple[EarlyExitResult, float]:
    """The engine's results on uint8 ``images`` in batches, and its throughput in images/s (normalisation
    included, after one warm-up batch)."""
    results: list[EarlyExitResult] = []
    throughput = images_per_second(lambda batch: results.append(engine(normalize(batch))), images, batch_size)
    return EarlyExitResult.cat(results[1:]), throughput  # the warm-up batch ran twice


def build_report(result: EarlyExitResult, outputs: ExitOutputs, classes: list[str], baselines: list[dict],
                 throughput: dict, full_flops: float) -> dict:
    """The report of a policy run through the engine (``result``) on the images whose all-exit outputs
    (and labels) are ``outputs``; ``baselines`` are other policies measured on the same images."""
    labels, exits, num_exits = outputs.labels, result.exit, outputs.num_exits
    right = result.prediction == labels
    all_right = outputs.correct().double()
    mean_flops = result.flops.double().mean().item()
    accuracy = 100 * right.double().mean().item()
    saved = 100 * (1 - mean_flops / full_flops)
    confidence = outputs.logits.float().softmax(-1).max(-1).values
    predictions = outputs.predictions()

    def percent(mask: Tensor) -> float | None:
        return 100 * mask.double().mean().item() if len(mask) else None

    return {
        "accuracy": accuracy,
        "flops_saved_pct": saved,
        "mean_flops": mean_flops,
        "full_flops": full_flops,
        "exit_distribution": (torch.bincount(exits, minlength=num_exits).double() / len(exits)).tolist(),
        "exit_accuracy": [percent(right[exits == k]) for k in range(num_exits)],
        "per_exit_accuracy": (100 * all_right.mean(0)).tolist(),
        "per_class_accuracy": {name: percent(right[labels == c]) for c, name in enumerate(classes)},
        "per_class_exit_accuracy": {name: (100 * all_right[labels == c].mean(0)).tolist()
                                    for c, name in enumerate(classes)},
        "confidence": [{"mean": c.mean().item(), "std": c.std().item()} for c in confidence.T],
        "effectiveness": accuracy * saved / 100,
        "prediction_changes": (predictions[:, 1:] != predictions[:, :-1]).sum(0).tolist(),
        "baselines": [{key: b[key] for key in ("name", "accuracy", "flops_saved_pct", "time_saved_pct") if key in b}
                      for b in baselines],
        "throughput": throughput,
    }


def evaluate_engine(engine: EarlyExitEngine, images: Tensor, outputs: ExitOutputs, classes: list[str],
                    baselines: list[dict], batch_size: int = 256) -> tuple[EarlyExitResult, dict]:
    """Run uint8 ``images`` through the engine and time it against the plain network; return the engine's
    results and the report."""
    result, engine_speed = run_engine(engine, images, batch_size)
    full_speed = images_per_second(lambda batch: engine.full_network(normalize(batch)), images, batch_size)
    flops_ratio = engine.full_flops / result.flops.double().mean().item()
    throughput = {
        "engine_images_per_s": engine_speed,
        "full_network_images_per_s": full_speed,
        "speedup": engine_speed / full_speed,
        "flops_ratio": flops_ratio,
        "batch_size": batch_size,
        "device": describe_device(next(engine.model.parameters()).device),
    }
    return result, build_report(result, outputs, classes, baselines, throughput, engine.full_flops)


def time_saved(distribution: list[float], latency: tuple[Tensor, float]) -> float:
    """The share of the full network's time (%) that exit shares ``distribution`` save, by a latency profile's
    seconds per exit and full-network seconds (``engine.latency_costs``)."""
    path, full = latency
    return 100 * (1 - float(torch.tensor(distribution, dtype=torch.float64) @ path) / full)


def policy_report(engine: EarlyExitEngine, images: Tensor, val: ExitOutputs, test: ExitOutputs, classes: list[str],
                  batch_size: int = 256, latency: tuple[Tensor, float] | None = None) -> dict:
    """The report of ``engine``'s exit policy, whatever it is, on the uint8 test ``images`` whose all-exit
    outputs are ``test``; threshold baselines are tuned on ``val`` to fixed savings and to the saving the
    policy itself reaches on ``val``, so one baseline always spends what the policy spends. With a ``latency``
    profile (the cost an agent trained with ``--data.costs`` trades against) the thresholds are tuned to savings
    of its time instead, and the policy and every baseline also get the time they save (``time_saved_pct``)."""
    own = evaluate_exits(policy_exits(engine.policy, val.logits), val, engine.costs, engine.full_flops)
    own_saving = own["flops_saved_pct"] if latency is None else time_saved(own["exit_distribution"], latency)
    targets = sorted({20.0, 30.0, 40.0, 50.0, 60.0, round(own_saving, 1)})
    others = baselines(val, test, engine.costs, engine.full_flops, tuple(targets), tuning=latency)
    if latency is not None:
        others = [b | {"time_saved_pct": time_saved(b["exit_distribution"], latency)} for b in others]
    report = evaluate_engine(engine, images, test, classes, others, batch_size)[1]
    if latency is not None:
        report["time_saved_pct"] = time_saved(report["exit_distribution"], latency)
    return report | {"val_flops_saved_pct": own["flops_saved_pct"]}  # what a FLOPs target is held to


class EarlyExitReport(Callback):
    """``eecnn test`` of an exit policy: the test split through the early-exit engine, then report.json, plots,
    TensorBoard scalars and figures in the run's folder, and a printed summary (on the main process only).

    The engine runs the classifier's CNN with the tested module's ``greedy_policy()``. The rest comes from the data
    module, an ``ExitCache``: the CNN, the cached all-exit outputs of "val" and "test", the images, the class
    names and ``hparams.classifier_ckpt``, whose training curves are plotted if they are found
    (``early_exit.curves.training_curves``).
    """

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        cache = trainer.datamodule
        images, _ = cache.split_images("test")
        test = cache.outputs["test"]
        engine = EarlyExitEngine(cache.model, module.greedy_policy()).to(module.device)
        report = policy_report(engine, images, cache.outputs["val"], test, cache.classes,
                               cache.images.hparams.batch_size, cache.latency)
        figures = report_figures(report, test, training_curves(cache.hparams.classifier_ckpt))
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"report/{k}": v for k, v in flatten(report).items()}, step=trainer.global_step)
            if isinstance(trainer.logger, TensorBoardLogger):
                for name, figure in figures.items():
                    trainer.logger.experiment.add_figure(f"report/{name}", figure, close=False)
        folder = Path(trainer.log_dir)
        save_report(report, figures, folder)
        print(f"{summary_table(report)}\nwrote {folder / 'report.json'} and {len(figures)} plots beside it")


def summary_table(report: dict) -> str:
    """The report's headline figures as a plain-text table."""
    t = report["throughput"]
    shares = " / ".join(f"{100 * p:.1f}" for p in report["exit_distribution"])
    per_exit = " / ".join(f"{a:.1f}" for a in report["per_exit_accuracy"])
    rows = [
        ("accuracy", f"{report['accuracy']:.2f} %"),
        ("FLOPs saved", (f"{report['flops_saved_pct']:.1f} % ({report['mean_flops'] / 1e6:.1f} of "
                         f"{report['full_flops'] / 1e6:.1f} MFLOPs per image)")),
        ("FLOPs saved on validation", f"{report['val_flops_saved_pct']:.1f} %"),
        *([("time saved, by the latency profile", f"{report['time_saved_pct']:.1f} %")] if "time_saved_pct" in report
          else []),
        ("exit shares", f"{shares} %"),
        ("each exit's accuracy", f"{per_exit} %"),
        ("effectiveness", f"{report['effectiveness']:.2f}"),
        ("engine / full network", (f"{t['engine_images_per_s']:.0f} / {t['full_network_images_per_s']:.0f} img/s: "
                                   f"{t['speedup']:.2f}x for a FLOPs ratio of {t['flops_ratio']:.2f}x "
                                   f"(batch {t['batch_size']}, {t['device']})")),
    ]
    rows += [(f"baseline: {b['name']}", f"{b['accuracy']:.2f} % at {b['flops_saved_pct']:.1f} % saved")
             for b in report["baselines"]]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def flatten(report: dict) -> dict[str, float]:
    """Every number in the report under a slash-separated name, for TensorBoard."""
    flat: dict[str, float] = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}/{key}", item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                visit(f"{prefix}/{item.get('name', i) if isinstance(item, dict) else f'exit{i + 1}'}", item)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[prefix] = float(value)

    visit("", report)
    return {name.lstrip("/"): value for name, value in flat.items() if not name.endswith("/name")}


def exit_labels(report: dict) -> list[str]:
    return [f"exit {k + 1}" for k in range(len(report["exit_distribution"]))]


def plot_exit_distribution(report: dict) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    shares = [100 * p for p in report["exit_distribution"]]
    bars = ax.bar(exit_labels(report), shares, color="C0")
    ax.bar_label(bars, [f"{s:.1f} %" for s in shares])
    ax.set_ylabel("share of test images (%)")
    ax.set_title(f"Where images exit: {report['flops_saved_pct']:.1f} % of FLOPs saved, "
                 f"{report['accuracy']:.2f} % accurate")
    ax.set_ylim(0, max(shares) * 1.15)
    return fig


def plot_confidence(outputs: ExitOutputs) -> Figure:
    confidence = outputs.logits.float().softmax(-1).max(-1).values
    correct = outputs.correct()
    fig = Figure(figsize=(3.2 * outputs.num_exits, 3.4))
    axes = fig.subplots(1, outputs.num_exits, sharey=True)
    bins = torch.linspace(0, 1, 21).tolist()
    for k, ax in enumerate(axes):
        ax.hist([confidence[correct[:, k], k].numpy(), confidence[~correct[:, k], k].numpy()], bins=bins,
                stacked=True, color=["C2", "C3"], label=["right", "wrong"])
        ax.set_title(f"exit {k + 1}")
        ax.set_xlabel("max softmax probability")
    axes[0].set_ylabel("test images")
    axes[-1].legend()
    fig.suptitle("Confidence of every exit on every test image")
    fig.tight_layout()
    return fig


def plot_per_class_accuracy(report: dict) -> Figure:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    names, accuracy = zip(*report["per_class_accuracy"].items())
    ax.bar(names, [a or 0 for a in accuracy], color="C0")
    ax.axhline(report["accuracy"], color="k", linestyle="--", label=f"all classes: {report['accuracy']:.2f} %")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy per class, early-exit policy")
    ax.set_ylim(0, 100)
    ax.tick_params(axis="x", rotation=45)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_class_exit_accuracy(report: dict) -> Figure:
    names = list(report["per_class_exit_accuracy"])
    grid = torch.tensor([report["per_class_exit_accuracy"][n] for n in names])
    fig = Figure(figsize=(1.4 * grid.shape[1] + 3, 0.45 * len(names) + 1.5))
    ax = fig.subplots()
    image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (row, col), value in zip(itertools.product(*map(range, grid.shape)), grid.flatten().tolist()):
        ax.text(col, row, f"{value:.0f}", ha="center", va="center", color="w" if value < 60 else "k", fontsize=8)
    ax.set_xticks(range(grid.shape[1]), exit_labels(report))
    ax.set_yticks(range(len(names)), names)
    ax.set_title("Accuracy (%) of each exit on each class, all test images")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    return fig


def plot_tradeoff(policies: dict[str, list[tuple[str, float, float, float]]], baselines: list[dict]) -> Figure:
    """Accuracy against FLOPs saved: each of ``policies`` a line of labelled (name, flops_saved_pct, accuracy,
    accuracy's standard deviation) points, over the threshold curves, fixed exits and oracle among ``baselines``."""
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for kind, style in (("max_softmax", "s--"), ("entropy", "^:")):
        points = sorted((b["flops_saved_pct"], b["accuracy"]) for b in baselines if b["name"].startswith(kind))
        if points:
            ax.plot(*zip(*points), style, label=f"{kind.replace('_', '-')} thresholds (tuned on val)", alpha=0.8)
    fixed = [b for b in baselines if b["name"].startswith("always")]
    ax.plot([b["flops_saved_pct"] for b in fixed], [b["accuracy"] for b in fixed], "kx", label="always exit k")
    for b in baselines:
        if b["name"] == "oracle":
            ax.plot(b["flops_saved_pct"], b["accuracy"], "g*", markersize=12, label="oracle (upper bound)")
    for color, (label, points) in zip(("C3", "C4"), policies.items()):
        points = sorted(points, key=lambda p: p[1])
        if not points:
            continue
        _, saved, accuracy, spread = zip(*points)
        ax.errorbar(saved, accuracy, yerr=spread, fmt="o-", color=color, linewidth=2, capsize=3, label=label)
        for name, x, y, _ in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("FLOPs saved vs. the full network (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs. compute on the test split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def plot_training_curves(scalars: Curves) -> Figure | None:
    """The classifier's loss and per-exit validation accuracy from its logged curves, if there are any."""
    exits = sorted(tag for tag in scalars if tag.startswith("val/acc_exit"))
    if not exits:
        return None
    fig = Figure(figsize=(11, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for tag, label in (("train/loss_step", "train (per step)"), ("val/loss", "validation")):
        if tag in scalars:
            loss_ax.plot(*scalars[tag], label=label)
    loss_ax.set_xlabel("optimiser step")
    loss_ax.set_ylabel("weighted loss over exits")
    loss_ax.set_title("Classifier training loss")
    loss_ax.legend()
    for tag in exits:
        steps, values = scalars[tag]
        label = tag.removeprefix("val/acc_").replace("exit", "exit ")
        acc_ax.plot(steps, [100 * v for v in values], marker=".", label=label)
    acc_ax.set_xlabel("optimiser step")
    acc_ax.set_ylabel("validation accuracy (%)")
    acc_ax.set_title("Accuracy of each exit during training")
    acc_ax.legend()
    fig.tight_layout()
    return fig


def report_figures(report: dict, outputs: ExitOutputs, curves: Curves | None) -> dict[str, Figure]:
    """Every plot of the report by file stem; the training curves only if the classifier's are known."""
    figures = {
        "exit_distribution": plot_exit_distribution(report),
        "confidence": plot_confidence(outputs),
        "per_class_accuracy": plot_per_class_accuracy(report),
        "class_exit_accuracy": plot_class_exit_accuracy(report),
        "tradeoff": plot_tradeoff({"exit agent": [("", report["flops_saved_pct"], report["accuracy"], 0.0)]},
                                  report["baselines"]),
    }
    plot = plot_training_curves(curves) if curves is not None else None
    if plot is not None:
        figures["training_curves"] = plot
    return figures


def save_figure(figure: Figure, path: Path) -> None:
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=120))


def save_report(report: dict, figures: dict[str, Figure], folder: Path) -> None:
    """``report.json`` and one PNG per figure in ``folder``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "report.json", report)
    for name, figure in figures.items():
        save_figure(figure, folder / f"{name}.png")
