"""Device selection: ``auto`` picks CUDA when available."""

from __future__ import annotations

import torch

from .errors import AdvDetectError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise AdvDetectError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AdvDetectError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)
