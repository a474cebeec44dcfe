"""The exit cache: a frozen classifier's logits at every exit for every image, computed once.

The exit agent and the threshold baselines only ever look at what the exits say, so the CNN runs
once per checkpoint; the cache file is named by the checkpoint's content hash and reused.
"""

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from early_exit.checkpoint import init_args, read_checkpoint
from early_exit.classifier import EarlyExitClassifier
from early_exit.data import CIFAR10DataModule, normalize
from early_exit.errors import InputError

SPLITS = ("train", "val", "test")


@dataclass
class ExitOutputs:
    """One split's exit outputs: ``logits`` (N, exits, classes) and ``labels`` (N,)."""

    logits: Tensor
    labels: Tensor

    @property
    def num_exits(self) -> int:
        return self.logits.shape[1]

    def predictions(self) -> Tensor:
        return self.logits.argmax(-1)

    def correct(self) -> Tensor:
        """(N, exits) bool: whether each exit's prediction is right."""
        return self.predictions() == self.labels[:, None]

    def probabilities(self) -> Tensor:
        return self.logits.float().softmax(-1)

    def entropy(self) -> Tensor:
        """(N, exits) entropy of each exit's softmax, normalised to [0, 1] by its maximum, log(classes)."""
        probs = self.probabilities()
        return -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(probs.shape[-1])

    def features(self) -> Tensor:
        """(N, exits, 4 + exits) agent state at each exit, from what is known by that exit: max softmax
        probability, top-1/top-2 margin, normalised entropy, agreement with the previous exit's
        prediction (0 at the first exit), and the exit index one-hot."""
        top2 = self.probabilities().topk(2, dim=-1).values
        predictions = self.predictions()
        agrees = torch.zeros_like(top2[..., 0])
        agrees[:, 1:] = (predictions[:, 1:] == predictions[:, :-1]).float()
        one_hot = torch.eye(self.num_exits).expand(len(top2), -1, -1)
        return torch.cat([top2[..., :1], top2[..., :1] - top2[..., 1:], self.entropy()[..., None],
                          agrees[..., None], one_hot], dim=-1)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_classifier(path: str | Path) -> tuple[EarlyExitClassifier, dict]:
    """A trained classifier, frozen and in eval mode, and the data settings it was trained with;
    InputError if ``path`` is not an EarlyExitClassifier checkpoint."""
    checkpoint = read_checkpoint(path, option="--model.classifier_ckpt")
    hparams = checkpoint["hyper_parameters"]
    if hparams["_class_path"].rsplit(".", 1)[-1] != EarlyExitClassifier.__name__:
        raise InputError(f"{path} is not an EarlyExitClassifier checkpoint: pass one written by "
                         "`eecnn fit --config configs/cifar10.yaml`")
    classifier = EarlyExitClassifier(**init_args(hparams))
    classifier.load_state_dict(checkpoint["state_dict"])
    return classifier.eval().requires_grad_(False), init_args(checkpoint.get("datamodule_hyper_parameters", {}))


@torch.no_grad()
def run_exits(classifier: EarlyExitClassifier, images: Tensor, labels: Tensor, batch_size: int = 512) -> ExitOutputs:
    """All exits' logits for uint8 ``images``, in eval mode and without augmentation."""
    device = classifier.device
    logits = [torch.stack(classifier(normalize(batch.to(device))), dim=1).float().cpu()
              for batch in images.split(batch_size)]
    return ExitOutputs(torch.cat(logits), labels.clone())


def exit_cache(classifier: EarlyExitClassifier, classifier_ckpt: str | Path, datamodule: CIFAR10DataModule,
               cache_dir: str | Path) -> dict[str, ExitOutputs]:
    """Every split's exit outputs of ``classifier`` (loaded from ``classifier_ckpt``, whose content hash
    names the cache file): read from the cache, or computed once and cached."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"exits-{file_digest(Path(classifier_ckpt))}-val{datamodule.hparams.val_size}" \
                       f"-seed{datamodule.hparams.split_seed}.pt"
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        return {split: ExitOutputs(**stored[split]) for split in SPLITS}
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    outputs = {split: run_exits(classifier, *datamodule.datasets[split].tensors) for split in SPLITS}
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as tmp:
        torch.save({split: vars(out) for split, out in outputs.items()}, tmp)
    os.replace(tmp.name, path)
    return outputs
