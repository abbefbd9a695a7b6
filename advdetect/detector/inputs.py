"""What the discriminator reads: the masks, and evidence planes beside them, as N x C x 32 x 32 maps.

The heart of the detector is the mask (``"masks"``: every channel of the detector's mask kind).
Two kinds of evidence that the mask method itself produces or uses can be stacked beside it:

* ``"residual"``: what the perturbation operator removes - the image minus its light Gaussian blur
  (sigma :data:`RESIDUAL_SIGMA` px), its absolute value averaged over colour channels, pooled to
  32 x 32, scaled by :data:`RESIDUAL_SCALE` and capped at 1 (every plane lies in [0, 1], as masks
  do). One-step attacks (FGSM) leave the classifier's evidence looking normal but add a
  full-budget sign pattern to every pixel, which this plane shows.
* ``"confidence"``: how hard the class is to delete - three constant planes holding the target
  probability before the mask, after it (no noise, no jitter), and the share of the iteration budget
  the optimisation used. Minimal-perturbation attacks such as DeepFool stop just past the decision
  boundary, so their class is barely held (torchattacks' CW with its defaults overshoots and is
  not caught this way; README, "What the discriminator reads").

The same function builds the maps at fitting time (from the stored sets) and at deployment (from
the images and the mask result), so both see identical inputs; ``detector.json`` records which
inputs a detector reads (older detectors: masks alone).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import OptionError
from .network import MASK_SIZE

INPUTS = ("masks", "residual", "confidence")
DEFAULT_INPUTS = INPUTS  # what `advdetect train` fits on unless told (MaskDetector itself defaults to masks)
RESIDUAL_SIGMA = 1.0
RESIDUAL_SCALE = 10.0


def parse_inputs(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"masks,residual"`` (or a sequence) -> a checked tuple in :data:`INPUTS` order; None: train's default."""
    if spec is None:
        return DEFAULT_INPUTS
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in INPUTS]
    if unknown or not names:
        raise OptionError(f"unknown detector input(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from: {', '.join(INPUTS)}")
    return tuple(n for n in INPUTS if n in names)


def input_channels(inputs: Sequence[str], mask_channels: int = 1) -> int:
    """How many channels the maps of ``inputs`` have, with ``mask_channels`` per mask."""
    sizes = {"masks": mask_channels, "residual": 1, "confidence": 3}
    return sum(sizes[name] for name in inputs)


def channels_fit(inputs: Sequence[str], channels: int) -> bool:
    """Whether maps of ``channels`` channels can hold ``inputs`` (the masks take at least one channel)."""
    extra = input_channels([name for name in inputs if name != "masks"])
    return channels - extra >= 1 if "masks" in inputs else channels == extra


def residual_map(images: torch.Tensor) -> torch.Tensor:
    """N x 1 x 32 x 32 in [0, 1]: mean absolute difference between the images and their light blur, scaled."""
    from ..masks.perturbation import gaussian_blur

    residual = (images - gaussian_blur(images, RESIDUAL_SIGMA)).abs().mean(1, keepdim=True)
    return (_pooled(residual) * RESIDUAL_SCALE).clamp(max=1)


def confidence_planes(prob_before: torch.Tensor, prob_after: torch.Tensor, iterations: torch.Tensor,
                      budget: int) -> torch.Tensor:
    """N x 3 x 32 x 32 constant planes: target probability before and after the mask, share of iterations used."""
    values = torch.stack([prob_before.float(), prob_after.float(), iterations.float() / max(budget, 1)], 1)
    return values[:, :, None, None].expand(-1, -1, MASK_SIZE, MASK_SIZE)


def detector_maps(inputs: Sequence[str], masks: torch.Tensor, *, images: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, prob_before: torch.Tensor | None = None,
                  prob_after: torch.Tensor | None = None, iterations: torch.Tensor | None = None,
                  budget: int = 1) -> torch.Tensor:
    """The detector's input for these masks (N x K x H x W) and, as ``inputs`` need them, the images and
    the mask optimisation's probabilities and iterations; on the masks' device, differentiable.
    ``residual``: the images' :func:`residual_map`, when already computed (then ``images`` is not needed)."""
    parts = []
    for name in inputs:
        if name == "masks":
            parts.append(_pooled(masks.float()))
        elif name == "residual":
            if residual is None and images is None:
                raise ValueError("the 'residual' input needs the images")
            parts.append((residual if residual is not None else residual_map(images.float())).to(masks.device))
        elif name == "confidence":
            if prob_before is None or prob_after is None or iterations is None:
                raise ValueError("the 'confidence' input needs prob_before, prob_after and iterations")
            parts.append(confidence_planes(prob_before, prob_after, iterations, budget).to(masks.device))
        else:
            raise OptionError(f"unknown detector input {name!r}; choose from: {', '.join(INPUTS)}")
    return torch.cat(parts, 1)


def maps_for_result(inputs: Sequence[str], images: torch.Tensor, result) -> torch.Tensor:
    """:func:`detector_maps` for a :class:`~advdetect.masks.base.MaskResult` of ``images``."""
    return detector_maps(inputs, result.masks, images=images, prob_before=result.prob_before,
                         prob_after=result.prob_after, iterations=result.iterations, budget=result.config.iterations)


def _pooled(maps: torch.Tensor) -> torch.Tensor:
    if maps.shape[-2:] == (MASK_SIZE, MASK_SIZE):
        return maps
    return F.adaptive_avg_pool2d(maps, MASK_SIZE)
