"""The exit cache: a frozen classifier's logits at every exit for every image, computed once.

The exit agent and the threshold baselines only ever look at what the exits say, so the CNN runs
once per checkpoint and data; the cache file is named by both and reused. ``ExitCache`` is the
agent's LightningDataModule: it owns the classifier checkpoint, the images and the cached splits.
"""

import itertools
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from early_exit.checkpoint import data_args, init_args, read_checkpoint
from early_exit.classifier import EarlyExitClassifier
from early_exit.data import CIFAR10_CLASSES, CIFAR10DataModule, normalize, random_crop_flip
from early_exit.engine import latency_costs
from early_exit.errors import InputError
from early_exit.evaluation import ExitOutputs, path_flops
from early_exit.files import file_digest, read_json, write_atomic


def load_classifier(path: str | Path, option: str = "--data.classifier_ckpt",
                    ) -> tuple[EarlyExitClassifier, dict, list[str]]:
    """A trained classifier, frozen and in eval mode, the data settings it was trained with (``data_args``:
    less a data path that does not exist here) and its class names; InputError naming ``option`` if
    ``path`` is not an EarlyExitClassifier checkpoint."""
    checkpoint = read_checkpoint(path, option=option)
    hparams = checkpoint["hyper_parameters"]
    if hparams["_class_path"].rsplit(".", 1)[-1] != EarlyExitClassifier.__name__:
        raise InputError(f"{path} is not an EarlyExitClassifier checkpoint: pass one written by "
                         f"`eecnn fit --config configs/cifar10.yaml` to {option}")
    classifier = EarlyExitClassifier(**init_args(hparams))
    classifier.load_state_dict(checkpoint["state_dict"])
    num_classes = classifier.hparams.num_classes
    classes = checkpoint.get(CIFAR10DataModule.__qualname__, {}).get("classes") or \
        (list(CIFAR10_CLASSES) if num_classes == len(CIFAR10_CLASSES) else [str(c) for c in range(num_classes)])
    return classifier.eval().requires_grad_(False), data_args(checkpoint, path), classes


@torch.no_grad()
def run_exits(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> ExitOutputs:
    """All exits' logits of ``model`` (a classifier or its CNN, in eval mode) for uint8 ``images``."""
    device = next(model.parameters()).device
    logits = [torch.stack(model(normalize(batch.to(device))), dim=1).float().cpu()
              for batch in images.split(batch_size)]
    return ExitOutputs(torch.cat(logits), labels.clone())


def augmented_views(images: Tensor, labels: Tensor, views: int, padding: int, flip: bool,
                    seed: int = 0) -> tuple[Tensor, Tensor]:
    """``views`` copies of uint8 ``images`` (N, 3, H, W), one after the other: the images themselves, then
    random crops after ``padding`` pixels of padding and, if ``flip``, random horizontal flips, drawn with
    ``seed`` so a cache of them is the same on every run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        copies = [images] + [random_crop_flip(images, padding, flip) for _ in range(views - 1)]
    return torch.cat(copies), labels.repeat(views)


class EnvironmentSteps(IterableDataset):
    """An endless count: the exit agent's training steps draw their experience from its environment."""

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class ExitCache(L.LightningDataModule):
    """The exit outputs of the classifier at ``classifier_ckpt`` on the images it was trained with: what the
    exit agent learns from and is measured on. Splits: "val" and "test", and "val_views" where ``val_views``
    > 1, that many views of each validation image (itself, then crops and flips as its data module augments
    training images; no cutout: every view is an image a test image could be); "train" for benchmarks.

    The images are the classifier's recorded data settings (its validation split is the one it never
    trained on), less those given here: ``data_dir`` and ``download`` say where they are read from,
    ``batch_size`` how many the report's engine runs at once; ``val_size`` and ``split_seed`` are for
    other images than the classifier's (a smaller folder, say). Missing cache files are
    computed in ``prepare_data`` (once per node) under ``cache_dir``, named by the checkpoint's content hash
    and the data's fingerprint, so other weights or other images never read a cache built for different ones.

    ``costs``, a latency profile written by `eecnn-latency`, makes each exit's measured seconds the cost the
    agent trains against (and its FLOPs-saving target a saving of time) instead of its FLOPs.

    Batches: validation and test yield their whole split as one (logits, labels) batch; training yields an
    endless count of environment steps (the agent replays ``train_outputs``): ``--trainer.limit_train_batches``
    sets the steps per epoch.
    """

    def __init__(self, classifier_ckpt: str, data_dir: str | None = None, download: bool | None = None,
                 batch_size: int | None = None, val_size: int | None = None, split_seed: int | None = None,
                 val_views: int = 1, cache_dir: str = "logs/exit_cache", costs: str | None = None) -> None:
        super().__init__()
        if val_views < 1:
            raise InputError(f"--data.val_views must be at least 1, got {val_views}")
        self.save_hyperparameters()
        self.outputs: dict[str, ExitOutputs] = {}

    # Read on first use, not in __init__: LightningCLI hands the settings of the class it instantiates to every
    # save_hyperparameters called meanwhile, the classifier's and the image data module's too.
    @cached_property
    def loaded(self) -> tuple[EarlyExitClassifier, dict, list[str]]:
        """The frozen classifier, the data settings it recorded and its class names (``load_classifier``)."""
        return load_classifier(self.hparams.classifier_ckpt)

    @property
    def classifier(self) -> EarlyExitClassifier:
        return self.loaded[0]

    @property
    def classes(self) -> list[str]:
        return self.loaded[2]

    @cached_property
    def images(self) -> CIFAR10DataModule:
        """The classifier's images: its recorded data settings, less those given here."""
        given = {key: self.hparams[key] for key in ("data_dir", "download", "batch_size", "val_size", "split_seed")}
        return CIFAR10DataModule(**self.loaded[1] | {k: v for k, v in given.items() if v is not None})

    @cached_property
    def latency(self) -> tuple[Tensor, float] | None:
        """The latency profile at ``costs`` (written by `eecnn-latency`) as ``engine.latency_costs``, or None."""
        if self.hparams.costs is None:
            return None
        profile = read_json(Path(self.hparams.costs), "--data.costs")
        if len(profile.get("stage_seconds", ())) != self.num_exits or len(profile.get("head_seconds", ())) != \
                self.num_exits:
            raise InputError(f"{self.hparams.costs} is not a latency profile of a classifier with {self.num_exits} "
                             "exits: write one with `eecnn-latency CLASSIFIER_CKPT OUT.json` for --data.costs")
        return latency_costs(profile["stage_seconds"], profile["head_seconds"])

    @property
    def costs(self) -> Tensor:
        """(exits,) the cost per image of answering at exit k through the engine, what the agent trains against:
        its FLOPs (stages and heads up to k) or, with a latency profile, its seconds."""
        return path_flops(self.model) if self.latency is None else self.latency[0]

    @property
    def full_cost(self) -> float:
        """The full network's cost (every stage, the final head), in the unit of ``costs``."""
        return float(self.model.exit_flops[-1]) if self.latency is None else self.latency[1]

    @property
    def model(self) -> nn.Module:
        """The classifier's CNN, which the early-exit engine runs."""
        return self.classifier.model

    @property
    def num_exits(self) -> int:
        return self.model.num_exits

    @property
    def num_classes(self) -> int:
        return self.classifier.hparams.num_classes

    @property
    def train_split(self) -> str:
        return "val_views" if self.hparams.val_views > 1 else "val"

    @property
    def train_outputs(self) -> ExitOutputs:
        """The exit outputs the agent learns from: the validation views, or the validation images themselves."""
        return self.outputs[self.train_split]

    def stage_splits(self, stage: str) -> tuple[str, ...]:
        return {"fit": (self.train_split, "val"), "validate": ("val",), "test": ("val", "test")}.get(stage, ())

    @cached_property
    def stem(self) -> str:
        """What names this classifier's exit outputs on these images: the checkpoint's and the data's hashes."""
        return f"exits-{file_digest(Path(self.hparams.classifier_ckpt))}-data{self.images.fingerprint()}"

    def path(self, split: str) -> Path:
        h, augment = self.hparams, self.images.hparams
        if split == "val_views":
            split = f"val_views{h.val_views}-crop{augment.crop_padding}{'-flip' if augment.horizontal_flip else ''}"
        return Path(h.cache_dir) / f"{self.stem}-{split}.pt"

    def compute(self, splits: tuple[str, ...]) -> None:
        """Run the classifier on those of ``splits`` that have no cache file yet, and save them."""
        missing = [split for split in splits if not self.path(split).is_file()]
        if not missing:
            return
        self.images.prepare_data()
        if (found := len(self.images.find_classes())) != self.num_classes:
            raise InputError(f"the data at {self.images.hparams.data_dir} has {found} classes but the classifier "
                             f"{self.num_classes}: point --data.data_dir at images of the classes the classifier "
                             "was trained on")
        padding, flip = self.images.hparams.crop_padding, self.images.hparams.horizontal_flip
        if self.trainer is not None:  # on the accelerator the Trainer runs on
            self.classifier.to(self.trainer.strategy.root_device)
        for split in missing:
            images, labels = self.split_images(split.removesuffix("_views"))
            if split == "val_views":
                images, labels = augmented_views(images, labels, self.hparams.val_views, padding, bool(flip))
            outputs = run_exits(self.classifier, images, labels)
            write_atomic(self.path(split), lambda file, outputs=outputs: torch.save(vars(outputs), file))

    def split_images(self, split: str) -> tuple[Tensor, Tensor]:
        """The uint8 images and labels of the classifier's ``split`` (train, val or test), read on first use: the
        cached exit outputs never need them, the engine and the benchmarks that run it on images do."""
        self.images.prepare_data()
        self.images.setup("test" if split == "test" else "fit")
        return self.images.datasets[split].tensors

    def prepare_data(self) -> None:
        stage = self.trainer.state.fn.value
        if stage == "fit" and not isinstance(self.trainer.limit_train_batches, int):
            raise InputError("the exit agent trains on an endless stream of environment steps: set "
                             "--trainer.limit_train_batches to its steps per epoch (configs/agent.yaml: 500)")
        self.compute(self.stage_splits(stage))

    def setup(self, stage: str, splits: tuple[str, ...] = ()) -> None:
        """Read the cached ``stage``'s splits (and ``splits``), computing any that are missing (outside a
        Trainer, which has already computed them in ``prepare_data``)."""
        splits = tuple(dict.fromkeys(self.stage_splits(stage) + splits))
        self.compute(splits)
        for split in splits:
            if split not in self.outputs:
                self.outputs[split] = ExitOutputs(**torch.load(self.path(split), weights_only=True))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(EnvironmentSteps(), batch_size=None)

    def split_loader(self, split: str) -> DataLoader:
        outputs = self.outputs[split]
        return DataLoader([(outputs.logits, outputs.labels)], batch_size=None)  # one step: the whole split

    def val_dataloader(self) -> DataLoader:
        return self.split_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.split_loader("test")
