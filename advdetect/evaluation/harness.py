"""The security evaluation's orchestration: the stages in order, and the report they make.

The stages live elsewhere: the settings and the attack sweep in :mod:`.config`, the
fit-on-one-half comparisons (transfer matrix, baselines, mask methods) in :mod:`.comparisons`,
the adaptive attacker in :mod:`.adaptive`, the report files in :mod:`.report`.

Layout of ``out/``::

    report.json  report.html  report.md     the report (see report.py)
    work/<attack>-<eps>/ (+ masks/)          attack sets on held-out test images, resumable

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attackset import generate_attack_set
from ..data import DataSpec, open_split
from ..detector import MaskDetector
from ..detector.io import library_versions
from ..distributed import context, single_process
from ..errors import OptionError
from ..inference import load_deployment
from ..maskset import compute_mask_set
from ..masks import MaskConfig
from ..recovery import RecoveryConfig
from ..detector.metrics import fpr_per_class
from ..splits import Split, load_split, split_metrics
from .adaptive import run_adaptive
from .comparisons import baselines as compare_baselines
from .comparisons import method_comparison, transfer_matrix
from .config import EvaluateConfig, Spec, main_specs, sweep
from .guard import check_unseen, unseen_images
from .report import gallery_rows, json_safe, write_reports

log = logging.getLogger(__name__)

THREAT_MODEL = (
    "The defender deploys the classifier behind the mask detector: an input whose "
    "meaningful-perturbation mask the detector flags is rejected (and its label recovered: "
    "see the recovery settings). Attackers perturb held-out test images within an L-inf ball of "
    "radius eps (FGSM, BIM, PGD, MI-FGSM; CW-L2 and DeepFool are unbounded minimal-perturbation "
    "attacks). Non-adaptive attackers know the classifier (white box) but not the detector. The "
    "adaptive attacker knows the classifier, the detector's weights and threshold and the mask "
    "algorithm, and attacks both jointly (PGD through a learned surrogate of the mask optimisation, "
    "BPDA-style) and checks its candidates on the real pipeline. An attack succeeds when the "
    "classifier is wrong and the detector does not flag the image; detection rates count successful adversarial images only, false positives count "
    "correctly classified clean images."
)


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
                   data: DataSpec | None = None, device: str = "auto",
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate the detector in ``detector_dir``; write report.{json,html,md} under ``out``; return the report.

    ``data``: where the test images come from; by default the data the detector was trained on
    (its recorded folder, or CIFAR-10 under ``data.data_dir``).
    """
    config = config or EvaluateConfig()
    start_all = time.time()
    timer = Timer()
    out = Path(out)
    deployed = load_deployment(detector_dir, None, device)
    wrapper, detector, meta, mask_config = deployed.model, deployed.detector, deployed.meta, deployed.mask_config
    recovery_masks_config, recovery = deployed.recovery_masks_config, deployed.recovery_config
    data = DataSpec.recorded(meta.get("data"), *(() if data is None else (data.path, data.data_dir,
                                                                         data.classes_file)))
    if config.adaptive and config.adaptive_targets >= wrapper.info.num_classes:
        raise OptionError(f"--adaptive-targets {config.adaptive_targets}: {wrapper.info.name} has "
                          f"{wrapper.info.num_classes} classes, so at most {wrapper.info.num_classes - 1} other ones")
    if config.adaptive and config.adaptive_unroll and mask_config.method != "meaningful":
        raise OptionError(f"--adaptive-unroll differentiates meaningful-perturbation masks; this detector reads "
                          f"{mask_config.method} masks")
    test_images = open_split(data, "test", wrapper.info)
    if config.n > len(test_images):
        raise OptionError(f"--n {config.n}: the data holds only {len(test_images)} test images")
    # the first n test images of the seeded order that the detector was neither fitted nor calibrated on
    images = unseen_images(test_images, config.n, config.seed + 1, meta)
    record = images.identify()
    check_unseen(meta, record, config)  # what unseen_images ensures, checked once more by identity
    if record.get("reserved_skipped"):
        log.info("passed over %d test images the detector was fitted or calibrated on", record["reserved_skipped"])

    ctx = context()
    with timer.stage("attacks_and_masks"):  # shared by every rank under torchrun, shard by shard
        directories, first = {}, None
        for spec in sweep(config):
            directory = out / "work" / spec.dirname
            generate_attack_set(wrapper, images, spec.config(), directory, batch_size=config.batch_size,
                                seed=config.seed, progress=progress)
            # the detector's masks, and the deletion masks recovery applies (when they differ)
            for masks_config in dict.fromkeys([mask_config, recovery_masks_config]):
                compute_mask_set(wrapper, directory, config=masks_config, progress=progress, reuse_clean_from=first,
                                 shard_size=config.shard_size)
            first = first or directory
            directories[spec.key] = (spec, directory)
    if not ctx.is_main:  # the rest is rank 0's alone: the other ranks are done
        log.info("rank %d: attack sets and masks done; rank 0 writes the report", ctx.rank)
        return {"rank": ctx.rank, "out": str(out)}
    with single_process():
        return _report(detector_dir, out, config, wrapper, detector, meta, mask_config, recovery_masks_config,
                       recovery, directories, timer, start_all, progress, data, record, deployed.fast)


def _report(detector_dir, out: Path, config: EvaluateConfig, wrapper, detector: MaskDetector, meta: dict[str, Any],
            mask_config: MaskConfig, recovery_masks_config: MaskConfig, recovery: RecoveryConfig,
            directories: dict[str, tuple[Spec, Path]], timer: Timer, start_all: float,
            progress: bool, data: DataSpec, record: dict[str, Any], fast=None) -> dict[str, Any]:
    """Everything after the shared attack and mask stages, in one process: metrics, comparisons, report files.
    ``fast``: the detector's fast path, which the adaptive attacker attacks too."""
    splits = {key: load_split(directory, mask_config.kind, recovery_masks_config.kind, name=key,
                              inputs=detector.input_names())
              for key, (_, directory) in directories.items()}

    with timer.stage("detector_metrics"):
        any_split = next(iter(splits.values()))  # every split holds the same clean images
        clean_scores = detector.decision_function(any_split.masks_clean)
        correct = any_split.correct.numpy()
        clean_section = {"n": int(len(any_split.labels)), "accuracy": float(correct.mean()),
                         "detector_fpr": float((clean_scores[correct] > detector.threshold_).mean()),
                         "threshold": detector.threshold_, "calibration_fpr": detector.calibration_fpr_,
                         "calibrated_on": meta.get("calibrated_on", "train"),
                         "per_class": [{"class": name, "fpr": rate} for name, rate in fpr_per_class(
                             clean_scores[correct], any_split.labels.numpy()[correct], detector.threshold_,
                             wrapper.info.classes).items()]}
        per_attack = {key: {"attack": spec.attack, "eps": spec.eps,
                            **split_metrics(wrapper, detector, splits[key], recovery_masks_config, recovery,
                                            clean_scores)}
                      for key, (spec, _) in directories.items()}

    fast_section = None
    if fast is not None:
        with timer.stage("fast_path_metrics"):
            fast_section = fast_path_section(fast, splits)

    half = config.n // 2
    main_splits = [splits[spec.key] for spec in main_specs(config)]
    with timer.stage("transfer_matrix"):
        transfer = transfer_matrix(main_splits, half, config.seed)
    with timer.stage("baselines"):
        baselines = compare_baselines(wrapper, main_splits, config, timer.add)
    methods = None
    if config.methods:
        with timer.stage("mask_methods"):
            methods = method_comparison(wrapper, mask_config, main_splits, config)
    adaptive = None
    if config.adaptive:
        with timer.stage("adaptive"):
            adaptive = run_adaptive(wrapper, detector, mask_config, list(splits.values()), half, config, progress,
                                    fast=fast)

    shown = splits[main_specs(config)[0].key] if "bim" not in config.attacks else \
        splits[Spec("bim", config.main_eps).key]
    gallery, pictures = gallery_rows(shown, detector, config.gallery)
    report = {
        "format": "advdetect.report/1",
        "out": str(out),
        "title": f"Security evaluation of {Path(detector_dir).name} on {wrapper.info.name}",
        "threat_model": THREAT_MODEL,
        "detector": {"path": str(detector_dir), "classifier": meta["classifier"],
                     "trained_on": meta.get("attacks"), "threshold": detector.threshold_,
                     "calibration_fpr": detector.calibration_fpr_, "mask_config": mask_config.to_dict(),
                     "recovery_config": recovery_masks_config.to_dict(), "recovery": recovery.to_dict()},
        "config": config.to_dict(),
        "data": data.describe(),
        "images": record,  # which test images (indices; content ids for an image folder)
        "splits": {"detector": f"all {config.n} test images (seed {config.seed + 1})",
                   "fit_half": f"test images 0..{half - 1}", "eval_half": f"test images {half}..{config.n - 1}",
                   "baselines": f"the first {config.n_baseline} test images, halves of those"},
        "clean": clean_section,
        "attacks": per_attack,
        "fast_path": fast_section,
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


def fast_path_section(fast: Any, splits: dict[str, Split]) -> dict[str, Any]:
    """The fast path's verdict (what ``detect`` uses) on the same held-out images: per attack, detection
    (correct clean vs successful attacks, at its own calibrated threshold) and, once, the clean images it
    flags per predicted class."""
    from ..fastpath import fast_metrics

    per_attack = {key: fast_metrics(fast, split.clean[split.correct], split.adv[split.successful])
                  for key, split in splits.items()}
    first = next(iter(per_attack.values()))  # every split holds the same clean images
    return {"threshold": fast.threshold, "calibration_fpr": fast.calibration_fpr,
            "margin": fast.margin is not None, "per_class_thresholds": bool(fast.margin is not None
                                                                           and fast.margin.per_class),
            "clean_fpr": first["fpr_at_threshold"],
            "per_class": [{"class": name, "fpr": rate} for name, rate in first.get("fpr_per_class", {}).items()],
            "attacks": {key: {k: v for k, v in m.items() if k not in ("fpr_per_class", "max_class_fpr")}
                        for key, m in per_attack.items()}}
