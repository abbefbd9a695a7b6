"""``advdetect evaluate`` end to end on a few dozen images: every section, HTML == JSON, a real browser."""

from __future__ import annotations

import ast
import base64
import html.parser
import io
import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from PIL import Image

from advdetect.cli import main
from advdetect.evaluation.report import dec, lookup, pct
from advdetect.splits import load_split

from ..conftest import SHARED_DATA, needs_builtin, needs_shared

pytestmark = [needs_shared, needs_builtin, pytest.mark.slow]


@pytest.fixture(scope="module")
def report_dir(fast_quick_detector, tmp_path_factory):
    import dataclasses

    from advdetect.evaluation import comparisons

    out = tmp_path_factory.mktemp("report")
    real_config = comparisons.method_config

    def quick_config(name, detector_config):  # the comparison's plumbing, not the methods' quality
        config = real_config(name, detector_config)
        return config if name == "meaningful" else dataclasses.replace(config, iterations=20)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comparisons, "method_config", quick_config)
        result = CliRunner().invoke(main, [
            "evaluate", "--detector", str(fast_quick_detector), "--out", str(out), "--n", "24", "--attacks",
            "fgsm,bim,cw", "--eps", "4/255,8/255", "--n-baseline", "16", "--adaptive-n", "4", "--adaptive-eps",
            "8/255,32/255", "--adaptive-steps", "2", "--adaptive-unroll", "1", "--adaptive-settings", "1:2,0.3:2",
            "--methods", "extremal,robust", "--n-methods", "4", "--data-dir", str(SHARED_DATA), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1])


class Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[dict[str, str]] = []
        self._cell: dict[str, str] | None = None
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        if tag in ("script", "link", "img") and any(str(a.get(k, "")).startswith(("http:", "https:", "//"))
                                                    for k in ("src", "href")):
            self.external.append(str(a))
        if tag == "td" and "data-path" in a:
            self._cell = {"path": a["data-path"], "value": a["data-value"], "text": ""}

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None


def test_json_has_every_section(report_dir):
    out, printed = report_dir
    report = json.loads((out / "report.json").read_text())
    assert report == printed
    for key in ("threat_model", "clean", "attacks", "transfer", "baselines", "adaptive", "mask_methods", "gallery",
                "config", "versions", "seeds", "timings"):
        assert report[key], key
    mm = report["mask_methods"]
    assert mm["methods"] == ["meaningful", "extremal", "robust"]
    assert mm["configs"]["extremal"]["method"] == "extremal" and mm["configs"]["robust"]["method"] == "robust"
    for name in mm["methods"]:
        assert mm["masks_per_second"][name] > 0 and set(mm["results"][name]) == {"fgsm@8/255", "bim@8/255", "cw"}
    assert set(report["attacks"]) == {"fgsm@4/255", "fgsm@8/255", "bim@4/255", "bim@8/255", "cw"}
    for a in report["attacks"].values():
        for key in ("success_rate", "tpr_at_threshold", "tpr_at_1fpr", "tpr_at_5fpr", "roc_auc", "recovery_top1",
                    "recovery_top5", "recovery_ground_truth", "recovery_ground_truth_top5"):
            assert key in a
        assert a["roc"]["fpr"][0] == 0.0 and a["roc"]["tpr"][-1] == 1.0
    assert 0 <= report["clean"]["detector_fpr"] <= 1 and 0 < report["clean"]["accuracy"] <= 1
    tr = report["transfer"]
    assert set(tr["matrix"]) <= set(tr["trained_on"]) and tr["tested_on"] == ["fgsm@8/255", "bim@8/255", "cw"]
    bl = report["baselines"]
    assert bl["methods"][0] == "masks" and len(bl["methods"]) == 7
    assert set(bl["winner"]) == {"fgsm@8/255", "bim@8/255", "cw"} and all(w in bl["methods"] for w in bl["winner"].values())
    ad = report["adaptive"]
    fast = ad["fast_path"]  # the detector's fast path, attacked white box on the same images
    assert [r["eps"] for r in ad["sweep"]] == pytest.approx([8 / 255, 32 / 255])
    assert ad["steps"] == 2 and ad["restarts"] == 1 and ad["more_iterations"]["steps"] == 8
    assert ad["more_restarts"]["restarts"] == 4 and ad["more_restarts"]["eps"] == pytest.approx(8 / 255)
    assert set(ad["sanity"]) == {"success_grows_with_eps", "success_at_largest_eps", "more_iterations_gain",
                                 "more_restarts_gain", "classifier_alone_at_largest_eps"}
    # the surrogate's runs, then the same runs through the real optimisation (1 unrolled step): twice the runs
    assert ad["unroll"] == 1 and "real mask optimisation" in ad["method"]
    # runs at the first eps: 1 random start, then each later run also starts from the best so far (2 each);
    # the exact path: the 2 settings asked for (weights 1, 0.3) x (surrogate, unrolled) = 4 runs; the fast path: 2
    assert ad["settings"] == [[1.0, 2.0], [0.3, 2.0]]
    assert ad["sweep"][0]["restarts"] == 1 + 3 * 2 and fast["sweep"][0]["restarts"] == 1 + 1 * 2
    assert 0 <= ad["sanity"]["classifier_alone_at_largest_eps"] <= 1 and ad["targets"] == 0
    assert [r["eps"] for r in fast["sweep"]] == pytest.approx([8 / 255, 32 / 255]) and set(fast["sanity"]) == set(
        ad["sanity"]) and "no surrogate" in fast["method"]
    assert all(r["n"] == ad["n_images"] for r in fast["sweep"])
    assert "Adaptive attack on the fast path" in (out / "report.md").read_text()


def test_the_fast_path_verdict_is_reported_beside_the_exact_one(report_dir, fast_quick_detector):
    """`detect` judges with the fast path: the report shows its detection on the same images, and its clean
    false-positive rate is what the deployed Guard gives on them."""
    from advdetect import Guard

    out, report = report_dir
    fast = report["fast_path"]
    assert set(fast["attacks"]) == set(report["attacks"]) and fast["margin"] is False
    for key, row in fast["attacks"].items():
        assert 0 <= row["roc_auc"] <= 1 and 0 <= row["tpr_at_threshold"] <= 1, key
        assert row["n_adversarial"] == report["attacks"][key]["n_adversarial"], key
    guard = Guard.load(fast_quick_detector, device="cpu")
    split = load_split(sorted((out / "work").iterdir())[0], guard.deployment.mask_config.kind)
    flagged = guard.check(split.clean[split.correct]).adversarial.float().mean()
    assert fast["clean_fpr"] == pytest.approx(float(flagged))
    assert [row["class"] for row in fast["per_class"]] == [row["class"] for row in report["clean"]["per_class"]]
    text = (out / "report.md").read_text()
    assert "Fast path (what `detect` uses)" in text and "Clean images flagged by the fast path" in text
    assert "NaN" not in (out / "report.json").read_text()  # strict JSON
    assert (out / "report.md").read_text().startswith("# Security evaluation")


def test_html_images_decode_and_numbers_equal_json(report_dir):
    out, report = report_dir
    page = Page()
    page.feed((out / "report.html").read_text())
    assert not page.external, page.external  # self-contained
    assert len(page.images) == 6  # roc, sweep, transfer, baselines, adaptive, gallery
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.load()
        assert img.size[0] > 100 and img.size[1] > 100
    assert len(page.cells) > 80
    for cell in page.cells:
        value = lookup(report, cell["path"])
        shown = ast.literal_eval(cell["value"])
        assert shown == value, cell
        assert cell["text"] in {pct(value), dec(value), str(value)}, cell


def test_headline_numbers_match_an_independent_computation(report_dir):
    """ROC-AUC recomputed by scikit-learn from the stored scores equals report.json, the HTML and the Markdown."""
    from sklearn.metrics import roc_auc_score

    out, report = report_dir
    page = Page()
    page.feed((out / "report.html").read_text())
    html_cells = {cell["path"]: cell["text"] for cell in page.cells}
    markdown = (out / "report.md").read_text().splitlines()
    checked = 0
    for key, attack in report["attacks"].items():
        clean, adv = attack["scores"]["clean"], attack["scores"]["adversarial"]
        assert len(clean) == attack["n_clean"] and len(adv) == attack["n_adversarial"]
        if not adv:
            continue
        auc = roc_auc_score([0] * len(clean) + [1] * len(adv), clean + adv)
        assert attack["roc_auc"] == pytest.approx(auc, abs=1e-12), key
        assert html_cells[f"attacks|{key}|roc_auc"] == f"{auc:.3f}"
        threshold = report["clean"]["threshold"]
        detected = sum(score > threshold for score in adv) / len(adv)
        assert attack["tpr_at_threshold"] == pytest.approx(detected, abs=1e-12), key
        row = next(line for line in markdown if line.startswith(f"| {key} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert f"{auc:.3f}" in cells and f"{100 * detected:.1f}%" in cells, row
        checked += 1
    assert checked >= 3


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_renders_in_a_headless_browser(report_dir, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium here (.ci/run installs Debian's chromium package; install it to run this test)")
    out, _ = report_dir
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                           "--dump-dom", (out / "report.html").resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = proc.stdout[proc.stdout.index("<body"):].split(">", 1)[0]
    assert 'data-images-loaded="6/6"' in body, body
    assert 'data-script-errors="0"' in body, body


def test_evaluate_refuses_more_images_than_the_detector_left_unseen(quick_detector, tmp_path):
    """An old detector (no image records): every test image after its 20 held-out ones counts as used."""
    det = tmp_path / "det"
    shutil.copytree(quick_detector, det)
    meta = json.loads((det / "detector.json").read_text())
    meta.update(calibrated_on="test", n_eval=20, seed=0)
    (det / "detector.json").write_text(json.dumps(meta))
    args = ["evaluate", "--detector", str(det), "--out", str(tmp_path / "r"), "--data-dir", str(SHARED_DATA)]
    result = CliRunner().invoke(main, [*args, "--n", "24"])
    assert result.exit_code == 2 and "use --n 20 or fewer" in result.output
    assert not (tmp_path / "r").exists()


def test_evaluate_refuses_more_targets_than_other_classes(quick_detector, tmp_path):
    """Checked before any attack runs: one line, exit 2, nothing written."""
    args = ["evaluate", "--detector", str(quick_detector), "--out", str(tmp_path / "r"), "--data-dir",
            str(SHARED_DATA), "--n", "24", "--adaptive-targets", "10"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "at most 9 other ones" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()
    for bad in ("1", "1:2,x:2", "-1:2", ""):
        result = CliRunner().invoke(main, [*args[:-2], "--adaptive-settings", bad])
        assert result.exit_code == 2 and "lam:kappa" in result.output and "Traceback" not in result.output, bad
        assert not (tmp_path / "r").exists()


def test_evaluate_refuses_unrolled_gradients_for_masks_it_cannot_differentiate(quick_detector, tmp_path):
    """--adaptive-unroll differentiates the meaningful-perturbation optimisation; an extremal detector is refused
    before any attack runs: one line, exit 2, nothing written."""
    det = tmp_path / "det"
    shutil.copytree(quick_detector, det)
    meta = json.loads((det / "detector.json").read_text())
    meta["mask_config"]["method"] = "extremal"
    (det / "detector.json").write_text(json.dumps(meta))
    args = ["evaluate", "--detector", str(det), "--out", str(tmp_path / "r"), "--data-dir", str(SHARED_DATA),
            "--n", "24", "--adaptive-unroll", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--adaptive-unroll differentiates" in result.output
    assert "extremal" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()
