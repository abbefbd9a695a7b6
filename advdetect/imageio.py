"""Reading and writing single images safely.

Any file a user hands us may be missing, empty, truncated, not an image at all, enormous
(a decompression bomb), or in an odd mode (grayscale, RGBA, palette, 16-bit). Each of these
becomes either a clean conversion (reported in ``notes``) or an :class:`AdvDetectError`.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import AdvDetectError

MAX_PIXELS = 64_000_000  # refuse larger images (decompression-bomb limit)
MAX_FILE_BYTES = 512 * 2**20  # and larger files


@dataclass
class LoadedImage:
    """One image as uint8 CHW RGB plus what was done to it on the way in."""

    pixels: torch.Tensor  # uint8, C x H x W (C = 3, or 1 for grayscale models)
    path: Path
    notes: list[str] = field(default_factory=list)

    def as_float(self) -> torch.Tensor:
        """float32 C x H x W in [0, 1]."""
        return self.pixels.float().div(255.0)


def _open_checked(path: Path, notes: list[str]):
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise AdvDetectError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise AdvDetectError(f"{path}: is a directory, expected an image file")
    size = path.stat().st_size
    if size == 0:
        raise AdvDetectError(f"{path}: file is empty (0 bytes); the copy or download did not finish")
    if size > MAX_FILE_BYTES:
        raise AdvDetectError(f"{path}: file is {size / 2**20:.0f} MiB, over the {MAX_FILE_BYTES // 2**20} MiB limit "
                             "for one image")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(path.read_bytes()))  # in memory: no file handle outlives the call
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise AdvDetectError(f"{path}: image is {w}x{h}, over the {MAX_PIXELS:,}-pixel limit "
                                     "(a possible decompression bomb); downscale it first")
            img.load()  # decode now so truncation surfaces here
        # the decoder's complaints about a file it could still read are reported, not printed
        notes.extend(dict.fromkeys(f"decoder warning: {w.message}" for w in caught))
    except AdvDetectError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise AdvDetectError(f"{path}: image is over the {MAX_PIXELS:,}-pixel limit (a possible decompression "
                             f"bomb: {exc}); downscale it first") from exc
    except UnidentifiedImageError as exc:
        raise AdvDetectError(f"{path}: not a readable image ({exc}); give a PNG, JPEG, BMP, GIF, TIFF or WebP file") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated / corrupt data
        raise AdvDetectError(f"{path}: corrupt or truncated image ({exc}); export or download it again") from exc
    return img


def _to_rgb_array(img, path: Path, notes: list[str]) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        notes.append(f"converted {mode} (16-bit) grayscale to 8-bit RGB")
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise AdvDetectError(f"{path}: image holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo if hi > lo else 1.0)
        notes.append("converted floating-point grayscale to 8-bit RGB")
        return np.repeat((arr * 255 + 0.5).astype(np.uint8)[:, :, None], 3, axis=2)
    if mode != "RGB":
        if mode in ("L", "1", "LA"):
            notes.append("converted grayscale to RGB")
        elif mode in ("RGBA", "PA") or (mode == "P" and "transparency" in img.info):
            notes.append("dropped the alpha channel (RGBA to RGB)")
        elif mode == "P":
            notes.append("converted palette image to RGB")
        else:
            notes.append(f"converted {mode} to RGB")
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3) -> LoadedImage:
    """Read an image file as RGB (``channels=3``) or grayscale (``channels=1``), resizing to ``size``
    (H, W) when given and different."""
    from PIL import Image

    if channels not in (1, 3):
        raise AdvDetectError(f"models with {channels} input channels are not supported (1 or 3)")
    path = Path(path)
    notes: list[str] = []
    img = _open_checked(path, notes)
    try:
        arr = _to_rgb_array(img, path, notes)
    except (OSError, ValueError, TypeError) as exc:
        raise AdvDetectError(f"{path}: cannot convert its {img.mode} pixels to RGB ({exc})") from exc
    if channels == 1:
        if notes and notes[-1] == "converted grayscale to RGB":
            notes.pop()
        else:
            notes.append("converted to grayscale (the model takes 1 channel)")
        arr = np.asarray(Image.fromarray(arr).convert("L"))
    if size is not None and arr.shape[:2] != tuple(size):
        h0, w0 = arr.shape[:2]
        arr = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR))
        notes.append(f"resized from {w0}x{h0} to {size[1]}x{size[0]} (the model's input size)")
    arr = np.array(arr, dtype=np.uint8, copy=True)
    pixels = torch.from_numpy(arr[:, :, None] if arr.ndim == 2 else arr).permute(2, 0, 1).contiguous()
    return LoadedImage(pixels, path, notes)


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a float [0, 1] C x H x W (or 1 x C x H x W; C = 3 or 1) tensor as PNG, atomically."""
    from PIL import Image

    from .storage import atomic_path

    if image.dim() == 4:
        image = image[0]
    arr = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:  # grayscale
        arr = arr[:, :, 0]
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
