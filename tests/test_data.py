from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advdetect.data import CIFAR10_CLASSES, load_cifar10, load_dataset, subset_indices
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
    ds = load_dataset(data_path=folder)
    assert ds.images.dtype == torch.float32 and ds.images.shape == (6, 3, 8, 8)
    assert 0 <= ds.images.min() and ds.images.max() <= 1
    assert ds.classes == ("cat", "dog") and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.array(Image.open(folder / "cat" / "0.png"))
    assert torch.equal((ds.images[0] * 255).round().byte(), torch.from_numpy(first).permute(2, 0, 1))


def test_subsets_are_deterministic_per_seed(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=10)
    a = load_dataset(data_path=folder, n=5, seed=7)
    b = load_dataset(data_path=folder, n=5, seed=7)
    c = load_dataset(data_path=folder, n=5, seed=8)
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
    a, b = load_dataset(data_path=folder, n=2, seed=1), load_dataset(data_path=folder, n=2, seed=1, offset=2)
    both = load_dataset(data_path=folder, n=4, seed=1)
    assert torch.equal(torch.cat([a.images, b.images]), both.images)


def test_resize_to_input_size_and_mixed_sizes(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=1)
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(folder / "dog" / "big.png")
    with pytest.raises(AdvDetectError, match="different sizes"):
        load_dataset(data_path=folder)
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


# --- your own data: DataSpec, splits, class mapping, streaming ---------------------------------

from advdetect.data import DataSpec, images_for, open_split, shared_images  # noqa: E402
from advdetect.models.wrapper import ModelInfo  # noqa: E402


def info(classes=("cat", "dog"), size=(8, 8), channels=3) -> ModelInfo:
    return ModelInfo("m", tuple(classes), size, (0.5,) * channels, (0.25,) * channels)


def test_single_folder_splits_into_disjoint_train_and_test_parts(tmp_path):
    folder = make_folder(tmp_path / "imgs", per_class=10)
    spec = DataSpec(path=str(folder))
    train, test = open_split(spec, "train", info()), open_split(spec, "test", info())
    assert len(test) == 6 and len(train) == 14  # 30% held out
    assert not set(train.positions) & set(test.positions)
    assert set(train.positions) | set(test.positions) == set(range(20))
    assert open_split(spec, "test", info()).positions == test.positions  # fixed: every command sees the same
    assert len(open_split(spec, None, info())) == 20  # attack's default on a single folder: all of it


def test_train_test_layout_and_records_by_content(tmp_path):
    make_folder(tmp_path / "d" / "train", per_class=4)
    make_folder(tmp_path / "d" / "test", per_class=2)
    spec = DataSpec(path=str(tmp_path / "d"))
    assert len(open_split(spec, "train", info())) == 8 and len(open_split(spec, "test", info())) == 4
    with pytest.raises(ValueError, match="single image folder"):
        open_split(spec, "all", info())
    record = images_for(info(), spec, "test", 3, seed=1).identify()
    assert record["dataset"] == "folder" and len(record["ids"]) == 3
    # a moved copy of the folder holds the same images: the guard still sees them
    import shutil

    shutil.copytree(tmp_path / "d", tmp_path / "moved")
    moved = images_for(info(), DataSpec(path=str(tmp_path / "moved")), "test", 4, seed=1).identify()
    assert len(shared_images([record], moved)) == 3
    other = make_folder(tmp_path / "other" / "test", per_class=2, size=(9, 9))
    make_folder(tmp_path / "other" / "train", per_class=1)
    fresh = images_for(info(), DataSpec(path=str(other.parent)), "test", 4, seed=1).identify()
    assert not shared_images([record], fresh)  # same file names, other pixels: not the same images


def test_classes_map_by_name_order_or_file(tmp_path):
    folder = make_folder(tmp_path / "imgs", classes=("dog", "cat"), per_class=2)
    by_name = open_split(DataSpec(path=str(folder)), "all", info(classes=("cat", "dog", "bird")))
    names = [p.parent.name for p in by_name.source.files]
    assert [by_name.source.labels[i] for i in range(4)] == [("cat", "dog").index(n) for n in names]
    ordered = open_split(DataSpec(path=str(folder)), "all", info(classes=("a", "b")))  # same count: sorted order
    assert ordered.source.labels == [0, 0, 1, 1]
    with pytest.raises(AdvDetectError, match="2 class folders .* 3 classes; pass --classes"):
        open_split(DataSpec(path=str(folder)), "all", info(classes=("a", "b", "c")))
    mapping = tmp_path / "classes.json"
    mapping.write_text('{"cat": 2, "dog": "a"}')
    mapped = open_split(DataSpec(path=str(folder), classes_file=str(mapping)), "all", info(classes=("a", "b", "c")))
    assert mapped.source.labels == [2, 2, 0, 0]
    lines = tmp_path / "classes.txt"
    lines.write_text("dog\ncat\n")
    assert open_split(DataSpec(path=str(folder), classes_file=str(lines)), "all",
                      info(classes=("x", "y"))).source.labels == [1, 1, 0, 0]
    mapping.write_text('{"cat": 7, "dog": 0}')
    with pytest.raises(AdvDetectError, match="'cat' maps to 7, not a class of the model"):
        open_split(DataSpec(path=str(folder), classes_file=str(mapping)), "all", info(classes=("a", "b", "c")))


def test_streamed_batches_convert_mixed_images_and_skip_unreadable_files(tmp_path):
    """Grayscale and color files in one folder come out with the model's channels; a corrupt file in
    the middle is skipped with its name and the reason, and the rest of the batch is kept."""
    folder = make_folder(tmp_path / "imgs", per_class=3, size=(10, 10))
    Image.fromarray(np.full((10, 10), 77, np.uint8), mode="L").save(folder / "cat" / "gray.png")
    (folder / "dog" / "1.png").write_bytes(b"not a png at all")
    for channels in (3, 1):
        chosen = open_split(DataSpec(path=str(folder)), "all", info(size=(16, 16), channels=channels))
        batches = list(chosen.batches(4, workers=2))
        assert [i for i, _ in batches] == [0, 1]
        kept = torch.cat([b.images for _, b in batches])
        assert kept.shape == (6, channels, 16, 16)
        skipped = [s for _, b in batches for s in b.skipped]
        assert len(skipped) == 1 and skipped[0]["image"].endswith("dog/1.png")
        assert "not a readable image" in skipped[0]["error"]
        index = torch.cat([b.index for _, b in batches]).tolist()
        assert index == [0, 1, 2, 3, 4, 6]  # cat: 0 1 2 gray, dog: 0 (1 unreadable) 2
    gray = chosen.source.item(chosen.source.files.index(folder / "cat" / "gray.png"))[0]
    assert gray.shape == (1, 16, 16) and int(gray.float().mean().round()) == 77


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(AdvDetectError, match="no images"):
        open_split(DataSpec(path=str(tmp_path / "empty")), "train", info())
