"""Labelled splits: a stored attack set and its mask sets, read once, and their metrics.

This module is the reading side of the stored sets (``attackset.py`` and ``maskset.py`` write
them) and the one place that says which images count:

* **correct**: clean images the classifier labels correctly - the clean class of every metric;
* **successful**: correct images whose adversarial version the classifier gets wrong - the
  adversarial class of every metric (a failed attack is no threat to detect).

:func:`split_metrics` computes a split's detection and recovery metrics for both ``advdetect
train`` and ``advdetect evaluate``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import AdvDetectError
from .storage import ShardStore

ATTACK_SET_FORMAT = "advdetect.attack-set/1"
MASK_SET_FORMAT = "advdetect.mask-set/1"


def correct_images(labels: torch.Tensor, clean_pred: torch.Tensor) -> torch.Tensor:
    """Clean images classified correctly (bool per image)."""
    return clean_pred == labels


def successful_attacks(labels: torch.Tensor, clean_pred: torch.Tensor, adv_pred: torch.Tensor) -> torch.Tensor:
    """Correctly classified images whose adversarial version is misclassified (bool per image)."""
    return correct_images(labels, clean_pred) & (adv_pred != labels)


@dataclass
class Split:
    """One attack set in memory: clean and adversarial images with labels and predictions, and,
    when loaded with :func:`load_split`, the masks the detector reads and those recovery applies."""

    clean: torch.Tensor  # N x C x H x W in [0, 1]
    adv: torch.Tensor
    labels: torch.Tensor  # int64 N
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    manifest: dict[str, Any]  # the attack set's manifest (job, shards, metrics)
    masks_clean: torch.Tensor | None = None  # what the detector reads, N x K x H x W
    masks_adv: torch.Tensor | None = None
    recovery_clean: torch.Tensor | None = None  # deletion masks mask recovery applies (the same when equal)
    recovery_adv: torch.Tensor | None = None
    name: str = ""
    index: torch.Tensor | None = None  # each image's position in the selection attacked (files left out skip)

    @property
    def correct(self) -> torch.Tensor:
        return correct_images(self.labels, self.clean_pred)

    @property
    def successful(self) -> torch.Tensor:
        return successful_attacks(self.labels, self.clean_pred, self.adv_pred)

    def first(self, n: int) -> Split:
        """The split of the first ``n`` images."""
        cut = {name: getattr(self, name)[:n] for name in ("clean", "adv", "labels", "clean_pred", "adv_pred",
                                                         "masks_clean", "masks_adv", "recovery_clean",
                                                         "recovery_adv", "index")
               if getattr(self, name) is not None and getattr(self, name).numel()}
        return replace(self, **cut)

    def with_masks(self, clean: torch.Tensor, adv: torch.Tensor) -> Split:
        """The same images with other maps (another mask method's, or baseline heatmaps)."""
        return replace(self, masks_clean=clean, masks_adv=adv)


class AttackSetReader:
    """A complete attack set, read a range of images at a time (checksums verified), so a job over a
    large set holds one shard in memory, not the set."""

    FIELDS = ("clean", "adv", "labels", "clean_pred", "adv_pred")

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.store = ShardStore(directory)
        self.manifest = self.store.manifest()
        if self.manifest.get("job", {}).get("format") != ATTACK_SET_FORMAT:
            raise AdvDetectError(f"{directory}: not an advdetect attack set (no {ATTACK_SET_FORMAT} manifest.json)")
        if not self.manifest.get("complete"):
            raise AdvDetectError(f"{directory}: attack set is incomplete; rerun the same attack command to finish it")
        self.keys = sorted(self.manifest["shards"])
        sizes = [int(self.manifest["shards"][k].get("n", 0)) for k in self.keys]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.n = sum(sizes)
        self._cache: dict[tuple[str, tuple[str, ...]], dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.n

    def rows(self, start: int, stop: int, names: tuple[str, ...] = FIELDS) -> dict[str, torch.Tensor]:
        """Images ``start..stop-1`` of the set (only ``names``)."""
        parts = []
        for key, first in zip(self.keys, self.starts):
            count = int(self.manifest["shards"][key].get("n", 0))
            if first + count <= start or first >= stop or not count:
                continue
            cache_key = (key, tuple(names))
            if cache_key not in self._cache:
                self._cache = {cache_key: self.store.get(key, list(names))}  # one shard kept: ranges go forward
            shard = self._cache[cache_key]
            lo, hi = max(start, first) - first, min(stop, first + count) - first
            parts.append({k: v[lo:hi] for k, v in shard.items()})
        if not parts:
            raise AdvDetectError(f"{self.directory}: no images {start}..{stop - 1} (the set holds {self.n})")
        return {k: torch.cat([p[k] for p in parts]) for k in names}

    def index(self) -> torch.Tensor:
        """Each image's position in the selection that was attacked (unreadable files left out)."""
        if "index" in self.store.names(self.keys[0]):
            return self.store.load_all(["index"])["index"]
        return torch.arange(self.n)  # sets from before the index was stored: no file was ever left out


def load_attack_set(directory: str | os.PathLike) -> Split:
    """Read a complete attack set (checksums verified), without masks."""
    reader = AttackSetReader(directory)
    tensors = reader.rows(0, reader.n)
    return Split(tensors["clean"], tensors["adv"], tensors["labels"], tensors["clean_pred"], tensors["adv_pred"],
                 reader.manifest, name=Path(directory).name, index=reader.index())


def masks_dir(attack_dir: str | os.PathLike, kind: str = "delete") -> Path:
    """Where one kind of mask lives (``MaskConfig.kind``): ``masks/`` for meaningful deletion,
    else ``masks-<kind>/`` (``masks-preserve``, ``masks-extremal-delete``, ``masks-robust``, ...)."""
    return Path(attack_dir) / ("masks" if kind == "delete" else f"masks-{kind}")


def load_mask_set(attack_dir: str | os.PathLike, kind: str = "delete", names: list[str] | None = None,
                  pool: int | None = None) -> dict[str, torch.Tensor]:
    """The stored masks of one ``kind`` for an attack set (checksums verified): every field, or ``names``.

    ``pool``: average-pool ``*_mask`` fields to ``pool x pool`` shard by shard (what the detector
    reads anyway), so large masks never sit in memory at full size.
    """
    store = ShardStore(masks_dir(attack_dir, kind))
    manifest = store.manifest()
    if manifest.get("job", {}).get("format") != MASK_SET_FORMAT or not manifest.get("complete"):
        raise AdvDetectError(f"{attack_dir}: no complete '{kind}' mask set; compute it with `advdetect masks --in "
                             f"{attack_dir}` and the detector's mask options first")
    if pool is None:
        return store.load_all(names)
    parts = [{k: _pooled(v, pool) if k.endswith("_mask") else v for k, v in shard.items()}
             for shard in store.iter_shards(names)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _pooled(masks: torch.Tensor, size: int) -> torch.Tensor:
    if masks.shape[-1] == size and masks.shape[-2] == size:
        return masks
    return torch.nn.functional.adaptive_avg_pool2d(masks, size)


def load_split(directory: str | os.PathLike, mask_kind: str, recovery_kind: str | None = None,
               name: str = "", images: bool = True, pool: int | None = None,
               inputs: Sequence[str] = ("masks",)) -> Split:
    """An attack set with its ``mask_kind`` masks and, if given, its ``recovery_kind`` masks: each read once.

    ``images=False`` leaves the images out (empty tensors) and reads only labels, predictions and
    masks; ``pool`` pools the detector's masks (see :func:`load_mask_set`): what fitting a detector needs.
    ``inputs``: what the detector reads (:mod:`advdetect.detector.inputs`); ``masks_clean`` and
    ``masks_adv`` hold those maps (at 32 x 32 when more than the masks), the residual computed from the
    loaded images, or a shard of images at a time when ``images=False``.
    """
    from .detector.inputs import detector_maps, residual_map

    reader = AttackSetReader(directory)
    fields = AttackSetReader.FIELDS if images else ("labels", "clean_pred", "adv_pred")
    t = reader.rows(0, reader.n, fields)
    empty = torch.empty(0)
    split = Split(t.get("clean", empty), t.get("adv", empty), t["labels"], t["clean_pred"], t["adv_pred"],
                  reader.manifest, name=name or Path(directory).name, index=reader.index())
    masks = load_mask_set(directory, mask_kind, ["clean_mask", "adv_mask"], pool=pool)
    recovery = masks if recovery_kind in (None, mask_kind) else \
        load_mask_set(directory, recovery_kind, ["clean_mask", "adv_mask"])
    maps = {side: masks[f"{side}_mask"] for side in ("clean", "adv")}
    if tuple(inputs) != ("masks",):
        extra = load_mask_set(directory, mask_kind, [f"{side}_{f}" for side in ("clean", "adv")
                                                     for f in ("prob_before", "prob_after", "iterations")])
        budget = int(ShardStore(masks_dir(directory, mask_kind)).manifest()["job"]["mask_config"]["iterations"])
        residual = {} if "residual" not in inputs else \
            {"clean": residual_map(split.clean), "adv": residual_map(split.adv)} if images else _residuals(reader)
        maps = {side: detector_maps(inputs, maps[side], residual=residual.get(side),
                                    prob_before=extra[f"{side}_prob_before"], prob_after=extra[f"{side}_prob_after"],
                                    iterations=extra[f"{side}_iterations"], budget=budget) for side in maps}
    return replace(split, masks_clean=maps["clean"], masks_adv=maps["adv"],
                   recovery_clean=recovery["clean_mask"], recovery_adv=recovery["adv_mask"])


def _residuals(reader: AttackSetReader, chunk: int = 512) -> dict[str, torch.Tensor]:
    """The residual planes of every clean and adversarial image, read ``chunk`` images at a time."""
    from .detector.inputs import residual_map

    parts: dict[str, list[torch.Tensor]] = {"clean": [], "adv": []}
    for start in range(0, reader.n, chunk):
        rows = reader.rows(start, min(start + chunk, reader.n), ("clean", "adv"))
        for side in parts:
            parts[side].append(residual_map(rows[side]))
    return {side: torch.cat(v) for side, v in parts.items()}


def balanced(parts: list[torch.Tensor], total: int, seed: int) -> torch.Tensor:
    """About ``total`` adversarial maps drawn equally from each attack's ``parts`` (all, if fewer): what a
    detector fits on beside ``total`` clean maps."""
    gen = torch.Generator().manual_seed(seed)
    per = max(1, total // len(parts))
    return torch.cat([p[torch.randperm(len(p), generator=gen)[:per]] for p in parts])


def split_metrics(model, detector, split: Split, recovery_masks_config, recovery,
                  clean_scores: np.ndarray | None = None) -> dict[str, Any]:
    """Detection and recovery metrics of ``detector`` on one held-out split.

    ``clean_scores``: the detector's scores of ``split.masks_clean`` when already computed
    (splits over the same clean images share them). Detection counts correct clean images
    against successful attacks; recovery is :func:`~advdetect.recovery.recovery_metrics` with
    the detector's real verdicts.
    """
    from sklearn.metrics import roc_curve

    from .detector import detection_metrics
    from .detector.metrics import fpr_per_class
    from .recovery import recovery_metrics

    if clean_scores is None:
        clean_scores = detector.decision_function(split.masks_clean)
    adv_scores = detector.decision_function(split.masks_adv)
    correct, success = split.correct.numpy(), split.successful.numpy()
    threshold = detector.threshold_
    labels = np.r_[np.zeros(correct.sum()), np.ones(success.sum())]
    scores = np.r_[clean_scores[correct], adv_scores[success]]
    detection = detection_metrics(labels, scores, threshold)
    rec = recovery_metrics(model, split.clean, split.adv, split.labels, split.clean_pred, split.adv_pred,
                           split.recovery_clean, split.recovery_adv,
                           clean_flagged=torch.as_tensor(clean_scores > threshold), mask_config=recovery_masks_config,
                           recovery=recovery, adv_flagged=torch.as_tensor(adv_scores > threshold))
    roc = {}
    if success.any() and correct.any():
        fpr, tpr, _ = roc_curve(labels, scores)
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).round().astype(int))
        roc = {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}
    undetected = success & (adv_scores <= threshold)
    per_class = fpr_per_class(clean_scores[correct], split.labels.numpy()[correct], threshold,
                              split.manifest.get("classes"))
    return {
        "params": split.manifest["job"]["attack"], **split.manifest["metrics"], **detection, **rec.to_dict(),
        "success_against_detector": float(undetected.sum() / max(correct.sum(), 1)),
        "fpr_per_class": per_class,  # held-out clean images flagged, per class
        "max_class_fpr": max(per_class.values()) if per_class else float("nan"),
        "roc": roc,
        "scores": {"clean": [float(v) for v in clean_scores[correct]],  # what roc_auc and the rates come from
                   "adversarial": [float(v) for v in adv_scores[success]]},
    }
