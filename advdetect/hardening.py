"""Adversarial training of the fast path's detector against the white-box adaptive attacker.

Asymmetric adversarial training (Yin et al., ICLR 2020), with the attack RADAR (2024) retrains
on: each round attacks the *current* fast path on the fitting images, white box (PGD on the
classifier's margin and the fast detector's score, gradients through the classifier, the mask
network and the perturbed classifier: :class:`~advdetect.evaluation.adaptive.FastPathMaps`, the
attacker ``advdetect evaluate`` runs), adds every adversarial image that fools the classifier to
the detector's positive class, whether or not it got past the detector, refits the detector from
scratch on clean maps against the non-adaptive attacks and all rounds' adaptive images so far,
and recalibrates it on the same clean calibration maps. The mask network is left as it is.

``advdetect train --adaptive-rounds K`` runs K rounds on the fast path it trains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .detector import MaskDetector
from .errors import OptionError
from .fastpath import FastPath, fit_fast_detector

log = logging.getLogger(__name__)


@dataclass
class HardeningConfig:
    """How the fast detector is hardened.

    ``eps``: the L-inf budgets of the training attack (the fitting images are shared among them
    in turn); ``steps`` and ``restarts``: its PGD; ``adaptive_share``: the share of the positive
    class given to adaptive images (the rest: the non-adaptive attacks, balanced as before);
    ``max_images``: how many fitting images are attacked per round (a seeded sample beyond that).
    """

    rounds: int = 0
    eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255)
    steps: int = 20
    restarts: int = 1
    adaptive_share: float = 0.5
    max_images: int = 2000
    batch_size: int = 256
    seed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # filled in: one entry per round

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise OptionError(f"adaptive rounds must be 0 or more, got {self.rounds}")
        if not self.eps or not all(0 < e <= 1 for e in self.eps):
            raise OptionError(f"hardening eps must lie in (0, 1], got {self.eps}")
        if self.steps < 1 or self.restarts < 1 or self.max_images < 1 or self.batch_size < 1:
            raise OptionError("hardening steps, restarts, max_images and batch_size must be at least 1")
        if not 0 < self.adaptive_share < 1:
            raise OptionError(f"adaptive_share must lie in (0, 1), got {self.adaptive_share}")

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "history"} | {"history": list(self.history)}


def adaptive_examples(fast: FastPath, images: torch.Tensor, config: HardeningConfig,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """White-box adaptive attacks on ``images`` (correctly classified; their predictions are the labels),
    the i-th image at ``config.eps[i % len(eps)]``. Returns the adversarial images, whether each fools
    the classifier, and whether each also passes the fast detector."""
    from .evaluation.adaptive import AdaptiveConfig, FastPathMaps, adaptive_pgd

    model = fast.explainer.model
    device = model.device
    with torch.no_grad():
        labels = model.logits(images, config.batch_size).argmax(1).cpu()
    maps_fn = FastPathMaps(fast)
    adv = images.clone()
    slot = torch.arange(len(images)) % len(config.eps)
    for k, eps in enumerate(config.eps):
        rows = (slot == k).nonzero().flatten()
        settings = AdaptiveConfig(eps=eps, steps=config.steps, restarts=config.restarts, seed=seed + k)
        for start in range(0, len(rows), config.batch_size):
            pick = rows[start:start + config.batch_size]
            adv[pick] = adaptive_pgd(model, maps_fn, fast.detector, images[pick], labels[pick], settings).cpu()
    with torch.no_grad():
        fooled = model.logits(adv, config.batch_size).argmax(1).cpu() != labels
    scores = fast.scores(adv.to(device)).cpu()
    return adv, fooled, fooled & (scores <= fast.detector.threshold_)


def harden_fast_path(fast: FastPath, clean_images: torch.Tensor, clean_maps: torch.Tensor,
                     adv_sets: Sequence[torch.Tensor], calibration: torch.Tensor | None, config: HardeningConfig,
                     progress: bool = False) -> FastPath:
    """``config.rounds`` rounds of adversarial training of ``fast``'s detector (see the module's docstring).

    ``clean_images``/``clean_maps``: the correctly classified fitting images and their maps;
    ``adv_sets``: the non-adaptive attacks' maps, one tensor per attack; ``calibration``: clean
    calibration maps. Returns a fast path with the hardened detector (``fast`` is left as it was);
    ``config.history`` gets, per round, how the attack did on the fitting images before the refit.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(config.seed)
    adaptive: list[torch.Tensor] = []
    for round_ in tqdm(range(config.rounds), desc="hardening", unit="round", disable=not progress, leave=False):
        pick = torch.randperm(len(clean_images), generator=gen)[:config.max_images].sort().values
        adv, fooled, passes = adaptive_examples(fast, clean_images[pick], config, seed=config.seed + 100 * round_)
        if fooled.any():
            maps, _ = fast.maps(adv[fooled].to(fast.explainer.model.device))
            adaptive.append(maps.cpu())
        detector = MaskDetector(**fast.detector.get_params())
        fit_fast_detector(detector, clean_maps, adv_sets, calibration, seed=config.seed + round_,
                          adaptive=torch.cat(adaptive) if adaptive else None, adaptive_share=config.adaptive_share)
        entry = {"round": round_ + 1, "attacked": int(len(pick)), "fooled": float(fooled.float().mean()),
                 "success_before_refit": float(passes.float().mean()),
                 "adaptive_maps": int(sum(len(a) for a in adaptive)), "threshold": float(detector.threshold_)}
        log.info("hardening round %d: the attack fooled classifier and detector on %.1f%% of %d fitting images; "
                 "detector refitted", round_ + 1, 100 * entry["success_before_refit"], len(pick))
        config.history.append(entry)
        fast = FastPath(fast.explainer, detector)
    return fast
