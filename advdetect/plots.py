"""Figures, drawn on ``matplotlib.figure.Figure`` directly: no pyplot, so the caller's backend
(a notebook's, say) is never switched and nothing is left open."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def image_hwc(image: torch.Tensor):
    """H x W x 3 for an RGB image, H x W x 3 gray for a 1-channel one (drawn without a colormap)."""
    image = image.detach().cpu().clamp(0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).numpy()


def explanation_figure(image: torch.Tensor, mask: torch.Tensor, perturbed: torch.Tensor,
                       probs_before: torch.Tensor, probs_after: torch.Tensor, classes: Sequence[str],
                       target: int, path: str | os.PathLike, title: str = "", top: int = 5,
                       panel_titles: Sequence[str] | None = None) -> None:
    """Image, mask heatmap (1 - mask: what was deleted), perturbed image, class probabilities.

    ``panel_titles`` (three) replace the titles of the image, mask and perturbed-image panels;
    the bars are ``probs_before`` (on the image) and ``probs_after`` (on the third panel's image).
    A two-channel mask (``game="both"``: [preserve, delete]) is drawn by its deletion channel."""
    from .storage import atomic_path

    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 3.6))
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 1.5]})
    axes[0].imshow(image_hwc(image), interpolation="nearest")
    titles = list(panel_titles or (f"input: {classes[target]} ({probs_before[target]:.1%})",
                                   "mask (deleted regions)",
                                   f"perturbed: {classes[target]} ({probs_after[target]:.1%})"))
    axes[0].set_title(titles[0])
    heat = axes[1].imshow(1 - mask.detach().cpu()[-1].numpy(), cmap="jet", vmin=0, vmax=1,
                          interpolation="nearest")
    axes[1].set_title(titles[1])
    fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(image_hwc(perturbed), interpolation="nearest")
    axes[2].set_title(titles[2])
    for ax in axes[:3]:
        ax.axis("off")
    order = torch.argsort(torch.maximum(probs_before, probs_after), descending=True)[:top].tolist()
    ys = range(len(order))
    axes[3].barh([y + 0.2 for y in ys], [float(probs_before[i]) for i in order], height=0.4, label="before")
    axes[3].barh([y - 0.2 for y in ys], [float(probs_after[i]) for i in order], height=0.4, label="after")
    axes[3].set_yticks(list(ys), [classes[i] for i in order])
    axes[3].invert_yaxis()
    axes[3].set_xlim(0, 1)
    axes[3].set_xlabel("probability")
    axes[3].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    suffix = os.path.splitext(str(path))[1].lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix, dpi=110)
