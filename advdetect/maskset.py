"""Masks for an attack set: clean and adversarial images, stored beside the set.

``<attack-set>/masks/`` (``masks-preserve/`` for the preservation game) holds safetensors shards (``clean_mask``, ``adv_mask`` and the
targets, probabilities and iterations behind them) with a checksummed manifest. The job is
resumable shard by shard, and masks do not depend on the shard size (see masks/meaningful.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .distributed import context
from .errors import AdvDetectError
from .masks import MaskConfig, make_explainer
from .masks.config import resolve_mask_config
from .models import check_same_classifier
from .models.wrapper import ModelWrapper
from .splits import MASK_SET_FORMAT, AttackSetReader, masks_dir
from .storage import ShardStore



@dataclass
class MaskSetSummary:
    n: int
    out: str
    seconds: float
    masks_per_second: float
    clean: dict[str, Any]
    adversarial: dict[str, Any]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _CleanDonor:
    """Clean masks of another attack set over the same clean images and mask settings, shard by shard."""

    def __init__(self, attack_dir: str | os.PathLike | None, config: MaskConfig, shard_size: int) -> None:
        self.store = self.reader = None
        if attack_dir is None:
            return
        store = ShardStore(masks_dir(attack_dir, config.kind))
        manifest = store.manifest()
        job = manifest.get("job", {})
        if (manifest.get("complete") and job.get("mask_config") == config.to_dict()
                and job.get("shard_size") == shard_size):
            self.store, self.reader = store, AttackSetReader(attack_dir)

    def shard(self, key: str, start: int, stop: int, clean: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The donor's clean masks for images ``start..stop-1`` if its clean images there are ``clean``."""
        if self.reader is None or key not in self.store.manifest()["shards"] or self.reader.n < stop:
            return None
        if not torch.equal(self.reader.rows(start, stop, ("clean",))["clean"], clean):
            return None
        return self.store.get(key, [f"clean_{name}" for name in MASK_FIELDS])


MASK_FIELDS = ("mask", "target", "prob_before", "prob_after", "iterations")


def compute_mask_set(model: ModelWrapper, attack_dir: str | os.PathLike,
                     config: MaskConfig | dict[str, Any] | None = None,
                     shard_size: int = 512, progress: bool = True,
                     reuse_clean_from: str | os.PathLike | None = None) -> MaskSetSummary:
    """Compute masks for every clean and adversarial image of the attack set at ``attack_dir``.

    The set is read one shard at a time, so memory does not grow with its size. ``config``: the mask
    settings, or overrides of those for the model's input size (:meth:`MaskConfig.for_input_size`).
    ``reuse_clean_from`` names another attack set over the same clean images (another attack
    on the same subset): its clean masks are copied instead of recomputed when they were made
    with the same settings (masks are deterministic, so this changes nothing but the time).
    """
    from tqdm.auto import tqdm

    config = resolve_mask_config(config, model.info.input_size)
    start = time.time()
    data = AttackSetReader(attack_dir)
    check_same_classifier(data.manifest["job"]["model"], model.info.identity(), f"attack set {attack_dir}")
    device = model.device
    store = ShardStore(masks_dir(attack_dir, config.kind))
    store.start({"format": MASK_SET_FORMAT, "mask_config": config.to_dict(), "attack_set": data.manifest["shards"],
                 "shard_size": shard_size})
    explainer = make_explainer(model, config)
    donor = _CleanDonor(reuse_clean_from, config, shard_size)
    n = data.n
    n_shards = (n + shard_size - 1) // shard_size
    ctx = context()  # under torchrun each rank computes its own shards
    mine = list(ctx.my_shards(n_shards))
    total = 2 * sum(len(range(n)[i * shard_size:(i + 1) * shard_size]) for i in mine)
    with tqdm(total=total, desc="masks", unit="mask", disable=not (progress and ctx.is_main)) as bar:
        for i in mine:
            key = f"{i:05d}"
            lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
            if store.has(key):
                bar.update(2 * (hi - lo))
                continue
            images = data.rows(lo, hi, ("clean", "adv"))
            tensors = donor.shard(key, lo, hi, images["clean"]) or {}
            for side in ("clean", "adv"):
                if f"{side}_mask" not in tensors:
                    result = explainer.attribute(images[side].to(device))
                    tensors.update({f"{side}_mask": result.masks, f"{side}_target": result.targets,
                                    f"{side}_prob_before": result.prob_before,
                                    f"{side}_prob_after": result.prob_after, f"{side}_iterations": result.iterations})
                bar.update(hi - lo)
            store.put(key, tensors)
    store.sync()
    summary = _summary(store)
    store.finish(summary=summary)
    seconds = time.time() - start
    return MaskSetSummary(n=n, out=str(store.directory), seconds=round(seconds, 2),
                          masks_per_second=round(2 * n / max(seconds, 1e-9), 2), clean=summary["clean"],
                          adversarial=summary["adv"], config=config.to_dict())


def _summary(store: ShardStore) -> dict[str, dict[str, float]]:
    """Mean iterations, mean mask value and the share of images whose class the mask deleted, per side,
    accumulated one shard at a time."""
    totals = {side: {"iterations": 0.0, "mask": 0.0, "deleted": 0.0, "n": 0, "pixels": 0} for side in ("clean", "adv")}
    names = [f"{side}_{f}" for side in ("clean", "adv") for f in ("mask", "iterations", "prob_before", "prob_after")]
    for shard in store.iter_shards(names):
        for side, t in totals.items():
            mask = shard[f"{side}_mask"]
            t["iterations"] += shard[f"{side}_iterations"].float().sum().item()
            t["mask"] += mask.double().sum().item()
            t["pixels"] += mask.numel()
            t["deleted"] += (shard[f"{side}_prob_after"] <= 0.1 * shard[f"{side}_prob_before"]).sum().item()
            t["n"] += len(mask)
    return {side: {"mean_iterations": t["iterations"] / max(t["n"], 1), "mean_mask": t["mask"] / max(t["pixels"], 1),
                   "deleted_fraction": t["deleted"] / max(t["n"], 1)} for side, t in totals.items()}


def run_mask_set(attack_dir: str | os.PathLike, model: str | ModelWrapper | None = None,
                 config: MaskConfig | dict[str, Any] | None = None,
                 shard_size: int = 512, device: str = "auto", progress: bool = True) -> MaskSetSummary:
    """The ``masks`` command: load the attack set's model (or ``model``) and compute its masks."""
    from .models import load_recorded_model, resolve_model
    from .storage import read_json

    manifest_path = Path(attack_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise AdvDetectError(f"{attack_dir}: not an attack set (no manifest.json); create one with `advdetect attack`")
    recorded = read_json(manifest_path).get("job", {}).get("model")
    if model is None and not isinstance(recorded, dict):
        raise AdvDetectError(f"{manifest_path}: no model recorded; the manifest is damaged")
    wrapper = resolve_model(model, device) if model is not None else \
        load_recorded_model(recorded, device, f"attack set {attack_dir}")
    return compute_mask_set(wrapper, attack_dir, config=config, shard_size=shard_size, progress=progress)
