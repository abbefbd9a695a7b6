"""Where images come from: CIFAR-10 or a folder of the user's own, split, subset and recorded.

Images are decoded on demand (see :mod:`advdetect.sources`) as float32 NCHW tensors in [0, 1]
(the project's single data contract), resized to the model's input size and converted to its
channel count, with labels as the model's class indices. Two kinds of data:

* CIFAR-10 under a data root: an ImageFolder tree ``<root>/cifar10-jpeg/{train,test}/<class>/``
  (or ``<root>/{train,test}/<class>/``), such as the JPEG copy in ``../shared/data``, or
  torchvision's ``<root>/cifar-10-batches-py`` (downloaded when missing and allowed; torchvision
  verifies the md5 of every batch file against the official release before reading it, so nothing
  unverified is ever unpickled). The root is ``--data-dir``, else ``$ADVDETECT_DATA``, else a
  per-user cache directory.
* ``--data DIR`` (:class:`DataSpec`): any ImageFolder, with ``train/`` and ``test/`` inside or a
  single tree that a fixed seed splits into train and test parts.

Every stage takes a seeded subset (:func:`images_for`); :meth:`Selection.identify` records which
images it holds (CIFAR-10 indices; for files, content ids too) so that an evaluation can refuse
images a detector was fitted or calibrated on (:func:`shared_images`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import AdvDetectError, DataNotFoundError, OptionError, UnknownNameError
from .sources import FolderSource, Selection, TensorSource

log = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
DATASETS = ("cifar10",)
SPLITS = ("train", "test")
ALL = "all"  # every image of a single image folder (``attack --data DIR`` on a folder without train/test)
CIFAR10_SIZES = {"train": 50_000, "test": 10_000}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ImageSet:
    """A set of images in [0, 1] with labels and the class names they index."""

    images: torch.Tensor  # float32, N x C x H x W, in [0, 1]
    labels: torch.Tensor  # int64, N
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def default_data_root() -> Path:
    """``$ADVDETECT_DATA`` if set, else ``$XDG_CACHE_HOME/advdetect/data`` (``~/.cache``)."""
    env = os.environ.get("ADVDETECT_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "advdetect" / "data"


def resolve_data_root(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_root()


def _image_folder_split(root: Path, split: str) -> Path | None:
    for candidate in (root / "cifar10-jpeg" / split, root / split):
        if candidate.is_dir() and any(p.is_dir() for p in candidate.iterdir()):
            return candidate
    return None


def list_image_folder(folder: str | os.PathLike) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files, labels and class names of an ImageFolder tree ``folder/<class>/<image>``.

    Classes are the sorted subdirectory names (as torchvision's ImageFolder does; for
    CIFAR-10 this is the standard class order); files are found recursively within each class folder
    and sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"image folder {folder} does not exist or is not a directory")
    classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
    if not classes:
        raise DataNotFoundError(
            f"{folder} has no class subdirectories; expected the layout {folder}/<class>/<image>.jpg"
        )
    files: list[Path] = []
    labels: list[int] = []
    for idx, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        files.extend(found)
        labels.extend([idx] * len(found))
    if not files:
        raise DataNotFoundError(f"{folder} has class folders but no images ({', '.join(IMAGE_SUFFIXES)})")
    return files, labels, classes


def subset_indices(total: int, n: int | None, seed: int, offset: int = 0) -> torch.Tensor:
    """A deterministic subset of ``range(total)``: ``n`` indices of a seeded permutation from ``offset`` on.

    With ``n`` None (or >= total) and no offset every index is returned in order. Subsets of
    one seed at different offsets never overlap (e.g. evaluation images at offset 0 and
    calibration images right after them).
    """
    if n is not None and n <= 0:
        raise OptionError(f"n must be positive, got {n}")
    if offset < 0:
        raise OptionError(f"offset must be >= 0, got {offset}")
    if offset == 0 and (n is None or n >= total):
        return torch.arange(total)
    if n is None or offset + n > total:
        raise OptionError(f"asked for {n} images from position {offset} of {total}: there are only {total}")
    return seeded_order(total, seed)[offset:offset + n]


def seeded_order(total: int, seed: int) -> torch.Tensor:
    """The seeded permutation of ``range(total)`` that :func:`subset_indices` takes its subsets from."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))


def subset_record(split: str, n: int, seed: int, offset: int = 0, dataset: str = "cifar10") -> dict[str, Any]:
    """Which images a seeded CIFAR-10 subset holds (see :func:`subset_indices`), as recorded in
    detector.json so that an evaluation can refuse images the detector was fitted or calibrated on."""
    indices = subset_indices(CIFAR10_SIZES[split], n, seed, offset).tolist()
    return {"dataset": dataset, "split": split, "seed": seed, "offset": offset, "indices": indices}


def shared_images(records: list[dict[str, Any]], other: dict[str, Any]) -> set[Any]:
    """The images of ``other`` (a record: see :meth:`Selection.identify`) that any of ``records`` holds too.

    Image files are compared by content id (path under the data root and bytes), so a moved copy
    of the same folder still counts; CIFAR-10 images by index within the same split.
    """
    shared: set[Any] = set()
    for record in records:
        if "ids" in other and "ids" in record:
            shared |= set(other["ids"]) & set(record["ids"])
        elif record.get("dataset") == other.get("dataset") and record.get("split") == other.get("split"):
            shared |= set(other["indices"]) & set(record.get("indices", ()))
    return shared


def _load_torchvision_cifar(root: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataNotFoundError(str(exc)) from exc
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


@dataclass(frozen=True)
class DataSpec:
    """Where a command's images come from.

    ``path`` (``--data``): an ImageFolder tree of the user's own, either with ``train/`` and
    ``test/`` inside, or a single ``<class>/<image>`` tree that is split by a fixed seed into a
    "train" part and a "test" part (``TEST_FRACTION`` of it). Without ``path``: CIFAR-10 under
    ``data_dir`` (``--data-dir``), downloaded when missing and ``download`` allows.
    ``classes_file`` (``--classes``) maps folder names to the model's classes (see :func:`class_mapping`).
    """

    path: str | None = None
    data_dir: str | None = None
    classes_file: str | None = None
    download: bool = True

    def describe(self) -> dict[str, Any]:
        """What detector.json records about the data (a folder by its absolute path)."""
        if self.path is None:
            return {"dataset": "cifar10"}
        return {"dataset": "folder", "path": str(Path(self.path).expanduser().resolve()),
                "classes_file": str(Path(self.classes_file).resolve()) if self.classes_file else None,
                "split_seed": SPLIT_SEED, "test_fraction": TEST_FRACTION}

    @classmethod
    def recorded(cls, record: dict[str, Any] | None, path: str | None = None,
                 data_dir: str | None = None, classes_file: str | None = None) -> DataSpec:
        """The data a detector was trained on (detector.json's ``data``), unless ``path`` names other data."""
        if path is None and isinstance(record, dict) and record.get("dataset") == "folder":
            path = record.get("path")
            classes_file = classes_file or record.get("classes_file")
        return cls(path=path, data_dir=data_dir, classes_file=classes_file)


TEST_FRACTION = 0.3  # a single image folder: the share of it held out as its "test" split
SPLIT_SEED = 0  # the seed of that split (fixed, so every command sees the same parts)


def open_split(spec: DataSpec, split: str | None, model_info: Any) -> Selection:
    """Every image of ``split`` of ``spec``, decoded for the model (``ModelInfo``: input size, channels,
    classes), as a :class:`Selection` in a fixed order. ``split``: "train", "test", or for a single
    image folder "all"; None: "all" for a single folder, else "test"."""
    if split is not None and split not in (*SPLITS, ALL):
        raise UnknownNameError("split", split, [*SPLITS, ALL])
    root = None if spec.path is None else Path(spec.path).expanduser()
    if root is not None and not root.is_dir():
        raise DataNotFoundError(f"--data {spec.path}: no such directory; give an ImageFolder "
                                "(<class>/<image> files, or train/ and test/ holding those)")
    layout = "single" if root is not None and not all((root / s).is_dir() for s in SPLITS) else "train-test"
    if split is None:
        split = ALL if layout == "single" else "test"
    if split == ALL and layout != "single":
        raise OptionError("split 'all' is for a single image folder; this data has train and test splits")
    size, channels = tuple(model_info.input_size), len(model_info.mean)
    if root is None:
        return _open_cifar10(spec, split, size, channels, model_info)
    folder = root / split if layout == "train-test" else root
    files, labels, folder_classes = list_image_folder(folder)
    reference = list_image_folder(root / "train")[2] if layout == "train-test" else folder_classes
    if not set(folder_classes) <= set(reference):
        extra = sorted(set(folder_classes) - set(reference))
        raise AdvDetectError(f"{folder} has class folders that {root / 'train'} lacks: {', '.join(extra[:5])}")
    mapping = class_mapping(reference, model_info.classes, spec.classes_file, str(root), model_info.name)
    model_labels = [mapping[folder_classes[label]] for label in labels]
    source = FolderSource(root, files, model_labels, model_info.classes, size, channels)
    members = list(range(len(files)))
    if layout == "single" and split != ALL:
        if len(files) < 2:
            raise AdvDetectError(f"{root} holds {len(files)} image; it cannot be split into train and test parts")
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        n_test = max(1, int(round(TEST_FRACTION * len(files))))
        members = sorted(order[:n_test]) if split == "test" else sorted(order[n_test:])
    record = {"dataset": "folder", "root": str(root.resolve()), "layout": layout, "split": split}
    return Selection(source, members, record)


def _open_cifar10(spec: DataSpec, split: str, size: tuple[int, ...], channels: int, model_info: Any) -> Selection:
    root = resolve_data_root(spec.data_dir)
    mapping = None
    if tuple(model_info.classes) != CIFAR10_CLASSES:
        mapping = class_mapping(CIFAR10_CLASSES, model_info.classes, spec.classes_file, "CIFAR-10", model_info.name)
    relabel = (lambda y: y) if mapping is None else (lambda y: mapping[CIFAR10_CLASSES[y]])
    record = {"dataset": "cifar10", "split": split}
    folder = _image_folder_split(root, split)
    if folder is not None:
        files, labels, classes = list_image_folder(folder)
        if classes != CIFAR10_CLASSES:
            raise AdvDetectError(f"{folder} does not hold the 10 CIFAR-10 class folders (found {classes[:12]})")
        source = FolderSource(folder, files, [relabel(y) for y in labels], model_info.classes, size, channels,
                              content_ids=False)
        return Selection(source, list(range(len(files))), record)
    tv_dir = root / "cifar-10-batches-py"
    if not (tv_dir.is_dir() or spec.download):
        raise DataNotFoundError(_not_found_message(root, "downloads are off"))
    try:
        images, labels = _load_torchvision_cifar(root, split, download=spec.download)
    except (OSError, DataNotFoundError) as exc:
        raise DataNotFoundError(_not_found_message(root, f"download failed: {exc}")) from exc
    if mapping is not None:
        labels = torch.tensor([relabel(int(y)) for y in labels], dtype=torch.int64)
    source = TensorSource(images, labels, model_info.classes, f"cifar10:{split}", size, channels)
    return Selection(source, list(range(len(labels))), record)


def class_mapping(folder_classes: Sequence[str], model_classes: Sequence[str], classes_file: str | None,
                  where: str, model_name: str) -> dict[str, int]:
    """Which model class each folder class is.

    ``classes_file``: a JSON object ``{"folder name": class index or model class name}``, or a text
    file with one folder name per line in the model's class order. Without one: by name when every
    folder is named after a model class, else in sorted order when the counts agree, else an error.
    """
    model_classes = list(model_classes)
    if classes_file is not None:
        mapping = _read_classes_file(classes_file, model_classes)
        missing = [c for c in folder_classes if c not in mapping]
        if missing:
            raise AdvDetectError(f"--classes {classes_file} does not map the class folders {', '.join(missing[:5])}")
        return {c: mapping[c] for c in folder_classes}
    if set(folder_classes) <= set(model_classes):
        return {c: model_classes.index(c) for c in folder_classes}
    if len(folder_classes) == len(model_classes):
        log.info("class folders of %s taken in sorted order as the model's classes", where)
        return {c: i for i, c in enumerate(folder_classes)}
    raise AdvDetectError(
        f"{where} has {len(folder_classes)} class folders ({', '.join(list(folder_classes)[:4])}...) but the model "
        f"{model_name} has {len(model_classes)} classes; pass --classes FILE mapping folder names to class indices")


def _read_classes_file(path: str, model_classes: list[str]) -> dict[str, int]:
    from .storage import read_json

    if not Path(path).is_file():
        raise AdvDetectError(f"--classes {path}: no such file")
    if Path(path).suffix.lower() == ".json":
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise AdvDetectError(f"--classes {path}: expected a JSON object {{\"folder\": class index or name}}")
    else:
        try:
            lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise AdvDetectError(f"--classes {path}: not readable as text ({exc})") from exc
        raw = {name: i for i, name in enumerate(lines)}
    mapping = {}
    for folder, target in raw.items():
        if isinstance(target, str) and target in model_classes:
            target = model_classes.index(target)
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(model_classes):
            raise AdvDetectError(f"--classes {path}: {folder!r} maps to {target!r}, not a class of the model "
                                 f"(0..{len(model_classes) - 1} or one of its class names)")
        mapping[str(folder)] = target
    return mapping


def select(images: Selection, n: int | None, seed: int, offset: int = 0) -> Selection:
    """``n`` images of ``images`` in a seeded order from ``offset`` on (see :func:`subset_indices`)."""
    slots = subset_indices(len(images), n, seed, offset).tolist()
    return Selection(images.source, [images.positions[s] for s in slots],
                     dict(images.record, seed=seed, offset=offset))


def images_for(model_info: Any, spec: DataSpec, split: str, n: int | None, seed: int, offset: int = 0) -> Selection:
    """The seeded subset a stage works on: ``n`` images of ``split`` from ``offset`` on."""
    return select(open_split(spec, split, model_info), n, seed, offset)


def _not_found_message(root: Path, why: str) -> str:
    return (
        f"CIFAR-10 not found under {root} (looked for {root}/cifar10-jpeg/<split>/<class>/, "
        f"{root}/<split>/<class>/ and {root}/cifar-10-batches-py; {why}). "
        "Pass --data-dir or set ADVDETECT_DATA to a folder holding one of these layouts, "
        "allow the download, or pass --data with an image folder of your own."
    )


class _PlainInfo:
    """Model-free decoding settings (for :func:`load_dataset` without a model)."""

    def __init__(self, classes: Sequence[str], size: tuple[int, int] | None, channels: int) -> None:
        self.classes, self.input_size, self.mean, self.name = tuple(classes), size, (0.0,) * channels, "none"


def load_dataset(
    dataset: str = "cifar10",
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
    input_size: tuple[int, int] | None = None,
    download: bool = True,
    offset: int = 0,
    channels: int = 3,
) -> ImageSet:
    """A seeded subset in memory (for small sets: scripts, tests). ``data_path``: a folder of one's own,
    all of it (its "train"/"test" split only where it has those subfolders)."""
    if data_path is None and dataset not in DATASETS:
        raise UnknownNameError("dataset", dataset, list(DATASETS))
    if data_path is not None:
        files, labels, classes = list_image_folder(data_path)
        source = FolderSource(Path(data_path), files, labels, classes, input_size, channels)
        chosen = select(Selection(source, list(range(len(files))), {"dataset": "folder"}), n, seed, offset)
    else:
        info = _PlainInfo(CIFAR10_CLASSES, input_size or (32, 32), channels)
        chosen = images_for(info, DataSpec(data_dir=None if data_dir is None else str(data_dir), download=download),
                            split, n, seed, offset)
    images, labels, skipped = chosen.load()
    if skipped:
        raise AdvDetectError(f"{skipped[0]['error']}")
    return ImageSet(images, labels, chosen.classes, str(data_path or dataset))


def load_cifar10(split: str = "test", n: int | None = None, seed: int = 0, data_dir: str | os.PathLike | None = None,
                 download: bool = True, offset: int = 0) -> ImageSet:
    """CIFAR-10 ``split`` in memory, optionally a seeded subset of ``n`` images (see :func:`subset_indices`)."""
    return load_dataset("cifar10", split, n, seed, data_dir=data_dir, download=download, offset=offset)
