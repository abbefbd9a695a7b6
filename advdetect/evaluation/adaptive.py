"""An adaptive attacker who knows the detector (Carlini & Wagner 2017; Tramer et al. 2020).

The mask is the result of an optimisation, which PGD can't differentiate cheaply. As in
BPDA, the attacker trains a *surrogate*: a small network that predicts an image's mask from
the image, fitted to masks the real pipeline computed. PGD then lowers the classifier's margin
for the true class and, through the surrogate, the detector's adversarial score, jointly:

    loss = max(z_y - max_{j != y} z_j, -kappa) + lam * max(D(S(x)) - (threshold - kappa_d), 0)

with random restarts (and, in a sweep, the previous eps's result both as it is and as a start);
the multi-targeted runs (Gowal et al. 2019) replace max_{j != y} z_j by z_t for each of the
classes t the classifier ranks next after y on the clean image, one run per class. Against a
pipeline with randomness the attacker can't see, ``eot`` averages each step's gradient over
that many draws (expectation over transformation, Athalye et al. 2018).
The attacker knows the whole pipeline, so it checks its candidates on the *real* one (the
classifier, the full mask optimisation, the detector) and keeps, per image, one that succeeds
there. Success means exactly that: the classifier is wrong and the real mask of the adversarial
image scores under the calibrated threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..detector import MaskDetector
from ..detector.inputs import detector_maps, maps_for_result
from ..device import seeded
from ..errors import AdvDetectError, OptionError
from ..fastpath import FastPath
from ..masks import MaskConfig, make_explainer
from ..models.wrapper import ModelWrapper, frozen
from ..splits import Split
from .config import EvaluateConfig

log = logging.getLogger(__name__)


class MaskSurrogate(nn.Module):
    """Image (N x I x H x W in [0, 1]) -> mask (N x C x H x W in [0, 1]); a small encoder-decoder.

    ``channels``: the channel count of the maps the detector reads (2 masks for ``game="both"``, and
    any evidence planes beside them); ``image_channels``: the images' (1 for a grayscale model)."""

    def __init__(self, width: int = 24, channels: int = 1, image_channels: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(image_channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=4, dilation=4), nn.GELU(),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    deterministic = True  # the same image gives the same maps (adaptive_candidates may drop settled images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def train_surrogate(images: torch.Tensor, masks: torch.Tensor, epochs: int = 15, batch_size: int = 128,
                    lr: float = 2e-3, seed: int = 0, device: torch.device | str = "cpu",
                    progress: bool = False) -> tuple[MaskSurrogate, dict[str, float]]:
    """Fit a surrogate to (image, mask) pairs; returns it (eval mode) and its fit on a 10% hold-out."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    with seeded(seed, device):  # the network's initialization; the caller's random state is kept
        net = MaskSurrogate(channels=masks.shape[1], image_channels=images.shape[1]).to(device)
    perm = torch.randperm(len(images), generator=gen)
    n_val = max(1, len(images) // 10)
    val, fit = perm[:n_val], perm[n_val:]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(fit) + batch_size - 1)
                                                                                      // batch_size))
    for _ in tqdm(range(epochs), desc="surrogate", unit="epoch", disable=not progress, leave=False):
        net.train()
        order = fit[torch.randperm(len(fit), generator=gen)]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, m = images[idx].to(device), masks[idx].to(device)
            loss = F.l1_loss(net(x), m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(images[val[i:i + 512]].to(device)).cpu() for i in range(0, len(val), 512)])
    target = masks[val]
    corr = (float(torch.corrcoef(torch.stack([pred.mean((1, 2, 3)), target.mean((1, 2, 3))]))[0, 1])
            if n_val > 1 else float("nan"))
    fit_stats = {"val_l1": float((pred - target).abs().mean()), "val_mean_mask_corr": corr,
                 "n_pairs": int(len(images))}
    for p in net.parameters():
        p.requires_grad_(False)
    return net, fit_stats


@dataclass
class AdaptiveConfig:
    eps: float = 8 / 255
    steps: int = 40
    restarts: int = 1
    alpha: float | None = None  # default 2.5 * eps / steps
    lam: float = 1.0
    kappa: float = 2.0  # classifier margin the attacker aims for
    kappa_detector: float = 1.0  # how far under the threshold the attacker aims
    seed: int = 0
    targets: torch.Tensor | None = None  # per image, the class a targeted run aims for (None: any wrong class)
    eot: int = 1  # gradients averaged over this many calls of the attacked maps (expectation over their randomness)

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1:
            raise OptionError(f"eps must lie in (0, 1], got {self.eps}")
        if self.steps < 1 or self.restarts < 1 or self.eot < 1:
            raise OptionError("steps, restarts and eot must be at least 1")


def _margin(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """z_y - max_{j != y} z_j per image (negative: misclassified); with ``target``, z_y - z_target."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    if target is not None:
        return true - logits.gather(1, target.to(logits.device)[:, None]).squeeze(1)
    return true - logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)


def _losses(model: ModelWrapper, surrogate: nn.Module, detector_net: nn.Module, x: torch.Tensor, y: torch.Tensor,
            threshold: float, cfg: AdaptiveConfig,
            rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attack loss, the classifier's (targeted) margin and the detector's score (zeros when ``cfg.lam``
    is 0: an attack on the classifier alone does not run the detector). ``rows``: which of ``cfg.targets``
    ``x`` holds (all by default)."""
    targets = cfg.targets if rows is None or cfg.targets is None else cfg.targets.to(rows.device)[rows]
    margin = _margin(model(x), y, targets)
    if cfg.lam == 0:
        return margin.clamp_min(-cfg.kappa), margin, torch.zeros_like(margin)
    score = detector_net(surrogate(x))
    loss = margin.clamp_min(-cfg.kappa) + cfg.lam * (score - (threshold - cfg.kappa_detector)).clamp_min(0)
    return loss, margin, score


def next_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """N x k: per image, the k classes ranked highest after the first (the multi-targeted runs' targets)."""
    if not 0 <= k < logits.shape[1]:
        raise OptionError(f"the multi-targeted attack aims for at most {logits.shape[1] - 1} other classes, got {k}")
    return logits.argsort(1, descending=True)[:, 1:1 + k]


def classifier_alone(model: ModelWrapper, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int,
                     restarts: int, seed: int = 0) -> float:
    """The share of ``images`` that the same PGD fools with the detector term off: a sound attack on an
    undefended classifier reaches 100% at a large eps (a sanity check of every report)."""
    cfg = AdaptiveConfig(eps=eps, steps=steps, restarts=restarts, lam=0.0, seed=seed)
    fooled = torch.zeros(len(images), dtype=torch.bool)
    for x in adaptive_candidates(model, nn.Identity(), None, images, labels, cfg):
        fooled |= model.logits(x).argmax(1).cpu() != labels.cpu()
    return float(fooled.float().mean()) if len(images) else float("nan")


def adaptive_candidates(model: ModelWrapper, surrogate: nn.Module, detector: MaskDetector | None, images: torch.Tensor,
                        labels: torch.Tensor, cfg: AdaptiveConfig, init: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One PGD result per restart, within ``cfg.eps`` (L-inf) of ``images``, each on ``model.device``.

    Where the attacked maps are deterministic (``surrogate.deterministic``, or no detector term), an
    image whose gradient is exactly zero (the loss's margin and detector terms both met with their
    room) would stay where it is at every later step, so it leaves the batch: the same result, fewer
    passes.

    ``cfg.restarts`` runs start from uniform noise in the ball. ``init`` (e.g. the attack's result
    at a smaller eps, which lies inside this ball too) adds two candidates: ``init`` itself,
    untouched, and a run that starts there. Keeping ``init`` unchanged is what makes a larger
    budget never do worse than a smaller one once candidates are chosen on the real pipeline.
    ``detector`` may be None when ``cfg.lam`` is 0 (the classifier alone is attacked).
    """
    device = model.device
    if detector is None and cfg.lam != 0:
        raise OptionError("an attack with a detector term (lam > 0) needs the detector")
    detector_net = nn.Identity() if detector is None else detector._fitted()
    threshold = 0.0 if detector is None else detector.threshold_
    alpha = cfg.alpha if cfg.alpha is not None else 2.5 * cfg.eps / cfg.steps
    x0, y = images.to(device).float(), labels.to(device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    project = lambda x: torch.min(torch.max(x, x0 - cfg.eps), x0 + cfg.eps).clamp(0, 1)  # noqa: E731
    project_rows = lambda x, rows: torch.min(torch.max(x, x0[rows] - cfg.eps), x0[rows] + cfg.eps).clamp(0, 1)  # noqa: E731
    # on a deterministic attacked pipeline an image with a zero gradient never moves again, so it leaves the batch
    settles = cfg.lam == 0 or bool(getattr(surrogate, "deterministic", False))
    starts: list[torch.Tensor | None] = [None] * cfg.restarts
    candidates: list[torch.Tensor] = []
    if init is not None:
        start = project(init.to(device).float())
        candidates.append(start)
        starts.append(start)
    with frozen(model), frozen(detector_net), frozen(surrogate):
        for start in starts:
            reset = getattr(surrogate, "reset", None)  # a stateful attacked pipeline (UnrolledMaps) starts afresh
            if callable(reset):
                reset()
            if start is None:
                noise = (torch.rand(x0.shape, generator=gen) * 2 - 1).to(device) * cfg.eps
                x = (x0 + noise).clamp(0, 1)
            else:
                x = start.clone()
            moving = torch.arange(len(x0), device=device)  # images whose gradient may still be nonzero
            for _ in range(cfg.steps):
                if not len(moving):
                    break
                part = x[moving].requires_grad_(True)
                grad = torch.zeros_like(part)
                for _ in range(cfg.eot):  # EOT: a randomised pipeline draws afresh on every call
                    loss, _, _ = _losses(model, surrogate, detector_net, part, y[moving], threshold, cfg, moving)
                    grad += torch.autograd.grad(loss.sum(), part)[0]
                with torch.no_grad():
                    x[moving] = project_rows(part - alpha * grad.sign(), moving)
                if settles:  # a zero gradient (both terms met with room) leaves the image where it is for good
                    moving = moving[grad.flatten(1).abs().amax(1) > 0]
            candidates.append(x.detach())
    return candidates


def _choose(tier: list[torch.Tensor], key: list[torch.Tensor]) -> torch.Tensor:
    """Per image, the index of the candidate with the lowest (tier, key); ties go to the earlier one."""
    rank = torch.stack([t.float() * 1e4 + k.float().clamp(-1e3, 1e3) for t, k in zip(tier, key)])  # C x N
    return rank.argmin(0)


def _gather(per_candidate: list[torch.Tensor], choice: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(per_candidate)
    return stacked[choice.to(stacked.device), torch.arange(stacked.shape[1], device=stacked.device)]


def adaptive_pgd(model: ModelWrapper, surrogate: nn.Module, detector: MaskDetector, images: torch.Tensor,
                 labels: torch.Tensor, cfg: AdaptiveConfig, init: torch.Tensor | None = None) -> torch.Tensor:
    """Adversarial images chosen among :func:`adaptive_candidates` by what the surrogate tells the attacker.

    A candidate that succeeds as far as the attacker can tell (misclassified, surrogate score
    under the threshold) beats any other, the smallest perturbation (L2) first; among the rest
    the lowest attack loss wins. :func:`evaluate_adaptive` chooses on the real pipeline instead.
    """
    candidates = adaptive_candidates(model, surrogate, detector, images, labels, cfg, init=init)
    detector_net = detector._fitted()
    x0, y = images.to(model.device).float(), labels.to(model.device)
    tiers, keys = [], []
    with torch.no_grad(), frozen(model), frozen(detector_net), frozen(surrogate):
        for x in candidates:
            loss, margin, score = _losses(model, surrogate, detector_net, x, y, detector.threshold_, cfg)
            ok = (margin < 0) & (score <= detector.threshold_)
            tiers.append((~ok).long())
            keys.append(torch.where(ok, (x - x0).flatten(1).norm(dim=1), loss))
    return _gather(candidates, _choose(tiers, keys)).detach()


@dataclass
class AdaptiveResult:
    eps: float
    steps: int
    restarts: int
    n: int
    success: float  # classifier fooled and the real mask passes the detector
    fooled: float  # classifier fooled (whatever the detector says)
    detected: float  # of the fooled images, fraction the real detector flags
    surrogate_success: float  # success as the attacker's surrogate sees it
    attacked: int | None = None  # images PGD ran on (the rest already succeeded from the warm start)

    def to_dict(self) -> dict[str, float | int]:
        from dataclasses import asdict

        return asdict(self)


class FastPathMaps(nn.Module):
    """The fast path's maps as a differentiable function of the image (classifier -> mask network ->
    perturbed classifier -> maps): a white-box attacker differentiates the real thing, no surrogate.
    The only difference from :meth:`FastPath.maps`: the iteration share is not rounded to whole iterations."""

    deterministic = True

    def __init__(self, fast: FastPath) -> None:
        super().__init__()
        self.explainer, self.inputs = fast.explainer, fast.detector.input_names()
        self.model, self.net = fast.explainer.model, fast.explainer.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        explainer = self.explainer
        probs = self.model(x).float().softmax(1)
        targets = probs.argmax(1)
        low, share = explainer.predict(x, targets, probs)
        masks = explainer.upsample(low, x.shape[-2:])
        after = self.model(explainer.perturb(x, masks)).float().softmax(1)
        pick = targets[:, None]
        budget = explainer.config.iterations
        return detector_maps(self.inputs, masks, images=x, prob_before=probs.gather(1, pick).squeeze(1),
                             prob_after=after.gather(1, pick).squeeze(1), iterations=share * budget, budget=budget)


def fast_path_target(fast: FastPath) -> tuple[nn.Module, Any, Callable[[torch.Tensor], torch.Tensor]]:
    """What a white-box attacker of ``fast`` differentiates, what judges it, and the real maps: the fast
    path's maps and detector, with the classifier's evidence planes (gap, blur shifts) and the margin
    combination when it has one."""
    from ..detector.margin import CombinedDetector, WithEvidence, with_evidence_planes

    maps = FastPathMaps(fast)
    if fast.margin is None:
        return maps, fast.detector, lambda images: fast.maps(images)[0]
    model, margin = fast.explainer.model, fast.margin

    def real(images: torch.Tensor) -> torch.Tensor:
        _, maps, _, evidence = fast.verdict_inputs(images)  # exactly what the deployed verdict reads
        return with_evidence_planes(maps, evidence)

    return WithEvidence(maps, model, margin), CombinedDetector(fast.detector, margin), real


def evaluate_adaptive(model: ModelWrapper, surrogate: nn.Module, detector: MaskDetector, mask_config: MaskConfig,
                      images: torch.Tensor, labels: torch.Tensor, cfg: AdaptiveConfig,
                      init: torch.Tensor | None = None,
                      real_maps: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[AdaptiveResult,
                                                                                             torch.Tensor]:
    """Run the adaptive attack on correctly classified ``images``, judge it on the real pipeline.

    The attacker knows the detector, so it may run the real pipeline (classifier, full mask
    optimisation, detector) on its candidates and keep, per image, one that succeeds there (the
    smallest perturbation first); failing that, a fooling one with the lowest real detector
    score; failing that, the lowest classifier margin. Returns the result and the chosen
    adversarial images (pass them as ``init`` to warm-start a larger eps or a further setting).
    An image whose ``init`` already succeeds on the real pipeline is kept as it is and not attacked
    again (success is all that is counted, so a further run could not change it); ``attacked`` in
    the result says how many were. ``real_maps``: the pipeline's maps of a batch (default: the
    optimised masks of ``mask_config``; the fast path's for an attack on it).
    """
    device = model.device
    x0, y = images.to(device).float(), labels.to(device)
    if real_maps is None:
        explainer = make_explainer(model, mask_config)
        real_maps = lambda x: maps_for_result(detector.input_names(), x, explainer.attribute(x))  # noqa: E731

    def judged(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """tier (0 succeeds, 1 fools the classifier only, 2 neither), key, prediction, real and surrogate score."""
        logits = model.logits(x)
        margin = _margin(logits, y[rows]).cpu()
        real = torch.as_tensor(detector.decision_function(real_maps(x).cpu())).float()
        with torch.no_grad(), frozen(surrogate):
            sur = torch.as_tensor(detector.decision_function(surrogate(x).cpu())).float()
        fooled, passes = margin < 0, real <= detector.threshold_
        tier = torch.where(fooled & passes, 0, torch.where(fooled, 1, 2))
        key = torch.where(fooled & passes, (x - x0[rows]).flatten(1).norm(dim=1).cpu(),
                          torch.where(fooled, real, margin))
        return tier, key, logits.argmax(1).cpu(), real, sur

    everyone = torch.arange(len(x0), device=device)
    if init is None:
        start, settled = None, torch.zeros(len(x0), dtype=torch.bool)
    else:  # the warm start, inside this ball (it may come from a smaller eps)
        start = torch.min(torch.max(init.to(device).float(), x0 - cfg.eps), x0 + cfg.eps).clamp(0, 1)
        kept = judged(start, everyone)
        settled = kept[0] == 0
    rows = (~settled).nonzero().squeeze(1)  # on the CPU; ``on`` indexes tensors on ``device``
    on = rows.to(device)
    adv = x0.clone() if start is None else start.clone()
    out = [torch.zeros(len(x0), dtype=torch.long), torch.zeros(len(x0)), torch.zeros(len(x0))] if start is None \
        else [kept[2].clone(), kept[3].clone(), kept[4].clone()]
    if len(rows):
        sub = replace(cfg, targets=None if cfg.targets is None else cfg.targets.cpu()[rows])
        candidates = adaptive_candidates(model, surrogate, detector, x0[on], y[on], sub,
                                         init=None if start is None else start[on])
        stats = [judged(x, on) for x in (candidates if start is None else candidates[1:])]
        if start is not None:  # candidates[0] is the warm start itself, judged above
            stats.insert(0, tuple(t[rows] for t in kept))
        choice = _choose([s[0] for s in stats], [s[1] for s in stats])
        adv[on] = _gather(candidates, choice)
        for slot, column in enumerate((2, 3, 4)):
            out[slot][rows] = _gather([s[column] for s in stats], choice)
    pred, score, sur_score = out
    fooled = pred != labels.cpu()
    passes = score <= detector.threshold_
    frac = lambda t: float(t.float().mean()) if t.numel() else float("nan")  # noqa: E731
    result = AdaptiveResult(eps=cfg.eps, steps=cfg.steps, restarts=cfg.restarts + (init is not None), n=len(images),
                            success=frac(fooled & passes), fooled=frac(fooled), detected=frac(~passes[fooled]),
                            surrogate_success=frac(fooled & (sur_score <= detector.threshold_)), attacked=len(rows))
    return result, adv.detach().cpu()


def surrogate_pairs(splits: list[Split], rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, maps) pairs a surrogate is fitted to: the clean images of the first split that the classifier
    gets right and every split's successful adversarial images, among ``rows`` (a boolean per image; all)."""
    first = splits[0]
    rows = torch.ones(len(first.labels), dtype=torch.bool) if rows is None else rows
    images, maps = [first.clean[rows & first.correct]], [first.masks_clean[rows & first.correct]]
    for split in splits:
        images.append(split.adv[rows & split.successful])
        maps.append(split.masks_adv[rows & split.successful])
    return torch.cat(images), torch.cat(maps)


def run_adaptive(wrapper, detector: MaskDetector, mask_config: MaskConfig, splits: list[Split], half: int,
                 config: EvaluateConfig, progress: bool, fast: FastPath | None = None) -> dict[str, Any]:
    """Surrogate fitted on the fit half's real masks; PGD on the eval half's correct clean images.

    ``fast``: the detector's fast path, attacked too, white box (gradients through the mask network
    itself), on the same images; its results go under ``"fast_path"``.
    """
    first = splits[0]
    index = torch.arange(len(first.labels))
    images_t, masks_t = surrogate_pairs(splits, index < half)
    if len(images_t) < 20:
        raise AdvDetectError(f"too few images ({len(images_t)}) to fit the adaptive attacker's surrogate; "
                             "raise --n or pass --no-adaptive")
    surrogate, fit_stats = train_surrogate(images_t, masks_t, seed=config.seed, device=wrapper.device,
                                           progress=progress)
    pool = ((index >= half) & first.correct).nonzero().flatten()[:config.adaptive_n]
    x, y = first.clean[pool], first.labels[pool]
    attacked: list[nn.Module] = [surrogate]
    unrolled = ""
    if config.adaptive_unroll:
        from .unrolled import UnrolledMaps

        attacked.append(UnrolledMaps(make_explainer(wrapper, mask_config), detector.input_names(),
                                     unroll=config.adaptive_unroll))
        unrolled = (f"; then the same runs with gradients through the real mask optimisation (warm-started, "
                    f"{config.adaptive_unroll} unrolled steps), starting from the surrogate's best")
    result = {
        "method": "PGD (L-inf) on classifier margin + detector score through a mask surrogate (BPDA-style)"
                  f"{unrolled}; candidates from random restarts and, for each eps, the previous eps's result (as it "
                  "is and as a start); per image the attacker keeps a candidate that succeeds on the real pipeline "
                  "(classifier, full mask optimisation, detector), the smallest perturbation first",
        "surrogate": fit_stats, "n_images": int(len(pool)), "steps": config.adaptive_steps,
        "restarts": config.adaptive_restarts, "targets": config.adaptive_targets, "unroll": config.adaptive_unroll,
        "settings": [list(pair) for pair in config.adaptive_settings],
        **adaptive_sweep(wrapper, attacked, detector, mask_config, x, y, config, progress, None),
    }
    if fast is not None:
        target, judge, real = fast_path_target(fast)
        combined = " combined with the classifier's gap" if fast.margin is not None else ""
        result["fast_path"] = {
            "method": f"PGD (L-inf) on classifier margin + the fast detector's score{combined}, white box: gradients "
                      "through the classifier, the mask network and the perturbed classifier (no surrogate); "
                      "candidates and choice as above, judged on the real fast path",
            **adaptive_sweep(wrapper, target, judge, mask_config, x, y, config, progress, real)}
    return result


def adaptive_sweep(wrapper, surrogate: nn.Module | Sequence[nn.Module], detector: MaskDetector, mask_config: MaskConfig,
                   x: torch.Tensor, y: torch.Tensor, config: EvaluateConfig, progress: bool,
                   real_maps: Callable[[torch.Tensor], torch.Tensor] | None,
                   iterations_check: bool = True) -> dict[str, Any]:
    """The eps sweep (each eps also restarting from the previous one's result), the more-steps and
    more-restarts runs (unless ``iterations_check`` is False: then ``more_iterations`` and ``more_restarts``
    are None) and the sanity checks, for one attacked pipeline: success grows with eps and reaches about
    100%, more steps or restarts add about nothing, and the same PGD on the classifier alone (detector
    term off) fools it on every image at the largest eps. ``surrogate``: what PGD differentiates in place
    of the real maps; several (e.g. the surrogate network and :class:`~.unrolled.UnrolledMaps`) run in
    turn, each keeping the best images so far."""
    from tqdm.auto import tqdm

    attacked = [surrogate] if isinstance(surrogate, nn.Module) else list(surrogate)

    # the multi-targeted runs aim for the classes the classifier ranks next on the clean image
    aims: list[torch.Tensor | None] = [None]
    if config.adaptive_targets:
        aims += list(next_classes(wrapper.logits(x.to(wrapper.device)).cpu(), config.adaptive_targets).T)

    def attack(eps: float, steps: int, restarts: int, init: torch.Tensor | None = None):
        # each (lam, kappa) run in turn, untargeted then each target, each keeping the best images so far:
        # the last result is the best of all
        runs = 0
        for maps in attacked:
            for lam, kappa in config.adaptive_settings:
                for aim in aims:
                    settings = AdaptiveConfig(eps=eps, steps=steps, restarts=restarts, seed=config.seed, lam=lam,
                                              kappa=kappa, targets=aim)
                    result, init = evaluate_adaptive(wrapper, maps, detector, mask_config, x, y, settings, init=init,
                                                     real_maps=real_maps)
                    runs += result.restarts
        return {**result.to_dict(), "restarts": runs, "settings": [list(s) for s in config.adaptive_settings],
                "targets": config.adaptive_targets}, init

    # each eps also restarts from the previous (smaller) eps's result: a larger budget can't do worse
    sweep_results, previous = [], None
    for eps in tqdm(sorted(config.adaptive_eps), desc="adaptive", unit="eps", disable=not progress, leave=False):
        result, previous = attack(eps, config.adaptive_steps, config.adaptive_restarts, init=previous)
        sweep_results.append(result)
    successes = [result["success"] for result in sweep_results]
    largest = max(config.adaptive_eps)
    sanity = {"success_grows_with_eps": all(later >= earlier - 0.02 for earlier, later in zip(successes, successes[1:])),
              "success_at_largest_eps": successes[-1], "more_iterations_gain": None, "more_restarts_gain": None,
              "classifier_alone_at_largest_eps": classifier_alone(wrapper, x, y, largest, config.adaptive_steps,
                                                                  config.adaptive_restarts, config.seed)}
    more_iterations = more_restarts = None
    if iterations_check:  # at the main eps, all three runs from random starts only
        base, _ = attack(config.main_eps, config.adaptive_steps, config.adaptive_restarts)
        more, _ = attack(config.main_eps, 4 * config.adaptive_steps, config.adaptive_restarts)
        more_iterations = {"steps": 4 * config.adaptive_steps, "eps": config.main_eps, "result": more,
                           "baseline_success": base["success"]}
        sanity["more_iterations_gain"] = more["success"] - base["success"]
        wider, _ = attack(config.main_eps, config.adaptive_steps, 4 * config.adaptive_restarts)
        more_restarts = {"restarts": 4 * config.adaptive_restarts, "eps": config.main_eps, "result": wider,
                         "baseline_success": base["success"]}
        sanity["more_restarts_gain"] = wider["success"] - base["success"]
    return {"sweep": sweep_results, "more_iterations": more_iterations, "more_restarts": more_restarts,
            "sanity": sanity}
