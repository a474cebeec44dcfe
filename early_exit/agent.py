"""The exit agent: a DQN that decides per image, exit by exit, whether to stop or to continue.

It never runs the CNN: episodes replay a frozen classifier's cached exit outputs, thousands at a time as
tensor operations. Its data module (``early_exit.cache.ExitCache``) provides them; the early-exit engine
runs the CNN with this agent as its policy (``early_exit.engine``).
"""

import copy
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from early_exit.errors import InputError
from early_exit.evaluation import SAVINGS, ExitOutputs, evaluate_exits, first_exit, operating_curve, probability_entropy

CONTINUE, EXIT = 0, 1
TARGET_TOLERANCE = 0.5  # points of FLOPs saved on validation a target may be missed by
NUM_CONFIDENCE_FEATURES = 4  # max prob, margin, entropy, agreement; then the exit one-hot and the softmax vectors


def confidence_features(logits: Tensor, previous: Tensor | int) -> Tensor:
    """(..., 4) for (..., classes) float exit logits: max softmax probability, top-1/top-2 margin, normalised
    entropy and agreement with the ``previous`` exit's predictions (-1 where there is none: never agreed with)."""
    probs = logits.softmax(-1)
    top2 = probs.topk(2, dim=-1).values
    agrees = (logits.argmax(-1) == previous).float()
    return torch.stack([top2[..., 0], top2[..., 0] - top2[..., 1], probability_entropy(probs), agrees], dim=-1)


def exit_features(logits: Tensor, num_exits: int, class_aware: bool) -> Tensor:
    """(N, k, 4 + num_exits [+ num_exits x classes]) what is known at each of the k exits in (N, k, classes)
    ``logits``: the ``confidence_features``, the exit index one-hot and, if ``class_aware``, the softmax
    vectors of every exit passed so far, zeros in place of those not reached: what lets a policy learn
    which classes an exit confuses."""
    logits = logits.float()
    n, k, classes = logits.shape
    predictions = logits.argmax(-1)
    previous = torch.cat([torch.full_like(predictions[:, :1], -1), predictions[:, :-1]], dim=1)
    one_hot = torch.eye(num_exits, device=logits.device)[:k].expand(n, -1, -1)
    scalars = torch.cat([confidence_features(logits, previous), one_hot], dim=-1)
    if not class_aware:
        return scalars
    passed = torch.ones(k, k, device=logits.device).tril()[None, :, :, None]  # exit j has passed exits 0..j
    seen = torch.zeros(n, k, num_exits, classes, device=logits.device)
    seen[:, :, :k] = logits.softmax(-1)[:, None] * passed
    return torch.cat([scalars, seen.flatten(2)], dim=-1)


def with_weight(features: Tensor, compute_weight: Tensor) -> Tensor:
    """The agent's state: ``features`` and the compute weight (per row, or one for all) it is asked to trade at."""
    return torch.cat([features, compute_weight.to(features).expand(features.shape[:-1])[..., None]], dim=-1)


def read_operating_weight(curve: Tensor, target: float, clamp: bool = False) -> float:
    """The smallest compute weight that saves the nearest share to ``target`` % of FLOPs on an agent's
    validation ``curve`` (rows of weight, FLOPs saved %, accuracy %), if within ``TARGET_TOLERANCE`` points of
    it: else an InputError that names the nearest shares, or with ``clamp`` (while training) that weight."""
    if curve.isnan().all():
        raise InputError("--model.target_flops_saved needs an agent validated by `eecnn fit`: pass a checkpoint "
                         "it wrote, or --model.compute_weight instead")
    reached = curve[~curve[:, 0].isnan()]
    above = reached[reached[:, 1] >= target][:1]  # the smallest weight that saves at least the target
    below = reached[reached[:, 1] < target][-1:]  # and the largest saving short of it
    nearest = min([*above, *below], key=lambda row: abs(float(row[1]) - target))
    if clamp or abs(float(nearest[1]) - target) <= TARGET_TOLERANCE:
        return float(nearest[0])
    if not len(above):
        raise InputError(f"this agent saves at most {float(reached[-1, 1]):.1f} % of FLOPs on validation: lower "
                         "--model.target_flops_saved, or train with a wider --model.compute_weight_range")
    reachable = " or ".join(f"{float(row[1]):.1f} %" for row in (*below, *above))
    raise InputError(f"this agent saves {reachable} of FLOPs on validation, nothing within {TARGET_TOLERANCE} of "
                     f"{target:g} %: ask --model.target_flops_saved for one of those")


def episode_returns(right: Tensor, exits: Tensor, step_costs: Tensor, compute_weight: float, reward_correct: float,
                    reward_wrong: float) -> Tensor:
    """Total reward of episodes ending at ``exits`` with answers ``right``: what ``ExitEnvironment`` pays them
    over their steps, whose relative costs are ``step_costs``."""
    return torch.where(right, reward_correct, reward_wrong) - compute_weight * step_costs.cumsum(0)[exits]


class GreedyPolicy(nn.Module):
    """An agent's greedy policy at one compute weight, as the early-exit engine asks it: for (n, k, classes)
    logits of the exits passed so far, whether each image stops at exit k. It decides what
    ``ExitAgent.stops`` decides, to float rounding, for a few operations per exit, which an engine answering one
    image at a time pays at every exit it passes: only exit k is featurised, and the Q-network is folded
    around the state's constant parts. The exit one-hot and the weight become one first-layer bias per exit;
    the margin and the entropy's scale go into the first layer's weights (it reads the top two probabilities
    and sum(p log p)); the two Q-values become their difference. A snapshot of the Q-network: make another
    after it trains."""

    def __init__(self, q_net: nn.Sequential, num_exits: int, num_classes: int, class_aware: bool,
                 compute_weight: float) -> None:
        super().__init__()
        self.q_net, self.num_exits, self.class_aware = q_net, num_exits, class_aware
        self.compute_weight = compute_weight
        first, hidden, last = (layer for layer in q_net if isinstance(layer, nn.Linear))
        with torch.no_grad():
            weight, scalars = first.weight, NUM_CONFIDENCE_FEATURES
            folded = {  # top-1 p, top-2 p, sum(p log p), agreement: the features, rearranged, times these columns
                "input_weight": torch.stack([weight[:, 0] + weight[:, 1], -weight[:, 1],
                                             weight[:, 2] / -math.log(num_classes), weight[:, 3]]),
                "exit_bias": first.bias + weight[:, scalars:scalars + num_exits].T + compute_weight * weight[:, -1],
                "hidden_weight": hidden.weight.T.contiguous(), "hidden_bias": hidden.bias.clone(),
                "out_weight": last.weight[EXIT] - last.weight[CONTINUE],
                "out_bias": last.bias[EXIT] - last.bias[CONTINUE]}
        for name, tensor in folded.items():
            self.register_buffer(name, tensor.float(), persistent=False)

    def forward(self, seen: Tensor) -> Tensor:
        if torch.is_autocast_enabled(seen.device.type):  # bf16 Q-values would flip close validated decisions
            with torch.autocast(seen.device.type, enabled=False):
                return self(seen.float())
        k = seen.shape[1]
        if self.class_aware:  # the state holds every exit passed: featurise them all
            state = with_weight(exit_features(seen, self.num_exits, True)[:, -1], torch.tensor(self.compute_weight))
            q = self.q_net(state)
            return q[:, EXIT] >= q[:, CONTINUE]
        logits = seen[:, -1].float()
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        sum_p_log_p = (probs * log_probs).sum(-1, keepdim=True)
        previous = seen[:, -2].argmax(-1, keepdim=True) if k > 1 else -1
        agrees = (logits.argmax(-1, keepdim=True) == previous).float()
        features = torch.cat([probs.topk(2, dim=-1).values, sum_p_log_p, agrees], dim=1)
        hidden = torch.addmm(self.exit_bias[k - 1], features, self.input_weight).relu_()
        hidden = torch.addmm(self.hidden_bias, hidden, self.hidden_weight).relu_()
        return hidden @ self.out_weight + self.out_bias >= 0  # not addmv: it traces with a data-dependent batch


class ExitEnvironment:
    """``num_envs`` exit episodes over cached exits, stepped at once.

    An episode is one image at one compute weight, drawn from ``weight_range`` when it starts: at exit
    k the agent sees ``features[image, k]`` and that weight, and exits or continues (at the last exit
    it must exit). Every decision at exit k pays the weight times the relative cost of reaching it
    (stage k and head k over the full network); exiting also earns ``reward_correct`` or
    ``reward_wrong``. Finished episodes restart on a new random image and weight.
    """

    def __init__(self, features: Tensor, correct: Tensor, step_costs: Tensor, weight_range: tuple[float, float],
                 reward_correct: float = 1.0, reward_wrong: float = -1.0, num_envs: int = 256) -> None:
        self.features, self.correct, self.step_costs = features, correct, step_costs.float()
        self.weight_range, self.reward_correct, self.reward_wrong = weight_range, reward_correct, reward_wrong
        self.last_exit = features.shape[1] - 1
        self.image = torch.randint(len(features), (num_envs,))
        self.exit = torch.zeros(num_envs, dtype=torch.long)
        self.weight = self.draw_weights(num_envs)

    def draw_weights(self, n: int) -> Tensor:
        low, high = self.weight_range
        return low + (high - low) * torch.rand(n)

    def state(self) -> Tensor:
        return with_weight(self.features[self.image, self.exit], self.weight)

    def outcome(self, right: Tensor) -> Tensor:
        return torch.where(right, self.reward_correct, self.reward_wrong)

    def rewards(self, exits_now: Tensor) -> Tensor:
        right = self.correct[self.image, self.exit]
        return self.outcome(right) * exits_now - self.weight * self.step_costs[self.exit]

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Apply ``actions``; return the transitions (state, action, reward, next state, done)."""
        states = self.state()
        exits_now = (actions == EXIT) | (self.exit == self.last_exit)
        actions = torch.where(exits_now, EXIT, CONTINUE)
        rewards = self.rewards(exits_now)
        next_states = with_weight(self.features[self.image, (self.exit + 1).clamp(max=self.last_exit)], self.weight)
        self.exit = torch.where(exits_now, 0, self.exit + 1)
        self.image = torch.where(exits_now, torch.randint(len(self.features), self.image.shape), self.image)
        self.weight = torch.where(exits_now, self.draw_weights(len(self.weight)), self.weight)
        return states, actions, rewards, next_states, exits_now


class ReplayBuffer:
    """A ring buffer of transitions held as preallocated tensors."""

    def __init__(self, capacity: int, state_dim: int) -> None:
        self.states = torch.zeros(capacity, state_dim)
        self.next_states = torch.zeros(capacity, state_dim)
        self.actions = torch.zeros(capacity, dtype=torch.long)
        self.rewards = torch.zeros(capacity)
        self.dones = torch.zeros(capacity, dtype=torch.bool)
        self.capacity, self.size, self.position = capacity, 0, 0

    def push(self, states: Tensor, actions: Tensor, rewards: Tensor, next_states: Tensor, dones: Tensor) -> None:
        slots = (self.position + torch.arange(len(states))) % self.capacity
        self.states[slots], self.actions[slots], self.rewards[slots] = states, actions, rewards
        self.next_states[slots], self.dones[slots] = next_states, dones
        self.position = int(slots[-1] + 1) % self.capacity
        self.size = min(self.size + len(states), self.capacity)

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        i = torch.randint(self.size, (batch_size,))
        return self.states[i], self.actions[i], self.rewards[i], self.next_states[i], self.dones[i]


class ExitAgent(L.LightningModule):
    """DQN exit policy for a frozen classifier, learning from and measured on its cached exit outputs.

    The reward for an image is ``reward_correct``/``reward_wrong`` at its exit minus a compute weight x
    the FLOPs spent on it as a fraction of the full network. The weight is an input of the Q-network:
    training draws one per episode from ``compute_weight_range`` (only ``compute_weight`` if None), so
    one agent covers every budget. The greedy policy (epsilon 0) answers at ``compute_weight`` or, with
    ``target_flops_saved``, at the smallest weight that saves that share of FLOPs on the validation split,
    read from the curve the checkpoint holds (``curve``: weight, FLOPs saved %, accuracy % on validation,
    a row per 0.1 % of savings, exact on those images).
    A negative weight pays for continuing; the default range starts below 0 so the curve reaches small
    savings. ``class_aware`` adds the softmax vectors of the exits passed to the state (``exit_features``).

    Its data module (``trainer.datamodule``, an ``ExitCache``) sets the sizes of its states (``num_exits``,
    ``num_classes``), the cost of answering at each exit (``costs``, ``full_cost``: FLOPs, or seconds from a
    latency profile, ``ExitCache.costs``) and the exit outputs the
    environment replays (``train_outputs``); its validation and test batches are whole cached splits.
    Checkpoints are selected by the mean validation reward at ``curve_points`` weights, on the plain
    validation images, the ones the threshold baselines are tuned on; the test split serves the report only.
    """

    def __init__(
        self,
        compute_weight: float = 0.5,
        compute_weight_range: tuple[float, float] | None = (-0.3, 1.0),
        target_flops_saved: float | None = None,
        reward_correct: float = 1.0,
        reward_wrong: float = -1.0,
        class_aware: bool = False,
        hidden_size: int = 256,
        num_envs: int = 256,
        replay_size: int = 100_000,
        replay_batch_size: int = 512,
        gamma: float = 1.0,
        lr: float = 1e-3,
        target_sync_steps: int = 200,
        epsilon_start: float = 1.0,
        epsilon_end: float = 0.02,
        epsilon_decay_steps: int = 2000,
        warmup_steps: int = 10,
        grad_clip: float = 10.0,
        curve_points: int = 21,
    ) -> None:
        super().__init__()
        if compute_weight_range is not None and not compute_weight_range[0] <= compute_weight_range[1]:
            raise InputError(f"--model.compute_weight_range needs low <= high, got {list(compute_weight_range)}")
        if target_flops_saved is not None and not 0 < target_flops_saved < 100:
            raise InputError(f"--model.target_flops_saved is a percentage between 0 and 100, got {target_flops_saved}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.register_buffer("curve", torch.full((len(SAVINGS), 3), float("nan")))  # measured at every validation
        self.sizes: dict[str, int] = {}  # num_exits and num_classes, once ``build`` has made the Q-network
        self.env_steps = self.episodes = 0

    def build(self, num_exits: int, num_classes: int) -> None:
        """Make the Q-network (and its target copy) for states of ``num_exits`` exits and ``num_classes``
        classes; InputError if it was made for others (the agent of another classifier)."""
        sizes = {"num_exits": num_exits, "num_classes": num_classes}
        if self.sizes and self.sizes != sizes:
            raise InputError(f"this agent decides for {self.sizes['num_exits']} exits and {self.sizes['num_classes']} "
                             f"classes, the classifier has {num_exits} and {num_classes}: pass the classifier it was "
                             "trained for as --data.classifier_ckpt")
        if self.sizes:
            return
        self.sizes = sizes
        state_dim = NUM_CONFIDENCE_FEATURES + num_exits * (1 + num_classes * self.hparams.class_aware) + 1
        hidden = self.hparams.hidden_size
        self.q_net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   nn.Linear(hidden, 2))
        self.target_net = copy.deepcopy(self.q_net).requires_grad_(False)

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        self.build(data.num_exits, data.num_classes)
        self.costs, self.full_cost = data.costs, data.full_cost
        self.step_costs = (self.costs.diff(prepend=self.costs.new_zeros(1)) / self.full_cost).float()
        if stage == "fit":
            source = data.train_outputs
            self.env = ExitEnvironment(self.features(source.logits), source.correct(), self.step_costs,
                                       self.weight_range(), self.hparams.reward_correct, self.hparams.reward_wrong,
                                       self.hparams.num_envs)
            self.buffer = ReplayBuffer(self.hparams.replay_size, self.q_net[0].in_features)

    def features(self, logits: Tensor) -> Tensor:
        """``exit_features`` of (N, k, classes) exit logits as this agent's Q-network reads them."""
        return exit_features(logits, self.sizes["num_exits"], self.hparams.class_aware)

    def weight_range(self) -> tuple[float, float]:
        h = self.hparams
        return tuple(h.compute_weight_range) if h.compute_weight_range is not None else (h.compute_weight,) * 2

    def operating_weight(self, clamp: bool = False) -> float:
        """The compute weight the greedy policy answers at: ``compute_weight``, or the weight
        ``target_flops_saved`` reads off the validation curve (``read_operating_weight``)."""
        target = self.hparams.target_flops_saved
        return self.hparams.compute_weight if target is None else read_operating_weight(self.curve, target, clamp)

    def switch_weights(self, logits: Tensor, steps: int = 40) -> Tensor:
        """(N, exits - 1) for (N, exits, classes) ``logits``: the smallest compute weight in the training range
        from which the greedy policy stops each image at exit k or before (inf where it never does), found
        by bisection on every decision at once. Exact when a higher weight never makes the policy go on,
        which the tests check for trained agents."""
        low, high = (torch.full(logits.shape[:1] + (logits.shape[1] - 1,), w, device=self.device)
                     for w in self.weight_range())
        features = self.features(logits.to(self.device))[:, :-1]
        stops_low, stops_high = self.decide(features, low), self.decide(features, high)
        for _ in range(steps):
            middle = (low + high) / 2
            stops = self.decide(features, middle)
            low, high = torch.where(stops, low, middle), torch.where(stops, middle, high)
        switch = torch.where(stops_low, low, torch.where(stops_high, high, torch.inf))
        return switch.cummin(dim=1).values.cpu()

    def epsilon(self) -> float:
        h = self.hparams
        progress = min(1.0, self.env_steps / max(1, h.epsilon_decay_steps))
        return h.epsilon_start + progress * (h.epsilon_end - h.epsilon_start)

    def decide(self, features: Tensor, compute_weight: Tensor) -> Tensor:
        """Whether the greedy policy stops in the states ``features`` at ``compute_weight`` (per state or one)."""
        # In fp32 under any Trainer precision: bf16 Q-values flip close decisions away from the validated curve.
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            q = self.q_net(with_weight(features, compute_weight))
        return q[..., EXIT] >= q[..., CONTINUE]

    def stops(self, logits: Tensor, compute_weight: float | None = None) -> Tensor:
        """(N, k) whether the greedy policy stops at each of the k exits in (N, k, classes) ``logits``, at
        ``compute_weight`` (by default the operating weight); exit k's answer reads exits 0..k only."""
        weight = torch.tensor(self.operating_weight() if compute_weight is None else compute_weight)
        return self.decide(self.features(logits.to(self.device)), weight)

    def greedy_policy(self, compute_weight: float | None = None) -> GreedyPolicy:
        """The greedy policy at ``compute_weight`` (by default the operating weight), for the engine."""
        weight = self.operating_weight() if compute_weight is None else compute_weight
        return GreedyPolicy(self.q_net, self.sizes["num_exits"], self.sizes["num_classes"], self.hparams.class_aware,
                            weight).to(self.device)

    def forward(self, logits: Tensor, compute_weight: float | None = None) -> Tensor:
        """``greedy_policy``'s decision for (n, k, classes) logits of the exits passed so far: whether each image
        stops at exit k. An engine holds the policy itself and pays for the operating weight only once."""
        return self.greedy_policy(compute_weight)(logits)

    def greedy_exits(self, outputs: ExitOutputs, compute_weight: float | None = None) -> Tensor:
        """(N,) 0-based exit the greedy policy takes on cached exit outputs: one pass over every exit."""
        return first_exit(self.stops(outputs.logits, compute_weight)).cpu()

    def training_step(self, batch: int, batch_idx: int) -> None:
        h = self.hparams
        with torch.no_grad():
            actions = self.q_net(self.env.state().to(self.device)).argmax(-1).cpu()
        explore = torch.rand(len(actions)) < self.epsilon()
        actions = torch.where(explore, torch.randint(2, actions.shape), actions)
        transitions = self.env.step(actions)
        self.buffer.push(*transitions)
        self.env_steps += 1
        self.episodes += int(transitions[4].sum())
        self.log_dict({"train/reward": transitions[2].mean(), "train/epsilon": self.epsilon()}, on_step=True,
                      batch_size=1)
        if self.env_steps < h.warmup_steps:
            return
        s, a, r, s2, done = (t.to(self.device) for t in self.buffer.sample(h.replay_batch_size))
        q = self.q_net(s).gather(1, a[:, None]).squeeze(1)
        with torch.no_grad():  # double DQN: the online network picks the next action, the target network values it
            next_is_last = s2[:, NUM_CONFIDENCE_FEATURES + self.env.last_exit] == 1  # where exiting is the only action
            best = torch.where(next_is_last, EXIT, self.q_net(s2).argmax(-1))
            value = self.target_net(s2).gather(1, best[:, None]).squeeze(1)
            target = r + h.gamma * value * (~done)
        loss = F.smooth_l1_loss(q, target)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=h.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        self.lr_schedulers().step()
        if self.global_step % h.target_sync_steps == 0:
            self.target_net.load_state_dict(self.q_net.state_dict())
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=1)

    def policy_metrics(self, outputs: ExitOutputs, compute_weight: float) -> dict[str, float]:
        """Accuracy, FLOPs saved, mean reward and exit shares of the greedy policy at ``compute_weight``."""
        exits = self.greedy_exits(outputs, compute_weight)
        result = evaluate_exits(exits, outputs, self.costs, self.full_cost)
        right = outputs.correct().gather(1, exits[:, None]).squeeze(1)
        returns = episode_returns(right, exits, self.step_costs, compute_weight, self.hparams.reward_correct,
                                  self.hparams.reward_wrong)
        metrics = {"acc": result["accuracy"] / 100, "flops_saved_pct": result["flops_saved_pct"],
                   "reward": returns.mean().item()}
        return metrics | {f"exit{k}_share": p for k, p in enumerate(result["exit_distribution"], start=1)}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """The exact curve a FLOPs target is read from, and ``val/reward``, what checkpoints are selected by:
        the mean reward at ``curve_points`` weights evenly spread over the training range."""
        val = ExitOutputs(*(t.cpu() for t in batch))
        switch = self.switch_weights(val.logits)
        self.curve.copy_(operating_curve(switch, val.correct(), self.costs, self.full_cost, self.weight_range()[0]))
        metrics = {f"val/{k}": v for k, v in self.policy_metrics(val, self.operating_weight(clamp=True)).items()}
        weights = torch.linspace(*self.weight_range(), self.hparams.curve_points).tolist()
        metrics["val/reward"] = sum(self.policy_metrics(val, w)["reward"] for w in weights) / len(weights)
        self.log_dict(metrics, batch_size=1)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """The greedy policy on the cached test split; ``report.EarlyExitReport`` runs it through the engine."""
        metrics = self.policy_metrics(ExitOutputs(*(t.cpu() for t in batch)), self.operating_weight())
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["exit_sizes"] = self.sizes  # what the Q-network is built for, before its weights load

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint)
        self.build(**checkpoint["exit_sizes"])

    @staticmethod
    def check_checkpoint(checkpoint: dict, target_flops_saved: float | None = None) -> None:
        """Refuse, in one line, an agent checkpoint this version cannot load, or a ``target_flops_saved`` its
        validation curve does not reach: before any image is read."""
        curve = checkpoint["state_dict"]["curve"]
        if len(curve) != len(SAVINGS) or "exit_sizes" not in checkpoint:
            raise InputError("this agent checkpoint was written by an older eecnn, which this one cannot load: "
                             "retrain it with `eecnn fit --config configs/agent.yaml`")
        if target_flops_saved is not None:
            read_operating_weight(curve, target_flops_saved)

    def configure_optimizers(self) -> dict:
        """Adam, its learning rate decaying linearly to zero over the run (constant if it has no end)."""
        optimizer = torch.optim.Adam(self.q_net.parameters(), lr=self.hparams.lr)
        total = self.trainer.estimated_stepping_batches
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
        return {"optimizer": optimizer, "lr_scheduler": decay}
