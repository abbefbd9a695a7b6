"""Memory layout for inference: channels-last weights where they give the same outputs.

On the CPU, oneDNN's convolutions run faster on channels-last (NHWC) tensors than on the default
NCHW layout (the built-in classifier's batch-1 forward: about 3.4 ms -> 2.2-2.7 ms on the 2-core CPU,
``scripts/bench_detect.py``). A convolution whose weight is channels-last writes a channels-last
output, so converting a module's weights is enough; the inputs stay as they are. Not every module
survives it: a ``forward`` that calls ``.view`` on a feature map fails on the new strides. So the
conversion is probed: the module runs once on a probe batch before and after, and is converted
back unless the outputs agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

RTOL, ATOL = 1e-4, 1e-5


def _to_channels_last(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """4-D parameters and buffers of ``module`` made channels-last, in place (the module stays the same
    object, so whoever holds it sees the change); each converted tensor with its data before."""
    changed = []
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.dim() == 4:
                changed.append((tensor, tensor.data))
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return changed


def prefer_channels_last(module: nn.Module, run: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]) -> bool:
    """Convert ``module``'s 4-D weights to channels-last if ``run()`` (a forward pass through it on a probe
    batch) gives the same outputs afterwards; returns whether it did.

    Only on the CPU, where it was measured to help (a CUDA module is left as it is). The module is used
    for inference afterwards: call this on a module you own (a copy), never on a caller's model.
    """
    params = [*module.parameters(), *module.buffers()]
    if not params or any(p.device.type != "cpu" for p in params) or not any(p.dim() == 4 for p in params):
        return False
    with torch.no_grad():
        before = _as_tuple(run())
        changed = _to_channels_last(module)
        try:
            after = _as_tuple(run())
            same = len(before) == len(after) and all(
                a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=RTOL, atol=ATOL)
                for a, b in zip(before, after))
        except RuntimeError as exc:  # e.g. a .view() on a channels-last feature map
            log.debug("channels-last refused by %s: %s", type(module).__name__, exc)
            same = False
    if not same:  # the weights as they were, layout included
        for tensor, data in changed:
            tensor.data = data
    return same


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)
