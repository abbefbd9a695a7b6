"""Attack sets: clean images, their adversarial versions and predictions, on disk.

An attack set directory holds safetensors shards (``clean``, ``adv``, ``labels``,
``clean_pred``, ``adv_pred``) and a ``manifest.json`` with the job, the sha256 of each shard
and the summary metrics. Generation is resumable shard by shard. Reading a set back is
:func:`advdetect.splits.load_attack_set`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .attacks import AttackConfig, attack_batch
from .data import DataSpec, open_split, select
from .distributed import context
from .errors import AdvDetectError
from .models.wrapper import ModelWrapper
from .sources import Selection
from .splits import ATTACK_SET_FORMAT, correct_images, successful_attacks
from .storage import ShardStore

log = logging.getLogger(__name__)


@dataclass
class AttackSummary:
    """What an attack run measured. Rates are fractions in [0, 1]."""

    n: int  # images attacked (the readable ones of those asked for)
    clean_accuracy: float
    adversarial_accuracy: float
    success_rate: float  # among images classified correctly when clean: now misclassified
    attack: dict[str, Any]
    model: dict[str, Any]
    out: str
    seconds: float
    skipped: list[dict[str, str]]  # unreadable files, left out: {"image", "error"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(labels: torch.Tensor, clean_pred: torch.Tensor, adv_pred: torch.Tensor) -> dict[str, float]:
    correct = correct_images(labels, clean_pred)
    fooled = successful_attacks(labels, clean_pred, adv_pred)
    return {
        "clean_accuracy": correct.float().mean().item(),
        "adversarial_accuracy": (adv_pred == labels).float().mean().item(),
        "success_rate": (fooled.sum() / correct.sum().clamp(min=1)).item(),
    }


def generate_attack_set(
    model: ModelWrapper,
    data: Selection,
    config: AttackConfig,
    out: str | os.PathLike,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> AttackSummary:
    """Attack every image of ``data`` and store the set under ``out``, shard by shard (resumable).

    Images are decoded one shard at a time (``workers`` processes ahead of the attack), so memory
    does not grow with the number of images. Unreadable files are left out and listed.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    start = time.time()
    device = model.device
    store = ShardStore(out)
    header = {"format": ATTACK_SET_FORMAT, "model": model.info.identity(), "attack": config.to_dict(),
              "data": {k: v for k, v in data.record.items() if k != "indices"},
              "n": len(data), "seed": seed, "batch_size": batch_size}
    store.start(header)
    n_shards = (len(data) + batch_size - 1) // batch_size
    ctx = context()  # under torchrun each rank attacks its own shards
    mine = list(ctx.my_shards(n_shards))
    pending = [i for i in mine if not store.has(f"{i:05d}")]
    with tqdm(total=len(mine), initial=len(mine) - len(pending), desc=f"attack {config.name}", unit="batch",
              disable=not (progress and ctx.is_main)) as bar:
        for i, batch in data.batches(batch_size, pending, workers):
            x, y = batch.images.to(device), batch.labels.to(device)
            if len(y):
                model.check_input(x[:1])
                clean_pred = model.predict(x)
                adv = attack_batch(model, x, y, config, seed=seed * 1_000_003 + i)
                adv_pred = model.predict(adv)
            else:  # every file of the shard unreadable: an empty shard keeps the numbering
                clean_pred = adv_pred = y
                adv = x
            store.put(f"{i:05d}", {"clean": x, "adv": adv, "labels": y, "clean_pred": clean_pred,
                                   "adv_pred": adv_pred, "index": batch.index},
                      extra={"skipped": batch.skipped} if batch.skipped else None)
            bar.update(1)
    store.sync()
    tensors = store.load_all(["labels", "clean_pred", "adv_pred"])
    skipped = store.extras("skipped")
    if not len(tensors["labels"]):
        raise AdvDetectError(f"none of the {len(data)} images could be read (first: {skipped[:1]})")
    metrics = summarize(tensors["labels"], tensors["clean_pred"], tensors["adv_pred"])
    store.finish(metrics=metrics, classes=list(model.info.classes), skipped=skipped)
    return AttackSummary(n=int(len(tensors["labels"])), attack=config.to_dict(), model=model.info.identity(),
                         out=str(out), seconds=round(time.time() - start, 2), skipped=skipped, **metrics)


def run_attack(
    model: str | ModelWrapper = "cifar10-cnn",
    attack: str = "bim",
    eps: str | float = "8/255",
    alpha: str | float | None = None,
    steps: int | None = None,
    n: int = 1000,
    out: str | os.PathLike = "attack-set",
    split: str | None = None,
    data: DataSpec | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> AttackSummary:
    """Load a model and a seeded subset of data, attack it, store the set; return the summary."""
    from .attacks import parse_eps
    from .models import resolve_model

    config = AttackConfig(attack, eps=parse_eps(eps), alpha=None if alpha is None else parse_eps(alpha), steps=steps)
    wrapper = resolve_model(model, device)
    images = open_split(data or DataSpec(), split, wrapper.info)
    chosen = select(images, min(n, len(images)), seed)
    return generate_attack_set(wrapper, chosen, config, out, batch_size=batch_size, seed=seed, progress=progress)
