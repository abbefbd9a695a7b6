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

The pieces live with their kind: the generator in :mod:`.parameterization`, the pyramid in
:mod:`.perturbation`, the area loss in :mod:`.loss`. Every image has its own parameters,
per-sample loss and Adam state, so a batch gives each
image what optimising it alone gives. Masks follow the package's convention, 1 = kept:
for ``delete`` the result is ``1 - m`` (the region is what gets perturbed).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.wrapper import frozen
from .base import DEFAULT_BATCH, MaskResult, check_images, resolve_targets
from .config import MaskConfig
from .loss import area_loss, area_target, class_term
from .optimizer import adam_direction
from .parameterization import MaxConvGenerator
from .perturbation import blur_pyramid, pyramid_blend

class ExtremalPerturbation:
    """Fixed-area masks; ``MaskConfig(method="extremal", area=..., game="preserve"|"delete"|"dual")``."""

    def __init__(self, model: nn.Module, config: MaskConfig | None = None) -> None:
        self.model = model
        self.config = config or MaskConfig(method="extremal", game="preserve")

    def attribute(self, images: torch.Tensor, target: torch.Tensor | int | None = None,
                  progress: bool = False) -> MaskResult:
        images = check_images(images)
        with frozen(self.model), torch.enable_grad():  # the loop differentiates the mask, even under no_grad
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
            step = adam_direction(grad, m1, m2, it + 1)
            with torch.no_grad():
                params = (params - cfg.lr * step).clamp_(0, 1)
        with torch.no_grad():
            mask = gen(params)
        return 1 - mask if cfg.game == "delete" else mask

