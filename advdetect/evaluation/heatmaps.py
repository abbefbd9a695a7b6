"""Baseline heatmaps from captum, fed to the same discriminator as the masks.

Each method gives an N x 1 x H x W map in [0, 1] for the predicted class (the raw image is
the N x 3 x H x W image itself). Maps are the absolute attribution summed over colour
channels, divided by each image's maximum. The model is used frozen in eval mode and left as
it was.

Note on guided backprop: captum's rule replaces the backward pass of ``nn.ReLU`` modules. A
model without ReLUs (the built-in cifar10-cnn uses GELU) is left with plain gradients, so
there it equals the saliency map; the report says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..errors import UnknownNameError
from ..models.wrapper import ModelWrapper, frozen

HEATMAP_METHODS = ("saliency", "guided_backprop", "grad_cam", "occlusion", "integrated_gradients", "raw_image")
LABELS = {"masks": "meaningful perturbation (ours)", "saliency": "gradient saliency",
          "guided_backprop": "guided backprop", "grad_cam": "Grad-CAM", "occlusion": "occlusion",
          "integrated_gradients": "integrated gradients", "raw_image": "raw input image"}


def unavailable(model: nn.Module, method: str) -> str | None:
    """Why ``method`` can't run on ``model`` (None when it can)."""
    if method == "grad_cam" and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return ("Grad-CAM left out: the classifier shows no Conv2d layer (an exported program keeps its layers "
                "out of reach)")
    return None


def last_conv(model: nn.Module) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("Grad-CAM needs a model with at least one Conv2d layer")
    return convs[-1]


def _attribute(model: ModelWrapper, method: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from captum.attr import (GuidedBackprop, IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion,
                             Saliency)

    if method == "saliency":
        return lambda x, t: Saliency(model).attribute(x, target=t, abs=True)
    if method == "guided_backprop":
        return lambda x, t: GuidedBackprop(model).attribute(x, target=t)
    if method == "grad_cam":
        def grad_cam(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            cam = LayerGradCam(model, last_conv(model)).attribute(x, target=t, relu_attributions=True)
            return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
        return grad_cam
    if method == "occlusion":  # grey squares of 1/4 of the image side, half-overlapping
        window = max(2, model.info.input_size[0] // 4)
        stride = max(1, window // 2)
        return lambda x, t: Occlusion(model).attribute(
            x, target=t, sliding_window_shapes=(x.shape[1], window, window), strides=(x.shape[1], stride, stride),
            baselines=0.5,
            perturbations_per_eval=16)
    if method == "integrated_gradients":
        return lambda x, t: IntegratedGradients(model).attribute(x, target=t, baselines=torch.zeros_like(x),
                                                                n_steps=16, internal_batch_size=512)
    raise UnknownNameError("heatmap method", method, list(HEATMAP_METHODS))


def heatmaps(model: ModelWrapper, images: torch.Tensor, method: str, targets: torch.Tensor | None = None,
             batch_size: int = 128) -> torch.Tensor:
    """Heatmaps of ``method`` for ``images`` (float [0, 1]) and ``targets`` (default: the prediction)."""
    if method not in HEATMAP_METHODS:
        raise UnknownNameError("heatmap method", method, list(HEATMAP_METHODS))
    if method == "raw_image":
        return images.detach().float().cpu()
    device = model.device
    attribute = _attribute(model, method)
    out = []
    with frozen(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks", category=UserWarning)
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device).float()
            t = targets[start:start + batch_size].to(device) if targets is not None else model.predict(x).to(device)
            a = attribute(x.requires_grad_(method != "occlusion"), t).detach()
            m = a.abs().sum(1, keepdim=True) if a.shape[1] > 1 else a.abs()
            out.append((m / m.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 1, *images.shape[-2:])
