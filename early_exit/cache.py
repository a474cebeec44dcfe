"""The exit cache: a frozen classifier's logits at every exit for every image, computed once.

The exit agent and the threshold baselines only ever look at what the exits say, so the CNN runs
once per checkpoint and data; the cache file is named by both and reused.
"""

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from early_exit.checkpoint import data_args, init_args, read_checkpoint
from early_exit.classifier import EarlyExitClassifier
from early_exit.data import CIFAR10_CLASSES, CIFAR10DataModule, normalize, random_crop_flip
from early_exit.errors import InputError
from early_exit.evaluation import ExitOutputs
from early_exit.files import write_atomic

SPLITS = ("train", "val", "test")  # and "val_views": views of the validation images (``augmented_views``)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_classifier(path: str | Path) -> tuple[EarlyExitClassifier, dict, list[str]]:
    """A trained classifier, frozen and in eval mode, the data settings it was trained with (``data_args``:
    less a data path that does not exist here) and its class names; InputError if ``path`` is not an
    EarlyExitClassifier checkpoint."""
    checkpoint = read_checkpoint(path, option="--model.classifier_ckpt")
    hparams = checkpoint["hyper_parameters"]
    if hparams["_class_path"].rsplit(".", 1)[-1] != EarlyExitClassifier.__name__:
        raise InputError(f"{path} is not an EarlyExitClassifier checkpoint: pass one written by "
                         "`eecnn fit --config configs/cifar10.yaml`")
    classifier = EarlyExitClassifier(**init_args(hparams))
    classifier.load_state_dict(checkpoint["state_dict"])
    num_classes = classifier.hparams.num_classes
    classes = checkpoint.get(CIFAR10DataModule.__qualname__, {}).get("classes") or \
        (list(CIFAR10_CLASSES) if num_classes == len(CIFAR10_CLASSES) else [str(c) for c in range(num_classes)])
    return classifier.eval().requires_grad_(False), data_args(checkpoint), classes


@torch.no_grad()
def run_exits(classifier: EarlyExitClassifier, images: Tensor, labels: Tensor, batch_size: int = 512) -> ExitOutputs:
    """All exits' logits for uint8 ``images``, in eval mode and without augmentation."""
    device = classifier.device
    logits = [torch.stack(classifier(normalize(batch.to(device))), dim=1).float().cpu()
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


def exit_cache(classifier: EarlyExitClassifier, classifier_ckpt: str | Path, datamodule: CIFAR10DataModule,
               cache_dir: str | Path, splits: tuple[str, ...] = SPLITS, views: int = 8) -> dict[str, ExitOutputs]:
    """The exit outputs of ``classifier`` (loaded from ``classifier_ckpt``) on ``splits``: read from the cache,
    or computed once per split and cached. The files are named by the checkpoint's content hash and the
    data's fingerprint, so other weights or other images never read a cache built for different ones.
    Split "val_views" holds ``views`` views of the validation images, cropped and flipped as ``datamodule``
    augments its training images (no cutout: every view is an image a test image could be)."""
    cache_dir = Path(cache_dir)
    stem = f"exits-{file_digest(Path(classifier_ckpt))}-data{datamodule.fingerprint()}"
    padding, flip = datamodule.hparams.crop_padding, datamodule.hparams.horizontal_flip
    names = {"val_views": f"val_views{views}-crop{padding}{'-flip' if flip else ''}"}
    paths = {split: cache_dir / f"{stem}-{names.get(split, split)}.pt" for split in splits}
    missing = [split for split in splits if not paths[split].is_file()]
    if missing:
        datamodule.prepare_data()
        if (found := len(datamodule.find_classes())) != classifier.hparams.num_classes:
            raise InputError(f"the data at {datamodule.hparams.data_dir} has {found} classes but the classifier "
                             f"{classifier.hparams.num_classes}: point --data.data_dir at images of the classes the "
                             "classifier was trained on")
        for stage in {"test" if split == "test" else "fit" for split in missing}:
            datamodule.setup(stage)
    for split in missing:
        images, labels = datamodule.datasets[split.removesuffix("_views")].tensors
        outputs = run_exits(classifier, *augmented_views(images, labels, views, padding, flip)
                            if split == "val_views" else (images, labels))
        write_atomic(paths[split], lambda file, outputs=outputs: torch.save(vars(outputs), file))
    return {split: ExitOutputs(**torch.load(paths[split], weights_only=True)) for split in splits}


def checkpoint_exits(classifier_ckpt: str | Path, data_dir: str | None, cache_dir: str | Path,
                     splits: tuple[str, ...] = ("val", "test")) -> tuple[EarlyExitClassifier, dict[str, ExitOutputs]]:
    """A classifier checkpoint and its cached exit outputs on ``splits`` of the data it was trained with, read from
    ``data_dir`` instead if given: what the benchmarks that measure a checkpoint's exits start from."""
    classifier, data, _ = load_classifier(classifier_ckpt)
    datamodule = CIFAR10DataModule(**(data | {"data_dir": data_dir} if data_dir else data))
    return classifier, exit_cache(classifier, classifier_ckpt, datamodule, cache_dir, splits)
