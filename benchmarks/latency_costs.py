"""Time against FLOPs as the exit agent's cost: does an agent trained on a latency profile save more wall time?

    eecnn-latency results/classifier.ckpt results/agent/latency-batch1.json --batch-size 1
    eecnn fit --config configs/agent.yaml --data.classifier_ckpt results/classifier.ckpt \\
        --data.costs results/agent/latency-batch1.json --data.data_dir ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/latency_costs.py results/agent.ckpt logs/agent/version_N/checkpoints/<best>.ckpt \\
        --profile results/agent/latency-batch1.json --output results/agent/latency-costs.json

Both agents answer at the compute weight their exact validation curve, measured in the profile's seconds, gives
for each time-saving target (``--targets``, and the time the FLOPs agent saves on validation at its own operating
point), beside max-softmax thresholds tuned on the same seconds to the same targets: equal time on validation, so
the more accurate policy on test is the better one, and at equal accuracy the one that saves more. For each, on
the test split: accuracy, FLOPs saved and the time saved that the profile predicts; at the FLOPs agent's own
point, the time saved measured through the engine one image at a time (``--single-images``, ``--rounds``
interleaved, the median kept) against the full network.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

from early_exit.agent import read_operating_weight
from early_exit.cache import ExitCache
from early_exit.checkpoint import data_args, read_checkpoint
from early_exit.data import normalize
from early_exit.engine import EarlyExitEngine, seconds_per_image
from early_exit.errors import InputError
from early_exit.evaluation import (
    ExitOutputs,
    confidence_scores,
    evaluate_exits,
    operating_curve,
    path_flops,
    threshold_exits,
    tune_thresholds,
)
from early_exit.files import write_json
from early_exit.inference import EarlyExitPredictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flops_agent", help="an agent trained on FLOPs (e.g. results/agent.ckpt)")
    parser.add_argument("latency_agent", help="an agent of the same classifier trained with --data.costs PROFILE")
    parser.add_argument("--profile", required=True, help="the latency profile (eecnn-latency) to predict time with")
    parser.add_argument("--data", help="the data_dir to read, if not the one the classifier recorded")
    parser.add_argument("--targets", type=float, nargs="+", default=[40.0, 50.0, 55.0],
                        help="time saved on validation (%%) to compare the policies at, beside the FLOPs agent's own")
    parser.add_argument("--single-images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    try:
        agents = {name: EarlyExitPredictor.from_checkpoint(path).policy
                  for name, path in (("FLOPs-trained agent", args.flops_agent),
                                     ("latency-trained agent", args.latency_agent))}
        given = {"costs": args.profile} | ({"data_dir": args.data} if args.data else {})
        cache = ExitCache(**data_args(read_checkpoint(args.flops_agent), args.flops_agent) | given)
        cache.setup("test")
    except InputError as err:
        sys.exit(f"latency_costs: error: {err}")
    val, test = cache.outputs["val"], cache.outputs["test"]
    seconds, full_seconds = cache.costs, cache.full_cost
    flops, full_flops = path_flops(cache.model), float(cache.model.exit_flops[-1])

    flops_agent = agents["FLOPs-trained agent"]
    own = evaluate_exits(flops_agent.greedy_exits(val, flops_agent.operating_weight()), val, seconds,
                         full_seconds)["flops_saved_pct"]  # a saving of the costs given: here, of time
    targets = sorted({round(own, 1), *args.targets})
    scores = confidence_scores(val.logits, "max_softmax"), confidence_scores(test.logits, "max_softmax")
    curves = {name: operating_curve(agent.switch_weights(val.logits), val.correct(), seconds, full_seconds,
                                    agent.weight_range()[0]) for name, agent in agents.items()}  # exact, in seconds
    rows, weights = [], {}
    for target in targets:
        for name, agent in agents.items():
            weight = read_operating_weight(curves[name], target, clamp=True)
            weights[name, target] = weight
            rows.append(measure(name, target, agent.greedy_exits(test, weight), test, flops, full_flops, seconds,
                                full_seconds) | {"compute_weight": weight})
        thresholds = tune_thresholds(scores[0], val, seconds, full_seconds, target)
        rows.append(measure("max-softmax thresholds, tuned on time", target, threshold_exits(scores[1], thresholds),
                            test, flops, full_flops, seconds, full_seconds))

    singles = test_images(cache)[:args.single_images]
    engines = {name: EarlyExitEngine(cache.model, agent.greedy_policy(weights[name, round(own, 1)]))
               for name, agent in agents.items()}
    full_network = next(iter(engines.values())).full_network
    times: dict[str, list[float]] = {name: [] for name in [*engines, "full network"]}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            times[name].append(statistics.mean(seconds_per_image(engine, singles)))
        times["full network"].append(statistics.mean(seconds_per_image(full_network, singles)))
    full_time = statistics.median(times["full network"])
    measured = {name: 100 * (1 - statistics.median(times[name]) / full_time) for name in engines}
    for row in rows:
        if row["target"] == round(own, 1) and row["policy"] in measured:
            row["measured_time_saved_pct"] = measured[row["policy"]]
    print("| time saved on val (target, %) | policy | test accuracy (%) | FLOPs saved (%) | time saved, by the "
          "profile (%) | time saved, measured one image at a time (%) |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        wall = f"{row['measured_time_saved_pct']:.1f}" if "measured_time_saved_pct" in row else ""
        print(f"| {row['target']:g} | {row['policy']} | {row['accuracy']:.2f} | {row['flops_saved_pct']:.1f} | "
              f"{row['time_saved_pct']:.1f} | {wall} |")
    if args.output:
        write_json(args.output, {"rows": rows, "full_network_ms_per_image": 1e3 * full_time,
                                 "single_images": len(singles), "rounds": args.rounds, "profile": args.profile,
                                 "flops_agent": args.flops_agent, "latency_agent": args.latency_agent})


def measure(policy: str, target: float, exits: torch.Tensor, test: ExitOutputs, flops: torch.Tensor,
            full_flops: float, seconds: torch.Tensor, full_seconds: float) -> dict:
    result = evaluate_exits(exits, test, flops, full_flops)
    return {"target": target, "policy": policy, "accuracy": result["accuracy"],
            "flops_saved_pct": result["flops_saved_pct"],
            "time_saved_pct": evaluate_exits(exits, test, seconds, full_seconds)["flops_saved_pct"],
            "exit_distribution": result["exit_distribution"]}


def test_images(cache: ExitCache) -> torch.Tensor:
    return normalize(cache.split_images("test")[0])


if __name__ == "__main__":
    main()
