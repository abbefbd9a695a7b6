"""A warm Python API: load a detector once, then judge, recover and explain batches of images.

    >>> guard = advdetect.Guard.load("det/")               # doctest: +SKIP
    >>> verdicts = guard.check(images)                      # doctest: +SKIP
    >>> verdicts.adversarial, verdicts.labels               # doctest: +SKIP

``images`` is a float32 N x C x H x W tensor in [0, 1] (the model's shape) or a list of image
files. The classifier, the detector and its fast path (when it has one) are loaded once and kept
in inference mode (eval, no parameter gradients), so calls from several threads share them
safely: nothing a call does changes state another call reads, and the mask optimisation draws its
randomness from generators of its own.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import AdvDetectError
from .inference import Deployment, judge, load_deployment, recover_batch, recovery_explainers
from .masks import MaskResult, make_explainer
from .models import ModelWrapper


@dataclass
class Verdicts:
    """One batch's labels and verdicts."""

    labels: torch.Tensor  # int64 N, the classifier's prediction
    classes: list[str]  # their names
    confidence: torch.Tensor  # N, the predicted class's probability
    scores: torch.Tensor  # N, adversarial scores (higher: more adversarial)
    adversarial: torch.Tensor  # bool N, score above the threshold
    threshold: float
    path: str  # "fast" (amortized masks) or "exact" (optimised masks)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image, as ``advdetect detect --json`` writes them."""
        return [{"label": self.classes[i], "label_index": int(self.labels[i]), "confidence": float(self.confidence[i]),
                 "score": float(self.scores[i]), "adversarial": bool(self.adversarial[i]), "path": self.path}
                for i in range(len(self.labels))]


@dataclass
class Recovered:
    """One batch's verdicts and recovered labels."""

    verdicts: Verdicts
    labels: torch.Tensor  # int64 N, the recovered top-1 (as `advdetect recover` reports it, for every image)
    pipeline_labels: torch.Tensor  # int64 N, what detect-then-recover gives: the prediction unless flagged
    top5: torch.Tensor  # N x 5 class indices
    probs: torch.Tensor  # N x classes after recovery
    masks: torch.Tensor  # N x 1 x H x W: the deletion masks applied back (or the detector's, for blur recovery)


def fast_layout(deployment: Deployment) -> dict[str, bool]:
    """Channels-last weights for the deployment's classifier, mask network and detector networks where each
    gives the same outputs on a probe batch (on the CPU: faster convolutions); which ones were converted.

    Call it only on a deployment whose models are owned (a :class:`Guard`'s): the modules are changed in
    place."""
    from .models.layout import prefer_channels_last

    model, info = deployment.model, deployment.model.info
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand(2, len(info.mean), *info.input_size, generator=gen).to(model.device)
    done = {"classifier": prefer_channels_last(model, lambda: model(probe))}
    if deployment.fast is not None:
        net = deployment.fast.explainer.net
        with torch.no_grad():
            probs = model(probe).float().softmax(1)
        done["mask_net"] = prefer_channels_last(net, lambda: net(probe, probs.argmax(1), probs))
    for name, detector in (("detector", deployment.detector), ("fast_detector", deployment.judge)):
        network = detector._fitted()
        if name == "fast_detector" and network is deployment.detector._fitted():
            continue
        maps = torch.rand(2, network.features[0].in_channels, 32, 32, generator=gen).to(model.device)
        done[name] = prefer_channels_last(network, lambda: network(maps))
    return done


class Guard:
    """A detector with its classifier, loaded once: :meth:`check`, :meth:`recover`, :meth:`explain`.

    Built from a :class:`~advdetect.inference.Deployment`, it puts the deployment's classifier and
    networks in inference mode for good (use :meth:`load`, which loads or copies them).
    """

    def __init__(self, deployment: Deployment, channels_last: bool = True) -> None:
        self.deployment = deployment
        model = deployment.model
        model.eval().requires_grad_(False)  # the guard owns this copy: inference only, for every thread
        if deployment.fast is not None:
            deployment.fast.explainer.net.eval().requires_grad_(False)
        deployment.detector._fitted().eval().requires_grad_(False)
        deployment.judge._fitted().eval().requires_grad_(False)
        self.layout = fast_layout(deployment) if channels_last else {}  # which networks run channels-last
        self._explain = make_explainer(model, deployment.mask_config)
        self._recovery = recovery_explainers(deployment)

    @classmethod
    def load(cls, detector_dir: str | os.PathLike, model: str | ModelWrapper | None = None, device: str = "auto",
             exact: bool = False, channels_last: bool = True) -> Guard:
        """The detector in ``detector_dir`` with its classifier (``model``, else the one it recorded);
        its fast path judges when it has one, unless ``exact``. A model passed in is copied (the guard
        keeps its copy in inference mode), so yours is left as it was. ``channels_last``: convert the
        networks' weights to channels-last where that gives the same outputs (:func:`fast_layout`)."""
        if isinstance(model, ModelWrapper):
            model = copy.deepcopy(model)
        return cls(load_deployment(detector_dir, model, device, exact=exact), channels_last=channels_last)

    @property
    def model(self) -> ModelWrapper:
        return self.deployment.model

    @property
    def path(self) -> str:
        return self.deployment.path

    def check(self, images: torch.Tensor | Sequence[str | os.PathLike]) -> Verdicts:
        """Labels and verdicts for a batch."""
        x = self._images(images)
        return self._verdicts(judge(self.deployment, x, self._recovery[0]))

    def recover(self, images: torch.Tensor | Sequence[str | os.PathLike]) -> Recovered:
        """Verdicts and the recovered labels (a flagged image's prediction ruled out, as the detector says);
        ``pipeline_labels`` keeps the prediction of images that are not flagged."""
        x = self._images(images)
        verdict, rec, shown = recover_batch(self.deployment, x, self._recovery)
        verdicts, recovered = self._verdicts(verdict), rec.top5[:, 0].clone()
        pipeline = torch.where(verdicts.adversarial, recovered, verdicts.labels)
        return Recovered(verdicts, recovered, pipeline, rec.top5, rec.probs, shown.cpu())

    def explain(self, images: torch.Tensor | Sequence[str | os.PathLike], target: torch.Tensor | int | None = None,
                exact: bool = True, refine: int = 0) -> MaskResult:
        """Masks explaining ``target`` (default: the prediction) with the detector's mask settings: optimised,
        or with ``exact=False`` the fast path's amortized masks (one pass; less faithful), refined by
        ``refine`` iterations of the optimisation when asked."""
        x = self._images(images)
        fast = self.deployment.fast
        if not exact and fast is not None:
            return fast.explainer.attribute(x, target=target, refine=refine)
        return self._explain.attribute(x, target=target)

    def _verdicts(self, j: Any) -> Verdicts:
        labels = j.probs.argmax(1)
        return Verdicts(labels, list(self.model.info.classes), j.probs.gather(1, labels[:, None]).squeeze(1),
                        j.scores, j.flagged, float(self.deployment.threshold), self.path)

    def _images(self, images: torch.Tensor | Sequence[str | os.PathLike]) -> torch.Tensor:
        from .imageio import load_image

        info = self.model.info
        if not isinstance(images, torch.Tensor):
            if isinstance(images, (str, os.PathLike)):
                images = [images]
            images = torch.stack([load_image(p, size=info.input_size, channels=len(info.mean)).as_float()
                                  for p in images]) if len(images) else torch.empty(0)
        if images.dtype != torch.float32:
            raise AdvDetectError(f"images must be float32 in [0, 1], got {images.dtype}")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise AdvDetectError("images must lie in [0, 1] (normalization happens inside the model)")
        x = images.to(self.model.device)
        self.model.check_input(x)
        return x
