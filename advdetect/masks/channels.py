"""Extremal perturbation of an intermediate layer's channels (Fong, Patrick & Vedaldi, ICCV 2019, Sec. 4).

Which channels of layer L must be kept to keep the class? A mask ``m`` in [0, 1]^C scales the
layer's output channel by channel (``a' = m * a``, zero = the channel switched off) and is
optimised, per image, to keep the target class's log-probability high while an area constraint
pulls it to exactly ``area * C`` ones:

    min_m  -log p_y(f(m * a))  +  lambda * mean((sort(m) - r_area)^2)

where ``r_area`` holds ``(1 - area) * C`` zeros then ``area * C`` ones (the paper's ranking
constraint), and lambda grows geometrically from ``area_coeff`` to ``100 * area_coeff``, as in
TorchRay. Images are optimised together but independently: each image has its own mask, its loss
depends on it alone, and Adam is elementwise, so an image's mask is the one optimising it alone
would give (to float rounding: the ranking is taken on a grid, equal weights by channel index, so
that rounding noise does not reorder them; see ``_ranking``). The result keeps the top
``area * C`` channels; ``prob_kept`` is the target probability with those channels alone (the
others zeroed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import OptionError
from ..models.wrapper import ModelWrapper, frozen


RANK_GRID = 1e-4  # weights are ranked on this grid, equal ones by channel index (see _ranking)


@dataclass(frozen=True)
class ChannelConfig:
    """Settings of the channel attribution: ``area`` (fraction of channels kept), Adam ``iterations``
    and ``lr`` on the mask's logits (which start at each channel's standardised gradient x activation),
    ``area_coeff`` (the constraint's starting weight)."""

    area: float = 0.1
    iterations: int = 150
    lr: float = 0.3
    area_coeff: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.area < 1:
            raise OptionError(f"area must lie in (0, 1), got {self.area}")
        if self.iterations < 1 or self.lr <= 0 or self.area_coeff < 0:
            raise OptionError("iterations must be >= 1, lr > 0 and area_coeff >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChannelResult:
    layer: str
    weights: torch.Tensor  # N x C, the optimised mask (1 = kept)
    kept: torch.Tensor  # N x k, indices of the channels kept (highest weights first)
    targets: torch.Tensor  # N
    prob_before: torch.Tensor  # N, target probability of the image
    prob_kept: torch.Tensor  # N, target probability with the kept channels alone
    config: ChannelConfig

    def to_dict(self, classes: tuple[str, ...] | None = None) -> dict[str, Any]:
        return {"layer": self.layer, "channels": int(self.weights.shape[1]), "config": self.config.to_dict(),
                "images": [{"target": classes[int(t)] if classes else int(t), "prob_before": float(b),
                            "prob_kept": float(k), "kept": kept.tolist(),
                            "weights": [round(float(w[i]), 4) for i in kept]}
                           for t, b, k, kept, w in zip(self.targets, self.prob_before, self.prob_kept, self.kept,
                                                       self.weights)]}


def find_layer(model: ModelWrapper, name: str) -> nn.Module:
    """The module ``name`` names in the classifier (names as ``model.net.named_modules()`` gives them;
    the wrapper's own ``net.`` prefix is accepted too)."""
    modules = dict(model.net.named_modules())
    for candidate in (name, name.removeprefix("net.")):
        if candidate and candidate in modules:
            return modules[candidate]
    names = [n for n in modules if n]
    shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
    hidden = "(none visible: an exported program hides its modules)"
    raise OptionError(f"no layer {name!r} in {model.info.name}; its layers: {shown or hidden}")


class ChannelExtremal:
    """``ChannelExtremal(model, layer, config).attribute(images, target=None) -> ChannelResult``."""

    def __init__(self, model: ModelWrapper, layer: str, config: ChannelConfig | None = None) -> None:
        self.model, self.layer, self.config = model, layer, config or ChannelConfig()
        self.module = find_layer(model, layer)

    @torch.enable_grad()  # the loop differentiates the channel weights, even when called under no_grad
    def attribute(self, images: torch.Tensor, target: torch.Tensor | int | None = None) -> ChannelResult:
        cfg, model = self.config, self.model
        x = images.to(model.device).float()
        with frozen(model), torch.no_grad():
            logits = model.logits(x)
            channels = self._channels(x)
        n = x.shape[0]
        targets = logits.argmax(1) if target is None else torch.as_tensor(target, device=x.device).expand(n).long()
        prob_before = logits.softmax(1).gather(1, targets[:, None]).squeeze(1)
        k = max(1, int(round(cfg.area * channels)))
        reference = torch.cat([torch.zeros(channels - k), torch.ones(k)]).to(x.device)
        theta = self._start(x, targets, channels).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=cfg.lr)
        growth = math.log(100) / max(cfg.iterations - 1, 1)
        index = torch.arange(channels, device=x.device, dtype=torch.float64)
        with frozen(model):
            for step in range(cfg.iterations):
                weights = torch.sigmoid(theta)
                with self._scaled(weights):
                    log_p = model(x).log_softmax(1).gather(1, targets[:, None]).squeeze(1)
                order = _ranking(weights.detach(), index)
                area = ((weights.gather(1, order) - reference) ** 2).mean(1)
                loss = (-log_p + cfg.area_coeff * math.exp(growth * step) * area).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            weights = torch.sigmoid(theta.detach())
            kept = weights.argsort(1, descending=True)[:, :k]
            binary = torch.zeros_like(weights).scatter_(1, kept, 1.0)
            with torch.no_grad(), self._scaled(binary):
                prob_kept = model.logits(x).softmax(1).gather(1, targets[:, None]).squeeze(1)
        return ChannelResult(self.layer, weights.cpu(), kept.cpu(), targets.cpu(), prob_before.cpu(),
                             prob_kept.cpu(), cfg)

    def _start(self, x: torch.Tensor, targets: torch.Tensor, channels: int) -> torch.Tensor:
        """Starting logits: each channel's gradient x activation for the target, standardised per image, so the
        optimisation starts from a ranking (equal starting weights would be ranked by float noise)."""
        ones = torch.ones(x.shape[0], channels, device=x.device, requires_grad=True)
        with frozen(self.model), self._scaled(ones):
            log_p = self.model(x).log_softmax(1).gather(1, targets[:, None]).sum()
        grad, = torch.autograd.grad(log_p, ones)  # d log p / d m at m = 1: sum of gradient x activation
        return ((grad - grad.mean(1, keepdim=True)) / grad.std(1, keepdim=True).clamp(min=1e-12)).detach()

    def _channels(self, x: torch.Tensor) -> int:
        seen: list[int] = []
        handle = self.module.register_forward_hook(lambda _m, _i, out: seen.append(_output(out).shape[1]))
        try:
            self.model.logits(x[:1])
        finally:
            handle.remove()
        if not seen:
            raise OptionError(f"layer {self.layer!r} is not used when {self.model.info.name} classifies an image")
        return seen[0]

    @contextmanager
    def _scaled(self, weights: torch.Tensor) -> Iterator[None]:
        """Within: the layer's output channels scaled by ``weights`` (N x C), image by image."""
        def hook(_module: nn.Module, _inputs: Any, out: Any) -> torch.Tensor:
            out = _output(out)
            return out * weights.view(*weights.shape, *([1] * (out.dim() - 2)))

        handle = self.module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def _ranking(weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Channels in ascending order of weight, on a ``RANK_GRID`` grid, equal ones by index.

    A batch's convolutions round differently from one image's, and Adam's sign-like first steps
    leave many exactly equal weights; ranked on the raw values, float noise would decide which of
    them the area constraint pushes up.
    """
    return ((weights.double() / RANK_GRID).floor() * index.numel() + index).argsort(1)


def _output(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise OptionError("channel attribution needs a layer whose output is one N x C (x ...) tensor")
    return out
