"""The security evaluation: attack sweep, baselines, transfer matrix, adaptive attack.

Layout of ``out/``::

    report.json  report.html  report.md     the report (see report.py)
    work/<attack>-<eps>/ (+ masks/)          attack sets on CIFAR-10 test images, resumable

Splits. The deployed detector (trained on training images, calibrated on test images after its
``n_eval`` held-out ones, or on training images) is evaluated on the first ``n`` of the same
held-out test images (so ``n`` may not exceed the detector's ``n_eval`` when the seeds match).
The transfer matrix, the baselines and the adaptive attacker's surrogate need training data of
their own, so the test images are split by index: the first half fits, the second half is
evaluated; every method uses the same halves. Baselines run on the first ``n_baseline`` images
(same rule, halves of that subset).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import numpy as np
import torch

from ..attacks import LINF_ATTACKS, AttackConfig, parse_eps
from ..attackset import generate_attack_set, load_attack_set
from ..data import CIFAR10_SIZES, load_dataset, shared_images, subset_record
from ..detector import MaskDetector, detection_metrics, tpr_at_fpr
from ..detector.io import library_versions
from ..distributed import context, single_process
from ..errors import AdvDetectError, UnknownNameError, OptionError
from ..masks import MaskConfig, make_explainer
from ..masks.config import METHODS as MASK_METHODS
from ..maskset import compute_mask_set, load_mask_set
from ..recovery import PAPER_RECOVERY, RecoveryConfig, recover, recovery_metrics
from .adaptive import AdaptiveConfig, evaluate_adaptive, train_surrogate
from .heatmaps import METHODS, heatmaps
from .report import json_safe

log = logging.getLogger(__name__)

ALL_ATTACKS = ("fgsm", "bim", "pgd", "mifgsm", "cw", "deepfool")
THREAT_MODEL = (
    "The defender deploys the classifier behind the mask detector: an input whose "
    "meaningful-perturbation mask the detector flags is rejected (and its label recovered: "
    "see the recovery settings). Attackers perturb CIFAR-10 test images within an L-inf ball of "
    "radius eps (FGSM, BIM, PGD, MI-FGSM; CW-L2 and DeepFool are unbounded minimal-perturbation "
    "attacks). Non-adaptive attackers know the classifier (white box) but not the detector. The "
    "adaptive attacker knows the classifier, the detector's weights and threshold and the mask "
    "algorithm, and attacks both jointly (PGD through a learned surrogate of the mask optimisation, "
    "BPDA-style) and checks its candidates on the real pipeline. An attack succeeds when the "
    "classifier is wrong and the detector does not flag the image; detection rates count successful adversarial images only, false positives count "
    "correctly classified clean images."
)


@dataclass
class EvaluateConfig:
    """What ``advdetect evaluate`` runs; every field is recorded in report.json."""

    attacks: tuple[str, ...] = ALL_ATTACKS
    eps: tuple[float, ...] = (4 / 255, 8 / 255)
    n: int = 1000
    n_baseline: int = 500
    baselines: tuple[str, ...] = METHODS
    adaptive: bool = True
    adaptive_n: int = 100
    adaptive_eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255)
    adaptive_steps: int = 40
    adaptive_restarts: int = 1
    gallery: int = 6
    methods: tuple[str, ...] = ()  # mask methods to compare with the detector's (extremal, robust)
    n_methods: int = 200
    seed: int = 0
    batch_size: int = 256
    shard_size: int = 512

    def __post_init__(self) -> None:
        for name in self.attacks:
            AttackConfig(name)  # unknown names -> UnknownNameError with the choices
        for name in self.baselines:
            if name not in METHODS:
                raise UnknownNameError("baseline", name, list(METHODS))
        if not self.attacks:
            raise OptionError("give at least one attack")
        if not self.eps:
            raise OptionError("give at least one eps")
        if self.n < 8:
            raise OptionError(f"n must be at least 8 (it is split in halves), got {self.n}")
        for name in self.methods:
            if name not in MASK_METHODS:
                raise UnknownNameError("mask method", name, list(MASK_METHODS))
        if self.n_baseline > self.n or self.n_methods > self.n or self.adaptive_n > self.n // 2:
            raise OptionError("n_baseline and n_methods must be <= n and adaptive_n <= n / 2 (the adaptive attack "
                             "uses the evaluation half)")

    @property
    def main_eps(self) -> float:
        return max(self.eps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def eps_tag(eps: float) -> str:
    """8/255 -> '8/255' (a multiple of 1/255 reads as one), else the float."""
    frac = Fraction(eps).limit_denominator(255)
    return f"{frac.numerator}/{frac.denominator}" if frac.denominator == 255 and abs(float(frac) - eps) < 1e-9 \
        else f"{eps:g}"


@dataclass(frozen=True)
class Spec:
    """One attack set of the sweep."""

    attack: str
    eps: float | None  # None: unbounded attacks (cw, deepfool)

    @property
    def key(self) -> str:
        return self.attack if self.eps is None else f"{self.attack}@{eps_tag(self.eps)}"

    @property
    def dirname(self) -> str:
        return self.key.replace("@", "-").replace("/", "-")

    def config(self) -> AttackConfig:
        return AttackConfig(self.attack) if self.eps is None else AttackConfig(self.attack, eps=self.eps)


def sweep(config: EvaluateConfig) -> list[Spec]:
    specs = []
    for name in config.attacks:
        if name in LINF_ATTACKS:
            specs += [Spec(name, e) for e in sorted(config.eps)]
        else:
            specs.append(Spec(name, None))
    return specs


def main_specs(config: EvaluateConfig) -> list[Spec]:
    """One set per attack: the largest eps for L-inf attacks."""
    return [s for s in sweep(config) if s.eps is None or s.eps == config.main_eps]


@dataclass
class SetData:
    spec: Spec
    clean: torch.Tensor
    adv: torch.Tensor
    labels: torch.Tensor
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    clean_mask: torch.Tensor
    adv_mask: torch.Tensor
    manifest: dict[str, Any]
    rec_clean_mask: torch.Tensor | None = None  # deletion masks for recovery (None: the masks above)
    rec_adv_mask: torch.Tensor | None = None

    @property
    def correct(self) -> torch.Tensor:
        return self.clean_pred == self.labels

    @property
    def success(self) -> torch.Tensor:
        return self.correct & (self.adv_pred != self.labels)


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.time() - start, 1)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time (and log) one stage of the evaluation."""
        log.info("evaluation stage: %s", name)
        start = time.time()
        try:
            yield
        finally:
            self.add(name, start)


def run_evaluation(detector_dir: str | os.PathLike, out: str | os.PathLike, config: EvaluateConfig | None = None,
                   data_dir: str | os.PathLike | None = None, device: str = "auto",
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate the detector in ``detector_dir``; write report.{json,html,md} under ``out``; return the report."""
    from ..inference import _setup, recovery_config, recovery_settings

    config = config or EvaluateConfig()
    start_all = time.time()
    timer = Timer()
    out = Path(out)
    wrapper, detector, meta, mask_config = _setup(detector_dir, None, device)
    rec_config = recovery_config(meta, mask_config)
    recovery = recovery_settings(meta)
    check_unseen(meta, subset_record("test", config.n, config.seed + 1), config)

    ctx = context()
    with timer.stage("attacks_and_masks"):  # shared by every rank under torchrun, shard by shard
        data = load_dataset("cifar10", split="test", n=config.n, seed=config.seed + 1, data_dir=data_dir,
                            progress=progress)
        directories, first = {}, None
        for spec in sweep(config):
            directory = out / "work" / spec.dirname
            generate_attack_set(wrapper, data, spec.config(), directory, batch_size=config.batch_size,
                                seed=config.seed, progress=progress,
                                data_description={"dataset": "cifar10", "split": "test", "n": config.n,
                                                  "seed": config.seed + 1})
            for cfg in dict.fromkeys([mask_config, rec_config]):  # detection masks, and deletion masks to recover
                compute_mask_set(wrapper, directory, config=cfg, progress=progress, reuse_clean_from=first,
                                 shard_size=config.shard_size)
            first = first or directory
            directories[spec.key] = (spec, directory)
    if not ctx.is_main:  # the rest is rank 0's alone: the other ranks are done
        log.info("rank %d: attack sets and masks done; rank 0 writes the report", ctx.rank)
        return {"rank": ctx.rank, "out": str(out)}
    with single_process():
        return _report(detector_dir, out, config, wrapper, detector, meta, mask_config, rec_config, recovery,
                       directories, timer, start_all, progress)


def _report(detector_dir, out: Path, config: EvaluateConfig, wrapper, detector: MaskDetector, meta: dict[str, Any],
            mask_config: MaskConfig, rec_config: MaskConfig, recovery: RecoveryConfig,
            directories: dict[str, tuple[Spec, Path]], timer: Timer, start_all: float,
            progress: bool) -> dict[str, Any]:
    """Everything after the shared attack and mask stages, in one process: metrics, comparisons, report files."""
    from .report import write_reports

    sets: dict[str, SetData] = {}
    for key, (spec, directory) in directories.items():
        s, m = load_attack_set(directory), load_mask_set(directory, mask_config.kind)
        r = m if rec_config.kind == mask_config.kind else load_mask_set(directory, rec_config.kind)
        sets[key] = SetData(spec, s.clean, s.adv, s.labels, s.clean_pred, s.adv_pred, m["clean_mask"],
                            m["adv_mask"], s.manifest, r["clean_mask"], r["adv_mask"])

    with timer.stage("detector_metrics"):
        any_set = next(iter(sets.values()))
        clean_scores = detector.decision_function(any_set.clean_mask)
        correct = any_set.correct.numpy()
        clean_section = {"n": int(len(any_set.labels)), "accuracy": float(correct.mean()),
                         "detector_fpr": float((clean_scores[correct] > detector.threshold_).mean()),
                         "threshold": detector.threshold_, "calibration_fpr": detector.calibration_fpr_,
                         "calibrated_on": meta.get("calibrated_on", "train")}
        per_attack = {key: _set_metrics(wrapper, detector, rec_config, recovery, sd, clean_scores)
                      for key, sd in sets.items()}

    half = config.n // 2
    main_sets = [sets[s.key] for s in main_specs(config)]
    with timer.stage("transfer_matrix"):
        transfer = _transfer_matrix(main_sets, half, config.seed)
    with timer.stage("baselines"):
        baselines = _baselines(wrapper, main_sets, config, timer)
    methods = None
    if config.methods:
        with timer.stage("mask_methods"):
            methods = _method_comparison(wrapper, mask_config, main_sets, config)
    adaptive = None
    if config.adaptive:
        with timer.stage("adaptive"):
            adaptive = _adaptive(wrapper, detector, mask_config, list(sets.values()), half, config, progress)

    gallery_set = sets[main_specs(config)[0].key] if "bim" not in config.attacks else \
        sets[Spec("bim", config.main_eps).key]
    gallery, pictures = _gallery(gallery_set, detector, config.gallery)
    report = {
        "format": "advdetect.report/1",
        "out": str(out),
        "title": f"Security evaluation of {Path(detector_dir).name} on {wrapper.info.name}",
        "threat_model": THREAT_MODEL,
        "detector": {"path": str(detector_dir), "classifier": meta["classifier"],
                     "trained_on": meta.get("attacks"), "threshold": detector.threshold_,
                     "calibration_fpr": detector.calibration_fpr_, "mask_config": mask_config.to_dict(),
                     "recovery_config": rec_config.to_dict(), "recovery": recovery.to_dict()},
        "config": config.to_dict(),
        "splits": {"detector": f"all {config.n} test images (seed {config.seed + 1})",
                   "fit_half": f"test images 0..{half - 1}", "eval_half": f"test images {half}..{config.n - 1}",
                   "baselines": f"the first {config.n_baseline} test images, halves of those"},
        "clean": clean_section,
        "attacks": per_attack,
        "transfer": transfer,
        "baselines": baselines,
        "adaptive": adaptive,
        "mask_methods": methods,
        "gallery": gallery,
        "versions": {**library_versions(), "platform": platform.platform()},
        "seeds": {"evaluation": config.seed, "images": config.seed + 1},
        "device": str(wrapper.device),
        "timings": {**timer.seconds, "total": round(time.time() - start_all, 1)},
    }
    report = json_safe(report)
    write_reports(out, report, pictures, classes=list(wrapper.info.classes))
    return report


def reserved_images(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The images a detector was fitted and calibrated on (detector.json's ``images``).

    Detectors from before that record are reconstructed from their seed: calibrated on test
    images, they used some of those after their ``n_eval`` held-out ones in the seeded order,
    so every test image after those counts as reserved.
    """
    if isinstance(meta.get("images"), dict):
        return [meta["images"][k] for k in ("fit", "calibration") if isinstance(meta["images"].get(k), dict)]
    if meta.get("calibrated_on") == "test" and isinstance(meta.get("seed"), int) and isinstance(meta.get("n_eval"), int):
        return [subset_record("test", CIFAR10_SIZES["test"] - meta["n_eval"], meta["seed"] + 1, offset=meta["n_eval"])]
    return []


def check_unseen(meta: dict[str, Any], images: dict[str, Any], config: EvaluateConfig) -> None:
    """Refuse to evaluate on images the detector was fitted or calibrated on (compared by identity)."""
    shared = shared_images(reserved_images(meta), images)
    if shared:
        raise AdvDetectError(f"{len(shared)} of the {config.n} evaluation images (--n {config.n}, --seed "
                             f"{config.seed}) were used to fit or calibrate this detector; use --n "
                             f"{meta.get('n_eval')} or fewer with --seed {meta.get('seed')}: its held-out images")


def _set_metrics(wrapper, detector: MaskDetector, rec_config: MaskConfig, recovery: RecoveryConfig, sd: SetData,
                 clean_scores: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import roc_curve

    correct, success = sd.correct.numpy(), sd.success.numpy()
    adv_scores = detector.decision_function(sd.adv_mask)
    labels = np.r_[np.zeros(correct.sum()), np.ones(success.sum())]
    scores = np.r_[clean_scores[correct], adv_scores[success]]
    det = detection_metrics(labels, scores, detector.threshold_) if success.any() else {}
    flagged = torch.as_tensor(clean_scores > detector.threshold_)
    rec_clean = sd.clean_mask if sd.rec_clean_mask is None else sd.rec_clean_mask
    rec_adv = sd.adv_mask if sd.rec_adv_mask is None else sd.rec_adv_mask
    rec = recovery_metrics(wrapper, sd.clean, sd.adv, sd.labels, sd.clean_pred, sd.adv_pred, rec_clean, rec_adv,
                           clean_flagged=flagged, mask_config=rec_config, recovery=recovery,
                           adv_flagged=torch.as_tensor(adv_scores > detector.threshold_)).to_dict()
    roc = {}
    if success.any():
        fpr, tpr, _ = roc_curve(labels, scores)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).round().astype(int))
        roc = {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}
    undetected = success & (adv_scores <= detector.threshold_)
    return {
        "attack": sd.spec.attack, "eps": sd.spec.eps, "params": sd.manifest["job"]["attack"],
        "attack_success": sd.manifest["metrics"]["success_rate"],
        "detection_rate": det.get("tpr_at_threshold", float("nan")),
        "roc_auc": det.get("roc_auc", float("nan")), "tpr_at_5fpr": det.get("tpr_at_5fpr", float("nan")),
        "tpr_at_1fpr": det.get("tpr_at_1fpr", float("nan")), "accuracy": det.get("accuracy", float("nan")),
        "success_against_detector": float(undetected.sum() / max(correct.sum(), 1)),
        "recovery_top1": rec["recovery_top1"], "recovery_top5": rec["recovery_top5"],
        "recovery_ground_truth": rec["recovery_ground_truth"],
        "recovery_ground_truth_top5": rec["recovery_ground_truth_top5"],
        "mask_recovery_top1": rec["mask_recovery_top1"], "mask_recovery_top5": rec["mask_recovery_top5"],
        "flagged_recovery_top1": rec["flagged_recovery_top1"], "flagged_recovery_top5": rec["flagged_recovery_top5"],
        "pipeline_recovery_top1": rec["pipeline_recovery_top1"],
        "harm": rec["harm"], "n_clean": int(correct.sum()), "n_adversarial": int(success.sum()), "roc": roc,
        "scores": {"clean": [float(v) for v in clean_scores[correct]],  # what roc_auc and the rates come from
                   "adversarial": [float(v) for v in adv_scores[success]]},
    }


def _fit_eval(fit_clean: torch.Tensor, fit_adv: torch.Tensor, seed: int) -> MaskDetector:
    X = torch.cat([fit_clean, fit_adv])
    y = torch.cat([torch.zeros(len(fit_clean)), torch.ones(len(fit_adv))])
    return MaskDetector(seed=seed, epochs=30, patience=5).fit(X, y)


def _auc_tpr(det: MaskDetector, clean: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    if len(adv) == 0 or len(clean) == 0:
        return {"roc_auc": float("nan"), "tpr_at_5fpr": float("nan"), "n_clean": len(clean), "n_adversarial": len(adv)}
    scores = np.r_[det.decision_function(clean), det.decision_function(adv)]
    labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    return {"roc_auc": float(roc_auc_score(labels, scores)), "tpr_at_5fpr": tpr_at_fpr(labels, scores, 0.05),
            "n_clean": int(len(clean)), "n_adversarial": int(len(adv))}


def _halves(sd: SetData, maps_clean: torch.Tensor, maps_adv: torch.Tensor, half: int, limit: int | None = None):
    """(fit clean, fit adv, eval clean, eval adv) maps by image index."""
    n = limit or len(sd.labels)
    idx = torch.arange(len(sd.labels))
    fit, ev = idx < half, (idx >= half) & (idx < n)
    c, s = sd.correct, sd.success
    return maps_clean[fit & c], maps_adv[fit & s], maps_clean[ev & c], maps_adv[ev & s]


def _transfer_matrix(sets: list[SetData], half: int, seed: int) -> dict[str, Any]:
    """Detector trained on attack A's fit half, tested on attack B's eval half (mask maps)."""
    rows: dict[str, dict[str, Any]] = {}
    for a in sets:
        fc, fa, _, _ = _halves(a, a.clean_mask, a.adv_mask, half)
        if len(fa) < 2 or len(fc) < 2:
            continue
        det = _fit_eval(fc, fa, seed)
        rows[a.spec.key] = {}
        for b in sets:
            _, _, ec, ea = _halves(b, b.clean_mask, b.adv_mask, half)
            rows[a.spec.key][b.spec.key] = _auc_tpr(det, ec, ea)
    return {"trained_on": list(rows), "tested_on": [s.spec.key for s in sets], "matrix": rows,
            "note": "ROC-AUC and TPR at 5% FPR of a discriminator fitted on the fit half of the row's attack, "
                    "on the evaluation half of the column's attack"}


def _baselines(wrapper, sets: list[SetData], config: EvaluateConfig, timer: Timer) -> dict[str, Any]:
    """The same discriminator and halves on captum heatmaps, the raw image, and our masks."""
    nb = config.n_baseline
    half = nb // 2
    results: dict[str, dict[str, Any]] = {}
    methods = ["masks", *config.baselines]
    for method in methods:
        t = time.time()
        clean_maps = None
        results[method] = {}
        for sd in sets:
            if method == "masks":
                cm, am = sd.clean_mask[:nb], sd.adv_mask[:nb]
            else:
                if clean_maps is None:
                    clean_maps = heatmaps(wrapper, sd.clean[:nb], method, targets=sd.clean_pred[:nb])
                cm, am = clean_maps, heatmaps(wrapper, sd.adv[:nb], method, targets=sd.adv_pred[:nb])
            sub = SetData(sd.spec, sd.clean[:nb], sd.adv[:nb], sd.labels[:nb], sd.clean_pred[:nb], sd.adv_pred[:nb],
                          cm, am, sd.manifest)
            fc, fa, ec, ea = _halves(sub, cm, am, half)
            if min(len(fc), len(fa), len(ec), len(ea)) < 2:
                results[method][sd.spec.key] = {"roc_auc": float("nan"), "tpr_at_5fpr": float("nan")}
                continue
            results[method][sd.spec.key] = _auc_tpr(_fit_eval(fc, fa, config.seed), ec, ea)
        timer.add(f"baseline_{method}", t)
    winners = {}
    for sd in sets:
        scored = [(results[m][sd.spec.key]["roc_auc"], m) for m in methods
                  if not np.isnan(results[m][sd.spec.key]["roc_auc"])]
        winners[sd.spec.key] = max(scored)[1] if scored else None
    notes = []
    if "guided_backprop" in config.baselines and not any(isinstance(m, torch.nn.ReLU) for m in wrapper.modules()):
        notes.append("the classifier has no nn.ReLU modules, so captum's guided backprop reduces to the plain "
                     "gradient (the same map as gradient saliency)")
    return {"methods": methods, "results": results, "winner": winners, "notes": notes,
            "note": "ROC-AUC / TPR at 5% FPR on the evaluation half of the first n_baseline images; the same "
                    "discriminator (MaskAlexNet) is fitted per method and attack on the fit half"}


def method_config(name: str, detector_config: MaskConfig) -> MaskConfig:
    """The masks compared for ``name``: the detector's own, or that method's deletion masks."""
    if name == "meaningful":
        return detector_config
    if name == "extremal":
        return MaskConfig(method="extremal", game="delete", area=0.1, seed=detector_config.seed)
    return MaskConfig(method="robust", seed=detector_config.seed)


def _method_comparison(wrapper, detector_config: MaskConfig, sets: list[SetData],
                       config: EvaluateConfig) -> dict[str, Any]:
    """Detection (same discriminator, same halves) and recovery for each mask method on the first n_methods images."""
    nm = config.n_methods
    half = nm // 2
    names = list(dict.fromkeys(["meaningful", *config.methods]))
    out: dict[str, Any] = {"methods": names, "configs": {}, "results": {}, "masks_per_second": {}}
    for name in names:
        cfg = method_config(name, detector_config)
        explainer = make_explainer(wrapper, cfg)
        out["configs"][name] = cfg.to_dict()
        t, count = time.time(), 0
        clean_masks = explainer.attribute(sets[0].clean[:nm].to(wrapper.device)).masks.cpu()
        count += nm
        out["results"][name] = {}
        for sd in sets:
            adv_masks = explainer.attribute(sd.adv[:nm].to(wrapper.device)).masks.cpu()
            count += nm
            sub = SetData(sd.spec, sd.clean[:nm], sd.adv[:nm], sd.labels[:nm], sd.clean_pred[:nm], sd.adv_pred[:nm],
                          clean_masks, adv_masks, sd.manifest)
            fc, fa, ec, ea = _halves(sub, clean_masks, adv_masks, half)
            row = (_auc_tpr(_fit_eval(fc, fa, config.seed), ec, ea) if min(len(fc), len(fa), len(ec), len(ea)) >= 2
                   else {"roc_auc": float("nan"), "tpr_at_5fpr": float("nan")})
            pick = (torch.arange(nm) >= half) & sub.success  # recovery on the evaluation half's successful attacks
            top5 = recover(wrapper, sub.adv[pick].to(wrapper.device), adv_masks[pick], PAPER_RECOVERY, cfg).top5
            clean_label = sub.clean_pred[pick]
            row["recovery_top1"] = float((top5[:, 0] == clean_label).float().mean()) if len(top5) else float("nan")
            row["recovery_top5"] = float((top5 == clean_label[:, None]).any(1).float().mean()) if len(top5) \
                else float("nan")
            out["results"][name][sd.spec.key] = row
        out["masks_per_second"][name] = round(count / max(time.time() - t, 1e-9), 2)
    out["note"] = (f"first {nm} test images: discriminators fitted on images 0..{half - 1}, evaluated on "
                   f"{half}..{nm - 1}; recovery applies each method's mask to the evaluation half's successful "
                   "adversarial images (top-1/top-5 of the clean prediction)")
    return out


def _adaptive(wrapper, detector: MaskDetector, mask_config: MaskConfig, sets: list[SetData], half: int,
              config: EvaluateConfig, progress: bool) -> dict[str, Any]:
    """Surrogate fitted on the fit half's real masks; PGD on the eval half's correct clean images."""
    first = sets[0]
    idx = torch.arange(len(first.labels))
    fit = idx < half
    images = [first.clean[fit & first.correct]]
    masks = [first.clean_mask[fit & first.correct]]
    for sd in sets:
        images.append(sd.adv[fit & sd.success])
        masks.append(sd.adv_mask[fit & sd.success])
    images_t, masks_t = torch.cat(images), torch.cat(masks)
    if len(images_t) < 20:
        raise AdvDetectError(f"too few images ({len(images_t)}) to fit the adaptive attacker's surrogate; "
                             "raise --n or pass --no-adaptive")
    surrogate, fit_stats = train_surrogate(images_t, masks_t, seed=config.seed, device=wrapper.device,
                                           progress=progress)
    pool = ((idx >= half) & first.correct).nonzero().flatten()[:config.adaptive_n]
    x, y = first.clean[pool], first.labels[pool]

    def attack(eps: float, steps: int, restarts: int, init: torch.Tensor | None = None):
        cfg = AdaptiveConfig(eps=eps, steps=steps, restarts=restarts, seed=config.seed)
        result, adv = evaluate_adaptive(wrapper, surrogate, detector, mask_config, x, y, cfg, init=init)
        return result.to_dict(), adv

    from tqdm.auto import tqdm

    # each eps also restarts from the previous (smaller) eps's result: a larger budget can't do worse
    sweep_results, previous = [], None
    for e in tqdm(sorted(config.adaptive_eps), desc="adaptive", unit="eps", disable=not progress, leave=False):
        result, previous = attack(e, config.adaptive_steps, config.adaptive_restarts, init=previous)
        sweep_results.append(result)
    # iterations check at the main eps, both runs from random starts only
    base, _ = attack(config.main_eps, config.adaptive_steps, config.adaptive_restarts)
    more, _ = attack(config.main_eps, 4 * config.adaptive_steps, config.adaptive_restarts)
    successes = [r["success"] for r in sweep_results]
    return {
        "method": "PGD (L-inf) on classifier margin + detector score through a mask surrogate (BPDA-style); "
                  "candidates from random restarts and, for each eps, the previous eps's result (as it is and as a "
                  "start); per image the attacker keeps a candidate that succeeds on the real pipeline (classifier, "
                  "full mask optimisation, detector), the smallest perturbation first",
        "surrogate": fit_stats, "n_images": int(len(pool)), "steps": config.adaptive_steps,
        "restarts": config.adaptive_restarts, "sweep": sweep_results,
        "more_iterations": {"steps": 4 * config.adaptive_steps, "eps": config.main_eps, "result": more,
                            "baseline_success": base["success"]},
        "sanity": {
            "success_grows_with_eps": all(b >= a - 0.02 for a, b in zip(successes, successes[1:])),
            "success_at_largest_eps": successes[-1],
            "more_iterations_gain": more["success"] - base["success"],
        },
    }


def _gallery(sd: SetData, detector: MaskDetector, k: int) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]]]:
    """Rows for the report and the pictures behind them (clean, its mask, adversarial, its mask)."""
    idx = sd.success.nonzero().flatten()[:k]
    if len(idx) == 0:
        return [], []
    cs = detector.decision_function(sd.clean_mask[idx])
    as_ = detector.decision_function(sd.adv_mask[idx])
    rows = [{"index": int(i), "label": int(sd.labels[i]), "clean_pred": int(sd.clean_pred[i]),
             "adv_pred": int(sd.adv_pred[i]), "clean_score": float(c), "adv_score": float(a), "attack": sd.spec.key}
            for i, c, a in zip(idx.tolist(), cs, as_)]
    pictures = [{"clean": sd.clean[i], "clean_mask": sd.clean_mask[i], "adv": sd.adv[i], "adv_mask": sd.adv_mask[i]}
                for i in idx.tolist()]
    return rows, pictures


def parse_eps_list(text: str) -> tuple[float, ...]:
    values = tuple(parse_eps(v) for v in text.split(",") if v.strip())
    if not values:
        raise OptionError("give at least one eps, e.g. --eps 4/255,8/255")
    return values
