import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import CLASSES, make_archive, make_image_folder

from early_exit.data import CIFAR10DataModule, cutout, random_crop_flip
from early_exit.errors import InputError


def setup_fit(data_dir, **kwargs) -> CIFAR10DataModule:
    datamodule = CIFAR10DataModule(data_dir=str(data_dir), download=False, val_size=16, batch_size=8, **kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_image_folder_is_split_into_train_and_validation(image_folder):
    datamodule = setup_fit(image_folder)
    assert datamodule.classes == CLASSES
    assert len(datamodule.datasets["train"]) == 4 * 48 - 16
    assert len(datamodule.datasets["val"]) == 16
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    assert labels.dtype == torch.int64


def test_validation_split_is_reproducible_and_disjoint_from_training(image_folder):
    a, b = setup_fit(image_folder, split_seed=3), setup_fit(image_folder, split_seed=3)
    assert torch.equal(a.datasets["val"].tensors[0], b.datasets["val"].tensors[0])
    other = setup_fit(image_folder, split_seed=4)
    assert not torch.equal(a.datasets["val"].tensors[1], other.datasets["val"].tensors[1])
    train = {img.numpy().tobytes() for img in a.datasets["train"].tensors[0]}
    assert not any(img.numpy().tobytes() in train for img in a.datasets["val"].tensors[0])


def test_archive_is_unpacked_once_into_a_cache_beside_it(image_archive):
    first = setup_fit(image_archive)
    cache = image_archive.parent / "cifar-like.extracted"
    assert cache.is_dir()
    stamp = cache.stat().st_mtime_ns
    second = setup_fit(image_archive)
    assert cache.stat().st_mtime_ns == stamp
    assert torch.equal(first.datasets["val"].tensors[0], second.datasets["val"].tensors[0])


def test_archive_in_a_read_only_folder_is_cached_under_the_user_cache(image_folder, tmp_path, monkeypatch):
    readonly = tmp_path / "shared"
    readonly.mkdir()
    archive = make_archive(image_folder, readonly / "copy.tar.gz")
    readonly.chmod(0o555)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        setup_fit(archive)
    finally:
        readonly.chmod(0o755)
    assert (tmp_path / "cache" / "eecnn" / "copy.extracted").is_dir()
    assert sorted(p.name for p in readonly.iterdir()) == ["copy.tar.gz"]


def test_test_split_is_read_for_test_and_predict(image_folder):
    datamodule = CIFAR10DataModule(data_dir=str(image_folder), download=False)
    datamodule.setup("test")
    assert len(datamodule.datasets["test"]) == 4 * 12 and "train" not in datamodule.datasets


def test_random_crop_flip_shifts_and_mirrors_each_image():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, padding=2, flip=True)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for pad, crop in zip(padded, out):  # every output is some window of its own padded image
        windows = [pad[:, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(-1)) for w in windows)
    assert not torch.equal(out, images)
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


def test_alternating_flips_show_each_training_image_both_ways_in_two_epochs(image_folder):
    original = setup_fit(image_folder).datasets["train"].tensors[0]
    data = setup_fit(image_folder, horizontal_flip="alternate", crop_padding=0)
    stored, labels = data.datasets["train"].tensors
    mirrored = (stored != original).flatten(1).any(1)
    assert 0 < mirrored.sum() < len(mirrored)  # a random half starts mirrored, the rest as they are
    assert torch.equal(stored[mirrored], original[mirrored].flip(-1))
    assert torch.equal(stored[~mirrored], original[~mirrored])
    seen = []
    for epoch in range(3):
        data.trainer = SimpleNamespace(training=True, current_epoch=epoch)
        seen.append(data.on_after_batch_transfer((stored, labels), 0)[0])
    assert torch.equal(seen[1], seen[0].flip(-1)) and torch.equal(seen[2], seen[0])
    with pytest.raises(InputError, match="--data.horizontal_flip must be true, false or alternate"):
        setup_fit(image_folder, horizontal_flip="sometimes")


def test_cutout_zeroes_one_clipped_square_per_image_across_channels():
    torch.manual_seed(0)
    images = torch.randn(256, 3, 16, 16) + 10  # no zeros of its own
    out = cutout(images, 4)
    erased = out == 0
    assert torch.equal(erased[:, 0], erased[:, 1]) and torch.equal(erased[:, 0], erased[:, 2])
    rows, cols = erased[:, 0].any(2), erased[:, 0].any(1)
    assert torch.equal(erased[:, 0], rows[:, :, None] & cols[:, None, :])  # a rectangle
    assert ((rows.sum(1) >= 2) & (rows.sum(1) <= 4) & (cols.sum(1) >= 2) & (cols.sum(1) <= 4)).all()
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rows}) > 5  # placed per image
    assert torch.equal(out[~erased], images[~erased])


# --- bad input: one clear message naming the problem ---------------------------------------------


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        setup_fit(tmp_path / "nowhere")
    with pytest.raises(InputError, match="archive .* does not exist"):
        setup_fit(tmp_path / "nowhere.tar.gz")


def test_folder_without_train_and_test_is_reported(tmp_path):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    with pytest.raises(InputError, match="no train/ and test/"):
        setup_fit(tmp_path / "images" / "cat")
    archive = make_archive(tmp_path / "images", tmp_path / "flat.tar.gz")
    with pytest.raises(InputError, match="no train/ and test/"):
        setup_fit(archive)


def test_class_folders_differing_between_splits_are_reported(tmp_path):
    root = make_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    shutil.rmtree(root / "test" / "cross")
    with pytest.raises(InputError, match="class folders differ.*cross"):
        setup_fit(root)


def test_empty_class_is_reported(tmp_path):
    root = make_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    for f in (root / "train" / "square").iterdir():
        f.unlink()
    with pytest.raises(InputError, match="square is empty"):
        setup_fit(root)


def test_unreadable_image_is_named(tmp_path):
    root = make_image_folder(tmp_path / "d", train_per_class=20, test_per_class=1)
    bad = root / "train" / "stripe" / "0003.jpg"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated JPEG
    with pytest.raises(InputError, match="cannot read image .*0003.jpg"):
        setup_fit(root)
    bad.write_text("not an image")
    with pytest.raises(InputError, match="cannot read image .*0003.jpg"):
        setup_fit(root)


def test_corrupt_archive_is_reported(tmp_path):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match="cannot unpack"):
        setup_fit(archive)
