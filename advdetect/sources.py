"""Image sources decoded on demand, and the shard-by-shard stream every stage reads.

A source holds no pixels until asked: :class:`FolderSource` decodes (and resizes, and converts to
the model's channel count) one file per item, :class:`TensorSource` slices an in-memory uint8
tensor (torchvision's CIFAR-10 arrays). :class:`Selection` is the seeded subset a stage works
on; :meth:`Selection.batches` decodes it shard by shard through a ``DataLoader`` (worker
processes for files), so no stage ever holds more than a shard of images.

An unreadable file does not stop a long job: it is skipped, and the batch says which file and
why (the stages log it and record it in their manifest).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .errors import AdvDetectError

log = logging.getLogger(__name__)

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL converts RGB to L


class ImageSource(Dataset):
    """Images by index: ``item(i)`` is (uint8 C x H x W pixels or None, label, error message)."""

    classes: tuple[str, ...]
    workers: int = 0  # DataLoader worker processes worth starting for this source

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        raise NotImplementedError

    def name(self, i: int) -> str:
        """How a user finds image ``i`` (a path, or dataset:split:index)."""
        raise NotImplementedError

    def image_id(self, i: int) -> str | None:
        """A content identity of image ``i`` (None where the index alone identifies it)."""
        return None

    def __getitem__(self, position: tuple[int, int]) -> tuple[int, torch.Tensor | None, int, str, str]:
        slot, i = position
        pixels, label, error = self.item(i)
        return slot, pixels, label, error, self.name(i) if error else ""


class TensorSource(ImageSource):
    """A uint8 N x C x H x W tensor with labels, resized and converted to ``size``/``channels`` per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], name: str,
                 size: tuple[int, int] | None = None, channels: int | None = None) -> None:
        self.images, self.labels, self.classes = images, labels, tuple(classes)
        self.source_name, self.size, self.channels = name, size, channels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def item(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        return convert_pixels(self.images[i], self.size, self.channels), int(self.labels[i]), ""

    def name(self, i: int) -> str:
        return f"{self.source_name}:{i}"


class FolderSource(ImageSource):
    """Image files with labels (already the model's class indices), decoded per item."""

    workers = 2

    def __init__(self, root: Path, files: Sequence[Path], labels: Sequence[int], classes: Sequence[str],
                 size: tuple[int, int] | None = None, channels: int | None = None, content_ids: bool = True) -> None:
        self.root, self.files, self.labels = Path(root), list(files), list(labels)
        self.classes, self.size, self.channels = tuple(classes), size, channels
        self.content_ids = content_ids  # False where the index identifies an image (CIFAR-10)

    def __len__(self) -> int:
        return len(self.files)

    def item(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        from .imageio import load_image

        try:
            pixels = load_image(self.files[i], size=self.size, channels=self.channels or 3).pixels
        except AdvDetectError as exc:
            return None, self.labels[i], str(exc)
        return pixels, self.labels[i], ""

    def name(self, i: int) -> str:
        return str(self.files[i])

    def image_id(self, i: int) -> str | None:
        """sha256 of the file's path under the data root and its bytes (moved folders keep their ids)."""
        if not self.content_ids:
            return None
        digest = hashlib.sha256(self.files[i].relative_to(self.root).as_posix().encode())
        try:
            digest.update(self.files[i].read_bytes())
        except OSError:
            pass  # an unreadable file is identified by its name alone
        return digest.hexdigest()[:16]


def convert_pixels(pixels: torch.Tensor, size: tuple[int, int] | None, channels: int | None) -> torch.Tensor:
    """uint8 C x H x W pixels at ``size`` (bilinear, antialiased) with ``channels`` (gray <-> RGB)."""
    if channels is not None and pixels.shape[0] != channels:
        if channels == 1 and pixels.shape[0] == 3:
            weights = torch.tensor(GRAY_WEIGHTS).view(3, 1, 1)
            pixels = (pixels.float() * weights).sum(0, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        elif channels == 3 and pixels.shape[0] == 1:
            pixels = pixels.expand(3, -1, -1).contiguous()
        else:
            raise AdvDetectError(f"cannot convert {pixels.shape[0]}-channel images to {channels} channels")
    if size is not None and tuple(pixels.shape[1:]) != tuple(size):
        resized = F.interpolate(pixels[None].float(), size=tuple(size), mode="bilinear", antialias=True,
                                align_corners=False)
        pixels = resized[0].round().clamp(0, 255).to(torch.uint8)
    return pixels


@dataclass
class Batch:
    """One shard of a selection: the readable images, and the files that could not be read."""

    images: torch.Tensor  # float32 B x C x H x W in [0, 1]
    labels: torch.Tensor  # int64 B
    index: torch.Tensor  # int64 B: positions in the selection
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"image": name, "error": message}


def _collate(items: list[tuple[int, torch.Tensor | None, int, str, str]]) -> Batch:
    kept = [it for it in items if it[1] is not None]
    skipped = [{"image": it[4], "error": it[3]} for it in items if it[1] is None]
    shapes = {tuple(it[1].shape) for it in kept}
    if len(shapes) > 1:
        raise AdvDetectError(f"images have different sizes {sorted(shapes)[:3]}; pass an input size to resize them")
    if not kept:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), skipped)
    images = torch.stack([it[1] for it in kept]).float().div_(255.0)
    return Batch(images, torch.tensor([it[2] for it in kept], dtype=torch.int64),
                 torch.tensor([it[0] for it in kept], dtype=torch.int64), skipped)


@dataclass
class Selection:
    """The images one stage works on: ``positions`` (indices into ``source``) in order, and how they
    were chosen (``record``: dataset, split, seed, offset; see :mod:`advdetect.data`)."""

    source: ImageSource
    positions: list[int]
    record: dict[str, Any]

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.source.classes

    def batches(self, batch_size: int, shards: Sequence[int] | None = None,
                workers: int | None = None) -> Iterator[tuple[int, Batch]]:
        """Shard ``i`` holds positions ``i * batch_size ..``; yields ``(i, Batch)`` for ``shards`` (default all),
        decoded ahead by ``workers`` processes (default: the source's choice, none for one shard)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        n_shards = (len(self) + batch_size - 1) // batch_size
        shards = list(range(n_shards) if shards is None else shards)
        if not shards:
            return
        plan = [[(slot, self.positions[slot]) for slot in range(i * batch_size, min(len(self), (i + 1) * batch_size))]
                for i in shards]
        if workers is None:
            workers = min(self.source.workers, os.cpu_count() or 1) if len(shards) > 1 else 0
        loader = DataLoader(self.source, batch_sampler=plan, num_workers=workers, collate_fn=_collate,
                            persistent_workers=False)
        for i, batch in zip(shards, loader):
            for bad in batch.skipped:
                log.warning("skipped: %s", bad["error"])  # the message names the file
            yield i, batch

    def load(self) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, str]]]:
        """Every readable image in memory (for small selections): images, labels, skipped files."""
        images, labels, skipped = [], [], []
        for _, batch in self.batches(256):
            images.append(batch.images)
            labels.append(batch.labels)
            skipped.extend(batch.skipped)
        if not labels or not sum(len(t) for t in labels):
            raise AdvDetectError(f"none of the {len(self)} images could be read")
        return torch.cat([t for t in images if len(t)]), torch.cat(labels), skipped

    def identify(self, slots: Sequence[int] | None = None) -> dict[str, Any]:
        """The record of the images at ``slots`` (positions in this selection; default all): the source
        indices, and for image files their content ids, so an evaluation can refuse reused images."""
        slots = range(len(self)) if slots is None else slots
        indices = [self.positions[s] for s in slots]
        record = dict(self.record, indices=indices)
        ids = [self.source.image_id(i) for i in indices]
        if ids and ids[0] is not None:
            record["ids"] = ids
        return record
