"""The model wrapper: normalization inside, metadata beside.

Every classifier in advdetect is a :class:`ModelWrapper`: it takes float32 NCHW images in
[0, 1] and returns logits, so attacks, masks and recovery all work in pixel space.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import AdvDetectError, OptionError


@dataclass
class ModelInfo:
    """What a classifier is: its name, classes, input size and normalization."""

    name: str
    classes: tuple[str, ...]
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sha256: str | None = None  # of the weights file, when there is one
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def identity(self) -> dict[str, Any]:
        """What a detector or a stored set records to check later that it is used with the same classifier.

        ``name`` is the spec that loads the model again: a built-in or torchvision name, or a
        model file's absolute path (so it loads from any directory); ``sha256`` its weights.
        """
        return {"name": self.name, "sha256": self.sha256, "input_size": list(self.input_size),
                "num_classes": self.num_classes, "mean": list(self.mean), "std": list(self.std)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"], d["input_size"] = list(self.classes), list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


IDENTITY_KEYS = ("name", "sha256", "input_size", "num_classes", "mean", "std")


def same_classifier(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two identities name the same classifier.

    Weights with a sha256 are the same classifier wherever the file lies (a moved file
    matches); the other fields must agree where both record them (older records lack the
    normalization).
    """
    keys = [k for k in IDENTITY_KEYS if k in recorded and k in current]
    if recorded.get("sha256") and recorded.get("sha256") == current.get("sha256"):
        keys.remove("name")
    return all(recorded[k] == current[k] for k in keys)


class ModelWrapper(nn.Module):
    """``net((x - mean) / std)`` for images ``x`` in [0, 1]."""

    def __init__(self, net: nn.Module, info: ModelInfo) -> None:
        super().__init__()
        if len(info.mean) != len(info.std):
            raise OptionError(f"mean has {len(info.mean)} values but std has {len(info.std)}")
        if any(s <= 0 for s in info.std):
            raise OptionError(f"std values must be positive, got {info.std}")
        self.net = net
        self.info = info
        self.register_buffer("mean", torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`AdvDetectError` unless ``x`` is N x C x H x W of this model's shape."""
        want = (len(self.info.mean), *self.info.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise AdvDetectError(
                f"{self.info.name} takes images of shape N x {want[0]} x {want[1]} x {want[2]}, got {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise AdvDetectError("input images hold NaN or infinite values")

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Top-1 labels for images in [0, 1], batched, in eval mode (restored afterwards)."""
        return self.logits(images, batch_size).argmax(1)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        outs = []
        with eval_mode(self):
            for start in range(0, images.shape[0], batch_size):
                outs.append(self(images[start:start + batch_size].to(self.device)).float())
        if not outs:
            return torch.empty(0, self.info.num_classes)
        return torch.cat(outs)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block and restore each submodule's mode after."""
    changed = [m for m in _submodules(module) if m.training]  # only these are restored (nothing to do if none)
    if changed:
        module.eval()
    try:
        yield module
    finally:
        for m in changed:
            m.training = True


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on every parameter; both restored after."""
    changed = [p for p in _parameters(module) if p.requires_grad]  # only these are touched (and restored)
    with eval_mode(module):
        for p in changed:
            p.requires_grad_(False)
        try:
            yield module
        finally:
            for p in changed:
                p.requires_grad_(True)


def as_tuple(values: Sequence[float] | float, n: int, what: str) -> tuple[float, ...]:
    """Expand a scalar to ``n`` values, or check a sequence has ``n``."""
    if isinstance(values, (int, float)):
        return (float(values),) * n
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise OptionError(f"{what} needs 1 or {n} values, got {len(values)}")
    return values


def _submodules(module: nn.Module) -> list[nn.Module]:
    """``module.modules()`` (each module once), without the names it builds: a verdict enters these contexts
    several times, and on a small network building the names costs more than the check (``frozen`` on the
    built-in classifier: 125 -> 81 us)."""
    seen: set[int] = set()
    out, stack = [], [module]
    while stack:
        m = stack.pop()
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
            stack.extend(child for child in reversed(m._modules.values()) if child is not None)
    return out


def _parameters(module: nn.Module) -> list[nn.Parameter]:
    """``module.parameters()`` (each parameter once), the same way as :func:`_submodules`."""
    seen: set[int] = set()
    out = []
    for m in _submodules(module):
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
