"""The exit agent: a DQN that decides per image, exit by exit, whether to stop or to continue.

It never runs the CNN while training: episodes replay the frozen classifier's cached exit outputs
(``early_exit.cache``), thousands at a time as tensor operations.
"""

import copy

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from early_exit.cache import SPLITS, ExitOutputs, exit_cache, load_classifier, normalized_entropy
from early_exit.classifier import EarlyExitClassifier
from early_exit.data import CIFAR10DataModule
from early_exit.engine import EarlyExitEngine
from early_exit.errors import InputError
from early_exit.evaluation import evaluate_exits, path_flops, policy_exits
from early_exit.model import EarlyExitCNN

CONTINUE, EXIT = 0, 1
NUM_CONFIDENCE_FEATURES = 4  # max prob, margin, entropy, agreement; then the exit one-hot


def exit_states(logits: Tensor, num_exits: int) -> Tensor:
    """(N, k, 4 + num_exits) agent state at each of the k exits in (N, k, classes) ``logits``, from what is
    known by that exit: max softmax probability, top-1/top-2 margin, normalised entropy, agreement with
    the previous exit's prediction (0 at the first exit), and the exit index one-hot."""
    logits = logits.float()
    top2 = logits.softmax(-1).topk(2, dim=-1).values
    predictions = logits.argmax(-1)
    agrees = torch.zeros_like(top2[..., 0])
    agrees[:, 1:] = (predictions[:, 1:] == predictions[:, :-1]).float()
    one_hot = torch.eye(num_exits, device=logits.device)[:logits.shape[1]].expand(len(logits), -1, -1)
    return torch.cat([top2[..., :1], top2[..., :1] - top2[..., 1:], normalized_entropy(logits)[..., None],
                      agrees[..., None], one_hot], dim=-1)


class ExitEnvironment:
    """``num_envs`` exit episodes over cached exits, stepped at once.

    An episode is one image: at exit k the agent sees ``features[image, k]`` and exits or continues
    (at the last exit it must exit). Every decision at exit k pays ``compute_weight`` times the
    relative cost of reaching it (stage k and head k over the full network); exiting also earns
    ``reward_correct`` or ``reward_wrong``. Finished episodes restart on a new random image.
    """

    def __init__(self, features: Tensor, correct: Tensor, step_costs: Tensor, compute_weight: float,
                 reward_correct: float = 1.0, reward_wrong: float = -1.0, num_envs: int = 256) -> None:
        self.features, self.correct, self.step_costs = features, correct, step_costs.float()
        self.compute_weight, self.reward_correct, self.reward_wrong = compute_weight, reward_correct, reward_wrong
        self.last_exit = features.shape[1] - 1
        self.image = torch.randint(len(features), (num_envs,))
        self.exit = torch.zeros(num_envs, dtype=torch.long)

    def state(self) -> Tensor:
        return self.features[self.image, self.exit]

    def outcome(self, right: Tensor) -> Tensor:
        return torch.where(right, self.reward_correct, self.reward_wrong)

    def rewards(self, image: Tensor, exit: Tensor, exits_now: Tensor) -> Tensor:
        return self.outcome(self.correct[image, exit]) * exits_now - self.compute_weight * self.step_costs[exit]

    def returns(self, right: Tensor, exits: Tensor) -> Tensor:
        """Total reward of episodes ending at ``exits`` with answers ``right``: the sum of their rewards."""
        return self.outcome(right) - self.compute_weight * self.step_costs.cumsum(0)[exits]

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Apply ``actions``; return the transitions (state, action, reward, next state, done)."""
        states = self.state()
        exits_now = (actions == EXIT) | (self.exit == self.last_exit)
        actions = torch.where(exits_now, EXIT, CONTINUE)
        rewards = self.rewards(self.image, self.exit, exits_now)
        next_states = self.features[self.image, (self.exit + 1).clamp(max=self.last_exit)]
        self.exit = torch.where(exits_now, 0, self.exit + 1)
        self.image = torch.where(exits_now, torch.randint(len(self.features), self.image.shape), self.image)
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
    """DQN exit policy for a trained ``EarlyExitClassifier`` checkpoint (frozen, never run while training).

    ``compute_weight`` is the knob that trades accuracy for compute: the reward for an image is
    ``reward_correct``/``reward_wrong`` at its exit minus ``compute_weight`` x the FLOPs spent on it
    as a fraction of the full network. The greedy policy (epsilon 0) is what validation, test and
    checkpoints use.

    The images whose exit outputs are cached come from ``data``, a ``CIFAR10DataModule`` that `eecnn` sets
    from its ``data:`` section; left unset, it is built from the settings the classifier was trained with.
    """

    def __init__(
        self,
        classifier_ckpt: str,
        compute_weight: float = 0.5,
        reward_correct: float = 1.0,
        reward_wrong: float = -1.0,
        num_exits: int = 4,
        cache_dir: str = "logs/exit_cache",
        hidden_size: int = 64,
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
        steps_per_epoch: int = 500,
        grad_clip: float = 10.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        state_dim = NUM_CONFIDENCE_FEATURES + num_exits
        self.q_net = nn.Sequential(nn.Linear(state_dim, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size),
                                   nn.ReLU(), nn.Linear(hidden_size, 2))
        self.target_net = copy.deepcopy(self.q_net).requires_grad_(False)
        self.buffer = ReplayBuffer(replay_size, state_dim)
        self.data: CIFAR10DataModule | None = None
        self.outputs: dict[str, ExitOutputs] = {}
        self.engine: EarlyExitEngine | None = None
        self.env_steps = self.episodes = 0

    def setup(self, stage: str) -> None:
        needs_engine, needs_outputs = stage in ("test", "predict"), stage != "predict"  # predict runs no cache
        if (needs_engine and self.engine is None) or (needs_outputs and not self.outputs):
            classifier = self.load_frozen_classifier()
            if needs_outputs and not self.outputs:
                splits = ("val", "test") if stage == "test" else SPLITS
                self.attach(exit_cache(classifier, self.hparams.classifier_ckpt, self.data, self.hparams.cache_dir,
                                       splits), classifier.model)

    def load_frozen_classifier(self) -> EarlyExitClassifier:
        """The frozen classifier this agent decides for; sets its class names, its data if none was given and
        the engine that runs the classifier's CNN with this agent as its policy."""
        classifier, data, self.classes = load_classifier(self.hparams.classifier_ckpt)
        if classifier.model.num_exits != self.hparams.num_exits:
            raise InputError(f"{self.hparams.classifier_ckpt} has {classifier.model.num_exits} exits but the agent "
                             f"is built for {self.hparams.num_exits}: set --model.num_exits "
                             f"{classifier.model.num_exits} or pass a matching classifier")
        if self.data is None:
            self.data = CIFAR10DataModule(**data)
        self.engine = EarlyExitEngine(classifier.model, self)  # a plain object: the CNN stays out of our checkpoints
        return classifier

    def attach(self, outputs: dict[str, ExitOutputs], model: EarlyExitCNN) -> None:
        """Train on the "train" split and evaluate on these cached exit outputs of ``model`` (whose FLOPs set
        the costs)."""
        self.outputs = outputs
        self.costs = path_flops(model)  # per image, answering at exit k through the engine
        self.full_flops = float(model.exit_flops[-1])
        step_costs = self.costs.diff(prepend=self.costs.new_zeros(1)) / self.full_flops
        source = outputs.get("train", next(iter(outputs.values())))  # without "train" only its rewards are used
        self.env = ExitEnvironment(exit_states(source.logits, self.hparams.num_exits), source.correct(),
                                   step_costs, self.hparams.compute_weight, self.hparams.reward_correct,
                                   self.hparams.reward_wrong, self.hparams.num_envs)

    def on_test_start(self) -> None:
        self.engine.to(self.device)

    def on_predict_start(self) -> None:
        self.engine.to(self.device)

    def epsilon(self) -> float:
        h = self.hparams
        progress = min(1.0, self.env_steps / max(1, h.epsilon_decay_steps))
        return h.epsilon_start + progress * (h.epsilon_end - h.epsilon_start)

    def forward(self, logits: Tensor) -> Tensor:
        """The greedy policy, as the engine asks it: for (n, k, classes) logits of the exits passed so far,
        whether each image stops at exit k."""
        with torch.no_grad():
            q = self.q_net(exit_states(logits.to(self.device), self.hparams.num_exits)[:, -1])
        return q[:, EXIT] >= q[:, CONTINUE]

    def greedy_exits(self, outputs: ExitOutputs) -> Tensor:
        """(N,) 0-based exit the greedy policy takes on cached exit outputs."""
        return policy_exits(self, outputs.logits.to(self.device)).cpu()

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
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
        with torch.no_grad():
            q_next = self.target_net(s2)
            next_is_last = s2[:, -1] == 1  # at the last exit, exiting is the only action
            value = torch.where(next_is_last, q_next[:, EXIT], q_next.max(-1).values)
            target = r + h.gamma * value * (~done)
        loss = F.smooth_l1_loss(q, target)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=h.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        if self.global_step % h.target_sync_steps == 0:
            self.target_net.load_state_dict(self.q_net.state_dict())
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=1)

    def _log_policy(self, split: str, exits: Tensor) -> None:
        result = evaluate_exits(exits, self.outputs[split], self.costs, self.full_flops)
        right = self.outputs[split].correct().gather(1, exits[:, None]).squeeze(1)
        metrics = {f"{split}/acc": result["accuracy"] / 100, f"{split}/flops_saved_pct": result["flops_saved_pct"],
                   f"{split}/reward": self.env.returns(right, exits).mean().item()}
        metrics |= {f"{split}/exit{k}_share": p for k, p in enumerate(result["exit_distribution"], start=1)}
        self.log_dict(metrics, batch_size=1)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._log_policy("val", self.greedy_exits(self.outputs["val"]))

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        """The greedy policy on the cached test split; ``report.EarlyExitReport`` runs it through the engine."""
        self._log_policy("test", self.greedy_exits(self.outputs["test"]))

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Normalised images (and their indices) through the early-exit engine."""
        images, index = batch
        return {"index": index, **vars(self.engine(images))}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.hparams.steps_per_epoch), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(range(1), batch_size=None)  # one step evaluates the whole cached split

    def test_dataloader(self) -> DataLoader:
        return DataLoader(range(1), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.q_net.parameters(), lr=self.hparams.lr)
