"""A teacher for the exits: a residual network of the fast CIFAR-10 class, trained like the classifier and more
accurate than its final exit, and the softened predictions the exits learn from.

``eecnn fit --config configs/teacher.yaml`` trains one. ``CIFAR10DataModule(teacher_ckpts=[...])`` adds the
teachers' predictions for every training image to its batches (computed once, cached by the checkpoints' and
the data's content), and ``EarlyExitClassifier(distillation_weight=...)`` distils them into every exit.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from early_exit.checkpoint import init_args, read_checkpoint
from early_exit.classifier import EarlyExitClassifier, optimizer_with_schedule
from early_exit.errors import InputError
from early_exit.model import BASE_CHANNELS, conv_bn_relu


class Residual(nn.Sequential):
    """``x + layers(x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class ScaledLinear(nn.Linear):
    """A linear layer whose outputs are scaled by ``scale``: small logits at the start, as ResNet-9 does."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale


class ResidualNet(nn.Sequential):
    """ResNet-9 as fast CIFAR-10 training knows it (Page, 2018): a prep conv; three groups that each double the
    channels with a conv and halve the map with a max-pool, the first and the last followed by a residual block
    of two convs; a global max-pool and a linear layer whose logits are scaled by 1/8. ``width`` scales the
    channels (64, 128, 256, 512); at 0.75 it costs about what the early-exit CNN does."""

    def __init__(self, num_classes: int = 10, width: float = 0.75) -> None:
        c = [max(1, round(channels * width)) for channels in BASE_CHANNELS]
        super().__init__(
            *conv_bn_relu(3, c[0]),
            *conv_bn_relu(c[0], c[1]), nn.MaxPool2d(2), Residual(*conv_bn_relu(c[1], c[1]), *conv_bn_relu(c[1], c[1])),
            *conv_bn_relu(c[1], c[2]), nn.MaxPool2d(2),
            *conv_bn_relu(c[2], c[3]), nn.MaxPool2d(2), Residual(*conv_bn_relu(c[3], c[3]), *conv_bn_relu(c[3], c[3])),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), ScaledLinear(c[3], num_classes, scale=0.125),
        )


class TeacherClassifier(L.LightningModule):
    """Trains a ``ResidualNet`` on cross-entropy, with the classifier's optimiser settings and learning-rate
    schedules. Validation and test also log ``acc_flip``: the accuracy of the prediction averaged over each
    image and its mirror image, which is what a student is taught."""

    def __init__(
        self,
        num_classes: int = 10,
        width: float = 0.75,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Literal["linear", "onecycle", "cosine", "constant"] = "linear",
        warmup_fraction: float = 0.2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ResidualNet(num_classes, width).to(memory_format=torch.channels_last)
        self.optimizer = optimizer
        self.accuracy = nn.ModuleDict({split: MulticlassAccuracy(num_classes, average="micro")
                                       for split in ("train_", "val_", "test_", "val_flip", "test_flip")})
        self.calibration = nn.ModuleDict({split: MulticlassCalibrationError(num_classes, n_bins=15)
                                          for split in ("val_", "test_")})

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images.contiguous(memory_format=torch.channels_last))

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, labels = batch[:2]
        logits = self(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing)
        self.accuracy["train_"](logits, labels)
        log = {"on_step": True, "on_epoch": True, "batch_size": len(labels)}
        self.log("train/loss", loss, prog_bar=True, **log)
        self.log("train/acc", self.accuracy["train_"], **log)
        return loss

    def _evaluate(self, batch: Sequence[Tensor], split: str) -> None:
        images, labels = batch[:2]
        logits = self(images).float()
        flipped = (logits.softmax(-1) + self(images.flip(-1)).float().softmax(-1)) / 2
        log = {"on_epoch": True, "sync_dist": True, "batch_size": len(labels)}
        self.log(f"{split}/loss", F.cross_entropy(logits, labels), prog_bar=True, **log)
        for name, metric, prediction in (("acc", self.accuracy[f"{split}_"], logits),
                                         ("acc_flip", self.accuracy[f"{split}_flip"], flipped),
                                         ("ece", self.calibration[f"{split}_"], logits)):
            metric(prediction, labels)
            self.log(f"{split}/{name}", metric, prog_bar=name == "acc", **log)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Per image: the predicted class and its softmax confidence."""
        confidence, prediction = self(batch[0]).float().softmax(-1).max(-1)
        return {"prediction": prediction, "confidence": confidence}

    def configure_optimizers(self):
        return optimizer_with_schedule(self, self.optimizer, self.hparams.lr_schedule, self.hparams.warmup_fraction)


def load_teacher(path: str | Path, option: str = "--data.teacher_ckpts") -> nn.Module:
    """The frozen network of a teacher checkpoint, in eval mode, returning logits: a ``TeacherClassifier``'s, or
    an ``EarlyExitClassifier``'s up to its final exit (so eecnn classifiers can teach as an ensemble)."""
    checkpoint = read_checkpoint(path, option=option)
    hparams = checkpoint["hyper_parameters"]
    kind = hparams["_class_path"].rsplit(".", 1)[-1]
    classes = {cls.__name__: cls for cls in (TeacherClassifier, EarlyExitClassifier)}
    if kind not in classes:
        raise InputError(f"{path} is a {kind}, not a classifier that can teach: pass a checkpoint written by "
                         f"`eecnn fit --config configs/teacher.yaml` (or configs/cifar10.yaml) to {option}")
    module = classes[kind](**init_args(hparams))
    module.load_state_dict(checkpoint["state_dict"])
    network = module.model if kind == TeacherClassifier.__name__ else FinalExit(module.model)
    return network.eval().requires_grad_(False)


class FinalExit(nn.Module):
    """An early-exit CNN's final exit alone: every stage, the last head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stages, self.head = model.stages, model.exits[-1]

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


@torch.no_grad()
def teacher_log_probs(networks: Sequence[nn.Module], images: Tensor, device: torch.device | str = "cpu",
                      batch_size: int = 500) -> Tensor:
    """(N, classes) log-probabilities of the ensemble of teacher ``networks`` (``load_teacher``'s) for normalised
    ``images``, on the CPU: the softmax averaged over the teachers and over each image and its mirror image. The
    teachers run on ``device``."""
    networks = [network.to(device) for network in networks]
    parts = []
    for batch in images.split(batch_size):
        batch = batch.to(device)
        views = torch.cat([batch, batch.flip(-1)]).contiguous(memory_format=torch.channels_last)
        probs = torch.stack([network(views).float().softmax(-1) for network in networks]).mean(0)
        parts.append(probs.view(2, len(batch), -1).mean(0).log().cpu())
    return torch.cat(parts)
