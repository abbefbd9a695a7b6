from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advdetect.data import CIFAR10_CLASSES, load_cifar10, load_dataset, load_image_folder, subset_indices
from advdetect.errors import AdvDetectError, DataNotFoundError, UnknownNameError

from .conftest import SHARED_DATA, needs_shared


def make_folder(root: Path, classes=("cat", "dog"), per_class=3, size=(8, 8)) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_image_folder_loads_float_in_unit_range(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    ds = load_image_folder(folder)
    assert ds.images.dtype == torch.float32 and ds.images.shape == (6, 3, 8, 8)
    assert 0 <= ds.images.min() and ds.images.max() <= 1
    assert ds.classes == ("cat", "dog") and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.array(Image.open(folder / "cat" / "0.png"))
    assert torch.equal((ds.images[0] * 255).round().byte(), torch.from_numpy(first).permute(2, 0, 1))


def test_subsets_are_deterministic_per_seed(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=10)
    a = load_image_folder(folder, n=5, seed=7)
    b = load_image_folder(folder, n=5, seed=7)
    c = load_image_folder(folder, n=5, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert subset_indices(10, None, 0).tolist() == list(range(10))


def test_subsets_at_offsets_continue_the_same_order(tmp_path):
    first, later = subset_indices(100, 30, 5), subset_indices(100, 20, 5, offset=30)
    assert torch.equal(torch.cat([first, later]), subset_indices(100, 50, 5))
    assert not set(first.tolist()) & set(later.tolist())
    with pytest.raises(ValueError, match="only 100"):
        subset_indices(100, 80, 5, offset=30)
    with pytest.raises(ValueError, match="offset"):
        subset_indices(100, 10, 5, offset=-1)
    folder = make_folder(tmp_path / "imgs", per_class=3)
    a, b = load_image_folder(folder, n=2, seed=1), load_image_folder(folder, n=2, seed=1, offset=2)
    both = load_image_folder(folder, n=4, seed=1)
    assert torch.equal(torch.cat([a.images, b.images]), both.images)


def test_resize_to_input_size_and_mixed_sizes(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=1)
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(folder / "dog" / "big.png")
    with pytest.raises(AdvDetectError, match="different sizes"):
        load_image_folder(folder)
    ds = load_dataset(data_path=folder, input_size=(16, 16))
    assert ds.images.shape == (3, 3, 16, 16)


def test_cifar_layout_under_data_root(tmp_path):
    make_folder(tmp_path / "cifar10-jpeg" / "test", classes=CIFAR10_CLASSES, per_class=1, size=(32, 32))
    ds = load_cifar10("test", data_dir=tmp_path, download=False)
    assert len(ds) == 10 and ds.classes == CIFAR10_CLASSES


def test_data_root_from_environment(tmp_path, monkeypatch):
    make_folder(tmp_path / "test", classes=CIFAR10_CLASSES, per_class=1, size=(32, 32))
    monkeypatch.setenv("ADVDETECT_DATA", str(tmp_path))
    assert len(load_cifar10("test", download=False)) == 10


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_cifar10("test", data_dir=tmp_path / "nowhere", download=False)
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "cifar10-jpeg" in msg and "--data-dir" in msg


def test_bad_names(tmp_path):
    with pytest.raises(UnknownNameError, match="cifar10"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(UnknownNameError, match="train, test"):
        load_cifar10("val", data_dir=tmp_path)


@needs_shared
def test_shared_cifar_subset():
    ds = load_cifar10("test", n=20, seed=0, data_dir=SHARED_DATA)
    assert ds.images.shape == (20, 3, 32, 32) and ds.labels.max() < 10
    assert torch.equal(ds.labels, load_cifar10("test", n=20, seed=0, data_dir=SHARED_DATA).labels)
