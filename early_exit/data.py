"""CIFAR-10 as a LightningDataModule.

Every split is decoded once into a uint8 tensor held in memory; augmentation and normalisation run
on whole batches after they reach the device, so on a 2-core CPU the model, not JPEG decoding or
per-image transforms, sets the pace.
"""

import contextlib
import glob
import hashlib
import math
import os
import shutil
import stat
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from early_exit.errors import InputError
from early_exit.files import file_digest, write_atomic
from early_exit.teacher import load_teacher, teacher_log_probs

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SIZE = 32
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def rgb_array(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """Any PIL image (any mode: RGBA, grayscale, palette) as a ``size`` x ``size`` RGB uint8 array (H, W, 3)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def load_rgb_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """Any PIL-readable image file as a ``size`` x ``size`` RGB uint8 array (H, W, 3)."""
    try:
        with Image.open(path) as image:
            return rgb_array(image, size)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"cannot read image {path} ({err}): replace or remove the file") from None


def expand_image_paths(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """The files named by ``inputs`` (files, folders searched with their sub-folders, or glob patterns), in
    order, and one error message per input that names nothing."""
    files, errors = [], []
    for pattern in inputs:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found = [path]
        else:
            found = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not found:
            errors.append(f"{pattern}: no image files there (not a file, a folder with images or a matching glob)")
        files += found
    return files, errors


def read_image_files(inputs: list[str]) -> tuple[list[Path], Tensor, list[str]]:
    """Decode every image named by ``inputs`` into uint8 (N, 3, 32, 32); unreadable ones are left out and
    each gets one error message naming the file. Returns the files read, their images and the errors."""
    files, errors = expand_image_paths(inputs)
    read, arrays = [], []
    for file in files:
        try:
            arrays.append(load_rgb_image(file))
            read.append(file)
        except InputError as err:
            errors.append(str(err))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays else \
        torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    return read, images, errors


def normalize(images: Tensor) -> Tensor:
    """(N, 3, H, W) images, uint8 in [0, 255] or float in [0, 1], standardised with CIFAR-10's channel
    statistics: the classifier's input."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    scaled = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return (scaled - mean) / std


def random_crop_flip(images: Tensor, padding: int, flip: bool) -> Tensor:
    """Random crop after zero padding and random horizontal flip, drawn per sample, in one gather.

    torchvision's transforms draw one set of parameters per call, so per-sample augmentation would
    mean a Python call per image in the DataLoader; this keeps it a handful of batched tensor ops.
    """
    n, c, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = torch.randint(0, 2 * padding + 1, (n, 1), device=device) + torch.arange(h, device=device)
    cols = torch.randint(0, 2 * padding + 1, (n, 1), device=device) + torch.arange(w, device=device)
    if flip:
        mirrored = torch.rand(n, 1, device=device) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def cutout(images: Tensor, size: int) -> Tensor:
    """Cutout (DeVries & Taylor, 2017): a ``size`` x ``size`` square of each normalised image set to zero,
    the channel mean, centred anywhere in the image and clipped at its border; drawn per sample, batched."""
    n, _, h, w = images.shape
    device = images.device
    top = torch.randint(0, h, (n, 1), device=device) - size // 2
    left = torch.randint(0, w, (n, 1), device=device) - size // 2
    rows = torch.arange(h, device=device) - top
    cols = torch.arange(w, device=device) - left
    inside = ((rows >= 0) & (rows < size)).view(n, 1, h, 1) & ((cols >= 0) & (cols < size)).view(n, 1, 1, w)
    return images.masked_fill(inside, 0.0)


def augment(images: Tensor, padding: int, flip: bool, cutout_size: int) -> Tensor:
    """The training augmentation of a uint8 batch, normalised: random crop and flip, then cutout (0: none)."""
    if padding > 0 or flip:
        images = random_crop_flip(images, padding, flip)
    images = normalize(images)
    return cutout(images, cutout_size) if cutout_size > 0 else images


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "eecnn"


def _is_writable(folder: Path) -> bool:
    # Mode bits, not os.access: root may write anywhere, but a folder marked read-only (such as a
    # shared data folder) should be left alone.
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & stat.S_IWUSR)


def extract_archive(archive: Path) -> Path:
    """Unpack ``archive`` once into a cache folder beside it (or under ~/.cache/eecnn if that folder is
    read-only) and return it. Unpacks into a temporary folder first, so a crash leaves no half cache."""
    name = next(archive.name.removesuffix(s) for s in ARCHIVE_SUFFIXES if archive.name.endswith(s))
    parent = archive.parent if _is_writable(archive.parent) else _cache_home()
    target = parent / f"{name}.extracted"
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(target)
    except (tarfile.TarError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.is_dir():  # another process unpacked it first
            return target
        raise InputError(f"cannot unpack {archive} ({err}): check that it is a .tar.gz or .tar file") from None
    return target


def find_split_root(folder: Path) -> Path:
    """The folder holding ``train/`` and ``test/``: ``folder`` itself, or its single subfolder."""
    candidates = [folder] + [d for d in sorted(folder.iterdir()) if d.is_dir()]
    for root in candidates:
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    raise InputError(f"{folder} has no train/ and test/ folders: expected train/<class>/* and test/<class>/*")


def class_folders(root: Path, split: str) -> list[str]:
    """The class names of an image folder's split: its sub-folders' names, sorted."""
    return sorted(d.name for d in (root / split).iterdir() if d.is_dir())


def read_image_folder(root: Path, split: str) -> tuple[Tensor, Tensor, list[str]]:
    """Decode ``root/split/<class>/*`` into uint8 images (N, 3, H, W), labels and class names."""
    class_sets = {s: class_folders(root, s) for s in ("train", "test")}
    if class_sets["train"] != class_sets["test"]:
        only = set(class_sets["train"]) ^ set(class_sets["test"])
        raise InputError(f"class folders differ between {root}/train and {root}/test ({', '.join(sorted(only))}): "
                         "both splits need the same classes")
    classes = class_sets[split]
    if not classes:
        raise InputError(f"{root / split} has no class folders: expected {split}/<class>/<image>")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_files = sorted(f for f in (root / split / name).iterdir() if f.is_file())
        if not class_files:
            raise InputError(f"class folder {root / split / name} is empty: add its images or remove the folder")
        files += class_files
        labels += [label] * len(class_files)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        images = np.stack(list(pool.map(load_rgb_image, files, chunksize=256)))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels), classes


def read_torchvision_cifar10(root: Path, split: str, download: bool) -> tuple[Tensor, Tensor, list[str]]:
    """CIFAR-10 through torchvision's own download and files."""
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(str(root), train=split == "train", download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise InputError(f"no CIFAR-10 at {root} ({err}): pass --data.download true, or point "
                         "--data.data_dir at an image-folder copy or its .tar.gz") from None
    except OSError as err:  # download failed: no network, unwritable folder
        raise InputError(f"could not download CIFAR-10 into {root} ({err}): check the network, or point "
                         "--data.data_dir at a local image-folder copy or its .tar.gz") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets), list(dataset.classes)


class TensorBatches:
    """Batches of a ``TensorDataset`` by one index per batch: no per-sample Python, no collation.

    ``sampler`` (a ``DistributedSampler``, for one process too) orders the samples: shuffled anew each epoch
    with ``seed`` (Lightning calls its ``set_epoch``), one shard per rank, padded to equal lengths as
    Lightning's own would be. Lightning leaves an iterable that is not a ``DataLoader`` as it is."""

    def __init__(self, dataset: TensorDataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        self.tensors, self.batch_size = dataset.tensors, batch_size
        self.sampler = DistributedSampler(dataset, num_replicas, rank, shuffle=shuffle, seed=seed)
        self.batch_sampler = None  # as in a DataLoader of whole batches: Lightning looks for it beside the sampler

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        order = torch.tensor(list(self.sampler), device=self.tensors[0].device)
        for index in order.split(self.batch_size):
            yield tuple(tensor[index] for tensor in self.tensors)


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 from torchvision's download (``data_dir`` a plain folder) or from an image-folder copy
    (``data_dir`` holding ``train/<class>/*`` and ``test/<class>/*``, or a .tar.gz/.tar of that).

    A validation split of ``val_size`` images is held out of the training split with ``split_seed``. Batches
    are drawn by one index each (``TensorBatches``), from images held on the accelerator; training batches
    are shuffled with ``split_seed`` and the epoch, and augmented on the device: random crop after
    ``crop_padding`` pixels of padding, horizontal flip, and a ``cutout`` x ``cutout`` square of zeros (0:
    none). ``horizontal_flip: alternate`` is airbench's alternating flip: each training image is mirrored at
    random once, then seen the other way round every other epoch, so two epochs show every image both ways
    instead of each way at random.

    With ``teacher_ckpts`` (``eecnn fit --config configs/teacher.yaml`` checkpoints, or classifiers' for their final
    exits) training batches carry a third tensor: the teachers' log-probabilities for each image, averaged over
    the teachers and over the image and its mirror image (what ``EarlyExitClassifier(distillation_weight=...)``
    distils into the exits). They are computed once and cached under ``teacher_cache_dir``, named by the
    checkpoints' content and the data's fingerprint.
    """

    def __init__(
        self,
        data_dir: str = "data/",
        download: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        batch_size: int = 128,
        crop_padding: int = 4,
        horizontal_flip: bool | Literal["alternate"] = True,
        cutout: int = 0,
        teacher_ckpts: list[str] | None = None,
        teacher_cache_dir: str = "logs/teacher_cache",
    ) -> None:
        super().__init__()
        for name, value, least in (("val_size", val_size, 1), ("batch_size", batch_size, 1),
                                   ("crop_padding", crop_padding, 0), ("cutout", cutout, 0)):
            if value < least:
                raise InputError(f"--data.{name} must be at least {least}, got {value}")
        if horizontal_flip not in (True, False, "alternate"):
            raise InputError(f"--data.horizontal_flip must be true, false or alternate, got {horizontal_flip!r}")
        self.save_hyperparameters()
        self.classes: list[str] = []
        self.datasets: dict[str, TensorDataset] = {}

    def fingerprint(self) -> str:
        """A short hash of what decides every split's images without decoding them: the data source's files
        (relative names, sizes and modification times; an archive is one file) and the split settings."""
        path = Path(self.hparams.data_dir).expanduser()
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        digest = hashlib.sha256(f"val_size={self.hparams.val_size} split_seed={self.hparams.split_seed}".encode())
        for file in files:
            info = file.stat()
            digest.update(f"\n{file.relative_to(path)} {info.st_size} {info.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]

    def image_folder(self) -> Path | None:
        """The image-folder root to read, unpacking an archive if needed; None means torchvision's files."""
        path = Path(self.hparams.data_dir).expanduser()
        if path.name.endswith(ARCHIVE_SUFFIXES):
            if not path.is_file():
                raise InputError(f"archive {path} does not exist: check --data.data_dir")
            return find_split_root(extract_archive(path))
        if path.is_file():
            raise InputError(f"{path} is a file but not a .tar.gz, .tgz or .tar archive: check --data.data_dir")
        if (path / "train").is_dir() or (path / "test").is_dir():
            return find_split_root(path)
        if not self.hparams.download and not (path / "cifar-10-batches-py").is_dir():
            if not path.exists():
                raise InputError(f"data_dir {path} does not exist: check --data.data_dir, or pass --data.download true")
            raise InputError(f"{path} has no train/ and test/ folders and no torchvision CIFAR-10 files: point "
                             "--data.data_dir at an image-folder copy, or pass --data.download true")
        return None

    def find_classes(self) -> list[str]:
        """The class names, without decoding an image: the image folder's class folders, or CIFAR-10's."""
        root = self.image_folder()
        return list(CIFAR10_CLASSES) if root is None else class_folders(root, "train")

    def prepare_data(self) -> None:
        if self.image_folder() is None:
            for split in ("train", "test"):
                read_torchvision_cifar10(Path(self.hparams.data_dir), split, self.hparams.download)

    def read_split(self, split: str) -> tuple[Tensor, Tensor]:
        """All images and labels of the official ``train`` or ``test`` split."""
        root = self.image_folder()
        if root is None:
            images, labels, self.classes = read_torchvision_cifar10(Path(self.hparams.data_dir), split, False)
        else:
            images, labels, self.classes = read_image_folder(root, split)
        return images, labels

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and "train" not in self.datasets:
            images, labels = self.read_split("train")
            val_size = self.hparams.val_size
            if not 0 < val_size < len(labels):
                raise InputError(f"val_size {val_size} must be between 1 and {len(labels) - 1}, "
                                 f"the number of training images less one")
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.hparams.split_seed))
            val, train = order[:val_size], order[val_size:]
            train_images = images[train]
            if self.hparams.horizontal_flip == "alternate":  # each image's first orientation, drawn once
                first = torch.rand(len(train), generator=torch.Generator().manual_seed(self.hparams.split_seed)) < 0.5
                train_images = torch.where(first.view(-1, 1, 1, 1), train_images.flip(-1), train_images)
            self.datasets["train"] = TensorDataset(train_images, labels[train])
            self.datasets["val"] = TensorDataset(images[val], labels[val])
        if stage == "fit" and self.hparams.teacher_ckpts and len(self.datasets["train"].tensors) == 2:
            train_images, train_labels = self.datasets["train"].tensors
            self.datasets["train"] = TensorDataset(train_images, train_labels, self.teacher_predictions(train_images))
        if stage in ("test", "predict") and "test" not in self.datasets:
            self.datasets["test"] = TensorDataset(*self.read_split("test"))

    def teacher_predictions(self, images: Tensor) -> Tensor:
        """``teacher_log_probs`` of the teachers for the training ``images`` (in the trainer's precision, on its
        device), from the cache if it has them."""
        paths = list(self.hparams.teacher_ckpts)
        for path in paths:
            if not Path(path).is_file():
                raise InputError(f"teacher checkpoint {path} does not exist: check --data.teacher_ckpts")
        digests = "-".join(file_digest(Path(path)) for path in paths)
        cache = Path(self.hparams.teacher_cache_dir) / f"teacher-{digests}-data{self.fingerprint()}.pt"
        if cache.is_file():
            return torch.load(cache, weights_only=True)
        device, precision = ("cpu", contextlib.nullcontext()) if self.trainer is None else \
            (self.trainer.strategy.root_device, self.trainer.precision_plugin.forward_context())
        with precision:  # the trainer's: bf16 where the hardware has it, several times faster than fp32
            log_probs = teacher_log_probs([load_teacher(path) for path in paths], normalize(images), device)
        write_atomic(cache, lambda file: torch.save(log_probs, file))
        return log_probs

    def state_dict(self) -> dict:
        """Saved in checkpoints, so predictions can be named without the data."""
        return {"classes": self.classes}

    def load_state_dict(self, state_dict: dict) -> None:
        self.classes = state_dict["classes"]

    def _loader(self, split: str, shuffle: bool = False) -> TensorBatches:
        trainer, dataset = self.trainer, self.datasets[split]
        if trainer is not None and trainer.strategy.root_device.type == "cuda":  # the images live on the GPU
            dataset = self.datasets[split] = TensorDataset(*(t.to(trainer.strategy.root_device)
                                                             for t in dataset.tensors))
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return TensorBatches(dataset, self.hparams.batch_size, shuffle, self.hparams.split_seed, replicas, rank)

    def train_dataloader(self) -> TensorBatches:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> TensorBatches:
        return self._loader("val")

    def test_dataloader(self) -> TensorBatches:
        return self._loader("test")

    def predict_dataloader(self) -> TensorBatches:
        return self._loader("test")

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, ...]:
        images, labels, *teacher = batch
        if self.trainer is None or not self.trainer.training:
            return normalize(images), labels, *teacher
        hp = self.hparams
        if hp.horizontal_flip == "alternate" and self.trainer.current_epoch % 2:
            images = images.flip(-1)
        return augment(images, hp.crop_padding, hp.horizontal_flip is True, hp.cutout), labels, *teacher


class ImageFilesDataModule(L.LightningDataModule):
    """Image files to predict, named by paths, folders or globs: any size or mode becomes 32x32 RGB.
    Unreadable files are reported on stderr, one line each, and left out; ``errors`` keeps the messages."""

    def __init__(self, inputs: list[str], batch_size: int = 256) -> None:
        super().__init__()
        self.inputs, self.batch_size = inputs, batch_size
        self.files: list[Path] = []
        self.errors: list[str] = []

    def setup(self, stage: str) -> None:
        self.files, self.images, self.errors = read_image_files(self.inputs)
        if self.trainer is None or self.trainer.is_global_zero:  # every rank reads the files; one reports them
            for message in self.errors:
                print(f"eecnn: error: {message}", file=sys.stderr)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, torch.arange(len(self.images))), batch_size=self.batch_size)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, index = batch
        return normalize(images), index
