"""Training all exits of the early-exit CNN at once, as a LightningModule."""

from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from early_exit.errors import InputError
from early_exit.model import SEED_HEAD_DROPOUT, SEED_STAGE_DROPOUT, EarlyExitCNN, HeadKind, patch_covariance


class EarlyExitClassifier(L.LightningModule):
    """Trains every exit on a weighted sum of their cross-entropy losses.

    ``exit_weights`` weigh the exits' losses at the start of training (all 1 if not given); if
    ``final_exit_weights`` is given, the weights move linearly to it over the run (the seed shifts
    weight from early to late exits). They are used as given, not normalised: the final exit at weight 1
    learns at the optimiser's rate whatever the early exits weigh.
    The learning rate follows ``lr_schedule`` per step, peaking at the optimiser's ``lr``: ``linear`` warms
    up linearly for ``warmup_fraction`` of the steps, then decays linearly to zero. Weight decay applies
    to conv and linear weights only, not to BatchNorm parameters or biases.

    With ``distillation_weight`` > 0 each exit's loss mixes in the KL divergence to a teacher's prediction
    softened by ``distillation_temperature``, because the early exits' accuracy is what any compute saving is
    made of. The teacher is the data's, if its training batches carry one (``--data.teacher_ckpts``), and every
    exit learns from it; else the final exit (detached) teaches the earlier ones.

    With ``whiten_stem`` the first conv starts as a whitening filter bank computed from the first training
    batch's 3x3 patches (averaged over all ranks under DDP), as airbench's stem does, rather than at random.

    With ``compile`` the CNN's forward is compiled by ``torch.compile`` for training (its weights and
    checkpoints are unchanged; validation and tests run the same compiled forward).
    """

    def __init__(
        self,
        num_classes: int = 10,
        num_stages: int = 4,
        width: float = 1.0,
        stage_dropout: Sequence[float] = SEED_STAGE_DROPOUT,
        head_dropout: Sequence[float] = SEED_HEAD_DROPOUT,
        head: HeadKind = "mlp",
        batchnorm_scale: bool = True,
        exit_weights: Sequence[float] | None = None,
        final_exit_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        distillation_weight: float = 0.0,
        distillation_temperature: float = 4.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Literal["linear", "onecycle", "cosine", "constant"] = "onecycle",
        warmup_fraction: float = 0.15,
        channels_last: bool = True,
        whiten_stem: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = EarlyExitCNN(num_classes, num_stages, width, stage_dropout, head_dropout, head=head,
                                  batchnorm_scale=batchnorm_scale)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        n = self.model.num_exits
        for name, weights in (("exit_weights", exit_weights), ("final_exit_weights", final_exit_weights)):
            if weights is not None and (len(weights) != n or min(weights) < 0 or sum(weights) <= 0):
                raise ValueError(f"--model.{name} needs {n} non-negative weights with a positive sum, got "
                                 f"{list(weights)}: e.g. --model.{name} [{','.join(['1'] * n)}]")
        if not 0 <= distillation_weight <= 1 or distillation_temperature <= 0:
            raise ValueError("--model.distillation_weight must lie in [0, 1] and --model.distillation_temperature "
                             "be positive")
        self.optimizer = optimizer
        self.accuracy = nn.ModuleDict(
            {split: nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in range(n))
             for split in ("train_", "val_", "test_")}  # ModuleDict keys may not shadow Module.train
        )
        # How far each exit's confidence is from its accuracy: what an exit policy reads.
        self.calibration = nn.ModuleDict(
            {split: nn.ModuleList(MulticlassCalibrationError(num_classes, n_bins=15) for _ in range(n))
             for split in ("val_", "test_")}
        )

    def configure_model(self) -> None:
        if self.hparams.compile and self.trainer.state.fn == "fit":
            self.model.compile()  # in place: the state dict keeps its names

    def forward(self, images: Tensor) -> list[Tensor]:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def current_exit_weights(self) -> Tensor:
        start = torch.tensor(self.hparams.exit_weights or [1.0] * self.model.num_exits, dtype=torch.float32)
        end = self.hparams.final_exit_weights
        if end is not None and self.trainer.training:
            progress = min(1.0, self.global_step / max(1, self.trainer.estimated_stepping_batches))
            start = torch.lerp(start, torch.tensor(end, dtype=torch.float32), progress)
        return start

    def exit_losses(self, exit_logits: list[Tensor], labels: Tensor, teacher: Tensor | None = None) -> Tensor:
        """Training loss per exit: label-smoothed cross-entropy, distilled from the ``teacher``'s log-probabilities
        (every exit) or else from the final exit (the earlier ones)."""
        logits = [z.float() for z in exit_logits]
        losses = torch.stack([F.cross_entropy(z, labels, label_smoothing=self.hparams.label_smoothing)
                              for z in logits])
        alpha, t = self.hparams.distillation_weight, self.hparams.distillation_temperature
        if alpha == 0:
            return losses
        students = logits if teacher is not None else logits[:-1]
        target = (teacher.float() if teacher is not None else logits[-1].detach()) / t
        target = target.log_softmax(-1)
        kl = torch.stack([F.kl_div((z / t).log_softmax(-1), target, log_target=True, reduction="batchmean")
                          for z in students]) * t * t
        distilled = (1 - alpha) * losses[:len(students)] + alpha * kl
        return torch.cat([distilled, losses[len(students):]])

    def _shared_step(self, batch: tuple[Tensor, ...], split: str) -> Tensor:
        images, labels, *teacher = batch
        exit_logits = self(images)
        if split == "train":
            losses = self.exit_losses(exit_logits, labels, *teacher)
        else:  # plain cross-entropy, comparable across recipes
            losses = torch.stack([F.cross_entropy(logits.float(), labels) for logits in exit_logits])
        weights = self.current_exit_weights().to(losses.device)
        loss = (weights * losses).sum()
        training = split == "train"
        sync = not training  # val/test figures are all-rank values under DDP
        log = {"on_step": training, "on_epoch": True, "sync_dist": sync, "batch_size": len(labels)}
        self.log(f"{split}/loss", loss, prog_bar=True, **log)
        for k, (exit_loss, logits) in enumerate(zip(losses, exit_logits), start=1):
            metric = self.accuracy[f"{split}_"][k - 1]
            metric(logits, labels)
            self.log(f"{split}/loss_exit{k}", exit_loss, **log)
            self.log(f"{split}/acc_exit{k}", metric, **log)
            if not training:
                calibration = self.calibration[f"{split}_"][k - 1]
                calibration(logits.float(), labels)
                self.log(f"{split}/ece_exit{k}", calibration, **log)
        self.log(f"{split}/acc", metric, prog_bar=True, **log)  # the final exit's: what checkpoints rank by
        return loss

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        if self.hparams.whiten_stem and self.global_step == 0 and batch_idx == 0:  # a fresh run, not a resume
            covariance = self.trainer.strategy.reduce(patch_covariance(batch[0]), reduce_op="mean")
            self.model.whiten_stem(covariance)
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per image and exit: the predicted class and its softmax confidence, shape (N, exits)."""
        probs = torch.stack(self(batch[0]), dim=1).float().softmax(-1)
        confidence, prediction = probs.max(-1)
        return {"prediction": prediction, "confidence": confidence}

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        classes = getattr(datamodule, "num_classes", 0)
        if classes and classes != self.hparams.num_classes:
            raise InputError(f"the data has {classes} classes but the model {self.hparams.num_classes}: "
                             f"set --model.num_classes {classes}")
        if getattr(datamodule, "hparams", {}).get("teacher_ckpts") and self.hparams.distillation_weight == 0:
            raise InputError("--data.teacher_ckpts is set but --model.distillation_weight is 0: set the weight of "
                             "the teacher's loss, e.g. --model.distillation_weight 0.5")
        if self.logger is not None:
            flops = {f"flops/exit{k}": float(f) for k, f in enumerate(self.model.exit_flops, start=1)}
            self.logger.log_metrics(flops, step=0)

    def configure_optimizers(self):
        return optimizer_with_schedule(self, self.optimizer, self.hparams.lr_schedule, self.hparams.warmup_fraction)


def optimizer_with_schedule(module: L.LightningModule, optimizer: OptimizerCallable, schedule: str,
                            warmup_fraction: float):
    """``optimizer`` over ``module``'s parameters, with the learning rate following ``schedule`` per step (what
    ``configure_optimizers`` returns). As in the fast CIFAR-10 recipes, weight decay applies to conv and linear
    weights only: decaying BatchNorm scales and biases only fights the normalisation."""
    decay = [p for p in module.parameters() if p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.ndim <= 1]
    optimizer = optimizer([{"params": decay, "name": "weights"},
                           {"params": no_decay, "weight_decay": 0.0, "name": "norms_biases"}])
    total_steps = int(module.trainer.estimated_stepping_batches)
    if schedule == "constant":
        return optimizer
    if schedule == "linear":
        warmup = max(1, round(warmup_fraction * total_steps))
        decay_steps = max(1, total_steps - warmup)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, min((step + 1) / warmup, (total_steps - step) / decay_steps))
        )
    elif schedule == "onecycle":
        peak = [group["lr"] for group in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peak, total_steps=total_steps, pct_start=warmup_fraction
        )
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Lookahead(Callback):
    """airbench's lookahead: every ``every`` steps and at the last one, the weights move to a running average of
    themselves (``slow = lerp(slow, weights, 1 - d)``, then ``weights = slow``), the average's decay ``d`` growing
    as ``decay * progress ** 3``, so the start of a run trains freely and its end averages more and more.

    Unlike Lightning's weight averaging, the average is not kept aside for evaluation: the network itself is
    reset to it, and what it validates, tests and saves is what it trains. BatchNorm statistics are averaged
    with the weights. ``eecnn fit ... --trainer.callbacks+=early_exit.Lookahead``.
    """

    def __init__(self, every: int = 5, decay: float = 0.774) -> None:  # airbench's 0.95 ** 5
        if every < 1 or not 0 <= decay < 1:
            raise ValueError(f"Lookahead needs --trainer.callbacks.every >= 1 and --trainer.callbacks.decay in [0, 1), "
                             f"got {every} and {decay}")
        self.every, self.decay = every, decay
        self.slow: list[Tensor] = []

    def _weights(self, pl_module: L.LightningModule) -> list[Tensor]:
        return [t for t in pl_module.state_dict().values() if t.is_floating_point()]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = self._weights(pl_module)
        # a resume has restored the average already, perhaps onto another device
        self.slow = [s.to(w.device) for s, w in zip(self.slow, weights)] or [w.detach().clone() for w in weights]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step, total = trainer.global_step, max(1, trainer.estimated_stepping_batches)
        if step % self.every and step < total:  # the last step averages too: the run ends on the average
            return
        decay = self.decay * min(1.0, step / total) ** 3
        for slow, weights in zip(self.slow, self._weights(pl_module)):
            slow.lerp_(weights, 1 - decay)
            weights.copy_(slow)

    def state_dict(self) -> dict:
        return {"slow": self.slow}

    def load_state_dict(self, state_dict: dict) -> None:
        self.slow = state_dict["slow"]
