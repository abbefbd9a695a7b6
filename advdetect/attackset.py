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
from .data import ImageSet
from .distributed import context
from .models.wrapper import ModelWrapper
from .splits import ATTACK_SET_FORMAT, correct_images, successful_attacks
from .storage import ShardStore

log = logging.getLogger(__name__)


@dataclass
class AttackSummary:
    """What an attack run measured. Rates are fractions in [0, 1]."""

    n: int
    clean_accuracy: float
    adversarial_accuracy: float
    success_rate: float  # among images classified correctly when clean: now misclassified
    attack: dict[str, Any]
    model: dict[str, Any]
    out: str
    seconds: float

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
    data: ImageSet,
    config: AttackConfig,
    out: str | os.PathLike,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    data_description: dict[str, Any] | None = None,
) -> AttackSummary:
    """Attack every image of ``data`` and store the set under ``out`` (resumable)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    start = time.time()
    device = model.device
    store = ShardStore(out)
    header = {"format": ATTACK_SET_FORMAT, "model": model.info.identity(), "attack": config.to_dict(),
              "data": data_description or {"source": data.source, "n": len(data)},
              "n": len(data), "seed": seed, "batch_size": batch_size}
    store.start(header)
    n_shards = (len(data) + batch_size - 1) // batch_size
    ctx = context()  # under torchrun each rank attacks its own shards
    for i in tqdm(list(ctx.my_shards(n_shards)), desc=f"attack {config.name}", unit="batch",
                  disable=not (progress and ctx.is_main)):
        key = f"{i:05d}"
        if store.has(key):
            continue
        sl = slice(i * batch_size, (i + 1) * batch_size)
        x = data.images[sl].to(device)
        y = data.labels[sl].to(device)
        clean_pred = model.predict(x)
        adv = attack_batch(model, x, y, config, seed=seed * 1_000_003 + i)
        adv_pred = model.predict(adv)
        store.put(key, {"clean": x, "adv": adv, "labels": y, "clean_pred": clean_pred, "adv_pred": adv_pred})
    store.sync()
    tensors = store.load_all(["labels", "clean_pred", "adv_pred"])
    metrics = summarize(tensors["labels"], tensors["clean_pred"], tensors["adv_pred"])
    store.finish(metrics=metrics, classes=list(model.info.classes))
    return AttackSummary(n=len(data), attack=config.to_dict(), model=model.info.identity(), out=str(out),
                         seconds=round(time.time() - start, 2), **metrics)


def run_attack(
    model: str | ModelWrapper = "cifar10-cnn",
    attack: str = "bim",
    eps: str | float = "8/255",
    alpha: str | float | None = None,
    steps: int | None = None,
    n: int = 1000,
    out: str | os.PathLike = "attack-set",
    split: str = "test",
    dataset: str = "cifar10",
    data_dir: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> AttackSummary:
    """Load a model and a seeded subset of data, attack it, store the set; return the summary."""
    from .attacks import parse_eps
    from .data import load_dataset
    from .models import resolve_model

    config = AttackConfig(attack, eps=parse_eps(eps), alpha=None if alpha is None else parse_eps(alpha), steps=steps)
    wrapper = resolve_model(model, device)
    data = load_dataset(dataset, split=split, n=n, seed=seed, data_dir=data_dir, data_path=data_path,
                        input_size=wrapper.info.input_size if data_path else None, progress=progress)
    wrapper.check_input(data.images[:1])
    description = {"dataset": dataset if data_path is None else str(data_path), "split": split, "n": n, "seed": seed}
    return generate_attack_set(wrapper, data, config, out, batch_size=batch_size, seed=seed,
                               progress=progress, data_description=description)
