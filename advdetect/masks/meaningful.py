"""Meaningful perturbation (Fong & Vedaldi, ICCV 2017): its optimiser loop, many masks at once,
each exactly as if optimised alone.

Design (what keeps the batched loop both correct and cheap):

* **Per-sample everything.** The objective returns one value per image and the batch loss
  is their sum, so each mask receives only its own gradient; Adam is element-wise and is
  written out with a per-sample step count (:mod:`.optimizer`).
* **Randomness keyed by the image's own iteration.** Jitter shifts and input noise come
  from banks indexed by each image's iteration number, so an image sees the same random
  sequence whichever batch it lands in and whenever it enters.
* **Continuous batching with early stopping.** Every ``check_every`` iterations, images
  whose mask and objective have converged (or that reached ``iterations``) are retired and
  their slots refilled from the queue, so converged images stop costing compute while the
  batch stays full.
* **Nothing redundant per iteration.** The perturbed reference (the blur) is computed once
  per image; upsampling and jitter are one ``grid_sample``; the model's parameters are
  frozen so backward computes only the input gradient.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..models.wrapper import frozen
from .base import DEFAULT_BATCH, MaskResult, check_images, resolve_targets
from .config import MaskConfig
from .loss import objective
from .optimizer import adam_direction
from .parameterization import base_grid, low_res_shape, pixels_to_grid, upsample
from .perturbation import blend, reference

log = logging.getLogger(__name__)


class ActiveBatch:
    """The images currently in the batch and their optimiser state (all per-sample).

    Methods built on this loop (robust perturbation) read it in their ``_loss``; ``aux`` holds
    the per-image data their ``_aux`` computed on admission.
    """

    names = ("idx", "x", "ref", "target", "p0", "log_floor", "mask", "m1", "m2", "t", "prev_mask", "loss_sum",
             "last_loss", "kept_mask", "kept", "aux")  # aux: per-image data of a method built on this loop

    def __init__(self, **tensors: torch.Tensor) -> None:
        for name in self.names:
            setattr(self, name, tensors[name])

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def select(self, keep: torch.Tensor) -> ActiveBatch:
        return ActiveBatch(**{n: getattr(self, n)[keep] for n in self.names})

    @staticmethod
    def concat(parts: list[ActiveBatch]) -> ActiveBatch:
        return ActiveBatch(**{n: torch.cat([getattr(p, n) for p in parts]) for n in ActiveBatch.names})


class MeaningfulPerturbation:
    """Meaningful-perturbation masks (Fong & Vedaldi, ICCV 2017) for a batch of images.

    >>> explainer = MeaningfulPerturbation(model, MaskConfig())      # doctest: +SKIP
    >>> result = explainer.attribute(images)                          # doctest: +SKIP
    >>> result.masks.shape                                            # doctest: +SKIP
    torch.Size([N, 1, H, W])

    ``model`` takes images in [0, 1] (e.g. a :class:`~advdetect.models.ModelWrapper`); it is
    used frozen in eval mode and left exactly as it was. Computation happens on the device
    of ``images``, where the model must live too.
    """

    def __init__(self, model: nn.Module, config: MaskConfig | None = None) -> None:
        config = config or MaskConfig()
        if config.game == "both":
            raise ValueError("game='both' stacks two games' masks; make it with make_explainer(model, config)")
        self.model = model
        self.config = config

    def batch_size_for(self, device: torch.device) -> int:
        return self.config.batch_size or DEFAULT_BATCH.get(device.type, 64)

    def attribute(self, images: torch.Tensor, target: torch.Tensor | int | None = None,
                  progress: bool = False, init: torch.Tensor | None = None) -> MaskResult:
        """Masks for ``images`` (N x C x H x W in [0, 1]) explaining ``target``.

        ``target`` defaults to the model's top prediction for each image. ``init``: low-resolution
        masks (N x 1 x ceil(H / upsample) x ceil(W / upsample), in [0, 1]) to start from instead of
        the game's constant (1 for deletion, 0.5 for preservation), e.g. an amortized mask network's.
        """
        images = check_images(images)
        if init is not None:
            want = (images.shape[0], 1, *low_res_shape(tuple(images.shape[-2:]), self.config.upsample))
            if tuple(init.shape) != want:
                raise ValueError(f"init masks must be {want} (low resolution), got {tuple(init.shape)}")
            init = init.detach().to(images.device, images.dtype).clamp(0, 1)
        device = images.device
        param = next(iter(self.model.parameters()), None)
        if param is not None and param.device != device:
            raise ValueError(f"model is on {param.device} but images are on {device}; move one of them")
        with frozen(self.model), torch.enable_grad():  # the loop differentiates the mask, even under no_grad
            return self._run(images, target, progress, init)

    # -- internals -----------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.amp and x.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(x).float()
        return self.model(x)

    @torch.no_grad()
    def _probs(self, x: torch.Tensor, target: torch.Tensor, batch: int) -> torch.Tensor:
        out = [self._forward(x[s:s + batch]).float().softmax(1).gather(1, target[s:s + batch, None]).squeeze(1)
               for s in range(0, x.shape[0], batch)]
        return torch.cat(out) if out else torch.empty(0, device=x.device)

    def _run(self, images: torch.Tensor, target: torch.Tensor | int | None, progress: bool,
             start: torch.Tensor | None = None) -> MaskResult:
        from tqdm.auto import tqdm

        cfg = self.config
        n, c, h, w = images.shape
        device = images.device
        batch = self.batch_size_for(device)
        targets, prob_before = self._targets_and_probs(images, target, batch)

        gen = torch.Generator().manual_seed(cfg.seed)
        shifts = pixels_to_grid((torch.rand(cfg.iterations, 2, generator=gen) * 2 - 1) * cfg.jitter, (h, w)).to(device)
        bank = min(cfg.iterations, 64)
        noise = (torch.randn(bank, c, h, w, generator=gen) * cfg.noise).to(device) if cfg.noise > 0 else None
        grid = base_grid((h, w), device, images.dtype)
        lh, lw = low_res_shape((h, w), cfg.upsample)
        init = 1.0 if cfg.game == "delete" else 0.5

        masks_out = torch.empty(n, 1, h, w, device=device)
        low_out = torch.empty(n, 1, lh, lw, device=device)
        iters_out = torch.zeros(n, dtype=torch.long, device=device)
        next_image = 0
        active: ActiveBatch | None = None
        bar = tqdm(total=n, desc="masks", unit="img", disable=not progress, leave=False)
        while True:
            # refill the free slots from the queue
            room = batch - (len(active) if active is not None else 0)
            if room > 0 and next_image < n:
                take = torch.arange(next_image, min(n, next_image + room), device=device)
                next_image += len(take)
                fresh = self._admit(images, targets, prob_before, take, (lh, lw),
                                    init if start is None else start[take])
                active = fresh if active is None else ActiveBatch.concat([active, fresh])
            if active is None or len(active) == 0:
                break
            window = self._window(active, grid, shifts, noise, bank)
            mean_loss = active.loss_sum / window
            finished = self._check(active, mean_loss, grid)
            if finished.any():
                done = active.select(finished)
                with torch.no_grad():
                    masks_out[done.idx] = upsample(done.mask, grid)
                    low_out[done.idx] = done.mask
                iters_out[done.idx] = done.t
                bar.update(len(done))
            active.last_loss = mean_loss
            if finished.any():
                active = active.select(~finished)
            active.prev_mask = active.mask.clone()
            active.loss_sum = torch.zeros_like(active.loss_sum)
        bar.close()
        with torch.no_grad():
            perturbed_after = self.perturb(images, masks_out)
        prob_after = self._probs(perturbed_after, targets, batch)
        return MaskResult(masks_out, targets, prob_before, prob_after, iters_out, cfg, low=low_out)

    @torch.no_grad()
    def _targets_and_probs(self, images: torch.Tensor, target: torch.Tensor | int | None,
                           batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The class each mask explains (top prediction unless given) and its probability, in one pass."""
        n = images.shape[0]
        if n == 0:
            return torch.empty(0, dtype=torch.long, device=images.device), torch.empty(0, device=images.device)
        probs = torch.cat([self._forward(images[s:s + batch]).float().softmax(1) for s in range(0, n, batch)])
        targets = resolve_targets(probs, target)
        return targets, probs.gather(1, targets[:, None]).squeeze(1)

    def _reference(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.perturbation == "noise":  # per-image noise seeded by its index: batch-independent
            return torch.stack([reference(x[i:i + 1], "noise", generator=torch.Generator().manual_seed(
                cfg.seed * 1_000_003 + int(j)))[0] for i, j in enumerate(idx.tolist())])
        return reference(x, cfg.perturbation, blur_sigma=cfg.blur_sigma)

    def perturb(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``images`` with ``masks`` applied by this explainer's perturbation (no noise, no jitter)."""
        idx = torch.arange(images.shape[0], device=images.device)
        return blend(images, self._reference(images, idx), masks)

    def _check(self, a: ActiveBatch, mean_loss: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Which images are done (converged or out of iterations), updating their kept masks.

        Converged: past ``min_iterations``, the mask moved < ``tol`` (mean abs) over the window,
        and the game's goal is met. Deletion's goal: the target probability of the image
        perturbed by the current mask - without noise or jitter, exactly as the result is used -
        is at most ``stop_ratio`` of the original (one extra forward pass per window). The
        latest mask that met it is kept, and returned if the optimisation later drifts off it.
        Preservation's goal: the window's mean objective changed less than ``tol``.
        """
        cfg = self.config
        out_of_steps = a.t >= cfg.iterations
        if cfg.game == "delete":
            with torch.no_grad():
                prob = self._probs(blend(a.x, a.ref, upsample(a.mask, grid)), a.target, len(a))
            goal = prob <= cfg.stop_ratio * a.p0
            a.kept_mask = torch.where(goal.view(-1, 1, 1, 1), a.mask, a.kept_mask)
            a.kept |= goal
            # out of iterations without meeting the goal now: fall back on the last mask that did
            fallback = out_of_steps & ~goal & a.kept
            a.mask = torch.where(fallback.view(-1, 1, 1, 1), a.kept_mask, a.mask)
        else:
            goal = (mean_loss - a.last_loss).abs() < cfg.tol
        if not cfg.early_stop:
            return out_of_steps
        moved = (a.mask - a.prev_mask).abs().flatten(1).mean(1)
        return out_of_steps | ((a.t >= cfg.min_iterations) & (moved < cfg.tol) & goal)

    def _admit(self, images: torch.Tensor, targets: torch.Tensor, prob_before: torch.Tensor, take: torch.Tensor,
               low: tuple[int, int], init: float | torch.Tensor) -> ActiveBatch:
        x = images[take]
        k = len(take)
        mask = init.clone() if isinstance(init, torch.Tensor) else torch.full((k, 1, *low), init, device=images.device)
        zeros = torch.zeros_like(mask)
        p0 = prob_before[take]
        log_floor = floor_score(p0, self.config.floor, self.config.score)
        return ActiveBatch(idx=take, x=x, ref=self._reference(x, take), target=targets[take], p0=p0, log_floor=log_floor,
                       aux=self._aux(x, targets[take]), mask=mask, m1=zeros,
                       m2=zeros.clone(), t=torch.zeros(k, dtype=torch.long, device=images.device),
                       prev_mask=mask.clone(), loss_sum=torch.zeros(k, device=images.device),
                       last_loss=torch.full((k,), float("inf"), device=images.device), kept_mask=mask.clone(),
                       kept=torch.zeros(k, dtype=torch.bool, device=images.device))

    def _window(self, a: ActiveBatch, grid: torch.Tensor, shifts: torch.Tensor, noise: torch.Tensor | None,
                bank: int) -> int:
        """Run up to ``check_every`` Adam iterations on the active images; return the count."""
        cfg = self.config
        # images enter at window boundaries, so only the last window can be cut short; one
        # host sync per window instead of one per iteration
        steps = min(cfg.check_every, cfg.iterations - int(a.t.min()))
        for _ in range(steps):
            live = (a.t < cfg.iterations).view(-1, 1, 1, 1)
            mask = a.mask.requires_grad_(True)
            offset = shifts[a.t.clamp(max=cfg.iterations - 1)] if cfg.jitter > 0 else None
            up = upsample(mask, grid, offset)
            perturbed = blend(a.x, a.ref, up)
            noise_t = noise[a.t % bank] if noise is not None else None
            if noise_t is not None:
                perturbed = perturbed + noise_t
            loss = self._loss(mask, up, self._forward(perturbed), a, noise_t)
            (grad,) = torch.autograd.grad(loss.sum(), mask)
            step = adam_direction(grad, a.m1, a.m2, (a.t + 1).view(-1, 1, 1, 1).float())
            with torch.no_grad():
                a.mask = torch.where(live, (mask - cfg.lr * step).clamp_(0, 1), mask.detach())
                a.loss_sum += torch.where(live.view(-1), loss.detach(), torch.zeros_like(loss))
                a.t = a.t + live.view(-1).long()
        return max(steps, 1)

    def _loss(self, mask_low: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor, a: ActiveBatch,
              noise: torch.Tensor | None) -> torch.Tensor:
        """Per-image objective of the current masks (``logits``: the model on the perturbed images)."""
        cfg = self.config
        return objective(mask_low, logits, a.target, cfg.game, cfg.l1_coeff, cfg.tv_coeff, cfg.tv_beta, cfg.score,
                         a.log_floor)

    def _aux(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image data a subclass's loss needs (none here)."""
        return torch.zeros(x.shape[0], 0, device=x.device)


def floor_score(p0: torch.Tensor, floor: float, score: str) -> torch.Tensor:
    """The class term's floor for probabilities ``floor * p0``, in the score's units."""
    if floor <= 0:
        return torch.full_like(p0, -1e30)
    q = (p0 * floor).clamp(1e-30, 1 - 1e-7)
    if score == "log_odds":
        return q.log() - torch.log1p(-q)
    return q.log()  # "prob" and "log_prob" are both floored on log p (see loss.class_term)


def compute_masks(model: nn.Module, images: torch.Tensor, target: torch.Tensor | int | None = None,
                  config: MaskConfig | None = None, progress: bool = False) -> MaskResult:
    """Functional shortcut for ``MeaningfulPerturbation(model, config).attribute(images, target)``."""
    return MeaningfulPerturbation(model, config).attribute(images, target=target, progress=progress)


__all__ = ["ActiveBatch", "MeaningfulPerturbation", "compute_masks", "floor_score"]
