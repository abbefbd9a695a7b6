"""The discriminator's training loop, single-process or data-parallel under torchrun.

Every rank draws the same minibatch order, flips and dropout masks from the same seeded
generator, for the whole minibatch, and then computes the loss on its own slice of it; the
gradients DistributedDataParallel averages are scaled so that their sum is the single-process
mean over the minibatch. So one step gives the single-process gradient, up to the order of
float sums (``tests/detector/test_fitting.py`` compares them).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..distributed import Context, context
from .network import MaskAlexNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSettings:
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    patience: int
    augment: bool


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_val_loss: float


def minibatch_backward(model: torch.nn.Module, net: MaskAlexNet, xb: torch.Tensor, yb: torch.Tensor,
                       dropout: list[torch.Tensor], ctx: Context) -> torch.Tensor:
    """Backpropagate the minibatch's mean loss (this rank's share of it); returns the summed loss, detached.

    ``model`` is ``net`` itself, or its DistributedDataParallel wrapper under torchrun.
    """
    mine = slice(ctx.rank, None, ctx.world_size) if ctx.enabled else slice(None)
    logits = model(xb[mine], [d[mine] for d in dropout])
    loss = F.binary_cross_entropy_with_logits(logits, yb[mine], reduction="sum")
    # DDP averages over ranks: times world_size / batch makes the sum the single-process mean
    (loss * (ctx.world_size if ctx.enabled else 1) / len(yb)).backward()
    return loss.detach()


def fit_network(net: MaskAlexNet, Xt: torch.Tensor, yt: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor,
                settings: FitSettings, generator: torch.Generator) -> FitResult:
    """Train ``net`` in place (AdamW, cosine schedule, early stopping on the validation loss); load the best state."""
    device = next(net.parameters()).device
    ctx = context()
    model = net if not ctx.enabled else DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)
    Xt, yt, Xv, yv = Xt.to(device), yt.to(device), Xv.to(device), yv.to(device)
    best, best_state, bad, history = float("inf"), None, 0, []
    for epoch in range(settings.epochs):
        net.train()
        order = torch.randperm(len(yt), generator=generator).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            xb = _augment(Xt[idx], generator) if settings.augment else Xt[idx]
            dropout = net.draw_dropout(len(idx), generator, device)
            opt.zero_grad(set_to_none=True)
            total += minibatch_backward(model, net, xb, yt[idx], dropout, ctx)
            opt.step()
        sched.step()
        if ctx.enabled:
            dist.all_reduce(total)
        train_loss = float(total) / len(yt)
        val_loss = validation_loss(net, Xv, yv)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
        log.info("detector epoch %d train %.4f val %.4f", epoch + 1, train_loss, val_loss)
        if val_loss < best - 1e-4:
            best, best_state, bad = val_loss, copy.deepcopy(net.state_dict()), 0
        else:
            bad += 1
        if _agreed(bad >= settings.patience, ctx):
            break
    net.load_state_dict(best_state)
    net.eval()
    return FitResult(history, best)


def validation_loss(net: MaskAlexNet, X: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return float(F.binary_cross_entropy_with_logits(net(X), y).item())


def _agreed(flag: bool, ctx: Context) -> bool:
    """Rank 0's decision, so that every rank leaves the training loop together."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips (a mask's meaning is mirror-symmetric)."""
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
