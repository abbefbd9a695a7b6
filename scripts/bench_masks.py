"""Benchmark the batched mask engine against a straightforward one-image-at-a-time loop.

    python scripts/bench_masks.py --data-dir ../shared/data            # full (a few minutes)
    python scripts/bench_masks.py --data-dir ../shared/data --quick    # under a minute

Prints one JSON object. Measured side by side in one run, same model, iterations and
hyperparameters:

(a) masks/s of the engine (early stopping off) at each batch size tried, vs the per-image
    loop -> ``speedup_vs_per_image`` (best batch size, picked automatically);
(b) the engine's time per iteration / one plain forward+backward (input gradient, frozen
    weights) at the same batch size -> ``overhead_ratio``;
(c) early stopping vs a fixed count: ``iterations_saved`` and the deletion quality of both
    (fraction of correctly classified images whose target probability falls to <= 10%),
    and the default configuration's speed-up -> ``speedup_default_vs_per_image``;
(d) ``masks_per_second_by_size``: the settings each input size gets (MaskConfig.for_input_size)
    at 32 px with the built-in model and at 224 px with torchvision's resnet18 (CIFAR-10 test
    images upsampled). ``--sizes-only`` runs just this part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect.data import load_cifar10, load_dataset  # noqa: E402
from advdetect.masks import MaskConfig, MeaningfulPerturbation, make_explainer  # noqa: E402
from advdetect.masks.loss import objective  # noqa: E402
from advdetect.masks.parameterization import low_res_shape  # noqa: E402
from advdetect.masks.perturbation import blend, reference  # noqa: E402
from advdetect.models import frozen, load_model  # noqa: E402


def per_image_loop(model, images: torch.Tensor, cfg: MaskConfig) -> torch.Tensor:
    """The straightforward baseline: one image at a time, torch.optim.Adam, same objective,
    jitter as a random sub-pixel shift of the upsampled mask and fresh input noise."""
    h, w = images.shape[-2:]
    lh, lw = low_res_shape((h, w), cfg.upsample)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = []
    with frozen(model):
        for x in images.split(1):
            target = model(x).argmax(1)
            ref = reference(x, cfg.perturbation, blur_sigma=cfg.blur_sigma)
            mask = torch.ones(1, 1, lh, lw, requires_grad=True)
            opt = torch.optim.Adam([mask], lr=cfg.lr)
            for _ in range(cfg.iterations):
                up = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
                if cfg.jitter > 0:
                    dx, dy = ((torch.rand(2, generator=gen) * 2 - 1) * cfg.jitter).tolist()
                    theta = torch.tensor([[[1.0, 0.0, 2 * dx / w], [0.0, 1.0, 2 * dy / h]]])
                    up = F.grid_sample(up, F.affine_grid(theta, list(up.shape), align_corners=False),
                                       padding_mode="border", align_corners=False)
                perturbed = blend(x, ref, up)
                if cfg.noise > 0:
                    perturbed = perturbed + cfg.noise * torch.randn(x.shape, generator=gen)
                loss = objective(mask, model(perturbed), target, cfg.game, cfg.l1_coeff, cfg.tv_coeff, cfg.tv_beta,
                                 cfg.score)
                opt.zero_grad()
                loss.sum().backward()
                opt.step()
                with torch.no_grad():
                    mask.clamp_(0, 1)
            out.append(F.interpolate(mask.detach(), size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def forward_backward_time(model, batch: torch.Tensor, repeats: int) -> float:
    """Seconds for one plain forward + backward to the input, frozen weights."""
    with frozen(model):
        for i in range(repeats + 1):
            if i == 1:
                start = time.perf_counter()
            x = batch.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    return (time.perf_counter() - start) / repeats


def quality(result, correct: torch.Tensor) -> float:
    return (result.deletion_ratio[correct] <= 0.1).float().mean().item()


def rates_by_input_size(data_dir: str | None, quick: bool, device: torch.device) -> dict:
    """Masks/s with each input size's own settings: 32 px (built-in model), 224 px (resnet18)."""
    rows = {}
    for spec, size, n in (("cifar10-cnn", 32, 32 if quick else 128), ("torchvision:resnet18", 224, 2 if quick else 8)):
        model = load_model(spec, device=device)
        images = load_dataset("cifar10", "test", n=n, seed=2024, data_dir=data_dir, input_size=(size, size)).images
        cfg = MaskConfig.for_input_size(size)
        _, seconds = timed(make_explainer(model, cfg).attribute, images.to(device))
        rows[f"{size}px"] = {"model": spec, "n_images": n, "masks_per_second": round(n / seconds, 3),
                             "iterations": cfg.iterations, "early_stop": cfg.early_stop, "upsample": cfg.upsample}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="cifar10-cnn")
    p.add_argument("--quick", action="store_true", help="fewer images and batch sizes (under a minute)")
    p.add_argument("--n", type=int, default=None, help="images for the engine runs")
    p.add_argument("--n-per-image", type=int, default=None, help="images for the per-image baseline")
    p.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes to try")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-methods", type=int, default=None, help="images for the per-method rates (default 64)")
    p.add_argument("--sizes-only", action="store_true", help="only (d): masks/s at 32 and 224 px")
    args = p.parse_args()
    by_input_size = rates_by_input_size(args.data_dir, args.quick, torch.device(args.device))
    if args.sizes_only:
        print(json.dumps({"device": args.device, "threads": torch.get_num_threads(),
                          "masks_per_second_by_size": by_input_size}))
        return

    n = args.n or (64 if args.quick else 256)
    n_single = args.n_per_image or (4 if args.quick else 24)
    sizes = [int(s) for s in (args.batch_sizes or ("32,64" if args.quick else "16,32,64,128,256")).split(",")]
    device = torch.device(args.device)
    model = load_model(args.model, device=device)
    data = load_cifar10("test", n=n, seed=2024, data_dir=args.data_dir)
    images = data.images.to(device)
    correct = (model.predict(images) == data.labels.to(device)).cpu()
    default = MaskConfig()
    fixed = default.replace(early_stop=False)

    _, t_single = timed(per_image_loop, model, images[:n_single].cpu() if device.type == "cpu" else images[:n_single], fixed)
    per_image_rate = n_single / t_single

    by_size, fixed_result = {}, None
    for bs in sizes:
        res, t = timed(MeaningfulPerturbation(model, fixed.replace(batch_size=bs)).attribute, images)
        by_size[bs] = {"masks_per_second": round(n / t, 2), "seconds": round(t, 2)}
        if fixed_result is None:
            fixed_result = res
    best = max(by_size, key=lambda b: by_size[b]["masks_per_second"])

    # (b) overhead ratio at the best batch size: one engine iteration vs one forward+backward
    chunk = images[:best]
    _, t_chunk = timed(MeaningfulPerturbation(model, fixed.replace(batch_size=best)).attribute, chunk)
    per_iteration = t_chunk / fixed.iterations
    fwd_bwd = forward_backward_time(model, chunk, repeats=10 if args.quick else 30)

    early_result, t_early = timed(MeaningfulPerturbation(model, default.replace(batch_size=best)).attribute, images)
    # (c) masks per second of each method at its default settings (same images)
    methods = {}
    for cfg in (default, MaskConfig(method="extremal"), MaskConfig(method="robust")):
        n_m = min(n, args.n_methods or (16 if args.quick else 64))
        _, t_m = timed(make_explainer(model, cfg).attribute, images[:n_m])
        methods[cfg.kind] = {"masks_per_second": round(n_m / t_m, 2), "n_images": n_m, "iterations": cfg.iterations}
    report = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "n_images": n,
        "n_per_image_baseline": n_single,
        "iterations": fixed.iterations,
        "per_image_masks_per_second": round(per_image_rate, 3),
        "batched_masks_per_second": by_size,
        "best_batch_size": best,
        "speedup_vs_per_image": round(by_size[best]["masks_per_second"] / per_image_rate, 2),
        "engine_seconds_per_iteration": round(per_iteration, 5),
        "forward_backward_seconds": round(fwd_bwd, 5),
        "overhead_ratio": round(per_iteration / fwd_bwd, 3),
        "mean_iterations_early": round(early_result.iterations.float().mean().item(), 1),
        "iterations_saved": round(1 - early_result.iterations.float().mean().item() / fixed.iterations, 3),
        "deletion_quality_fixed": round(quality(fixed_result, correct), 3),
        "deletion_quality_early": round(quality(early_result, correct), 3),
        "default_masks_per_second": round(n / t_early, 2),
        "speedup_default_vs_per_image": round(n / t_early / per_image_rate, 2),
        "config": default.to_dict(),
        "methods_masks_per_second": methods,
        "masks_per_second_by_size": by_input_size,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
