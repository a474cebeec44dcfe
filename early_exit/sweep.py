"""The accuracy/compute trade-off: the exit agent trained at several compute weights, beside the baselines.

    eecnn-sweep --classifier-ckpt logs/classifier/version_0/checkpoints/last.ckpt --output results/sweep

Each agent is trained by `eecnn fit --config configs/agent.yaml` (extra CLI flags after ``--``) and
measured, like every baseline, by ``evaluate_exits`` on the test split. Threshold baselines are
tuned on the validation split to the FLOPs saving each agent reached there, and to a fixed grid.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from early_exit.agent import ExitAgent  # noqa: E402
from early_exit.cli import EarlyExitCLI  # noqa: E402
from early_exit.errors import InputError  # noqa: E402
from early_exit.evaluation import baselines, evaluate_exits  # noqa: E402

AGENT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "agent.yaml"


def train_agent(classifier_ckpt: str, compute_weight: float, config: Path, extra: list[str]) -> tuple[dict, ExitAgent]:
    """Train one agent through the CLI; return its test figures (the best checkpoint's greedy policy) and it."""
    cli = EarlyExitCLI(args=["--config", str(config), "--model.classifier_ckpt", classifier_ckpt,
                             "--model.compute_weight", str(compute_weight),
                             "--trainer.logger.name", f"sweep/compute_weight_{compute_weight:g}", *extra], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model)
    seconds = time.perf_counter() - start
    best = cli.trainer.checkpoint_callback.best_model_path
    agent = ExitAgent.load_from_checkpoint(best, map_location="cpu")
    agent.setup("test")  # reads the exit cache: no CNN runs
    val, test = (evaluate_exits(agent.greedy_exits(agent.features[split]), agent.outputs[split], agent.costs,
                                agent.full_flops) for split in ("val", "test"))
    row = {"name": f"agent, compute_weight {compute_weight:g}", "compute_weight": compute_weight, **test,
           "val_flops_saved_pct": val["flops_saved_pct"], "train_seconds": seconds,
           "env_steps_per_s": cli.model.env_steps * agent.hparams.num_envs / seconds,
           "updates_per_s": cli.trainer.global_step / seconds, "checkpoint": best}
    return row, agent


def write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| policy | test accuracy (%) | FLOPs saved (%) | exit shares (%) |", "|---|---:|---:|---|"]
    for row in rows:
        shares = " / ".join(f"{100 * p:.1f}" for p in row["exit_distribution"])
        lines.append(f"| {row['name']} | {row['accuracy']:.2f} | {row['flops_saved_pct']:.1f} | {shares} |")
    return "\n".join(lines) + "\n"


def plot(agents: list[dict], others: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 5))
    for kind, style in (("max_softmax", "s--"), ("entropy", "^:")):
        points = sorted((r["flops_saved_pct"], r["accuracy"]) for r in others if r["name"].startswith(kind))
        ax.plot(*zip(*points), style, label=f"{kind.replace('_', '-')} thresholds (tuned on val)", alpha=0.8)
    fixed = [r for r in others if r["name"].startswith("always")]
    ax.plot([r["flops_saved_pct"] for r in fixed], [r["accuracy"] for r in fixed], "kx", label="always exit k")
    oracle = next(r for r in others if r["name"] == "oracle")
    ax.plot(oracle["flops_saved_pct"], oracle["accuracy"], "g*", markersize=12, label="oracle (upper bound)")
    points = sorted((r["flops_saved_pct"], r["accuracy"], r["compute_weight"]) for r in agents)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="C3", linewidth=2, label="DQN exit agent")
    for saved, accuracy, weight in points:
        ax.annotate(f"λ={weight:g}", (saved, accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("FLOPs saved vs. the full network (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs. compute on the CIFAR-10 test split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=120)
    os.replace(tmp.name, path)
    plt.close(fig)


def run(classifier_ckpt: str, compute_weights: list[float], output: Path, config: Path, extra: list[str]) -> list[dict]:
    agents = []
    for weight in compute_weights:
        row, agent = train_agent(classifier_ckpt, weight, config, extra)
        agents.append(row)
    targets = sorted({round(a["val_flops_saved_pct"], 1) for a in agents} | {20.0, 30.0, 40.0, 50.0, 60.0})
    others = baselines(agent.outputs["val"], agent.outputs["test"], agent.costs, agent.full_flops, tuple(targets))
    rows = agents + others
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "sweep.json", json.dumps(rows, indent=2) + "\n")
    write_atomic(output / "sweep.md", markdown_table(rows))
    plot(agents, others, output / "sweep.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="eecnn-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier-ckpt", required=True)
    parser.add_argument("--compute-weights", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--output", type=Path, default=Path("results/sweep"))
    parser.add_argument("--config", type=Path, default=AGENT_CONFIG)
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    sys.argv = sys.argv[:1]  # each agent's CLI gets its arguments from args=, not from this command's flags
    try:
        rows = run(args.classifier_ckpt, args.compute_weights, args.output, args.config, extra)
    except InputError as err:
        sys.exit(f"eecnn-sweep: error: {err}")
    print(markdown_table(rows))
    print(f"wrote {args.output / 'sweep.json'}, {args.output / 'sweep.md'} and {args.output / 'sweep.png'}")


if __name__ == "__main__":
    main()
