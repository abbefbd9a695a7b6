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
from .models import check_same_classifier
from .models.wrapper import ModelWrapper
from .splits import MASK_SET_FORMAT, load_attack_set, load_mask_set, masks_dir
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


def _clean_donor(attack_dir: str | os.PathLike | None, clean: torch.Tensor, config: MaskConfig,
                 shard_size: int) -> dict[str, torch.Tensor] | None:
    """Clean masks of another attack set over the very same clean images and mask settings."""
    if attack_dir is None:
        return None
    manifest = ShardStore(masks_dir(attack_dir, config.kind)).manifest()
    job = manifest.get("job", {})
    if (not manifest.get("complete") or job.get("mask_config") != config.to_dict()
            or job.get("shard_size") != shard_size):
        return None
    if not torch.equal(load_attack_set(attack_dir).clean, clean):
        return None
    masks = load_mask_set(attack_dir, config.kind)
    return {k: v for k, v in masks.items() if k.startswith("clean_")}


def compute_mask_set(model: ModelWrapper, attack_dir: str | os.PathLike, config: MaskConfig | None = None,
                     shard_size: int = 512, progress: bool = True,
                     reuse_clean_from: str | os.PathLike | None = None) -> MaskSetSummary:
    """Compute masks for every clean and adversarial image of the attack set at ``attack_dir``.

    ``reuse_clean_from`` names another attack set over the same clean images (another attack
    on the same subset): its clean masks are copied instead of recomputed when they were made
    with the same settings (masks are deterministic, so this changes nothing but the time).
    """
    from tqdm.auto import tqdm

    config = config or MaskConfig()
    start = time.time()
    data = load_attack_set(attack_dir)
    check_same_classifier(data.manifest["job"]["model"], model.info.identity(), f"attack set {attack_dir}")
    device = model.device
    store = ShardStore(masks_dir(attack_dir, config.kind))
    store.start({"format": MASK_SET_FORMAT, "mask_config": config.to_dict(), "attack_set": data.manifest["shards"],
                 "shard_size": shard_size})
    explainer = make_explainer(model, config)
    donor = _clean_donor(reuse_clean_from, data.clean, config, shard_size)
    n = int(data.labels.shape[0])
    n_shards = (n + shard_size - 1) // shard_size
    ctx = context()  # under torchrun each rank computes its own shards
    mine = list(ctx.my_shards(n_shards))
    bar = tqdm(total=2 * sum(len(range(n)[i * shard_size:(i + 1) * shard_size]) for i in mine), desc="masks",
               unit="mask", disable=not (progress and ctx.is_main))
    for i in mine:
        key = f"{i:05d}"
        sl = slice(i * shard_size, (i + 1) * shard_size)
        count = len(range(n)[sl])
        if store.has(key):
            bar.update(2 * count)
            continue
        tensors: dict[str, torch.Tensor] = {}
        for side, images in (("clean", data.clean[sl]), ("adv", data.adv[sl])):
            if side == "clean" and donor is not None:
                tensors.update({k: v[sl] for k, v in donor.items()})
                bar.update(count)
                continue
            result = explainer.attribute(images.to(device))
            tensors.update({f"{side}_mask": result.masks, f"{side}_target": result.targets,
                            f"{side}_prob_before": result.prob_before, f"{side}_prob_after": result.prob_after,
                            f"{side}_iterations": result.iterations})
            bar.update(count)
        store.put(key, tensors)
    bar.close()
    store.sync()
    stored = store.load_all()
    summary = {side: {"mean_iterations": stored[f"{side}_iterations"].float().mean().item(),
                      "mean_mask": stored[f"{side}_mask"].mean().item(),
                      "deleted_fraction": (stored[f"{side}_prob_after"]
                                           <= 0.1 * stored[f"{side}_prob_before"]).float().mean().item()}
               for side in ("clean", "adv")}
    store.finish(summary=summary)
    seconds = time.time() - start
    return MaskSetSummary(n=n, out=str(store.directory), seconds=round(seconds, 2),
                          masks_per_second=round(2 * n / max(seconds, 1e-9), 2), clean=summary["clean"],
                          adversarial=summary["adv"], config=config.to_dict())


def run_mask_set(attack_dir: str | os.PathLike, model: str | ModelWrapper | None = None, config: MaskConfig | None = None,
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
