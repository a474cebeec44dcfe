"""Exit-agent training speed: eecnn's vectorised DQN on cached exit outputs against a loop in the seed's style.

    python benchmarks/agent_training.py --classifier-ckpt results/classifier.ckpt \\
        --output results/benchmarks/agent-training.json

- eecnn: `eecnn fit --config configs/agent.yaml` as shipped: the frozen CNN's exit outputs are cached
  once (timed separately), then 256 episodes advance at once as tensor operations;
- seed style: one episode at a time, as the seed's `train_rl_agent` does: a CNN forward on one image
  per episode (here a validation image, the agent's own), then one decision per exit, each followed by
  a DQN update on a batch sampled from a Python deque. It runs ``--seed-episodes`` episodes; its wall time
  for as many episodes as eecnn ran is extrapolated from that rate, and the table says so.

Both use the same Q-network shape, state features, rewards, batch size and optimiser.
"""

import argparse
import copy
import random
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F

from early_exit.agent import EXIT, NUM_CONFIDENCE_FEATURES, ExitAgent, with_weight
from early_exit.cache import ExitCache
from early_exit.cli import EarlyExitCLI
from early_exit.data import normalize
from early_exit.engine import describe_device, inference_copy
from early_exit.files import write_json

ROOT = Path(__file__).resolve().parents[1]


def eecnn_training(classifier_ckpt: str, data: str | None, workdir: str) -> dict:
    args = ["--config", str(ROOT / "configs" / "agent.yaml"), "--data.classifier_ckpt", classifier_ckpt,
            "--trainer.logger.save_dir", workdir, "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", workdir]
    cli = EarlyExitCLI(args=args + (["--data.data_dir", data] if data else []), run=False)
    agent: ExitAgent = cli.model
    cache: ExitCache = cli.datamodule
    start = time.perf_counter()
    cache.setup("fit")  # reads the cache, or builds it: the CNN runs once per image and split
    cache_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cli.trainer.fit(agent, datamodule=cache)
    seconds = time.perf_counter() - start
    steps = agent.env_steps * agent.hparams.num_envs
    return {"wall_s": seconds, "cache_s": cache_seconds, "episodes": agent.episodes, "env_steps": steps,
            "env_steps_per_s": steps / seconds, "episodes_per_s": agent.episodes / seconds, "agent": agent,
            "cache": cache}


def seed_style_training(template: ExitAgent, cache: ExitCache, episodes: int) -> dict:
    """One image, one CNN forward and one DQN update per decision at a time, as in the seed."""
    h = template.hparams
    images, labels = cache.split_images("val")
    model = inference_copy(cache.model)
    q_net = copy.deepcopy(template.q_net)
    target_net = copy.deepcopy(q_net)
    optimizer = torch.optim.Adam(q_net.parameters(), lr=h.lr)
    memory: deque = deque(maxlen=h.replay_size)
    step_costs = template.step_costs
    num_exits = cache.num_exits
    steps, last = 0, num_exits - 1
    start = time.perf_counter()
    for _ in range(episodes):
        i = random.randrange(len(images))
        with torch.no_grad():
            logits = torch.stack(model(normalize(images[i:i + 1]).contiguous(memory_format=torch.channels_last)), 1)
        weight = torch.empty(()).uniform_(*template.weight_range())  # the episode's compute weight
        states = with_weight(template.features(logits)[0], weight)
        right = logits[0].argmax(-1) == labels[i]
        for k in range(num_exits):
            epsilon = max(h.epsilon_end, 1 - steps / h.epsilon_decay_steps)
            with torch.no_grad():
                action = random.randrange(2) if random.random() < epsilon else int(q_net(states[k][None]).argmax())
            done = action == EXIT or k == last
            outcome = (h.reward_correct if right[k] else h.reward_wrong) if done else 0.0
            memory.append((states[k], action, outcome - float(weight) * float(step_costs[k]),
                           states[min(k + 1, last)], done))
            steps += 1
            if len(memory) >= h.replay_batch_size:
                s, a, r, s2, d = zip(*random.sample(memory, h.replay_batch_size))
                s, s2 = torch.stack(s), torch.stack(s2)
                a, r, d = torch.tensor(a), torch.tensor(r), torch.tensor(d)
                q = q_net(s).gather(1, a[:, None]).squeeze(1)
                with torch.no_grad():
                    q_next = target_net(s2)
                    is_last = s2[:, NUM_CONFIDENCE_FEATURES + last] == 1
                    value = torch.where(is_last, q_next[:, EXIT], q_next.max(-1).values)
                    target = r + h.gamma * value * (~d)
                loss = F.smooth_l1_loss(q, target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if steps % h.target_sync_steps == 0:
                    target_net.load_state_dict(q_net.state_dict())
            if done:
                break
    seconds = time.perf_counter() - start
    return {"wall_s": seconds, "episodes": episodes, "env_steps": steps, "env_steps_per_s": steps / seconds,
            "episodes_per_s": episodes / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier-ckpt", default=str(ROOT / "results" / "classifier.ckpt"))
    parser.add_argument("--data", help="overrides the classifier's recorded data_dir")
    parser.add_argument("--seed-episodes", type=int, default=2000)
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI below gets its arguments from args=, not from this script's flags
    random.seed(0)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as workdir:
        ours = eecnn_training(args.classifier_ckpt, args.data, workdir)
    agent, cache = ours.pop("agent"), ours.pop("cache")
    seed = seed_style_training(agent, cache, episodes=args.seed_episodes)
    seed_total = ours["episodes"] / seed["episodes_per_s"]
    figures = {
        "eecnn": ours,
        "seed_style": seed,
        "seed_style_wall_s_for_eecnn_episodes": seed_total,
        "speedup_env_steps": ours["env_steps_per_s"] / seed["env_steps_per_s"],
        "device": describe_device(torch.device("cpu")),
        "torch": torch.__version__,
        "classifier_ckpt": args.classifier_ckpt,
    }
    print(f"\n{'exit-agent training':<46}{'eecnn':>14}{'seed style':>14}")
    print("-" * 74)
    print(f"{'env-steps/s':<46}{ours['env_steps_per_s']:>14,.0f}{seed['env_steps_per_s']:>14,.0f}")
    print(f"{'episodes/s':<46}{ours['episodes_per_s']:>14,.0f}{seed['episodes_per_s']:>14,.0f}")
    print(f"{'episodes to the trained policy':<46}{ours['episodes']:>14,}{ours['episodes']:>14,}")
    print(f"{'wall time for them (s)':<46}{ours['wall_s']:>14,.0f}{seed_total:>13,.0f}*")
    print(f"{'one-off exit cache (s)':<46}{ours['cache_s']:>14,.0f}{'-':>14}")
    print(f"* extrapolated from {seed['episodes']:,} seed-style episodes in {seed['wall_s']:.0f} s; "
          f"{figures['device']}")
    if args.output:
        write_json(args.output, figures)


if __name__ == "__main__":
    main()
