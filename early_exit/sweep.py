"""The accuracy/compute trade-off: the exit agent trained at several compute weights, beside the baselines.

    eecnn-sweep --classifier-ckpt logs/classifier/version_0/checkpoints/last.ckpt --output results/sweep

Each agent is trained by `eecnn fit --config configs/agent.yaml` (extra CLI flags after ``--``) and
measured, like every baseline, by ``evaluate_exits`` on the test split. Threshold baselines are
tuned on the validation split to the FLOPs saving each agent reached there, and to a fixed grid.
"""

import argparse
import sys
import time
from pathlib import Path

from early_exit.agent import ExitAgent
from early_exit.cli import EarlyExitCLI
from early_exit.errors import InputError
from early_exit.evaluation import baselines, evaluate_exits
from early_exit.files import write_json, write_text
from early_exit.report import plot_tradeoff, save_figure

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
    agent.data = cli.model.data  # the images the --data flags name
    agent.setup("test")  # reads the exit cache: no CNN runs
    val, test = (evaluate_exits(agent.greedy_exits(agent.outputs[split]), agent.outputs[split], agent.costs,
                                agent.full_flops) for split in ("val", "test"))
    row = {"name": f"agent, compute_weight {compute_weight:g}", "compute_weight": compute_weight, **test,
           "val_flops_saved_pct": val["flops_saved_pct"], "train_seconds": seconds,
           "env_steps_per_s": cli.model.env_steps * agent.hparams.num_envs / seconds,
           "updates_per_s": cli.trainer.global_step / seconds, "checkpoint": best}
    return row, agent


def markdown_table(rows: list[dict]) -> str:
    lines = ["| policy | test accuracy (%) | FLOPs saved (%) | exit shares (%) |", "|---|---:|---:|---|"]
    for row in rows:
        shares = " / ".join(f"{100 * p:.1f}" for p in row["exit_distribution"])
        lines.append(f"| {row['name']} | {row['accuracy']:.2f} | {row['flops_saved_pct']:.1f} | {shares} |")
    return "\n".join(lines) + "\n"


def run(classifier_ckpt: str, compute_weights: list[float], output: Path, config: Path, extra: list[str]) -> list[dict]:
    agents = []
    for weight in compute_weights:
        row, agent = train_agent(classifier_ckpt, weight, config, extra)
        agents.append(row)
    targets = sorted({round(a["val_flops_saved_pct"], 1) for a in agents} | {20.0, 30.0, 40.0, 50.0, 60.0})
    others = baselines(agent.outputs["val"], agent.outputs["test"], agent.costs, agent.full_flops, tuple(targets))
    rows = agents + others
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "sweep.json", rows)
    write_text(output / "sweep.md", markdown_table(rows))
    points = [(f"λ={a['compute_weight']:g}", a["flops_saved_pct"], a["accuracy"]) for a in agents]
    save_figure(plot_tradeoff(points, others), output / "sweep.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="eecnn-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier-ckpt", required=True)
    parser.add_argument("--compute-weights", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0])
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
