"""The fast path: a detector that reads amortized masks (one network pass) instead of optimised ones.

A fast path is a trained :class:`~advdetect.masks.amortized.MaskNet` plus a :class:`MaskDetector`
fitted and calibrated on the maps it gives (the same ``inputs`` as the exact detector: masks,
residual, confidence). It lives in ``<detector>/fast/``: ``mask_net.safetensors`` +
``mask_net.json`` and a detector saved the usual way (``detector.json`` + safetensors).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .detector import MaskDetector, load_detector, save_detector
from .detector.inputs import maps_for_result
from .detector.margin import MarginCombination
from .masks import MaskConfig, MaskResult
from .errors import AdvDetectError, OptionError
from .masks.amortized import AmortizedMasks, load_mask_net, save_mask_net
from .masks.parameterization import low_res_shape
from .models.wrapper import ModelWrapper, eval_mode

FAST_DIR = "fast"
MARGIN_FILE = "margin.json"


@dataclass
class FastPath:
    """A mask network and the detector fitted on its maps."""

    explainer: AmortizedMasks
    detector: MaskDetector
    margin: MarginCombination | None = None  # the detector's score combined with the classifier's gap

    @property
    def threshold(self) -> float:
        """The calibrated threshold of the verdict's score (the combination's, when there is one)."""
        return self.margin.threshold_ if self.margin is not None else self.detector.threshold_

    @property
    def calibration_fpr(self) -> float:
        return self.margin.calibration_fpr_ if self.margin is not None else self.detector.calibration_fpr_

    def maps(self, images: torch.Tensor, probs: torch.Tensor | None = None) -> tuple[torch.Tensor, MaskResult]:
        """The detector's maps for ``images`` and the amortized mask result they come from."""
        return amortized_maps(self.explainer, self.detector.input_names(), images, probs=probs)

    def scores(self, images: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        """The verdict's scores of ``images`` (compare with :attr:`threshold`)."""
        maps, _ = self.maps(images, probs)
        return self.combine(torch.as_tensor(self.detector.decision_function(maps)), images)

    def combine(self, scores: torch.Tensor, images: torch.Tensor, logits: torch.Tensor | None = None,
                evidence: torch.Tensor | None = None) -> torch.Tensor:
        """The detector's ``scores`` of ``images``, combined with the classifier's gap (and blur shifts) when
        there is a :class:`MarginCombination` (``logits``: the classifier's on ``images``, ``evidence``: the
        combination's, when already computed, e.g. by :meth:`logits_and_evidence`)."""
        if self.margin is None:
            return scores
        if evidence is None:
            model = self.explainer.model
            with torch.no_grad(), eval_mode(model):
                evidence = self.margin.evidence(model, images.to(model.device),
                                                None if logits is None else logits.to(model.device))
        return torch.as_tensor(self.margin.decision_function(scores, evidence.cpu()))

    def verdict_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MaskResult,
                                                            torch.Tensor | None]:
        """What a verdict reads, computed as a verdict computes it: the classifier's logits and the
        combination's evidence (:meth:`logits_and_evidence`), then the detector's maps and their mask result
        from the mask network reading those probabilities. The deployed verdict (``inference.judge``) and the
        white-box attacker's real judge both take it from here, so they cannot drift apart (logits move with a
        call's batch size at ~1e-6 on some CPUs)."""
        logits, evidence = self.logits_and_evidence(images)
        maps, result = self.maps(images, probs=logits.softmax(1).to(images.device))
        return logits, maps, result, evidence

    def logits_and_evidence(self, images: torch.Tensor,
                            batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classifier's logits of ``images`` and the combination's evidence (None without one): with a
        combination, a small batch and its shifted copies go through the classifier in one call (at most
        ``batch_size`` images of ``images`` at a time)."""
        model = self.explainer.model
        if self.margin is None or len(images) == 0:
            return model.logits(images, batch_size), None
        parts = []
        with torch.no_grad(), eval_mode(model):
            for start in range(0, len(images), batch_size):
                parts.append(self.margin.logits_and_evidence(model, images[start:start + batch_size].to(model.device)))
        return torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts])


def amortized_maps(explainer: AmortizedMasks, inputs: Sequence[str], images: torch.Tensor, batch_size: int = 512,
                   probs: torch.Tensor | None = None) -> tuple[torch.Tensor, MaskResult]:
    """Maps (N x C x 32 x 32) of ``inputs`` from amortized masks, in batches, and the concatenated result."""
    maps, results = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        result = explainer.attribute(x, probs=None if probs is None else probs[start:start + batch_size])
        maps.append(maps_for_result(inputs, x, result))
        results.append(result)
    cat = MaskResult(*(torch.cat([getattr(r, name) for r in results]) for name in
                       ("masks", "targets", "prob_before", "prob_after", "iterations")), config=explainer.config)
    return torch.cat(maps), cat


def save_fast_path(detector_dir: str | os.PathLike, fast: FastPath, classifier: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> Path:
    """Write the fast path under ``<detector_dir>/fast/``."""
    from .storage import write_json

    directory = Path(detector_dir) / FAST_DIR
    save_mask_net(directory, fast.explainer.net, extra={"mask_config": fast.explainer.config.to_dict()})
    save_detector(directory, fast.detector, classifier, fast.explainer.config, extra=extra)
    if fast.margin is not None:
        write_json(directory / MARGIN_FILE, fast.margin.to_dict())
    else:  # an earlier fast path's combination would judge with this detector's scores
        (directory / MARGIN_FILE).unlink(missing_ok=True)
    return directory


def has_fast_path(detector_dir: str | os.PathLike) -> bool:
    return (Path(detector_dir) / FAST_DIR / "detector.json").is_file()


def load_fast_path(detector_dir: str | os.PathLike, model: ModelWrapper) -> FastPath:
    """The fast path of a detector, for ``model`` (checked to be the classifier it was trained with)."""
    directory = Path(detector_dir) / FAST_DIR
    detector, meta = load_detector(directory, classifier=model.info.identity(), device=str(model.device))
    net, _ = load_mask_net(directory, device=model.device)
    config = MaskConfig.from_dict(meta["mask_config"])
    info = model.info
    want = (len(info.mean), info.num_classes, low_res_shape(tuple(info.input_size), config.upsample))
    have = (net.spec.in_channels, net.spec.num_classes, net.spec.low_shape)
    if have != want:
        raise AdvDetectError(f"{directory}: the mask network takes {have[0]} channels, {have[1]} classes and writes "
                             f"{have[2]} masks; {info.name} needs {want}; the fast path belongs to another model")
    return FastPath(AmortizedMasks(model, net, config), detector, load_margin(directory))


def load_margin(directory: Path) -> MarginCombination | None:
    """The fast path's :class:`MarginCombination` (``margin.json``, plain JSON), if it has one."""
    from .storage import read_json

    path = directory / MARGIN_FILE
    if not path.is_file():
        return None
    try:
        return MarginCombination.from_dict(read_json(path))
    except ValueError as exc:
        raise AdvDetectError(f"{path}: {exc}; retrain the detector") from None


IMAGE_BUDGET = 2**30  # bytes of training images the mask network learns from (sampled beyond that)


@dataclass
class FastSet:
    """Images of stored attack sets with their optimised masks (pooled to the mask's cells) and iterations
    (N x 0 masks and zero iterations when read without them: :func:`read_attack_images`)."""

    images: torch.Tensor
    masks: torch.Tensor
    iterations: torch.Tensor
    usable: torch.Tensor  # bool: counts for the detector (correct clean image, or successful attack)
    adversarial: torch.Tensor  # bool
    attack: torch.Tensor  # int: which set each image came from


def read_fast_set(directories: Sequence[Path], kind: str, pool: tuple[int, int], keep: Sequence[torch.Tensor],
                  clean_from_first: bool = True, adversarial: bool = True, chunk: int = 512) -> FastSet:
    """Clean images of the first set (when ``clean_from_first``) and every set's adversarial images (when
    ``adversarial``), where ``keep[i]`` (bool per image of set i) says so; read a chunk at a time."""
    from .splits import AttackSetReader, load_mask_set, successful_attacks

    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("images", "masks", "iterations", "usable", "adv", "set")}
    size = pool[0] if pool[0] == pool[1] else None
    for number, directory in enumerate(directories):
        reader = AttackSetReader(directory)
        sides = (("clean",) if clean_from_first and number == 0 else ()) + (("adv",) if adversarial else ())
        masks = load_mask_set(directory, kind, [f"{s}_{f}" for s in sides for f in ("mask", "iterations")], pool=size)
        chosen = keep[number]
        for start in range(0, reader.n, chunk):
            stop = min(start + chunk, reader.n)
            rows = reader.rows(start, stop)
            picked = chosen[start:stop]
            for side in sides:
                parts["images"].append(rows[side][picked])
                mask = masks[f"{side}_mask"][start:stop][picked]
                parts["masks"].append(mask if size else torch.nn.functional.adaptive_avg_pool2d(mask, pool))
                parts["iterations"].append(masks[f"{side}_iterations"][start:stop][picked])
                good = rows["clean_pred"] == rows["labels"] if side == "clean" else \
                    successful_attacks(rows["labels"], rows["clean_pred"], rows["adv_pred"])
                parts["usable"].append(good[picked])
                parts["adv"].append(torch.full((int(picked.sum()),), side == "adv"))
                parts["set"].append(torch.full((int(picked.sum()),), number))
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return FastSet(cat["images"], cat["masks"], cat["iterations"], cat["usable"], cat["adv"], cat["set"])


def read_attack_images(directories: Sequence[Path], budget: int | None = None, seed: int = 0,
                       chunk: int = 512) -> FastSet:
    """Correct clean images of the first attack set and successful attacks of each (no masks: sets the
    fast path's detector fits on beyond the masked ones); when the sets hold more than ``budget`` images
    (the first set's clean ones counted too), the same seeded share of each."""
    from .splits import AttackSetReader, successful_attacks

    readers = [AttackSetReader(d) for d in directories]
    total = sum(r.n for r in readers) + (readers[0].n if readers else 0)
    share = 1.0 if budget is None or total <= budget else budget / total
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("images", "adv", "set")}
    for number, reader in enumerate(readers):
        for start in range(0, reader.n, chunk):
            rows = reader.rows(start, min(start + chunk, reader.n))
            picked = torch.rand(len(rows["labels"]), generator=gen) < share
            correct = rows["clean_pred"] == rows["labels"]
            sides = [("adv", successful_attacks(rows["labels"], rows["clean_pred"], rows["adv_pred"]))]
            for side, good in ([("clean", correct)] if number == 0 else []) + sides:
                chosen = good & picked
                parts["images"].append(rows[side][chosen])
                parts["adv"].append(torch.full((int(chosen.sum()),), side == "adv"))
                parts["set"].append(torch.full((int(chosen.sum()),), number))
    cat = {k: torch.cat(v) for k, v in parts.items()}
    n = len(cat["images"])
    return FastSet(cat["images"], torch.zeros(n, 0), torch.zeros(n), torch.ones(n, dtype=torch.bool), cat["adv"],
                   cat["set"])


def train_fast_path(model: ModelWrapper, config: MaskConfig, detector: MaskDetector, fit_dirs: Sequence[Path],
                    fit_keep: Sequence[torch.Tensor], calibration: FastSet | None = None,
                    settings: Any = None, seed: int = 0, progress: bool = False,
                    hardening: Any = None, margin: MarginCombination | None = None,
                    extra_dirs: Sequence[Path] = ()) -> FastPath:
    """A mask network trained on the fitting images of ``fit_dirs`` (clean of the first, adversarial of each;
    ``fit_keep``: which images fit) and ``detector`` (unfitted, with the exact detector's parameters) fitted
    on its maps (correct clean vs successful attacks, balanced over the attacks) and calibrated on the
    clean images of ``calibration``. ``extra_dirs`` (attack sets without masks, one per attack of
    ``fit_dirs``, in the same order): further images the detector and the margin combination fit on (the
    mask network's maps need no optimised masks). ``hardening`` (a
    :class:`~advdetect.hardening.HardeningConfig`): then adversarially train that detector against the
    white-box adaptive attacker. ``margin`` (an unfitted, configured :class:`MarginCombination`): then
    combine its score with the classifier's evidence as that combination says (:func:`fit_margin`; needs
    ``calibration``)."""
    from .masks.amortized import mask_net_for
    from .masks.amortized_training import MaskNetFit, fit_mask_net
    from .masks.parameterization import low_res_shape

    if margin is not None and calibration is None:
        raise OptionError("the margin combination is calibrated on clean images the detector never fitted on: "
                          "give calibration images")
    if extra_dirs and len(extra_dirs) != len(fit_dirs):
        raise ValueError(f"extra_dirs needs one attack set per fitting set ({len(fit_dirs)}), got {len(extra_dirs)}")
    settings = settings or MaskNetFit(seed=seed)
    pool = low_res_shape(tuple(model.info.input_size), config.upsample)
    per_image = 4 * len(model.info.mean) * model.info.input_size[0] * model.info.input_size[1]
    budget = max(512, IMAGE_BUDGET // per_image)
    total = sum(int(k.sum()) for k in fit_keep) + int(fit_keep[0].sum())
    gen = torch.Generator().manual_seed(seed)
    if total > budget:  # the same share of every set
        keep = [k & (torch.rand(k.shape, generator=gen) < budget / total) for k in fit_keep]
    else:
        keep = list(fit_keep)
    data = read_fast_set(fit_dirs, config.kind, pool, keep)
    device = model.device
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = mask_net_for(model.info, config).to(device)
    fit_mask_net(model, net, data.images.to(device), config, teacher_masks=data.masks,
                 teacher_iterations=data.iterations, settings=settings, progress=progress)
    fast = FastPath(AmortizedMasks(model, net, config), detector)
    images, usable, adversarial, attack = data.images, data.usable, data.adversarial, data.attack
    if extra_dirs:  # within the same memory budget as the masked images
        more = read_attack_images(extra_dirs, budget, seed + 1)
        images, usable = torch.cat([images, more.images]), torch.cat([usable, more.usable])
        adversarial, attack = torch.cat([adversarial, more.adversarial]), torch.cat([attack, more.attack])
    maps, _ = fast.maps(images.to(device))
    maps = maps.cpu()
    clean = usable & ~adversarial
    adv_sets = [maps[usable & adversarial & (attack == i)] for i in range(len(fit_dirs))]
    cal_maps = None
    if calibration is not None:
        cal_maps, _ = fast.maps(calibration.images.to(device))
        cal_maps = cal_maps.cpu()[calibration.usable]
    fit_fast_detector(detector, maps[clean], adv_sets, cal_maps, seed)
    if hardening is not None and hardening.rounds:
        from .hardening import harden_fast_path

        fast = harden_fast_path(fast, images[clean], maps[clean], adv_sets, cal_maps, hardening, progress)
    if margin is not None:
        fast.margin = fit_margin(fast, images[usable], maps[usable], adversarial[usable],
                                 calibration.images[calibration.usable], cal_maps, margin)
    return fast


def fit_margin(fast: FastPath, images: torch.Tensor, maps: torch.Tensor, adversarial: torch.Tensor,
               clean_images: torch.Tensor, clean_maps: torch.Tensor, config: MarginCombination | None = None,
               batch_size: int = 512) -> MarginCombination:
    """A :class:`MarginCombination` configured as ``config`` (default: the gap alone) of ``fast``'s detector
    score and the classifier's evidence, fitted on ``images`` (their ``maps``; ``adversarial``: bool per
    image) and calibrated, at the detector's rate, on ``clean_images`` (their ``clean_maps``), which the
    detector never fitted on (one threshold, or one per predicted class with ``per_class``). ``config`` is
    left as it was."""
    model = fast.explainer.model
    params = (config or MarginCombination()).get_params()
    combination = MarginCombination(**(params | {"fpr": getattr(fast.detector, "calibration_fpr_",
                                                                fast.detector.fpr)}))

    def evidence(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), eval_mode(model):
            return torch.cat([combination.evidence(model, x[i:i + batch_size].to(model.device)).cpu()
                              for i in range(0, len(x), batch_size)])

    combination.fit(fast.detector.decision_function(maps), evidence(images), adversarial.long().numpy())
    return combination.calibrate(fast.detector.decision_function(clean_maps), evidence(clean_images),
                                 n_classes=model.info.num_classes)


def fit_fast_detector(detector: MaskDetector, clean: torch.Tensor, adv_sets: Sequence[torch.Tensor],
                      calibration: torch.Tensor | None, seed: int, adaptive: torch.Tensor | None = None,
                      adaptive_share: float = 0.5) -> MaskDetector:
    """Fit ``detector`` on clean maps against as many adversarial ones: drawn equally from ``adv_sets``,
    and, when ``adaptive`` maps are given, ``adaptive_share`` of them from those; calibrate it on
    ``calibration`` (clean maps of images it never fitted on). Returns it."""
    from .splits import balanced

    n_adaptive = 0 if adaptive is None else min(len(adaptive), round(len(clean) * adaptive_share))
    adv = balanced(list(adv_sets), len(clean) - n_adaptive, seed)
    if n_adaptive:
        gen = torch.Generator().manual_seed(seed + 1)
        adv = torch.cat([adv, adaptive[torch.randperm(len(adaptive), generator=gen)[:n_adaptive]]])
    detector.fit(torch.cat([clean, adv]), torch.cat([torch.zeros(len(clean)), torch.ones(len(adv))]))
    if calibration is not None:
        detector.calibrate(calibration)
    return detector


def fast_metrics(fast: FastPath, clean: torch.Tensor, adv: torch.Tensor) -> dict[str, Any]:
    """Detection metrics of the fast path's verdict on held-out clean images (correct) and attacks
    (successful), with the clean images flagged per predicted class."""
    import numpy as np

    from .detector import detection_metrics
    from .detector.metrics import fpr_per_class

    model = fast.explainer.model
    c, a = fast.scores(clean).numpy(), fast.scores(adv).numpy()
    out: dict[str, Any] = detection_metrics(np.r_[np.zeros(len(c)), np.ones(len(a))], np.r_[c, a], fast.threshold)
    if len(c):
        classes = model.predict(clean).cpu().numpy()
        out["fpr_per_class"] = fpr_per_class(c, classes, fast.threshold, list(model.info.classes))
        out["max_class_fpr"] = max(out["fpr_per_class"].values())
    return out
