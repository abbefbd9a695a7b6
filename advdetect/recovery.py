"""Label recovery: give back the label the classifier would have given a flagged image.

Two methods (:class:`RecoveryConfig`):

- ``"mask"`` (Fong & Vedaldi 2017, section 6): apply the image's own deletion mask back to it
  (blur where the mask deletes) and classify again. The mask deletes the evidence for the
  (adversarial) prediction, so the classifier may fall back to the clean label.
- ``"blur"`` (the default): blur the whole image lightly (Gaussian, ``sigma`` pixels), which
  washes out much of an L-inf perturbation while keeping the object, and classify again.

With ``exclude_flagged`` the prediction of an image the detector flags is ruled out of the
recovered ranking: the detector says that label is the adversary's. On the built-in CIFAR-10
model and BIM 8/255 the light blur with the flagged label ruled out recovers the clean label
far more often than the mask does (README, "Detect and recover"); the mask's deleted regions
overlap the object, so blurring them removes the clean class's evidence too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .masks import MaskConfig, make_explainer
from .masks.perturbation import gaussian_blur
from .models.wrapper import ModelWrapper
from .errors import OptionError

RECOVERY_METHODS = ("blur", "mask")
LEGACY_NAMES = {"denoise": "blur"}  # what detectors trained before the rename recorded


@dataclass(frozen=True)
class RecoveryConfig:
    method: str = "blur"
    sigma: float = 0.75  # blur of "blur", in pixels (tuned on the CIFAR-10 training split)
    exclude_flagged: bool = True  # rule the flagged prediction out of the recovered ranking

    def __post_init__(self) -> None:
        if self.method not in RECOVERY_METHODS:
            raise OptionError(f"unknown recovery method {self.method!r}; choose one of {', '.join(RECOVERY_METHODS)}")
        if not 0 < self.sigma <= 16:
            raise OptionError(f"recovery sigma must lie in (0, 16] pixels, got {self.sigma}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecoveryConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise OptionError(f"unknown recovery settings: {', '.join(sorted(unknown))}")
        return cls(**{**d, **({"method": LEGACY_NAMES[d["method"]]} if d.get("method") in LEGACY_NAMES else {})})


PAPER_RECOVERY = RecoveryConfig(method="mask", exclude_flagged=False)


@dataclass
class Recovery:
    logits: torch.Tensor  # N x K on the recovered images
    probs: torch.Tensor  # N x K, softmax over the classes not ruled out (ruled-out ones 0)
    top5: torch.Tensor  # N x 5 class indices, best first (ruled-out labels last)
    images: torch.Tensor  # N x C x H x W, what was classified

    @property
    def top1(self) -> torch.Tensor:
        return self.top5[:, 0]


def recover(model: ModelWrapper, images: torch.Tensor, masks: torch.Tensor | None = None,
            config: RecoveryConfig | None = None, mask_config: MaskConfig | None = None,
            predicted: torch.Tensor | None = None, flagged: torch.Tensor | None = None) -> Recovery:
    """Recovered logits and top-5 of ``images``.

    ``masks`` (deletion masks under ``mask_config``) are needed by the ``"mask"`` method only.
    ``predicted`` (the labels the classifier gave ``images``) is ruled out where ``flagged``
    (all images when None) if ``config.exclude_flagged``.
    """
    config = config or RecoveryConfig()
    with torch.no_grad():
        if config.method == "mask":
            if masks is None:
                raise ValueError("mask recovery needs the images' deletion masks")
            explainer = make_explainer(model, mask_config or MaskConfig())
            recovered = explainer.perturb(images, masks.to(images.device))
        else:
            recovered = gaussian_blur(images, config.sigma)
    logits = model.logits(recovered).cpu()
    ranked = logits.clone()
    if config.exclude_flagged and predicted is not None:
        rows = torch.ones(len(ranked), dtype=torch.bool) if flagged is None else flagged.cpu().bool()
        ranked[rows, predicted.cpu()[rows]] = float("-inf")
    return Recovery(logits, ranked.softmax(1), ranked.topk(min(5, ranked.shape[1]), dim=1).indices, recovered.cpu())


@dataclass
class RecoveryMetrics:
    """Fractions over successful adversarial images (recovery) and clean images (harm)."""

    method: str
    n_adversarial: int
    recovery_top1: float  # recovered top-1 == the clean prediction
    recovery_top5: float  # clean prediction within the recovered top-5
    recovery_ground_truth: float  # recovered top-1 == the true label
    recovery_ground_truth_top5: float
    n_clean: int
    harm: float  # detect-then-recover: clean, correctly classified images whose label the pipeline changes
    harm_unconditional: float  # recovery (nothing ruled out) applied to every clean correct image changes its label
    mask_recovery_top1: float  # the paper's recovery (deletion mask applied back), for reference
    mask_recovery_top5: float
    # the deployed pipeline (detect, then recover only what is flagged); None without adversarial verdicts
    n_flagged: int | None = None  # successful adversarial images the detector flags
    flagged_recovery_top1: float | None = None  # recovery over the flagged adversarial images only
    flagged_recovery_top5: float | None = None
    pipeline_recovery_top1: float | None = None  # of all successful adversarial images: flagged and recovered

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recovery_metrics(model: ModelWrapper, clean: torch.Tensor, adv: torch.Tensor, labels: torch.Tensor,
                     clean_pred: torch.Tensor, adv_pred: torch.Tensor, clean_masks: torch.Tensor,
                     adv_masks: torch.Tensor, clean_flagged: torch.Tensor | None = None,
                     mask_config: MaskConfig | None = None, recovery: RecoveryConfig | None = None,
                     adv_flagged: torch.Tensor | None = None) -> RecoveryMetrics:
    """Recovery over successful attacks and harm over correctly classified clean images.

    ``recovery_top1/top5`` treat every successful adversarial image as flagged (what recovery
    gives back once an image is flagged). ``adv_flagged`` (bool per image) says which
    adversarial images the detector really flags: ``flagged_recovery_*`` is recovery over
    those alone, and ``pipeline_recovery_top1`` the share of all successful adversarial images
    that the deployed pipeline (detect, then recover what is flagged) gives back with the clean
    label. ``clean_flagged`` says which clean images the detector flags; only those are
    "recovered" in the deployed pipeline, so only those can be harmed.
    """
    recovery = recovery or RecoveryConfig()
    correct = clean_pred == labels
    success = correct & (adv_pred != labels)
    device = model.device
    adv_s, adv_pred_s = adv[success].to(device), adv_pred[success]
    rec_adv = recover(model, adv_s, adv_masks[success], recovery, mask_config, predicted=adv_pred_s)
    paper = rec_adv if recovery == PAPER_RECOVERY else recover(model, adv_s, adv_masks[success], PAPER_RECOVERY,
                                                               mask_config)
    truth = labels[success].cpu()
    clean_label = clean_pred[success].cpu()
    flagged = (clean_flagged[correct.cpu()].bool() if clean_flagged is not None
               else torch.ones(int(correct.sum()), dtype=torch.bool))
    clean_c, pred_c = clean[correct].to(device), clean_pred[correct].cpu()
    rec_clean = recover(model, clean_c, clean_masks[correct], recovery, mask_config, predicted=pred_c, flagged=flagged)
    plain = replace(recovery, exclude_flagged=False)
    rec_plain = rec_clean if plain == recovery else recover(model, clean_c, clean_masks[correct], plain, mask_config)

    def frac(x: torch.Tensor) -> float:
        return float(x.float().mean()) if x.numel() else float("nan")

    return RecoveryMetrics(
        method=recovery.method,
        n_adversarial=int(success.sum()),
        recovery_top1=frac(rec_adv.top1 == clean_label),
        recovery_top5=frac((rec_adv.top5 == clean_label[:, None]).any(1)),
        recovery_ground_truth=frac(rec_adv.top1 == truth),
        recovery_ground_truth_top5=frac((rec_adv.top5 == truth[:, None]).any(1)),
        n_clean=int(correct.sum()),
        harm=frac((rec_clean.top1 != pred_c) & flagged),
        harm_unconditional=frac(rec_plain.top1 != pred_c),
        mask_recovery_top1=frac(paper.top1 == clean_label),
        mask_recovery_top5=frac((paper.top5 == clean_label[:, None]).any(1)),
        **_deployed(rec_adv, clean_label, None if adv_flagged is None else adv_flagged[success.cpu()].bool(), frac),
    )


def _deployed(rec_adv: Recovery, clean_label: torch.Tensor, flagged: torch.Tensor | None, frac) -> dict[str, Any]:
    """Recovery as deployed: only the adversarial images the detector flags are recovered."""
    if flagged is None:
        return {}
    hit1 = rec_adv.top1 == clean_label
    hit5 = (rec_adv.top5 == clean_label[:, None]).any(1)
    return {"n_flagged": int(flagged.sum()), "flagged_recovery_top1": frac(hit1[flagged]),
            "flagged_recovery_top5": frac(hit5[flagged]), "pipeline_recovery_top1": frac(hit1 & flagged)}

