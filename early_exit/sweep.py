"""One exit agent along the accuracy/compute trade-off, over several seeds, beside the threshold baselines.

    eecnn-sweep --classifier-ckpt results/classifier.ckpt --output results/sweep

Each seed (``--seeds``) trains one agent by `eecnn fit --config configs/agent.yaml` (flags after ``--``
go to every run); its Q-network takes the compute weight as an input, so one agent covers every
budget. At each FLOPs-saving target (``--targets``) it answers at the weight its validation curve gives
for that target, and is measured by ``evaluate_exits`` on the test split. The max-softmax and entropy
thresholds are tuned on the same validation images to the same targets and to a 2 %-step grid, so each
agent point is compared with the best threshold rule at the FLOPs that point spends on test, and with
the same rules tuned on the test split itself: a ceiling that no threshold tuned on held-out images passes.
``--fixed-weights`` also trains one agent per fixed compute weight, as agents were trained before.
"""

import argparse
import statistics
import sys
import time
from importlib.resources import files
from pathlib import Path

import numpy as np

from early_exit.agent import ExitAgent
from early_exit.cache import ExitCache
from early_exit.cli import EarlyExitCLI
from early_exit.errors import InputError
from early_exit.evaluation import baselines, evaluate_exits
from early_exit.files import write_json, write_text
from early_exit.report import plot_tradeoff, save_figure

AGENT_CONFIG = Path(str(files("early_exit.configs") / "agent.yaml"))  # configs/agent.yaml, in any install
GRID = tuple(float(t) for t in range(10, 72, 2))  # threshold tunings that draw the baseline curves


def train_agent(classifier_ckpt: str, name: str, config: Path, extra: list[str]) -> tuple[dict, ExitAgent, ExitCache]:
    """Train one agent through the CLI, logging under ``logs/<name>`` (``extra`` flags last); return how it
    went, its best checkpoint, loaded, and its exit cache with the validation and test splits read."""
    cli = EarlyExitCLI(args=["--config", str(config), "--data.classifier_ckpt", classifier_ckpt,
                             "--trainer.logger.name", name, *extra], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    callback = cli.trainer.checkpoint_callback
    agent = ExitAgent.load_from_checkpoint(callback.best_model_path, map_location="cpu")
    cli.datamodule.setup("test")  # reads the exit cache: no CNN runs
    run = {"name": name, "checkpoint": callback.best_model_path, "val_reward": float(callback.best_model_score),
           "train_seconds": seconds, "env_steps_per_s": cli.model.env_steps * agent.hparams.num_envs / seconds,
           "updates_per_s": cli.trainer.global_step / seconds}
    return run, agent, cli.datamodule


def measure(agent: ExitAgent, cache: ExitCache, name: str) -> dict:
    """The agent's greedy policy at its operating weight (for a target it never reaches, the weight that
    saves the most) on test, with the FLOPs it saves on validation."""
    weight = agent.operating_weight(clamp=True)
    val, test = (evaluate_exits(agent.greedy_exits(cache.outputs[split], weight), cache.outputs[split], cache.costs,
                                cache.full_cost) for split in ("val", "test"))
    return {"name": name, "compute_weight": weight, **test, "val_flops_saved_pct": val["flops_saved_pct"]}


def best_threshold_at(others: list[dict], flops_saved: float) -> float:
    """The test accuracy of the better threshold rule (max-softmax or entropy) at ``flops_saved`` % on test,
    interpolated along its tuned points."""
    def curve(kind: str) -> float:
        points = sorted((b["flops_saved_pct"], b["accuracy"]) for b in others if b["name"].startswith(kind))
        saved, accuracy = zip(*points)
        return float(np.interp(flops_saved, saved, accuracy))
    return max(curve("max_softmax"), curve("entropy"))


def summarise(rows: list[dict], others: list[dict], ceiling: list[dict], targets: list[float]) -> list[dict]:
    """Per target: the agents' test accuracy and FLOPs saved (mean and standard deviation over seeds), the
    thresholds tuned to the same target, and each agent's lead over the best threshold at its own FLOPs:
    tuned on validation (``others``) and on test (``ceiling``)."""
    summary = []
    for target in targets:
        points = [r for r in rows if r.get("target") == target]
        accuracy, saved = [p["accuracy"] for p in points], [p["flops_saved_pct"] for p in points]
        lead, ceiling_lead = ([p["accuracy"] - best_threshold_at(thresholds, p["flops_saved_pct"]) for p in points]
                              for thresholds in (others, ceiling))
        tuned = {b["name"].split(" ")[0]: b for b in others if b["name"].endswith(f">= {target:g}% saved")}
        summary.append({
            "target_flops_saved": target, "seeds": len(points),
            "agent_accuracy": statistics.mean(accuracy), "agent_accuracy_std": statistics.pstdev(accuracy),
            "agent_flops_saved_pct": statistics.mean(saved), "agent_flops_saved_pct_std": statistics.pstdev(saved),
            **{f"{kind}_{key}": tuned[kind][key] for kind in ("max_softmax", "entropy")
               for key in ("accuracy", "flops_saved_pct")},
            "lead_over_best_threshold": statistics.mean(lead), "lead_std": statistics.pstdev(lead),
            "lead_over_test_tuned_threshold": statistics.mean(ceiling_lead)})
    return summary


def summary_table(summary: list[dict]) -> str:
    lines = [("| FLOPs saved target (val) | agent test accuracy (%) | agent FLOPs saved (%) | max-softmax (%) | "
              "entropy (%) | agent lead at equal FLOPs (points) | lead over thresholds tuned on test |"),
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        lines.append(
            f"| {s['target_flops_saved']:g} | {s['agent_accuracy']:.2f} ± {s['agent_accuracy_std']:.2f} | "
            f"{s['agent_flops_saved_pct']:.1f} ± {s['agent_flops_saved_pct_std']:.1f} | "
            f"{s['max_softmax_accuracy']:.2f} at {s['max_softmax_flops_saved_pct']:.1f} | "
            f"{s['entropy_accuracy']:.2f} at {s['entropy_flops_saved_pct']:.1f} | "
            f"{s['lead_over_best_threshold']:+.2f} ± {s['lead_std']:.2f} | "
            f"{s['lead_over_test_tuned_threshold']:+.2f} |")
    return "\n".join(lines) + (f"\n\nMeans ± standard deviations over {summary[0]['seeds']} agent seeds; thresholds "
                               "tuned on validation to the same target. The lead is each agent's test accuracy minus "
                               "the better threshold rule's, interpolated at the FLOPs that agent saves on test; the "
                               "last column compares with the same rules tuned on test itself, their ceiling.\n")


def policy_table(rows: list[dict]) -> str:
    lines = ["| policy | test accuracy (%) | FLOPs saved (%) | exit shares (%) |", "|---|---:|---:|---|"]
    for row in rows:
        shares = " / ".join(f"{100 * p:.1f}" for p in row["exit_distribution"])
        lines.append(f"| {row['name']} | {row['accuracy']:.2f} | {row['flops_saved_pct']:.1f} | {shares} |")
    return "\n".join(lines) + "\n"


def run(classifier_ckpt: str, seeds: list[int], targets: list[float], fixed_weights: list[float], output: Path,
        config: Path, extra: list[str]) -> dict:
    runs, rows = [], []
    for seed in seeds:
        trained, agent, cache = train_agent(classifier_ckpt, f"{output.name}/seed_{seed}", config,
                                            ["--seed_everything", str(seed), *extra])
        runs.append(trained | {"seed": seed})  # its logs: logs/<output folder name>/seed_<seed>
        for target in targets:
            agent.hparams.target_flops_saved = target
            name = f"agent seed {seed}, {target:g}% saved on val"
            rows.append(measure(agent, cache, name) | {"seed": seed, "target": target})
    for weight in fixed_weights:
        trained, fixed_agent, cache = train_agent(classifier_ckpt, f"{output.name}/fixed_{weight:g}", config,
                                           ["--model.compute_weight_range", "null", "--model.compute_weight",
                                            str(weight), "--model.target_flops_saved", "null", *extra])
        runs.append(trained | {"compute_weight": weight})
        rows.append(measure(fixed_agent, cache, f"agent trained at compute weight {weight:g} only") | {"fixed": True})
    val, test = cache.outputs["val"], cache.outputs["test"]
    others = baselines(val, test, cache.costs, cache.full_cost, tuple(sorted(set(GRID) | set(targets))))
    ceiling = baselines(test, test, cache.costs, cache.full_cost, GRID)
    summary = summarise(rows, others, ceiling, targets)
    output.mkdir(parents=True, exist_ok=True)
    result = {"summary": summary, "runs": runs, "rows": rows + others, "tuned_on_test": ceiling}
    write_json(output / "sweep.json", result)
    tuned = [b for b in others if not b["name"].endswith("saved") or any(b["name"].endswith(f">= {t:g}% saved")
                                                                          for t in targets)]
    write_text(output / "sweep.md", summary_table(summary) + "\n" + policy_table(rows + tuned))
    curve = [(f"{s['target_flops_saved']:g} %", s["agent_flops_saved_pct"], s["agent_accuracy"],
              s["agent_accuracy_std"]) for s in summary]
    fixed = [(f"λ={r['compute_weight']:g}", r["flops_saved_pct"], r["accuracy"], 0.0) for r in rows if r.get("fixed")]
    save_figure(plot_tradeoff({f"DQN agent at each target (mean ± sd, {len(seeds)} seeds)": curve,
                               "DQN agents trained at one compute weight each": fixed}, others), output / "sweep.png")
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(prog="eecnn-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier-ckpt", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[20.0, 30.0, 40.0, 50.0, 60.0],
                        help="FLOPs saved (%%) on validation to measure each agent at")
    parser.add_argument("--fixed-weights", type=float, nargs="*", default=[],
                        help="also train one agent per compute weight, fixed during training")
    parser.add_argument("--output", type=Path, default=Path("results/sweep"))
    parser.add_argument("--config", type=Path, default=AGENT_CONFIG,
                        help="the config each agent trains with (default: eecnn's configs/agent.yaml)")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if bad := [t for t in args.targets if not 0 < t < 100]:
        parser.error(f"--targets are percentages between 0 and 100, got {bad[0]:g}")
    sys.argv = sys.argv[:1]  # each agent's CLI gets its arguments from args=, not from this command's flags
    try:
        result = run(args.classifier_ckpt, args.seeds, args.targets, args.fixed_weights, args.output, args.config,
                     extra)
    except InputError as err:
        sys.exit(f"eecnn-sweep: error: {err}")
    print(summary_table(result["summary"]))
    print(f"wrote {args.output / 'sweep.json'}, {args.output / 'sweep.md'} and {args.output / 'sweep.png'}")


if __name__ == "__main__":
    main()
