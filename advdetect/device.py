"""Device selection: ``auto`` picks CUDA when available."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Torch's global generators seeded with ``seed`` for the block, and restored after.

    For code that draws from the global generators (torchattacks, module initialization,
    dropout): the caller's random state is left as it was. ``device``: a CUDA device's generator
    is forked and seeded too.
    """
    device = torch.device(device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield
