"""Amortized masks (Dabkowski & Gal, NeurIPS 2017): a small network gives the mask in one pass.

:class:`MaskNet` takes the image, the class to explain and the classifier's probabilities (which
the verdict computes anyway) and outputs the low-resolution mask of a :class:`MaskConfig`
(``ceil(H / upsample)`` cells, upsampled as the optimiser's mask is) plus the share of the
iteration budget the optimiser would use. :class:`AmortizedMasks` is an
:class:`~.base.Explainer` over it: ``attribute`` returns a :class:`~.base.MaskResult` whose
``prob_after`` is the classifier's real probability on the image perturbed by the predicted
mask, so the result feeds the detector's maps exactly as an optimised one does.
:mod:`.amortized_training` fits the network; :func:`save_mask_net` / :func:`load_mask_net`
store it as safetensors + JSON.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdvDetectError
from ..models.wrapper import frozen
from .base import MaskResult, check_images, resolve_targets
from .config import MaskConfig
from .parameterization import base_grid, low_res_shape, upsample
from .perturbation import blend, reference

NET_FORMAT = "advdetect.mask-net/1"
NET_WEIGHTS = "mask_net.safetensors"
NET_META = "mask_net.json"


@dataclass(frozen=True)
class MaskNetSpec:
    """The shape of a :class:`MaskNet`: what it reads and the mask it writes."""

    in_channels: int
    num_classes: int
    low_shape: tuple[int, int]  # the mask's cells (ceil(H / upsample), ceil(W / upsample))
    width: int = 32

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.num_classes < 2 or self.width < 4 or min(self.low_shape) < 1:
            raise ValueError(f"bad mask network shape: {self}")


class MaskNet(nn.Module):
    """Image (in [0, 1]) + target class + class probabilities -> low-res mask logits and an iteration logit.

    Three 3 x 3 convolutions (the second with stride 2) encode the image; the target's one-hot code
    and the probabilities scale and shift the features (FiLM); the features are pooled to the mask's
    cells and two convolutions write the mask there. Small on purpose: at 32 x 32 it costs about a
    third of the built-in classifier's forward pass.
    """

    def __init__(self, spec: MaskNetSpec) -> None:
        super().__init__()
        self.spec = spec
        w = spec.width
        self.encoder = nn.Sequential(
            nn.Conv2d(spec.in_channels, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1))
        self.film = nn.Linear(2 * spec.num_classes, 4 * w)
        self.head = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(2 * w, w, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(w, 1, 1))
        self.iterations = nn.Linear(2 * w, 1)

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N x 1 x h x w mask logits, N iteration-share logits)."""
        code = torch.cat([F.one_hot(targets, self.spec.num_classes).to(probs.dtype), probs], 1)
        scale, shift = self.film(code).chunk(2, 1)
        feats = self.encoder((images - 0.5) / 0.25)
        feats = feats * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        feats = F.adaptive_avg_pool2d(feats, self.spec.low_shape)
        pooled = F.relu(feats).mean((2, 3))
        return self.head(feats), self.iterations(pooled).squeeze(1)


class AmortizedMasks:
    """Masks from a trained :class:`MaskNet` in one forward pass: an :class:`~.base.Explainer`.

    ``config``: the settings of the optimised masks the network stands in for (game, blur,
    upsampling, iteration budget). ``model`` and ``net`` are used frozen, in eval mode, and left
    as they were. Deterministic: no noise, no jitter.
    """

    def __init__(self, model: nn.Module, net: MaskNet, config: MaskConfig) -> None:
        if config.method != "meaningful" or config.game not in ("delete", "preserve"):
            raise ValueError(f"amortized masks stand in for meaningful deletion or preservation masks, not "
                             f"{config.kind!r}")
        self.model, self.net, self.config = model, net, config

    def attribute(self, images: torch.Tensor, target: torch.Tensor | int | None = None, progress: bool = False,
                  probs: torch.Tensor | None = None, refine: int = 0) -> MaskResult:
        """Masks for ``images`` explaining ``target`` (default: the top prediction).

        ``probs``: the classifier's softmax on ``images`` when already computed (saves a pass).
        ``refine``: that many iterations of the mask optimisation (``config``'s, without early
        stopping) starting from the predicted masks; the result's ``iterations`` are then those.
        """
        if refine < 0:
            raise ValueError(f"refine must be 0 or more iterations, got {refine}")
        images = check_images(images)
        with torch.no_grad(), frozen(self.model), frozen(self.net):
            if probs is None:
                probs = self.model(images).float().softmax(1)
            targets = resolve_targets(probs, target)
            low, share = self.predict(images, targets, probs)
            if refine:
                return self.refine(images, targets, low, refine, progress)
            masks = self.upsample(low, images.shape[-2:])
            after = self.model(self.perturb(images, masks)).float().softmax(1)
        pick = targets[:, None]
        iterations = (share * self.config.iterations).round().long()
        return MaskResult(masks, targets, probs.gather(1, pick).squeeze(1), after.gather(1, pick).squeeze(1),
                          iterations, self.config)

    def refine(self, images: torch.Tensor, targets: torch.Tensor, low: torch.Tensor, iterations: int,
               progress: bool = False) -> MaskResult:
        """``iterations`` steps of the optimised masks' loop from the low-resolution masks ``low``."""
        from .meaningful import MeaningfulPerturbation

        config = self.config.replace(iterations=iterations, early_stop=False,
                                     check_every=min(self.config.check_every, iterations))
        with torch.enable_grad():
            return MeaningfulPerturbation(self.model, config).attribute(images, target=targets, progress=progress,
                                                                        init=low)

    def predict(self, images: torch.Tensor, targets: torch.Tensor,
                probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution masks in [0, 1] and iteration shares in [0, 1] (differentiable)."""
        logits, share = self.net(images, targets, probs)
        return torch.sigmoid(logits), torch.sigmoid(share)

    def upsample(self, low: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        return upsample(low, base_grid(tuple(size), low.device, low.dtype))

    def perturb(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``images`` with ``masks`` applied by the optimised masks' perturbation."""
        cfg = self.config
        return blend(images, reference(images, cfg.perturbation, blur_sigma=cfg.blur_sigma), masks)


def mask_net_for(model_info: Any, config: MaskConfig, width: int = 32) -> MaskNet:
    """A fresh network for a classifier's inputs (``ModelInfo``) and the masks of ``config``."""
    spec = MaskNetSpec(in_channels=len(model_info.mean), num_classes=model_info.num_classes,
                       low_shape=low_res_shape(tuple(model_info.input_size), config.upsample), width=width)
    return MaskNet(spec)


def save_mask_net(directory: str | os.PathLike, net: MaskNet, extra: dict[str, Any] | None = None) -> Path:
    """``mask_net.safetensors`` + ``mask_net.json`` (its shape, the weights' sha256, ``extra``) in ``directory``."""
    from ..storage import save_tensors, write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digest = save_tensors(directory / NET_WEIGHTS, {k: v.detach().cpu() for k, v in net.state_dict().items()})
    spec = asdict(net.spec)
    spec["low_shape"] = list(net.spec.low_shape)
    write_json(directory / NET_META, {"format": NET_FORMAT, "spec": spec, "weights": NET_WEIGHTS, "sha256": digest,
                                      **(extra or {})})
    return directory


def load_mask_net(directory: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[MaskNet, dict[str, Any]]:
    """The network saved in ``directory`` (weights checked against their recorded sha256) and its JSON."""
    from ..storage import load_tensors, read_json

    path = Path(directory) / NET_META
    if not path.is_file():
        raise AdvDetectError(f"{directory}: no mask network ({NET_META} missing)")
    meta = read_json(path)
    try:
        if not isinstance(meta, dict) or meta.get("format") != NET_FORMAT:
            raise ValueError("not an advdetect mask network description")
        raw = meta["spec"]
        spec = MaskNetSpec(int(raw["in_channels"]), int(raw["num_classes"]),
                           (int(raw["low_shape"][0]), int(raw["low_shape"][1])), int(raw["width"]))
        if Path(meta["weights"]).name != meta["weights"] or not isinstance(meta["sha256"], str):
            raise ValueError("weights must be a file beside it, with its sha256")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise AdvDetectError(f"{path}: damaged mask network description ({exc})") from exc
    net = MaskNet(spec)
    state = load_tensors(Path(directory) / meta["weights"], sha256=meta["sha256"])
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise AdvDetectError(f"{path}: weights do not fit the mask network ({exc})") from exc
    return net.to(device).eval(), meta
