"""CIFAR-10 and ImageFolder loading.

All images come back as float32 NCHW tensors in [0, 1] (the project's single data
contract) with int64 labels. Two layouts are understood under a data root:

* an ImageFolder tree ``<root>/cifar10-jpeg/{train,test}/<class>/*.jpg`` (or
  ``<root>/{train,test}/<class>/`` directly), such as the JPEG copy in ``../shared/data``;
* torchvision's own ``<root>/cifar-10-batches-py`` (downloaded when missing and allowed).
  torchvision verifies the md5 of every batch file against the official release before
  reading it, so nothing unverified is ever unpickled.

The data root is ``--data-dir``, else ``$ADVDETECT_DATA``, else a per-user cache directory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .distributed import context
from .errors import AdvDetectError, DataNotFoundError, OptionError, UnknownNameError

log = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
DATASETS = ("cifar10",)
SPLITS = ("train", "test")
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
    CIFAR-10 this is the standard class order) and files are sorted within each class.
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
        found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
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
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=gen)[offset:offset + n]


def subset_record(split: str, n: int, seed: int, offset: int = 0, dataset: str = "cifar10") -> dict[str, Any]:
    """Which images a seeded CIFAR-10 subset holds (see :func:`subset_indices`), as recorded in
    detector.json so that an evaluation can refuse images the detector was fitted or calibrated on."""
    indices = subset_indices(CIFAR10_SIZES[split], n, seed, offset).tolist()
    return {"dataset": dataset, "split": split, "seed": seed, "offset": offset, "indices": indices}


def shared_images(records: list[dict[str, Any]], other: dict[str, Any]) -> set[int]:
    """Indices of ``other`` (a :func:`subset_record`) that any of ``records`` holds too (same dataset and split)."""
    mine = set(other["indices"])
    shared: set[int] = set()
    for record in records:
        if record.get("dataset") == other["dataset"] and record.get("split") == other["split"]:
            shared |= mine & set(record.get("indices", ()))
    return shared


def _decode(path: Path, size: tuple[int, int] | None) -> torch.Tensor:
    from .imageio import load_image_uint8  # local import keeps module import cheap

    return load_image_uint8(path, size=size)


def load_image_folder(
    folder: str | os.PathLike,
    n: int | None = None,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    progress: bool = False,
    offset: int = 0,
) -> ImageSet:
    """Load (a seeded subset of) an ImageFolder tree as float32 images in [0, 1].

    ``size`` (H, W) resizes every image; without it all images must share one size.
    """
    from tqdm.auto import tqdm

    files, labels, classes = list_image_folder(folder)
    idx = subset_indices(len(files), n, seed, offset).tolist()
    decoded = []
    for i in tqdm(idx, desc=f"loading {Path(folder).name}", unit="img", disable=not (progress and context().is_main), leave=False):
        decoded.append(_decode(files[i], size))
    shapes = {tuple(t.shape) for t in decoded}
    if len(shapes) > 1:
        raise AdvDetectError(
            f"images in {folder} have different sizes {sorted(shapes)[:3]}...; pass an input size to resize them"
        )
    images = torch.stack(decoded).float().div_(255.0)
    return ImageSet(images, torch.tensor([labels[i] for i in idx], dtype=torch.int64), classes, str(folder))


def _load_torchvision_cifar(root: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataNotFoundError(str(exc)) from exc
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def load_cifar10(
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = False,
    offset: int = 0,
) -> ImageSet:
    """CIFAR-10 ``split`` ("train" or "test"), optionally a seeded subset of ``n`` images (see subset_indices)."""
    if split not in SPLITS:
        raise UnknownNameError("split", split, list(SPLITS))
    root = resolve_data_root(data_dir)
    folder = _image_folder_split(root, split)
    if folder is not None:
        result = load_image_folder(folder, n=n, seed=seed, progress=progress, offset=offset)
        if result.classes != CIFAR10_CLASSES:
            raise AdvDetectError(f"{folder} does not hold the 10 CIFAR-10 class folders (found {result.classes[:12]})")
        return result
    tv_dir = root / "cifar-10-batches-py"
    if tv_dir.is_dir() or download:
        try:
            images, labels = _load_torchvision_cifar(root, split, download=download)
        except (OSError, DataNotFoundError) as exc:
            raise DataNotFoundError(_not_found_message(root, f"download failed: {exc}")) from exc
        idx = subset_indices(len(labels), n, seed, offset)
        return ImageSet(images[idx].float().div_(255.0), labels[idx], CIFAR10_CLASSES, str(tv_dir))
    raise DataNotFoundError(_not_found_message(root, "downloads are off"))


def _not_found_message(root: Path, why: str) -> str:
    return (
        f"CIFAR-10 not found under {root} (looked for {root}/cifar10-jpeg/<split>/<class>/, "
        f"{root}/<split>/<class>/ and {root}/cifar-10-batches-py; {why}). "
        "Pass --data-dir or set ADVDETECT_DATA to a folder holding one of these layouts, "
        "or allow the download."
    )


def load_dataset(
    dataset: str = "cifar10",
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
    input_size: tuple[int, int] | None = None,
    download: bool = True,
    progress: bool = False,
    offset: int = 0,
) -> ImageSet:
    """Load a named dataset, or any ImageFolder directory when ``data_path`` is given."""
    if data_path is not None:
        return load_image_folder(data_path, n=n, seed=seed, size=input_size, progress=progress, offset=offset)
    if dataset not in DATASETS:
        raise UnknownNameError("dataset", dataset, list(DATASETS))
    return load_cifar10(split, n=n, seed=seed, data_dir=data_dir, download=download, progress=progress,
                        offset=offset)
