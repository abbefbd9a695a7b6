"""Mask parameterization: a low-resolution mask, upsampled (and jittered) to image size.

The optimised variable is an N x 1 x h x w tensor of values in [0, 1] with
``h = ceil(H / factor)``. It is turned into the full-resolution mask by bilinear sampling
on a grid; the same grid op shifts each sample's mask by its own sub-pixel jitter, so
upsampling and jitter cost one ``grid_sample`` per iteration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from ..errors import OptionError


def low_res_shape(size: tuple[int, int], factor: int) -> tuple[int, int]:
    if factor < 1:
        raise OptionError(f"upsample factor must be at least 1, got {factor}")
    return max(1, math.ceil(size[0] / factor)), max(1, math.ceil(size[1] / factor))


def base_grid(size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """1 x H x W x 2 sampling grid (x, y in [-1, 1], pixel centres) for ``grid_sample``."""
    h, w = size
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).unsqueeze(0)


def pixels_to_grid(shift: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Convert (x, y) shifts in output pixels to ``grid_sample``'s [-1, 1] units."""
    h, w = size
    return shift * torch.tensor([2.0 / w, 2.0 / h], device=shift.device, dtype=shift.dtype)


def upsample(low: torch.Tensor, grid: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Full-resolution masks from low-resolution ones.

    ``grid`` is :func:`base_grid` of the output size; ``offset`` (N x 2, in grid units, see
    :func:`pixels_to_grid`) translates each sample's mask, with border values extended.
    """
    n = low.shape[0]
    g = grid.expand(n, -1, -1, -1)
    if offset is not None:
        g = g + offset.to(grid.dtype).view(n, 1, 1, 2)
    return F.grid_sample(low, g, mode="bilinear", padding_mode="border", align_corners=False)
