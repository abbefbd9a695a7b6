"""The report's figures (PNG bytes), drawn on ``matplotlib.figure.Figure``: no pyplot, so a
caller's backend is never switched."""

from __future__ import annotations

import io
import math
from typing import Any

import torch

from ..plots import image_hwc
from .heatmaps import LABELS


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _subplots(figsize: tuple[float, float], rows: int = 1, cols: int = 1, **kwargs: Any):
    """A figure and its axes without pyplot (the caller's matplotlib backend is left alone)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kwargs)


def figures(report: dict[str, Any], pictures: list[dict[str, torch.Tensor]], classes: list[str]) -> dict[str, bytes]:
    figs: dict[str, bytes] = {}
    attacks = report["attacks"]
    main = [k for k in attacks if attacks[k]["eps"] is None or attacks[k]["eps"] == max(report["config"]["eps"])]
    fig, ax = _subplots((5.5, 4.5))
    for key in main:
        roc = attacks[key]["roc"]
        if roc:
            ax.plot(roc["fpr"], roc["tpr"], label=f"{key} (AUC {attacks[key]['roc_auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.axvline(report["clean"]["calibration_fpr"], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false-positive rate (clean)", ylabel="detection rate (adversarial)", title="ROC per attack")
    ax.legend(fontsize=8)
    figs["roc"] = _png(fig)

    linf = sorted({a["attack"] for a in attacks.values() if a["eps"] is not None})
    if linf:
        fig, ax = _subplots((5.5, 4))
        for name in linf:
            pts = sorted((a["eps"] * 255, _nan(a["tpr_at_threshold"]), _nan(a["success_against_detector"]))
                         for a in attacks.values() if a["attack"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name}: detected")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", label=f"{name}: fools both")
        ax.set(xlabel="eps (x/255)", ylabel="fraction", title="eps sweep", ylim=(0, 1))
        ax.legend(fontsize=7)
        figs["sweep"] = _png(fig)

    tr = report["transfer"]
    if tr["matrix"]:
        rows, cols = tr["trained_on"], tr["tested_on"]
        grid = [[float("nan") if tr["matrix"][r][c]["roc_auc"] is None else tr["matrix"][r][c]["roc_auc"]
                 for c in cols] for r in rows]
        fig, ax = _subplots((1.0 + 0.9 * len(cols), 0.8 + 0.6 * len(rows)))
        im = ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if not math.isnan(v) and v < 0.8 else "black")
        ax.set(xlabel="tested on", ylabel="trained on", title="transfer (ROC-AUC)")
        fig.colorbar(im, ax=ax, fraction=0.04)
        figs["transfer"] = _png(fig)

    bl = report["baselines"]
    if bl["results"]:
        keys = list(next(iter(bl["results"].values())))
        fig, ax = _subplots((7, 4))
        width = 0.8 / len(bl["methods"])
        for i, m in enumerate(bl["methods"]):
            ax.bar([k + i * width for k in range(len(keys))], [bl["results"][m][k]["roc_auc"] or 0.0 for k in keys],
                   width, label=LABELS.get(m, m))
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys, rotation=30, ha="right")
        ax.set(ylabel="ROC-AUC", ylim=(0.4, 1.0), title="heatmap methods, same discriminator and halves")
        ax.legend(fontsize=7, ncol=2)
        figs["baselines"] = _png(fig)

    ad = report.get("adaptive")
    if ad:
        fig, ax = _subplots((5.5, 4))
        eps = [r["eps"] * 255 for r in ad["sweep"]]
        ax.plot(eps, [_nan(r["success"]) for r in ad["sweep"]], "o-", label="success (real pipeline)")
        ax.plot(eps, [_nan(r["surrogate_success"]) for r in ad["sweep"]], "x--", label="success (attacker's surrogate)")
        ax.plot(eps, [_nan(r["fooled"]) for r in ad["sweep"]], ".:", label="classifier fooled")
        ax.set(xscale="log", xlabel="eps (x/255)", ylabel="fraction", ylim=(0, 1.02), title="adaptive attack")
        ax.legend(fontsize=8)
        figs["adaptive"] = _png(fig)

    if pictures:
        fig, axes = _subplots((6, 1.6 * len(pictures)), len(pictures), 4, squeeze=False)
        for row, (pic, meta) in enumerate(zip(pictures, report["gallery"])):
            for col, (key, title) in enumerate((("clean", f"clean: {classes[meta['clean_pred']]}"),
                                                ("clean_mask", f"deletion mask, score {meta['clean_score']:+.2f}"),
                                                ("adv", f"adv: {classes[meta['adv_pred']]}"),
                                                ("adv_mask", f"deletion mask, score {meta['adv_score']:+.2f}"))):
                img = pic[key].detach().cpu().float()
                ax = axes[row][col]
                if key in ("clean", "adv"):  # an image (RGB or grayscale)
                    ax.imshow(image_hwc(img))
                else:  # a deletion mask
                    ax.imshow(img[-1].numpy(), cmap="magma", vmin=0, vmax=1)
                ax.set_title(title, fontsize=7)
                ax.axis("off")
        figs["gallery"] = _png(fig)
    return figs
