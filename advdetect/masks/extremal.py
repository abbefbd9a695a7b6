"""Extremal perturbations (Fong, Patrick & Vedaldi, ICCV 2019), batched over images.

Instead of trading area against the class score with a penalty, an extremal perturbation
fixes the mask's area ``a`` and finds the region of that area that matters most:

* **area constraint** by ranking: ``R_a(m) = || vecsort(m) - r_a ||^2`` where ``r_a`` is
  ``(1 - a) |Omega|`` zeros then ``a |Omega|`` ones; its weight grows geometrically over the
  iterations so the constraint is met at the end;
* **smooth max-convolution mask generator**: ``m(u) = smax_v k(u - v) p(v)`` over a coarse
  parameter grid ``p`` (spacing ``step``) with a Gaussian ``k`` (sigma ``smooth``) and a
  soft maximum, which yields smooth blobs without a total-variation term;
* **blur pyramid perturbation**: each pixel takes a blur level chosen by the mask, linearly
  interpolated between ``levels`` Gaussian blurs from ``max_blur`` down to the image itself;
* **games**: ``preserve`` (the region alone keeps the class), ``delete`` (removing the region
  removes it) and ``dual`` (both).

Every image has its own parameters, per-sample loss and Adam state, so a batch gives each
image what optimising it alone gives. Masks follow the engine's convention, 1 = kept:
for ``delete`` the result is ``1 - m`` (the region is what gets perturbed).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.wrapper import frozen
from .config import MaskConfig
from .engine import ADAM_BETAS, ADAM_EPS, DEFAULT_BATCH, MaskResult, resolve_targets
from .loss import class_term
from .perturbation import gaussian_blur

SMAX_TEMPERATURE = 0.05


class MaxConvGenerator:
    """Coarse parameters -> smooth full-resolution mask by a soft max-convolution."""

    def __init__(self, size: tuple[int, int], step: int, sigma: float, device: torch.device) -> None:
        h, w = size
        self.size = size
        self.grid = (math.ceil(h / step) + 1, math.ceil(w / step) + 1)
        gy, gx = torch.meshgrid(torch.arange(self.grid[0], device=device) * step,
                                torch.arange(self.grid[1], device=device) * step, indexing="ij")
        py, px = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        radius = math.ceil(3 * sigma / step) + 1
        # for each pixel, the parameters within `radius` grid cells and their Gaussian weights
        cy = (py.flatten() // step)[:, None] + torch.arange(-radius, radius + 1, device=device).repeat_interleave(
            2 * radius + 1)[None]
        cx = (px.flatten() // step)[:, None] + torch.arange(-radius, radius + 1, device=device).repeat(
            2 * radius + 1)[None]
        valid = (cy >= 0) & (cy < self.grid[0]) & (cx >= 0) & (cx < self.grid[1])
        cy, cx = cy.clamp(0, self.grid[0] - 1), cx.clamp(0, self.grid[1] - 1)
        d2 = (gy[cy, cx] - py.flatten()[:, None]) ** 2 + (gx[cy, cx] - px.flatten()[:, None]) ** 2
        self.index = cy * self.grid[1] + cx  # P x K
        self.weight = torch.exp(-d2.float() / (2 * sigma ** 2)) * valid  # P x K

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        """N x 1 x gh x gw parameters in [0, 1] -> N x 1 x H x W mask in [0, 1]."""
        n = params.shape[0]
        z = params.flatten(1)[:, self.index] * self.weight  # N x P x K
        soft = (z * torch.softmax(z / SMAX_TEMPERATURE, dim=2)).sum(2)
        return soft.view(n, 1, *self.size)


def blur_pyramid(x: torch.Tensor, max_blur: float, levels: int) -> torch.Tensor:
    """N x L x C x H x W: level 0 blurred with sigma ``max_blur``, the last level ``x`` itself."""
    sigmas = [max_blur * (1 - k / (levels - 1)) for k in range(levels)]
    return torch.stack([gaussian_blur(x, s) if s > 0 else x for s in sigmas], dim=1)


def pyramid_blend(pyramid: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per pixel, the pyramid level ``keep * (L - 1)`` (1 = the image, 0 = the strongest blur)."""
    levels = pyramid.shape[1]
    t = keep.clamp(0, 1) * (levels - 1)  # N x 1 x H x W
    k0 = t.floor().clamp(max=levels - 2).long()
    frac = t - k0
    c = pyramid.shape[2]
    lo = pyramid.gather(1, k0.unsqueeze(2).expand(-1, 1, c, -1, -1)).squeeze(1)
    hi = pyramid.gather(1, (k0 + 1).unsqueeze(2).expand(-1, 1, c, -1, -1)).squeeze(1)
    return lo * (1 - frac) + hi * frac


def area_target(n_pixels: int, area: float, device: torch.device) -> torch.Tensor:
    """r_a sorted ascending: (1 - a) zeros, then a ones."""
    ones = int(round(area * n_pixels))
    return torch.cat([torch.zeros(n_pixels - ones, device=device), torch.ones(ones, device=device)])


def area_loss(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image, mean squared difference between the sorted mask and r_a."""
    return ((mask.flatten(1).sort(dim=1).values - target) ** 2).mean(1)


class ExtremalPerturbation:
    """Fixed-area masks; ``MaskConfig(method="extremal", area=..., game="preserve"|"delete"|"dual")``."""

    def __init__(self, model: nn.Module, config: MaskConfig | None = None) -> None:
        self.model = model
        self.config = config or MaskConfig(method="extremal", game="preserve")

    def attribute(self, images: torch.Tensor, target: torch.Tensor | int | None = None,
                  progress: bool = False) -> MaskResult:
        if images.dim() != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
        images = images.detach().float()
        with frozen(self.model):
            probs = self._probs(images)
            targets = resolve_targets(probs, target)
            batch = self.config.batch_size or DEFAULT_BATCH.get(images.device.type, 64)
            parts = [self._optimise(images[s:s + batch], targets[s:s + batch]) for s in range(0, len(images), batch)]
            masks = torch.cat(parts) if parts else torch.empty(0, 1, *images.shape[-2:], device=images.device)
            after = self._probs(self.perturb(images, masks))
        gather = lambda p: p.gather(1, targets[:, None]).squeeze(1)  # noqa: E731
        iterations = torch.full((len(images),), self.config.iterations, dtype=torch.long, device=images.device)
        return MaskResult(masks, targets, gather(probs), gather(after), iterations, self.config)

    def perturb(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``images`` with the blur pyramid chosen per pixel by ``masks`` (1 = kept)."""
        cfg = self.config
        return pyramid_blend(blur_pyramid(images, cfg.max_blur, cfg.levels), masks)

    @torch.no_grad()
    def _probs(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:
            return torch.empty(0, 1, device=images.device)
        return torch.cat([self.model(images[s:s + 512]).float().softmax(1) for s in range(0, len(images), 512)])

    def _optimise(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n, _, h, w = x.shape
        gen = MaxConvGenerator((h, w), cfg.step, cfg.smooth, x.device)
        pyramid = blur_pyramid(x, cfg.max_blur, cfg.levels)
        r_a = area_target(h * w, cfg.area, x.device)
        params = torch.full((n, 1, *gen.grid), 0.5, device=x.device)
        m1, m2 = torch.zeros_like(params), torch.zeros_like(params)
        b1, b2 = ADAM_BETAS
        growth = 100.0 ** (1 / max(cfg.iterations - 1, 1))  # the area weight ends 100x higher
        for it in range(cfg.iterations):
            params.requires_grad_(True)
            mask = gen(params)
            loss = cfg.area_coeff * growth ** it * area_loss(mask, r_a)
            if cfg.game in ("preserve", "dual"):
                loss = loss + class_term(self.model(pyramid_blend(pyramid, mask)), target, "preserve", cfg.score)
            if cfg.game in ("delete", "dual"):
                loss = loss + class_term(self.model(pyramid_blend(pyramid, 1 - mask)), target, "delete", cfg.score)
            (grad,) = torch.autograd.grad(loss.sum(), params)
            with torch.no_grad():
                m1.mul_(b1).add_(grad, alpha=1 - b1)
                m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                step = (m1 / (1 - b1 ** (it + 1))) / ((m2 / (1 - b2 ** (it + 1))).sqrt() + ADAM_EPS)
                params = (params - cfg.lr * step).clamp_(0, 1)
        with torch.no_grad():
            mask = gen(params)
        return 1 - mask if cfg.game == "delete" else mask

