"""``advdetect train``: attack -> masks -> discriminator -> calibration -> held-out metrics.

Layout of ``out/``::

    detector.json, detector.safetensors   the trained, calibrated detector
    report.json                           what was measured on held-out test images
    work/train-<attack>/                  attack set (+ masks/) on training images
    work/calibration-<attack>/            clean test images the threshold is set on (--calibrate-on test)
    work/test-<attack>/                   attack set (+ masks/) on held-out test images, for the report

Images come from CIFAR-10 or the user's own folder (``--data``, see :class:`advdetect.data.DataSpec`),
decoded and processed shard by shard.

Every stage is resumable: rerunning the same command reuses finished shards.
Training images are split into a fitting part (with its own validation split for early
stopping) and a calibration part whose clean masks set the threshold; the metrics come
from test-split images never used for either.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .attacks import DETECTOR_ATTACKS, AttackConfig, parse_eps
from .attackset import generate_attack_set
from .data import DataSpec, open_split, select
from .detector import MaskDetector, save_detector
from .detector.inputs import parse_inputs
from .detector.margin import SQUEEZE_SIGMAS, MarginCombination, parse_squeeze
from .detector.network import MASK_SIZE
from .distributed import context
from .errors import AdvDetectError, OptionError
from .masks import MaskConfig
from .masks.amortized_training import MaskNetFit
from .masks.config import resolve_mask_config
from .maskset import compute_mask_set
from .models.wrapper import ModelWrapper
from .recovery import RecoveryConfig
from .sources import Selection
from .splits import AttackSetReader, balanced, load_split, split_metrics
from .storage import write_json

log = logging.getLogger(__name__)


CALIBRATION_SOURCES = ("test", "train")
# the fast path's detector fits on this many times --n training images by default (at most FAST_N_MAX): its
# maps come from the mask network in one pass, so the extra images cost their attacks only, ~0.4 s an image
# for the six default attacks on the 2-core CPU (README, "More images for the fast path")
FAST_N_FACTOR = 6
FAST_N_MAX = 10_000


@dataclass
class TrainReport:
    out: str
    model: dict[str, Any]
    attacks: list[dict[str, Any]]
    n_train: int
    n_eval: int
    threshold: float
    calibrated_on: str  # "test" (clean test images beside the evaluation ones) or "train"
    n_calibration: int  # clean, correctly classified images the threshold was set on
    calibration_fpr: float
    metrics: dict[str, Any]  # per attack: detection + recovery on held-out test images
    seconds: float
    data: dict[str, Any]  # where the images came from (DataSpec.describe)
    mask_config: dict[str, Any]  # the mask settings used
    images: dict[str, Any]  # which images fitted, calibrated and were held out (as in detector.json)
    fast: dict[str, Any] | None = None  # the fast path (amortized masks): per attack, held-out detection metrics

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_attacks(spec: str, eps: str | float) -> list[AttackConfig]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise OptionError("give at least one attack, e.g. --attack bim or --attack fgsm,bim,pgd")
    value = parse_eps(eps)
    return [AttackConfig(name, eps=value) for name in names]


def prepare_split(model: ModelWrapper, attack: AttackConfig, images: Selection, directory: Path,
                  mask_config: MaskConfig, batch_size: int, progress: bool, reuse_clean_from: Path | None = None,
                  shard_size: int = 512, recovery_masks: bool = False) -> Path:
    """Attack set + masks for ``images`` in ``directory`` (resumable, streamed shard by shard); returns it.

    ``reuse_clean_from``: an earlier split over the same images, whose clean masks are reused.
    ``recovery_masks``: also the deletion masks that mask recovery applies, if the detector reads others.
    """
    generate_attack_set(model, images, attack, directory, batch_size=batch_size, seed=images.record["seed"],
                        progress=progress)
    compute_mask_set(model, directory, config=mask_config, progress=progress, reuse_clean_from=reuse_clean_from,
                     shard_size=shard_size)
    if recovery_masks and mask_config.for_recovery() != mask_config:
        compute_mask_set(model, directory, config=mask_config.for_recovery(), progress=progress,
                         reuse_clean_from=reuse_clean_from, shard_size=shard_size)
    return directory


def default_fast_n(n: int, available: int, with_fast: bool = True) -> int:
    """``train``'s default ``fast_n``: :data:`FAST_N_FACTOR` x ``n``, at most :data:`FAST_N_MAX` and the
    ``available`` training images, never below ``n`` (and ``n`` when there is no fast path)."""
    return max(n, min(FAST_N_FACTOR * n, FAST_N_MAX, available)) if with_fast else n


def train_detector(model: ModelWrapper, attacks: list[AttackConfig], n: int, n_eval: int, out: str | os.PathLike,
                   mask_config: MaskConfig | None = None, detector: MaskDetector | None = None,
                   transfer: list[AttackConfig] | None = None, calibration_fraction: float = 0.2,
                   data: DataSpec | None = None, batch_size: int = 256, seed: int = 0,
                   progress: bool = True, shard_size: int = 512,
                   recovery: RecoveryConfig | None = None, calibrate_on: str = "test",
                   n_calibration: int = 1000, work: str | os.PathLike | None = None,
                   fast: bool = True, fast_settings: MaskNetFit | None = None,
                   hardening: Any = None, margin: MarginCombination | None = None,
                   fast_n: int | None = None) -> TrainReport:
    """Run the whole pipeline and save the detector under ``out``; return the held-out report.

    ``data``: CIFAR-10 (the default) or a folder of the user's own (see :class:`DataSpec`).
    ``calibrate_on="test"`` sets the threshold on ``n_calibration`` clean test images disjoint
    from the ``n_eval`` evaluation images; ``"train"`` on the last ``calibration_fraction`` of the
    training images (which the classifier was trained on, so it is more confident on them and the
    held-out false-positive rate comes out higher).
    ``work``: where the attack and mask sets live (default ``out/work``); another run's work folder
    reuses its finished sets (same images, attacks and mask settings), e.g. to fit detectors that
    leave one attack out.
    ``fast``: also train the fast path (a mask network and a detector on its maps, ``out/fast/``), when the
    masks are meaningful deletion or preservation masks; ``fast_settings``: how the network is trained.
    ``hardening`` (:class:`~advdetect.hardening.HardeningConfig`): adversarial training of the fast
    detector against the white-box adaptive attacker (needs the fast path). ``margin`` (an unfitted,
    configured :class:`~advdetect.detector.margin.MarginCombination`): the fast path's verdict combines its
    detector's score with the classifier's evidence as that combination says (needs the fast path).
    ``fast_n`` (>= ``n``; default :func:`default_fast_n`: 6 x ``n``, at most 10,000 and what the data's
    training part holds): training images the fast path's detector and combination fit on; the
    ``fast_n - n`` after the exact detector's are attacked (``work/fast-train-*``) but not masked.
    """
    if not 0 < calibration_fraction < 1:
        raise OptionError(f"calibration_fraction must lie in (0, 1), got {calibration_fraction}")
    with_fast = fast and fast_supported(mask_config or MaskConfig())
    if hardening is not None and hardening.rounds and not with_fast:
        raise OptionError("adaptive rounds harden the fast path's detector: train it too (--fast, with meaningful "
                          "deletion or preservation masks)")
    if margin is not None and not with_fast:
        raise OptionError("the margin combination is part of the fast path: train it too (--fast, with meaningful "
                          "deletion or preservation masks)")
    if fast_n is not None and fast_n != n and not with_fast:
        raise OptionError("--fast-n sets the fast path's training images: train the fast path too (--fast, with "
                          "meaningful deletion or preservation masks)")
    if fast_n is not None and fast_n < n:
        raise OptionError(f"--fast-n ({fast_n}) must be at least --n ({n}): the fast path also fits on the exact "
                          "detector's images")
    if calibrate_on not in CALIBRATION_SOURCES:
        raise OptionError(f"calibrate_on must be one of {', '.join(CALIBRATION_SOURCES)}, got {calibrate_on!r}")
    data = data or DataSpec()
    train_images, test_images = (open_split(data, split, model.info) for split in ("train", "test"))
    if n > len(train_images):
        raise OptionError(f"--n {n}: the training part of the data holds only {len(train_images)} images")
    if fast_n is not None and fast_n > len(train_images):
        raise OptionError(f"--fast-n {fast_n}: the training part of the data holds only {len(train_images)} images")
    fast_n = default_fast_n(n, len(train_images), with_fast) if fast_n is None else fast_n
    needed = n_eval + (n_calibration if calibrate_on == "test" else 0)
    if needed > len(test_images):
        raise OptionError(f"--n-eval + --n-calibration ({n_eval} + {n_calibration}) exceeds the "
                          f"{len(test_images)} test images of the data" if calibrate_on == "test" else
                          f"--n-eval {n_eval} exceeds the {len(test_images)} test images of the data")
    start = time.time()
    out = Path(out)
    work = Path(work) if work is not None else out / "work"
    mask_config = mask_config or MaskConfig()
    recovery = recovery or RecoveryConfig()
    detector = detector or MaskDetector(seed=seed, device=str(model.device))
    fit_images = select(train_images, n, seed)
    held_out_images = select(test_images, n_eval, seed + 1)

    train_dirs: list[Path] = []
    for attack in attacks:
        train_dirs.append(prepare_split(model, attack, fit_images, work / f"train-{attack.name}", mask_config,
                                        batch_size, progress, reuse_clean_from=train_dirs[0] if train_dirs else None,
                                        shard_size=shard_size))
    # "train": the training images are split by position, the first part fits, the rest calibrates.
    # "test": every training image fits; clean test images right after the evaluation images calibrate
    # (images the classifier never saw, like those it will be deployed on).
    n_fit = n if calibrate_on == "test" else int(round(n * (1 - calibration_fraction)))
    fit_adv, clean_split, fit_keep = [], None, []
    inputs = detector.input_names()  # the masks, and any evidence planes beside them
    for directory in train_dirs:  # the detector reads masks at its own resolution: pooled as they are read
        split = load_split(directory, mask_config.kind, images=False, pool=MASK_SIZE, inputs=inputs)
        clean_split = clean_split or split  # every attack set holds the same clean images
        fit_adv.append(split.masks_adv[split.successful & (split.index < n_fit)])
        fit_keep.append(split.index < n_fit)
    fitting = clean_split.index < n_fit
    fit_clean = clean_split.masks_clean[clean_split.correct & fitting]
    cal_clean = clean_split.masks_clean[clean_split.correct & ~fitting]
    records = {"fit": fit_images.identify(clean_split.index[fitting].tolist())}
    if calibrate_on == "test":
        cal_images = select(test_images, n_calibration, seed + 1, offset=n_eval)
        cal_dir = prepare_split(model, attacks[0], cal_images, work / f"calibration-{attacks[0].name}", mask_config,
                                batch_size, progress, shard_size=shard_size)
        calibration = load_split(cal_dir, mask_config.kind, images=False, pool=MASK_SIZE, inputs=inputs)
        cal_clean = calibration.masks_clean[calibration.correct]
        records["calibration"] = cal_images.identify(calibration.index.tolist())
    else:
        records["calibration"] = fit_images.identify(clean_split.index[~fitting].tolist())
    if not len(fit_clean) or not sum(len(a) for a in fit_adv) or not len(cal_clean):
        raise AdvDetectError(f"nothing to fit on: {len(fit_clean)} correctly classified clean images, "
                             f"{sum(len(a) for a in fit_adv)} successful attacks, {len(cal_clean)} calibration "
                             "images; check that the data's classes match the model's (see --classes) and use more images")
    adv = balanced(fit_adv, len(fit_clean), seed)
    X = torch.cat([fit_clean, adv])
    y = torch.cat([torch.zeros(len(fit_clean)), torch.ones(len(adv))])
    detector.fit(X, y)
    detector.calibrate(cal_clean)
    fast_path = None
    if with_fast:
        from .fastpath import read_fast_set, train_fast_path
        from .masks.parameterization import low_res_shape

        pool = low_res_shape(tuple(model.info.input_size), mask_config.upsample)
        fast_settings = fast_settings or MaskNetFit(seed=seed)
        cal_set = read_fast_set([cal_dir], mask_config.kind, pool, [torch.ones(len(calibration.index), dtype=bool)],
                                adversarial=False) if calibrate_on == "test" else \
            read_fast_set([train_dirs[0]], mask_config.kind, pool, [~fitting], adversarial=False)
        extra_dirs = []
        if fast_n > n:  # attacked, not masked: the fast detector reads the network's maps
            extra_images = select(train_images, fast_n - n, seed, offset=n)
            for attack in attacks:
                generate_attack_set(model, extra_images, attack, work / f"fast-train-{attack.name}",
                                    batch_size=batch_size, seed=extra_images.record["seed"], progress=progress)
                extra_dirs.append(work / f"fast-train-{attack.name}")
            records["fast_fit"] = extra_images.identify(AttackSetReader(extra_dirs[0]).index().tolist())
        fast_path = train_fast_path(model, mask_config, MaskDetector(**detector.get_params()), train_dirs, fit_keep,
                                    cal_set, settings=fast_settings, seed=seed, progress=progress,
                                    hardening=hardening, margin=margin, extra_dirs=extra_dirs)
    elif fast:
        log.warning("no fast path: amortized masks stand in for meaningful deletion or preservation masks, "
                    "not %s", mask_config.kind)

    recovery_masks = mask_config.for_recovery()
    eval_attacks = list(attacks) + [a for a in (transfer or []) if a not in attacks]
    metrics, first_test, fast_rows = {}, None, {}
    for attack in eval_attacks:
        directory = prepare_split(model, attack, held_out_images, work / f"test-{attack.name}", mask_config,
                                  batch_size, progress, reuse_clean_from=first_test, shard_size=shard_size,
                                  recovery_masks=True)
        first_test = first_test or directory
        held_out = load_split(directory, mask_config.kind, recovery_masks.kind, inputs=inputs)
        metrics[attack.name] = split_metrics(model, detector, held_out, recovery_masks, recovery)
        metrics[attack.name]["trained_on"] = attack in attacks
        if fast_path is not None:
            from .fastpath import fast_metrics

            fast_rows[attack.name] = fast_metrics(fast_path, held_out.clean[held_out.correct],
                                                  held_out.adv[held_out.successful])
        if "held_out" not in records:  # every attack set holds the same images
            records["held_out"] = held_out_images.identify(held_out.index.tolist())
    report = TrainReport(out=str(out), model=model.info.identity(), attacks=[a.to_dict() for a in attacks],
                         n_train=n, n_eval=n_eval, threshold=detector.threshold_,
                         calibrated_on=calibrate_on, n_calibration=int(len(cal_clean)),
                         calibration_fpr=detector.calibration_fpr_, metrics=metrics,
                         seconds=round(time.time() - start, 1), data=data.describe(),
                         mask_config=mask_config.to_dict(), images=records,
                         fast={"threshold": fast_path.threshold, "margin": fast_path.margin is not None,
                               "squeeze": list(fast_path.margin.squeeze) if fast_path.margin is not None else None,
                               "per_class": bool(fast_path.margin is not None and fast_path.margin.per_class),
                               "noise": list(fast_path.margin.noise) if fast_path.margin is not None else None,
                               "hidden": fast_path.margin.hidden if fast_path.margin is not None else None,
                               "n_train": max(n, fast_n),
                               "n_fit_maps": getattr(fast_path.detector, "n_samples_fit_", None),
                               "metrics": fast_rows,
                               "hardening": hardening.describe() if hardening is not None and hardening.rounds
                               else None} if fast_path is not None else None)
    ctx = context()  # under torchrun every rank holds the same detector; rank 0 writes it
    if ctx.is_main:
        save_detector(out, detector, model.info.identity(), mask_config,
                      extra={"recovery_config": mask_config.for_recovery().to_dict(), "recovery": recovery.to_dict(),
                             "attacks": report.attacks, "metrics": metrics, "history": detector.history_,
                             "n_train": n, "n_eval": n_eval, "calibrated_on": calibrate_on,
                             "n_calibration": report.n_calibration, "seed": seed, "data": report.data,
                             "images": records})  # evaluate passes over these fit and calibration images
        from .fastpath import FAST_DIR, save_fast_path

        if fast_path is None and (out / FAST_DIR).is_dir():  # an earlier detector's fast path would judge for this one
            log.info("removing the fast path of an earlier detector in %s", out / FAST_DIR)
            shutil.rmtree(out / FAST_DIR)
        if fast_path is not None:
            save_fast_path(out, fast_path, model.info.identity(),
                           extra={"metrics": fast_rows, "hardening": report.fast["hardening"], "mask_net_fit": {
                               "loss": fast_settings.loss, "epochs": fast_settings.epochs,
                               "last_epoch": fast_settings.history[-1] if fast_settings.history else None}})
        write_json(out / "report.json", report.to_dict())
    ctx.barrier()
    return report


def fast_supported(config: MaskConfig) -> bool:
    """Whether a mask network can stand in for ``config``'s masks (meaningful deletion or preservation)."""
    return config.method == "meaningful" and config.game in ("delete", "preserve")


def run_train(model: str | ModelWrapper = "cifar10-cnn", attack: str = ",".join(DETECTOR_ATTACKS),
              eps: str = "8/255", n: int = 5000, n_eval: int = 2000, out: str | os.PathLike = "detector",
              transfer: str | None = None, mask_config: MaskConfig | dict[str, Any] | None = None,
              data: DataSpec | None = None, seed: int = 0, device: str = "auto", progress: bool = True,
              batch_size: int = 256, shard_size: int = 512, recovery: RecoveryConfig | None = None,
              calibrate_on: str = "test", n_calibration: int = 1000, fpr: float = 0.05, inputs: str | None = None,
              work: str | os.PathLike | None = None, fast: bool = True, fast_epochs: int = 30,
              adaptive_rounds: int = 0, margin: bool | None = None,
              squeeze: str | tuple[float, ...] = SQUEEZE_SIGMAS, class_calibration: bool = False,
              noise: str | tuple[float, ...] | None = None, combiner: str | None = None,
              fast_n: int | None = None) -> TrainReport:
    """The ``train`` command: resolve names, then :func:`train_detector`.

    ``inputs``: what the discriminator reads (:data:`advdetect.detector.inputs.INPUTS`, comma-separated;
    None: the default). ``fast``: also train the fast path, its mask network for ``fast_epochs`` epochs.
    ``adaptive_rounds``: rounds of adversarial training of the fast detector against the white-box
    adaptive attacker (:mod:`advdetect.hardening`; 0: none). ``margin``: combine the fast detector's
    score with the classifier's log-probability gap and its blur shifts at the ``squeeze`` sigmas
    (comma-separated or a tuple; "none": the gap alone) and its noise shifts at the ``noise`` sigmas, with
    ``combiner`` "logistic" or "mlp" (:data:`COMBINERS`); ``class_calibration``: with one threshold per
    predicted class. ``margin=None`` (the default) combines whenever the fast path is trained, and then
    ``noise`` and ``combiner`` default to :data:`DEFAULT_NOISE` and :data:`DEFAULT_COMBINER` (the best
    verdict measured, README "Noise shifts and an MLP combiner"). ``fast_n``: training images of the fast
    path's detector and combination (default :func:`default_fast_n`; those beyond ``n`` are attacked, not
    masked).

    ``mask_config``: the mask settings, or overrides (a dict) of the settings for the model's input size
    (:meth:`MaskConfig.for_input_size`).
    """
    from .hardening import HardeningConfig
    from .models import resolve_model

    hardening = HardeningConfig(rounds=adaptive_rounds, seed=seed)
    attacks = parse_attacks(attack, eps)
    inputs = ",".join(parse_inputs(inputs))
    transfer_attacks = parse_attacks(transfer, eps) if transfer else []
    wrapper = resolve_model(model, device)
    mask_config = resolve_mask_config(mask_config, wrapper.info.input_size)
    if margin is None:  # the default: combine whenever there is a fast path to combine with
        margin = fast and fast_supported(mask_config)
    margin_config = margin_combination(margin, squeeze, class_calibration, noise, combiner, seed)
    return train_detector(wrapper, attacks, n=n, n_eval=n_eval, out=out, mask_config=mask_config,
                          transfer=transfer_attacks, data=data, seed=seed, progress=progress,
                          detector=MaskDetector(seed=seed, device=str(wrapper.device), fpr=fpr, inputs=inputs),
                          batch_size=batch_size,
                          shard_size=shard_size, recovery=recovery, calibrate_on=calibrate_on,
                          n_calibration=n_calibration, work=work, fast=fast,
                          fast_settings=MaskNetFit(epochs=fast_epochs, seed=seed), hardening=hardening,
                          margin=margin_config, fast_n=fast_n)


COMBINERS = {"logistic": 0, "mlp": 32}  # `train --combiner`: the MarginCombination's hidden width
DEFAULT_NOISE = "0.01"  # `train`'s noise shift when --noise is not given
DEFAULT_COMBINER = "mlp"


def margin_combination(margin: bool, squeeze: str | tuple[float, ...] = SQUEEZE_SIGMAS,
                       class_calibration: bool = False, noise: str | tuple[float, ...] | None = None,
                       combiner: str | None = None, seed: int = 0) -> MarginCombination | None:
    """The unfitted :class:`MarginCombination` that ``train --margin`` and its options describe (None without
    --margin; the options that need it are refused then). ``noise`` and ``combiner`` left as None take
    :data:`DEFAULT_NOISE` and :data:`DEFAULT_COMBINER`."""
    if combiner is not None and combiner not in COMBINERS:
        raise OptionError(f"--combiner must be one of {', '.join(COMBINERS)}, got {combiner!r}")
    if not margin:
        if class_calibration or parse_squeeze(noise or (), "--noise") or combiner is not None:
            raise OptionError("--class-calibration, --noise and --combiner configure the margin combination, "
                              "which --no-margin (or --no-fast, or masks without a fast path) turns off")
        return None
    noise = parse_squeeze(DEFAULT_NOISE if noise is None else noise, "--noise")
    squeeze, combiner = parse_squeeze(squeeze), DEFAULT_COMBINER if combiner is None else combiner
    return MarginCombination(squeeze=squeeze, per_class=class_calibration, noise=noise,
                             hidden=COMBINERS[combiner], seed=seed)
