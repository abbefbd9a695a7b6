"""report.json (every number), report.html (self-contained, plots embedded) and report.md.

Every number shown in the HTML sits in a cell ``<td data-path="a|b|c" data-value="...">``
naming where it lives in report.json, so tests (and readers) can check one against the other.
The page has no external resources; a tiny inline script records on ``<body>`` how many
images loaded and whether any script error happened (used by the headless-browser test).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import torch

from ..storage import atomic_path, write_json
from .heatmaps import LABELS

PAGE_SCRIPT = """
window.__errors = 0;
window.addEventListener('error', function () { window.__errors += 1;
  document.body.setAttribute('data-script-errors', String(window.__errors)); });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
  document.body.setAttribute('data-script-errors', String(window.__errors));
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
img { max-width: 100%; } .note { color: #555; font-size: 0.9em; } .win { font-weight: bold; }
"""

CALIBRATION_SOURCE = {"test": "clean test images beside the held-out ones", "train": "clean training images"}


def pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def dec(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def json_safe(obj: Any) -> Any:
    """NaN and infinities become null (JSON has no NaN); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def lookup(report: dict[str, Any], path: str) -> Any:
    node: Any = report
    for part in path.split("|"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


class Html:
    """Builds the page; ``num`` renders a number cell tied to its JSON path."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def num(self, path: str, fmt=pct, cls: str = "") -> str:
        value = lookup(self.report, path)
        klass = f' class="{cls}"' if cls else ""
        return (f'<td{klass} data-path="{html.escape(path)}" data-value="{html.escape(repr(value))}">'
                f"{html.escape(fmt(value))}</td>")

    def image(self, png: bytes, alt: str) -> None:
        self.add(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>')

    def render(self, title: str) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{STYLE}</style><script>{PAGE_SCRIPT}</script></head>"
                f"<body>\n{''.join(self.parts)}\n</body></html>\n")


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


def _figures(report: dict[str, Any], pictures: list[dict[str, torch.Tensor]], classes: list[str]) -> dict[str, bytes]:
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
            pts = sorted((a["eps"] * 255, _nan(a["detection_rate"]), _nan(a["success_against_detector"]))
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
                                                ("clean_mask", f"mask, score {meta['clean_score']:+.2f}"),
                                                ("adv", f"adv: {classes[meta['adv_pred']]}"),
                                                ("adv_mask", f"mask, score {meta['adv_score']:+.2f}"))):
                img = pic[key].detach().cpu().float()
                ax = axes[row][col]
                if img.shape[0] == 3:
                    ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
                else:  # a mask; two channels (game "both"): the deletion one
                    ax.imshow(img[-1].numpy(), cmap="magma", vmin=0, vmax=1)
                ax.set_title(title, fontsize=7)
                ax.axis("off")
        figs["gallery"] = _png(fig)
    return figs


def _tables(report: dict[str, Any]) -> tuple[Html, list[str]]:
    """The HTML body and the Markdown lines, built side by side from the same numbers."""
    h, md = Html(report), []
    title = report["title"]
    h.add(f"<h1>{html.escape(title)}</h1>")
    md += [f"# {title}", ""]
    h.add(f"<h2>Threat model</h2><p>{html.escape(report['threat_model'])}</p>")
    md += ["## Threat model", "", report["threat_model"], ""]
    c = report["clean"]
    h.add("<h2>Clean images</h2><table><tr><th class=name>images</th><th>classifier accuracy</th>"
          "<th>detector false-positive rate</th><th>threshold</th></tr><tr>"
          f"{h.num('clean|n', str)}{h.num('clean|accuracy')}{h.num('clean|detector_fpr')}"
          f"{h.num('clean|threshold', dec)}</tr></table>"
          f"<p class=note>calibrated on {CALIBRATION_SOURCE.get(c.get('calibrated_on', 'train'), '?')} to "
          f"{pct(c['calibration_fpr'])} FPR</p>")
    md += ["## Clean images", "", "| images | classifier accuracy | detector FPR | threshold |", "|---|---|---|---|",
           f"| {c['n']} | {pct(c['accuracy'])} | {pct(c['detector_fpr'])} | {dec(c['threshold'])} |", ""]

    cols = [("attack_success", "attack success", pct), ("detection_rate", "detected at threshold", pct),
            ("success_against_detector", "fools classifier + detector", pct), ("roc_auc", "ROC-AUC", dec),
            ("tpr_at_5fpr", "TPR @5% FPR", pct), ("tpr_at_1fpr", "TPR @1% FPR", pct),
            ("flagged_recovery_top1", "recovery of flagged top-1", pct),
            ("flagged_recovery_top5", "recovery of flagged top-5", pct),
            ("pipeline_recovery_top1", "pipeline gives clean label", pct),
            ("recovery_top1", "recovery top-1", pct), ("recovery_top5", "recovery top-5", pct),
            ("recovery_ground_truth", "truth top-1", pct), ("recovery_ground_truth_top5", "truth top-5", pct),
            ("mask_recovery_top1", "mask recovery top-1", pct), ("mask_recovery_top5", "mask recovery top-5", pct),
            ("harm", "harm", pct), ("n_adversarial", "n adv", str)]
    h.add("<h2>Attacks</h2><table><tr><th class=name>attack</th>"
          + "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in cols) + "</tr>")
    md += ["## Attacks", "", "| attack | " + " | ".join(t for _, t, _ in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for key, a in report["attacks"].items():
        h.add(f"<tr><td class=name>{html.escape(key)}</td>"
              + "".join(h.num(f"attacks|{key}|{k}", f) for k, _, f in cols) + "</tr>")
        md.append(f"| {key} | " + " | ".join(f(a[k]) for k, _, f in cols) + " |")
    rec = report["detector"].get("recovery", {})
    how = (f"a light blur (sigma {rec.get('sigma', 0):g} px)" if rec.get("method") == "denoise"
           else "each adversarial image's deletion mask applied back to it")
    if rec.get("exclude_flagged"):
        how += ", with the flagged (adversarial) prediction ruled out"
    h.add("</table><p class=note>Detection, ROC and TPR count successful adversarial images against correctly "
          f"classified clean ones; recovery is {html.escape(how)} (top-1/top-5 of the clean prediction, and of the "
          "true label): over the adversarial images the detector flags (as deployed), and over every successful one "
          "as if all were flagged; 'pipeline gives clean label' is the share of all successful adversarial images "
          "that detection-then-recovery gives back with the clean label; mask recovery is the paper's (the deletion mask applied back, nothing ruled out); harm: "
          "correctly classified clean images the detector flags and recovery relabels.</p>")
    md += [""]
    return h, md


def _more_tables(h: Html, md: list[str], report: dict[str, Any], figs: dict[str, bytes]) -> None:
    tr = report["transfer"]
    if tr["matrix"]:
        h.add("<h2>Transfer matrix</h2><p class=note>" + html.escape(tr["note"]) + "</p><table><tr>"
              "<th class=name>trained on \\ tested on</th>"
              + "".join(f"<th>{html.escape(c)}</th>" for c in tr["tested_on"]) + "</tr>")
        md += ["## Transfer matrix (ROC-AUC)", "", tr["note"], "",
               "| trained on \\ tested on | " + " | ".join(tr["tested_on"]) + " |",
               "|---|" + "---|" * len(tr["tested_on"])]
        for r in tr["trained_on"]:
            h.add(f"<tr><td class=name>{html.escape(r)}</td>"
                  + "".join(h.num(f"transfer|matrix|{r}|{c}|roc_auc", dec) for c in tr["tested_on"]) + "</tr>")
            md.append(f"| {r} | " + " | ".join(dec(tr["matrix"][r][c]["roc_auc"]) for c in tr["tested_on"]) + " |")
        h.add("</table>")
        if "transfer" in figs:
            h.image(figs["transfer"], "transfer matrix")
        md.append("")
    bl = report["baselines"]
    if bl["results"]:
        keys = list(next(iter(bl["results"].values())))
        h.add("<h2>Baselines</h2><p class=note>" + html.escape(bl["note"]) + "</p><table><tr>"
              "<th class=name>method</th>" + "".join(f"<th>{html.escape(k)} AUC</th><th>TPR@5%</th>" for k in keys)
              + "</tr>")
        md += ["## Baselines (ROC-AUC / TPR at 5% FPR)", "", bl["note"], "",
               "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for m in bl["methods"]:
            cells = "".join(h.num(f"baselines|results|{m}|{k}|roc_auc", dec, "win" if bl["winner"][k] == m else "")
                            + h.num(f"baselines|results|{m}|{k}|tpr_at_5fpr") for k in keys)
            h.add(f"<tr><td class=name>{html.escape(LABELS.get(m, m))}</td>{cells}</tr>")
            md.append(f"| {LABELS.get(m, m)} | " + " | ".join(
                f"{dec(bl['results'][m][k]['roc_auc'])} / {pct(bl['results'][m][k]['tpr_at_5fpr'])}" for k in keys)
                + " |")
        wins = "; ".join(f"{k}: {LABELS.get(w, w)}" for k, w in bl["winner"].items())
        h.add(f"</table><p><b>Best method per attack (ROC-AUC):</b> {html.escape(wins)}</p>"
              + "".join(f"<p class=note>Note: {html.escape(n)}</p>" for n in bl["notes"]))
        if "baselines" in figs:
            h.image(figs["baselines"], "baseline comparison")
        md += ["", f"**Best method per attack (ROC-AUC):** {wins}", *[f"Note: {n}" for n in bl["notes"]], ""]
    mm = report.get("mask_methods")
    if mm:
        keys = list(next(iter(mm["results"].values())))
        h.add("<h2>Mask methods</h2><p class=note>" + html.escape(mm["note"]) + "</p><table><tr>"
              "<th class=name>method</th><th>masks/s</th>"
              + "".join(f"<th>{html.escape(k)} AUC</th><th>TPR@5%</th><th>rec. top-1</th><th>rec. top-5</th>"
                        for k in keys) + "</tr>")
        md += ["## Mask methods (ROC-AUC / TPR at 5% FPR / recovery top-1 / top-5)", "", mm["note"], "",
               "| method | masks/s | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for m in mm["methods"]:
            cells = "".join(h.num(f"mask_methods|results|{m}|{k}|roc_auc", dec)
                            + "".join(h.num(f"mask_methods|results|{m}|{k}|{c}") for c in
                                      ("tpr_at_5fpr", "recovery_top1", "recovery_top5")) for k in keys)
            h.add(f"<tr><td class=name>{html.escape(m)}</td>{h.num(f'mask_methods|masks_per_second|{m}', str)}"
                  f"{cells}</tr>")
            md.append(f"| {m} | {mm['masks_per_second'][m]} | " + " | ".join(
                "{} / {} / {} / {}".format(dec(mm["results"][m][k]["roc_auc"]), pct(mm["results"][m][k]["tpr_at_5fpr"]),
                                           pct(mm["results"][m][k].get("recovery_top1")),
                                           pct(mm["results"][m][k].get("recovery_top5"))) for k in keys) + " |")
        h.add("</table>")
        md.append("")
    ad = report.get("adaptive")
    if ad:
        h.add(f"<h2>Adaptive attack</h2><p>{html.escape(ad['method'])}; {ad['steps']} steps, {ad['restarts']} "
              f"restarts, {ad['n_images']} correctly classified evaluation-half images. Success = the classifier "
              "is wrong and the real mask of the adversarial image passes the detector.</p><table><tr>"
              "<th>eps</th><th>success</th><th>classifier fooled</th><th>detected (of fooled)</th>"
              "<th>success per surrogate</th></tr>")
        md += ["## Adaptive attack", "", f"{ad['method']}; {ad['steps']} steps, {ad['restarts']} restarts, "
               f"{ad['n_images']} images.", "", "| eps | success | fooled | detected (of fooled) | per surrogate |",
               "|---|---|---|---|---|"]
        for i, r in enumerate(ad["sweep"]):
            h.add(f"<tr><td>{r['eps'] * 255:g}/255</td>" + "".join(h.num(f"adaptive|sweep|{i}|{k}") for k in
                  ("success", "fooled", "detected", "surrogate_success")) + "</tr>")
            md.append(f"| {r['eps'] * 255:g}/255 | {pct(r['success'])} | {pct(r['fooled'])} | {pct(r['detected'])} | "
                      f"{pct(r['surrogate_success'])} |")
        mi, s = ad["more_iterations"], ad["sanity"]
        h.add("</table><h3>Sanity checks</h3><table><tr><th class=name>check</th><th>value</th></tr>"
              f"<tr><td class=name>success at the largest eps (should be about 100%)</td>"
              f"{h.num('adaptive|sanity|success_at_largest_eps')}</tr>"
              f"<tr><td class=name>success grows with eps</td>{h.num('adaptive|sanity|success_grows_with_eps', str)}</tr>"
              f"<tr><td class=name>gain from {mi['steps']} instead of {ad['steps']} steps at eps "
              f"{mi['eps'] * 255:g}/255 (should be about 0)</td>{h.num('adaptive|sanity|more_iterations_gain', pct)}</tr>"
              f"<tr><td class=name>surrogate fit: mean |mask error| on held-out pairs</td>"
              f"{h.num('adaptive|surrogate|val_l1', dec)}</tr></table>")
        if "adaptive" in figs:
            h.image(figs["adaptive"], "adaptive attack success over eps")
        md += ["", f"Sanity: success at the largest eps {pct(s['success_at_largest_eps'])}; grows with eps: "
               f"{s['success_grows_with_eps']}; gain from {mi['steps']} steps: {pct(s['more_iterations_gain'])}; "
               f"surrogate held-out mask L1 {dec(ad['surrogate']['val_l1'])}.", ""]


def write_reports(out: str | Path, report: dict[str, Any], pictures: list[dict[str, torch.Tensor]] | None = None,
                  classes: list[str] | None = None) -> dict[str, Path]:
    """Write report.json, report.md and report.html under ``out``; return their paths."""
    out = Path(out)
    report = json_safe(report)
    classes = classes or [str(i) for i in range(1000)]
    figs = _figures(report, pictures or [], classes)
    h, md = _tables(report)
    for name, alt in (("roc", "ROC curves per attack"), ("sweep", "detection and success over eps")):
        if name in figs:
            h.image(figs[name], alt)
    _more_tables(h, md, report, figs)
    if "gallery" in figs:
        h.add("<h2>Gallery</h2><p class=note>Successful adversarial images of the main attack: clean image, its "
              "mask, adversarial image, its mask (dark = deleted), with the detector's scores.</p>")
        h.image(figs["gallery"], "gallery: clean image, its mask, adversarial image, its mask")
    t = report["timings"]
    h.add("<h2>Run</h2><table><tr><th class=name>stage</th><th>seconds</th></tr>"
          + "".join(f"<tr><td class=name>{html.escape(k)}</td>{h.num(f'timings|{k}', str)}</tr>" for k in t)
          + "</table><p class=note>Versions: " + html.escape(", ".join(f"{k} {v}" for k, v in
                                                                     report["versions"].items())) + "</p>")
    md += ["## Run", "", " | ".join(f"{k} {v}s" for k, v in t.items()), "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    paths = {"json": out / "report.json", "html": out / "report.html", "md": out / "report.md"}
    write_json(paths["json"], report)
    for key, text in (("html", h.render(report["title"])), ("md", "\n".join(md))):
        with atomic_path(paths[key]) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths
