"""report.json (every number), report.html (self-contained, plots embedded) and report.md.

Each table is described once (:class:`Table`: its rows and, per cell, the JSON path of the
number and its format) and rendered to both HTML and Markdown. Every number shown in the HTML
sits in a cell ``<td data-path="a|b|c" data-value="...">`` naming where it lives in
report.json, so tests (and readers) can check one against the other. Figures are drawn in
:mod:`.figures`.
The page has no external resources; a tiny inline script records on ``<body>`` how many
images loaded and whether any script error happened (used by the headless-browser test).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..detector import MaskDetector
from ..splits import Split
from ..storage import atomic_path, write_json
from .figures import figures
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


@dataclass(frozen=True)
class Cell:
    """One number of a table: where it lives in report.json and how it is shown."""

    path: str  # "a|b|c"
    fmt: Callable[[Any], str] = pct
    css: str = ""


@dataclass
class Table:
    """A table of the report, described once and rendered to HTML and Markdown alike."""

    title: str  # its section heading ("" for none)
    header: list[str]  # the row-label column's title, then one title per cell
    rows: list[tuple[str, list[Cell]]] = field(default_factory=list)
    note: str = ""  # under the table
    level: int = 2  # heading level


def table_html(table: Table, report: dict[str, Any]) -> str:
    parts = [f"<h{table.level}>{html.escape(table.title)}</h{table.level}>" if table.title else "", "<table><tr>",
             f"<th class=name>{html.escape(table.header[0])}</th>",
             *(f"<th>{html.escape(title)}</th>" for title in table.header[1:]), "</tr>"]
    for label, cells in table.rows:
        parts.append(f"<tr><td class=name>{html.escape(label)}</td>")
        for cell in cells:
            value = lookup(report, cell.path)
            klass = f' class="{cell.css}"' if cell.css else ""
            parts.append(f'<td{klass} data-path="{html.escape(cell.path)}" data-value="{html.escape(repr(value))}">'
                         f"{html.escape(cell.fmt(value))}</td>")
        parts.append("</tr>")
    parts.append("</table>")
    if table.note:
        parts.append(f"<p class=note>{html.escape(table.note)}</p>")
    return "".join(parts)


def table_markdown(table: Table, report: dict[str, Any]) -> list[str]:
    lines = [f"{'#' * table.level} {table.title}", ""] if table.title else []
    lines += ["| " + " | ".join(table.header) + " |", "|---" * len(table.header) + "|"]
    for label, cells in table.rows:
        lines.append(f"| {label} | " + " | ".join(cell.fmt(lookup(report, cell.path)) for cell in cells) + " |")
    return lines + ([""] + [table.note] if table.note else []) + [""]


ATTACK_COLUMNS = [("success_rate", "attack success", pct), ("tpr_at_threshold", "detected at threshold", pct),
                  ("success_against_detector", "fools classifier + detector", pct), ("roc_auc", "ROC-AUC", dec),
                  ("tpr_at_5fpr", "TPR @5% FPR", pct), ("tpr_at_1fpr", "TPR @1% FPR", pct),
                  ("flagged_recovery_top1", "recovery of flagged top-1", pct),
                  ("flagged_recovery_top5", "recovery of flagged top-5", pct),
                  ("pipeline_recovery_top1", "pipeline gives clean label", pct),
                  ("recovery_top1", "recovery top-1", pct), ("recovery_top5", "recovery top-5", pct),
                  ("recovery_ground_truth", "truth top-1", pct), ("recovery_ground_truth_top5", "truth top-5", pct),
                  ("mask_recovery_top1", "mask recovery top-1", pct),
                  ("mask_recovery_top5", "mask recovery top-5", pct), ("harm", "harm", pct),
                  ("n_adversarial", "n adv", str)]


def _recovery_note(report: dict[str, Any]) -> str:
    rec = report["detector"].get("recovery", {})
    how = (f"a light blur (sigma {rec.get('sigma', 0):g} px)" if rec.get("method") == "blur"
           else "each adversarial image's deletion mask applied back to it")
    if rec.get("exclude_flagged"):
        how += ", with the flagged (adversarial) prediction ruled out"
    return ("Detection, ROC and TPR count successful adversarial images against correctly classified clean ones; "
            f"recovery is {how} (top-1/top-5 of the clean prediction, and of the true label): over the adversarial "
            "images the detector flags (as deployed), and over every successful one as if all were flagged; "
            "'pipeline gives clean label' is the share of all successful adversarial images that "
            "detection-then-recovery gives back with the clean label; mask recovery is the paper's (the deletion "
            "mask applied back, nothing ruled out); harm: correctly classified clean images the detector flags and "
            "recovery relabels.")


def tables(report: dict[str, Any]) -> list[tuple[Table, str | None]]:
    """Every table of the report, in order, each with the figure (if any) shown after it."""
    out: list[tuple[Table, str | None]] = []
    clean = report["clean"]
    out.append((Table("Clean images", ["images", "classifier accuracy", "detector false-positive rate", "threshold"],
                      [("held-out", [Cell("clean|n", str), Cell("clean|accuracy"), Cell("clean|detector_fpr"),
                                     Cell("clean|threshold", dec)])],
                      note=f"calibrated on {CALIBRATION_SOURCE.get(clean.get('calibrated_on', 'train'), '?')} to "
                           f"{pct(clean['calibration_fpr'])} FPR"), None))
    if clean.get("per_class"):
        out.append((Table("Clean images flagged, per class", ["class", "false-positive rate"],
                          [(row["class"], [Cell(f"clean|per_class|{i}|fpr")])
                           for i, row in enumerate(clean["per_class"])],
                          note="Held-out clean images the detector flags, by their class: the calibrated rate is an "
                               "average, and one class may carry more of it."), None))
    out.append((Table("Attacks", ["attack", *(title for _, title, _ in ATTACK_COLUMNS)],
                      [(key, [Cell(f"attacks|{key}|{name}", fmt) for name, _, fmt in ATTACK_COLUMNS])
                       for key in report["attacks"]], note=_recovery_note(report)), "roc"))
    out += _fast_path_tables(report)
    transfer = report["transfer"]
    if transfer["matrix"]:
        out.append((Table("Transfer matrix (ROC-AUC)", ["trained on \\ tested on", *transfer["tested_on"]],
                          [(row, [Cell(f"transfer|matrix|{row}|{col}|roc_auc", dec) for col in transfer["tested_on"]])
                           for row in transfer["trained_on"]], note=transfer["note"]), "transfer"))
    base = report["baselines"]
    if base["results"]:
        keys = list(next(iter(base["results"].values())))
        wins = "; ".join(f"{k}: {LABELS.get(w, w)}" for k, w in base["winner"].items())
        notes = " ".join(f"Note: {n}" for n in base["notes"])
        out.append((Table("Baselines (ROC-AUC / TPR at 5% FPR)",
                          ["method", *(f"{k} {what}" for k in keys for what in ("AUC", "TPR@5%"))],
                          [(LABELS.get(m, m), [cell for k in keys for cell in (
                              Cell(f"baselines|results|{m}|{k}|roc_auc", dec, "win" if base["winner"][k] == m else ""),
                              Cell(f"baselines|results|{m}|{k}|tpr_at_5fpr"))]) for m in base["methods"]],
                          note=f"{base['note']}. Best method per attack (ROC-AUC): {wins}. {notes}".strip()),
                    "baselines"))
    methods = report.get("mask_methods")
    if methods:
        keys = list(next(iter(methods["results"].values())))
        columns = (("roc_auc", "AUC", dec), ("tpr_at_5fpr", "TPR@5%", pct), ("recovery_top1", "rec. top-1", pct),
                   ("recovery_top5", "rec. top-5", pct))
        out.append((Table("Mask methods", ["method", "masks/s", *(f"{k} {title}" for k in keys for _, title, _ in columns)],
                          [(m, [Cell(f"mask_methods|masks_per_second|{m}", str),
                                *(Cell(f"mask_methods|results|{m}|{k}|{name}", fmt) for k in keys
                                  for name, _, fmt in columns)]) for m in methods["methods"]],
                          note=methods["note"]), None))
    adaptive = report.get("adaptive")
    if adaptive:
        out.append((Table("Adaptive attack", ["eps", "success", "classifier fooled", "detected (of fooled)",
                                              "success per surrogate"],
                          [(f"{r['eps'] * 255:g}/255", [Cell(f"adaptive|sweep|{i}|{k}") for k in
                                                       ("success", "fooled", "detected", "surrogate_success")])
                           for i, r in enumerate(adaptive["sweep"])],
                          note=f"{adaptive['method']}; {adaptive['steps']} steps, {adaptive['restarts']} restarts, "
                               f"runs (lam, kappa) {adaptive['settings']}, each untargeted then aimed at each of "
                               f"{adaptive['targets']} next-ranked classes, on "
                               f"{adaptive['n_images']} correctly classified evaluation-half images. Success = the "
                               "classifier is wrong and the real mask of the adversarial image passes the "
                               "detector."), None))
        out.append((Table("Sanity checks", ["check", "value"], _sanity_rows(adaptive, adaptive, "adaptive") + [
            ("surrogate fit: mean |mask error| on held-out pairs", [Cell("adaptive|surrogate|val_l1", dec)])],
            level=3), "adaptive"))
        fast = adaptive.get("fast_path")
        if fast:
            out.append((Table("Adaptive attack on the fast path", [
                "eps", "success", "classifier fooled", "detected (of fooled)"],
                [(f"{r['eps'] * 255:g}/255", [Cell(f"adaptive|fast_path|sweep|{i}|{k}") for k in
                                             ("success", "fooled", "detected")]) for i, r in enumerate(fast["sweep"])],
                note=f"{fast['method']}; the same images, steps and restarts. Success = the classifier is wrong and "
                     "the fast detector (amortized masks), which `detect` uses, passes the image."), None))
            out.append((Table("Sanity checks (fast path)", ["check", "value"],
                              _sanity_rows(adaptive, fast, "adaptive|fast_path"), level=3), None))
    out.append((Table("Run", ["stage", "seconds"], [(k, [Cell(f"timings|{k}", str)]) for k in report["timings"]],
                      note="Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())), None))
    return out


FAST_COLUMNS = [("roc_auc", "ROC-AUC", dec), ("tpr_at_5fpr", "TPR @5% FPR", pct), ("tpr_at_1fpr", "TPR @1% FPR", pct),
                ("tpr_at_threshold", "detected at threshold", pct), ("n_adversarial", "n adv", str)]


def _fast_path_tables(report: dict[str, Any]) -> list[tuple[Table, str | None]]:
    """The fast path's verdict on the same images, when the detector has one (reports before it: none)."""
    fast = report.get("fast_path")
    if not fast:
        return []
    combined = " combined with the classifier's margin" if fast["margin"] else ""
    combined += ", one threshold per predicted class" if fast["per_class_thresholds"] else ""
    out = [(Table("Fast path (what `detect` uses)", ["attack", *(title for _, title, _ in FAST_COLUMNS)],
                  [(key, [Cell(f"fast_path|attacks|{key}|{name}", fmt) for name, _, fmt in FAST_COLUMNS])
                   for key in fast["attacks"]],
                  note=f"Amortized masks (one network pass) and the detector fitted on them{combined}, on the same "
                       f"held-out images as above; it flags {pct(fast['clean_fpr'])} of the correctly classified "
                       f"clean images at its threshold (calibrated to {pct(fast['calibration_fpr'])} FPR)."), None)]
    if fast["per_class"]:
        out.append((Table("Clean images flagged by the fast path, per class", ["class", "false-positive rate"],
                          [(row["class"], [Cell(f"fast_path|per_class|{i}|fpr")])
                           for i, row in enumerate(fast["per_class"])], level=3), None))
    return out


def _page(report: dict[str, Any], figs: dict[str, bytes]) -> tuple[str, str]:
    """The HTML page and the Markdown text, table by table from the same descriptions."""
    title = report["title"]
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<h2>Threat model</h2><p>{html.escape(report['threat_model'])}</p>"]
    md = [f"# {title}", "", "## Threat model", "", report["threat_model"], ""]
    for table, figure in tables(report):
        body.append(table_html(table, report))
        md += table_markdown(table, report)
        if figure == "roc":  # after the attack table: the ROC curves and the eps sweep
            body += [_image(figs[name], alt) for name, alt in (("roc", "ROC curves per attack"),
                                                               ("sweep", "detection and success over eps"))
                     if name in figs]
        elif figure in figs:
            body.append(_image(figs[figure], f"{figure} figure"))
        if table.title == "Attacks" and "gallery" in figs:
            body.append("<h2>Gallery</h2><p class=note>Successful adversarial images of the main attack: clean "
                        "image, its mask, adversarial image, its mask (dark = deleted), with the detector's scores."
                        "</p>" + _image(figs["gallery"], "gallery: clean image, its mask, adversarial image, its mask"))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style><script>{PAGE_SCRIPT}</script></head>"
            f"<body>\n{''.join(body)}\n</body></html>\n")
    return page, "\n".join(md)


def _image(png: bytes, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


def write_reports(out: str | Path, report: dict[str, Any], pictures: list[dict[str, torch.Tensor]] | None = None,
                  classes: list[str] | None = None) -> dict[str, Path]:
    """Write report.json, report.md and report.html under ``out``; return their paths."""
    out = Path(out)
    report = json_safe(report)
    figs = figures(report, pictures or [], classes or [str(i) for i in range(1000)])
    page, markdown = _page(report, figs)
    paths = {"json": out / "report.json", "html": out / "report.html", "md": out / "report.md"}
    write_json(paths["json"], report)
    for key, text in (("html", page), ("md", markdown)):
        with atomic_path(paths[key]) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return paths


def gallery_rows(split: Split, detector: MaskDetector,
             count: int) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]]]:
    """Rows for the report and the pictures behind them (clean, its deletion mask, adversarial, its deletion mask)."""
    chosen = split.successful.nonzero().flatten()[:count].tolist()
    if not chosen:
        return [], []
    clean_scores = detector.decision_function(split.masks_clean[chosen])
    adv_scores = detector.decision_function(split.masks_adv[chosen])
    rows = [{"index": i, "label": int(split.labels[i]), "clean_pred": int(split.clean_pred[i]),
             "adv_pred": int(split.adv_pred[i]), "clean_score": float(clean_score), "adv_score": float(adv_score),
             "attack": split.name} for i, clean_score, adv_score in zip(chosen, clean_scores, adv_scores)]
    pictures = [{"clean": split.clean[i], "clean_mask": split.recovery_clean[i], "adv": split.adv[i],
                 "adv_mask": split.recovery_adv[i]} for i in chosen]  # the deletion masks, whatever the detector reads
    return rows, pictures


def _sanity_rows(adaptive: dict[str, Any], part: dict[str, Any], key: str) -> list[tuple[str, list[Cell]]]:
    """The sanity checks of one attacked pipeline (``part``: the exact path's results or the fast path's)."""
    rows = [("success at the largest eps (should be about 100%)", [Cell(f"{key}|sanity|success_at_largest_eps")]),
            ("success grows with eps", [Cell(f"{key}|sanity|success_grows_with_eps", str)])]
    more, wider = part.get("more_iterations"), part.get("more_restarts")
    if more:
        rows.append((f"gain from {more['steps']} instead of {adaptive['steps']} steps at eps {more['eps'] * 255:g}/255 "
                     "(should be about 0, never below)", [Cell(f"{key}|sanity|more_iterations_gain")]))
    if wider:
        rows.append((f"gain from {wider['restarts']} instead of {adaptive['restarts']} random starts at eps "
                     f"{wider['eps'] * 255:g}/255 (should be about 0, never below)",
                     [Cell(f"{key}|sanity|more_restarts_gain")]))
    rows.append(("the same PGD on the classifier alone, fooled at the largest eps (should be 100%)",
                 [Cell(f"{key}|sanity|classifier_alone_at_largest_eps")]))
    return rows
