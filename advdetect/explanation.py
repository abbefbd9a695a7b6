"""One image, one mask, one figure: ``advdetect.explain(image, model)``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .masks import MaskConfig, make_explainer
from .masks.config import resolve_mask_config
from .models import ModelWrapper, resolve_model


@dataclass
class Explanation:
    image: torch.Tensor  # C x H x W in [0, 1]
    mask: torch.Tensor  # 1 x H x W, 1 = kept
    perturbed: torch.Tensor  # C x H x W
    probs_before: torch.Tensor  # num_classes
    probs_after: torch.Tensor
    target: int
    classes: tuple[str, ...]
    iterations: int
    notes: list[str] = field(default_factory=list)
    mask_config: dict[str, Any] = field(default_factory=dict)  # the settings the mask was computed with

    def to_dict(self, top: int = 5) -> dict[str, Any]:
        order = torch.argsort(self.probs_before, descending=True)[:top].tolist()
        return {
            "target": self.classes[self.target], "target_index": self.target,
            "prob_before": float(self.probs_before[self.target]), "prob_after": float(self.probs_after[self.target]),
            "deleted_area": float(1 - self.mask.mean()), "iterations": self.iterations,
            "top": [{"class": self.classes[i], "before": float(self.probs_before[i]),
                     "after": float(self.probs_after[i])} for i in order],
            "notes": self.notes, "mask_config": self.mask_config,
        }

    def save_figure(self, path: str | os.PathLike) -> None:
        from .plots import explanation_figure

        explanation_figure(self.image, self.mask, self.perturbed, self.probs_before, self.probs_after, self.classes,
                           self.target, path)


def explain(image: torch.Tensor | str | os.PathLike, model: ModelWrapper | str = "cifar10-cnn",
            config: MaskConfig | dict[str, Any] | None = None, target: int | None = None,
            out: str | os.PathLike | None = None, device: str = "auto") -> Explanation:
    """Compute the meaningful-perturbation mask of one image and (optionally) save a figure.

    ``image`` is a path or a C x H x W / 1 x C x H x W tensor in [0, 1]; ``model`` a
    :class:`ModelWrapper` or a model spec such as ``"cifar10-cnn"``; ``config`` the mask
    settings, or overrides of those for the model's input size (:meth:`MaskConfig.for_input_size`).
    """
    from .imageio import load_image

    model = resolve_model(model, device)
    notes: list[str] = []
    if isinstance(image, (str, os.PathLike)):
        loaded = load_image(image, size=model.info.input_size, channels=len(model.info.mean))
        notes, image = loaded.notes, loaded.as_float()
    x = image if image.dim() == 4 else image.unsqueeze(0)
    x = x.float().to(model.device)
    model.check_input(x)
    cfg = resolve_mask_config(config, model.info.input_size)
    explainer = make_explainer(model, cfg)
    result = explainer.attribute(x, target=target)
    with torch.no_grad():
        perturbed = explainer.perturb(x, result.masks)
    logits = model.logits(torch.cat([x, perturbed]))
    probs = logits.softmax(1).cpu()
    explanation = Explanation(x[0].cpu(), result.masks[0].cpu(), perturbed[0].cpu(), probs[0], probs[1],
                              int(result.targets[0]), model.info.classes, int(result.iterations[0]), notes,
                              cfg.to_dict())
    if out is not None:
        explanation.save_figure(out)
    return explanation


def explain_file(image: str | os.PathLike, model: str | ModelWrapper = "cifar10-cnn",
                 config: MaskConfig | dict[str, Any] | None = None,
                 target: str | int | None = None, out: str | os.PathLike | None = None,
                 device: str = "auto") -> dict[str, Any]:
    """The ``explain`` command: resolve the target by name or index, explain, report as a dict."""
    wrapper = resolve_model(model, device)
    index = _target_index(wrapper, target)
    result = explain(image, wrapper, config=config, target=index, out=out).to_dict()
    result["image"] = str(image)
    result["figure"] = str(out) if out else None
    return result


def explain_layer(image: str | os.PathLike, layer: str, model: str | ModelWrapper = "cifar10-cnn",
                  area: float | None = None, target: str | int | None = None,
                  device: str = "auto", top: int = 10) -> dict[str, Any]:
    """The ``explain --layer`` command: which channels of ``layer`` must be kept to keep the class
    (extremal perturbation of activations, :mod:`advdetect.masks.channels`), as a dict."""
    from .imageio import load_image
    from .masks.channels import ChannelConfig, ChannelExtremal

    wrapper = resolve_model(model, device)
    loaded = load_image(image, size=wrapper.info.input_size, channels=len(wrapper.info.mean))
    x = loaded.as_float().unsqueeze(0).to(wrapper.device)
    config = ChannelConfig() if area is None else ChannelConfig(area=area)
    result = ChannelExtremal(wrapper, layer, config).attribute(x, target=_target_index(wrapper, target))
    row = result.to_dict(wrapper.info.classes)
    image_row = row.pop("images")[0]
    shown = list(zip(image_row.pop("kept"), image_row.pop("weights")))
    return {"image": str(image), **row, **image_row, "n_kept": len(shown),
            "top_channels": [{"channel": c, "weight": w} for c, w in shown[:top]], "notes": loaded.notes}


def _target_index(wrapper: ModelWrapper, target: str | int | None) -> int | None:
    """A class given by name or index, checked against the model's classes."""
    from .errors import AdvDetectError

    if target is None:
        return None
    if str(target).isdigit() and int(target) < wrapper.info.num_classes:
        return int(target)
    if str(target) in wrapper.info.classes:
        return wrapper.info.classes.index(str(target))
    raise AdvDetectError(f"unknown class {target!r}; choose a name or index of: {', '.join(wrapper.info.classes[:20])}")
