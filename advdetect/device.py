"""Device selection: ``auto`` picks CUDA when available."""

from __future__ import annotations

import torch

from .errors import AdvDetectError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """The device for ``name``; under torchrun this also joins the process group (see distributed)."""
    from .distributed import init_from_env, rank_device

    if name.split(":")[0] not in DEVICES:
        raise AdvDetectError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AdvDetectError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    init_from_env(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return rank_device(torch.device(name))
