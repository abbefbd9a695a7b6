"""End to end: attack -> masks -> train -> detect / recover / explain, on a few real images."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from advdetect.cli import main
from advdetect.data import CIFAR10_CLASSES
from advdetect.imageio import save_image
from advdetect.splits import load_attack_set, load_split

from .conftest import SHARED_DATA, needs_builtin, needs_shared

pytestmark = [needs_shared, needs_builtin, pytest.mark.slow]
FAST_MASKS = ["--iterations", "40"]


def run(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


def last_json(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("det")
    result = run("train", "--attack", "bim", "--n", "120", "--n-eval", "60", "--n-calibration", "40",
                 "--out", str(out), "--data-dir", str(SHARED_DATA), "--transfer", "fgsm", "--json", *FAST_MASKS,
                 "--fast-epochs", "3", "--fast-n", "120")  # the fast path's plumbing, not its quality
    assert result.exit_code == 0, result.output
    return out, last_json(result)


def test_train_report_and_artifacts(detector_dir):
    out, report = detector_dir
    assert (out / "detector.json").is_file() and (out / "detector.safetensors").is_file()
    assert set(report["metrics"]) == {"bim", "fgsm"}
    m = report["metrics"]["bim"]
    for key in ("accuracy", "roc_auc", "tpr_at_5fpr", "tpr_at_1fpr", "recovery_top1", "recovery_top5", "harm"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["trained_on"] and not report["metrics"]["fgsm"]["trained_on"]
    meta = json.loads((out / "detector.json").read_text())
    assert meta["classifier"]["name"] == "cifar10-cnn" and meta["mask_config"]["iterations"] == 40
    # the fast path: a mask network and a detector on its maps, with held-out metrics for every attack
    assert (out / "fast" / "mask_net.json").is_file() and (out / "fast" / "detector.json").is_file()
    assert set(report["fast"]["metrics"]) == {"bim", "fgsm"}
    assert all(0 <= m["roc_auc"] <= 1 for m in report["fast"]["metrics"].values())
    # a bare train's verdict is the best one measured: the score combined with the classifier's gap, blur
    # shifts and one noise shift by an MLP
    fast = report["fast"]
    assert fast["margin"] is True and fast["noise"] == [0.01] and fast["hidden"] == 32
    assert fast["squeeze"] == [0.75, 1.5] and (out / "fast" / "margin.json").is_file()
    # rerunning reuses every finished stage and gives the same report
    again = run("train", "--attack", "bim", "--n", "120", "--n-eval", "60", "--n-calibration", "40",
                "--out", str(out), "--data-dir", str(SHARED_DATA), "--transfer", "fgsm", "--json", *FAST_MASKS,
                "--fast-epochs", "3", "--fast-n", "120")
    assert again.exit_code == 0 and last_json(again)["metrics"]["bim"]["roc_auc"] == m["roc_auc"]


def test_threshold_is_calibrated_on_unseen_test_images(detector_dir):
    """Calibration images: clean test images the classifier never saw, none of them an evaluation image."""
    out, report = detector_dir
    assert report["calibrated_on"] == "test" and 30 <= report["n_calibration"] <= 40
    cal = load_attack_set(out / "work" / "calibration-bim")
    test = load_attack_set(out / "work" / "test-bim")
    assert len(cal.clean) == 40 and cal.manifest["job"]["data"]["split"] == "test"
    flat_cal, flat_test = cal.clean.flatten(1), test.clean.flatten(1)
    assert not bool((torch.cdist(flat_cal, flat_test).min(1).values == 0).any())  # disjoint from the evaluation
    train = load_attack_set(out / "work" / "train-bim")
    assert not bool((torch.cdist(flat_cal, train.clean.flatten(1)).min(1).values == 0).any())
    # the threshold flags at most 5% of the calibration images' clean masks
    from advdetect.detector import load_detector

    detector, meta = load_detector(out)
    calibration = load_split(out / "work" / "calibration-bim", "delete", inputs=detector.input_names())
    cal_masks = calibration.masks_clean[calibration.correct]
    assert len(cal_masks) == report["n_calibration"]
    assert (detector.decision_function(cal_masks) > detector.threshold_).mean() <= 0.05
    assert meta["calibrated_on"] == "test" and meta["n_calibration"] == report["n_calibration"]
    bad = run("train", "--attack", "bim", "--n", "120", "--n-eval", "9500", "--out", str(out / "x"),
              "--data-dir", str(SHARED_DATA))
    assert bad.exit_code == 2 and "exceeds the 10000" in bad.output
    bad_fpr = run("train", "--fpr", "1.5", "--out", str(out / "y"), "--data-dir", str(SHARED_DATA))
    assert bad_fpr.exit_code == 2 and "--fpr" in bad_fpr.output and not (out / "y").exists()


def test_detect_and_recover(detector_dir, tmp_path):
    out, _ = detector_dir
    data = load_attack_set(out / "work" / "test-bim")
    save_image(data.adv[0], tmp_path / "adv.png")
    rgba = (data.clean[1].permute(1, 2, 0) * 255).byte().numpy()
    Image.fromarray(rgba).convert("RGBA").resize((64, 64)).save(tmp_path / "big.png")
    result = run("detect", str(tmp_path / "adv.png"), str(tmp_path / "big.png"), "--detector", str(out), "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]  # JSON Lines
    assert [r["image"].endswith(n) for r, n in zip(rows, ("adv.png", "big.png"))] == [True, True]
    assert any("resized" in n for n in rows[1]["notes"]) and any("alpha" in n for n in rows[1]["notes"])
    assert all(isinstance(r["adversarial"], bool) and r["path"] == "fast" for r in rows)
    exact = json.loads(run("detect", str(tmp_path / "adv.png"), "--detector", str(out), "--exact", "--json").stdout)
    assert exact["path"] == "exact" and exact["label"] == rows[0]["label"]
    alone = json.loads(run("detect", str(tmp_path / "adv.png"), "--detector", str(out), "--json").stdout)
    assert alone["score"] == pytest.approx(rows[0]["score"], abs=1e-4)  # a batch judges each image as alone
    text = run("detect", str(tmp_path / "adv.png"), "--detector", str(out))
    assert "score" in text.output and ("ADVERSARIAL" in text.output or "clean" in text.output)
    rec = run("recover", str(tmp_path / "adv.png"), "--detector", str(out), "--out", str(tmp_path / "r.png"), "--json")
    assert rec.exit_code == 0, rec.output
    r = last_json(rec)
    assert len(r["recovered_top5"]) == 5 and (tmp_path / "r.png").stat().st_size > 1000
    assert r["method"] == "blur" and abs(sum(t["probability"] for t in r["recovered_top5"]) - 1) < 0.2
    if r["adversarial"]:  # a flagged image's prediction is ruled out
        assert r["ruled_out"] == r["prediction"] and r["recovered"] != r["prediction"]
        assert r["prediction"] not in [t["class"] for t in r["recovered_top5"]]
    else:
        assert r["ruled_out"] is None
    mask = last_json(run("recover", str(tmp_path / "adv.png"), "--detector", str(out), "--method", "mask", "--json"))
    assert mask["method"] == "mask" and mask["score"] == r["score"]
    bad = run("recover", str(tmp_path / "adv.png"), "--detector", str(out), "--method", "magic")
    assert bad.exit_code == 2 and "magic" in bad.output


def test_adaptive_rounds_harden_the_fast_detector(detector_dir, tmp_path):
    """--adaptive-rounds refits the fast detector on white-box adaptive images (finished stages reused)."""
    import shutil

    out = tmp_path / "det"
    shutil.copytree(detector_dir[0], out)
    args = ["train", "--attack", "bim", "--n", "120", "--n-eval", "60", "--n-calibration", "40",
            "--out", str(out), "--data-dir", str(SHARED_DATA), "--fast-epochs", "3", "--fast-n", "120", *FAST_MASKS]
    result = run(*args, "--adaptive-rounds", "1", "--json")
    assert result.exit_code == 0, result.output
    hardening = last_json(result)["fast"]["hardening"]
    entry, = hardening["history"]
    assert hardening["rounds"] == 1 and entry["attacked"] > 50 and 0 <= entry["success_before_refit"] <= 1
    assert entry["adaptive_maps"] > 0
    assert json.loads((out / "fast" / "detector.json").read_text())["hardening"]["rounds"] == 1
    refused = run(*args, "--adaptive-rounds", "1", "--no-fast")
    assert refused.exit_code == 2 and "fast path" in refused.output and "Traceback" not in refused.output


def test_margin_combines_the_fast_verdict_with_the_classifier_gap(detector_dir, tmp_path):
    """--margin: the fast path's verdict is a calibrated combination of its score and the classifier's gap
    (--class-calibration: with a threshold per predicted class; --noise and --combiner mlp: a noise shift read
    by an MLP)."""
    import shutil

    out = tmp_path / "det"
    shutil.copytree(detector_dir[0], out)
    args = ["train", "--attack", "bim", "--n", "120", "--n-eval", "60", "--n-calibration", "40",
            "--out", str(out), "--data-dir", str(SHARED_DATA), "--fast-epochs", "2", "--fast-n", "120", *FAST_MASKS]
    for bad in (["--no-margin", "--class-calibration"], ["--no-margin", "--noise", "0.01"],
                ["--no-margin", "--combiner", "mlp"], ["--noise", "-1"]):
        refused = run(*args, *bad)
        assert refused.exit_code == 2 and ("--no-margin" in refused.output or "--noise" in refused.output), bad
        assert "Traceback" not in refused.output, bad
    plain = run(*args, "--no-margin", "--json")  # the fast detector's own verdict: no combination saved
    assert plain.exit_code == 0, plain.output
    assert last_json(plain)["fast"]["margin"] is False and not (out / "fast" / "margin.json").exists()
    result = run(*args, "--margin", "--class-calibration", "--noise", "0.01", "--combiner", "mlp", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    saved = json.loads((out / "fast" / "margin.json").read_text())
    assert report["fast"]["margin"] is True and report["fast"]["threshold"] == pytest.approx(saved["threshold"])
    assert saved["params"]["squeeze"] == report["fast"]["squeeze"] == [0.75, 1.5]  # --squeeze's default blur shifts
    assert saved["params"]["per_class"] is True and report["fast"]["per_class"] is True
    assert len(saved["class_offsets"]) == 10  # one per class of the classifier (0 where too few images)
    assert saved["params"]["noise"] == report["fast"]["noise"] == [0.01] and report["fast"]["hidden"] == 32
    assert saved["params"]["hidden"] == 32 and len(saved["mlp"]) == 3
    held = report["fast"]["metrics"]["bim"]
    assert set(held["fpr_per_class"]) <= set(CIFAR10_CLASSES) and held["max_class_fpr"] == max(
        held["fpr_per_class"].values())
    data = load_attack_set(out / "work" / "test-bim")
    save_image(data.adv[0], tmp_path / "adv.png")
    row = json.loads(run("detect", str(tmp_path / "adv.png"), "--detector", str(out), "--json").stdout)
    assert row["path"] == "fast" and row["adversarial"] == (row["score"] > saved["threshold"])
    refused = run(*args, "--margin", "--no-fast")
    assert refused.exit_code == 2 and "fast path" in refused.output and "Traceback" not in refused.output


def test_fast_n_fits_the_fast_detector_on_images_that_were_attacked_but_not_masked(detector_dir, tmp_path):
    """--fast-n: the fast path's detector fits on more training images than the exact one, after them in
    the seeded order (attacked, never masked), which evaluation then refuses like the fitting images."""
    import shutil

    from advdetect.evaluation.guard import reserved_images

    out = tmp_path / "det"
    shutil.copytree(detector_dir[0], out)
    args = ["train", "--attack", "bim", "--n", "120", "--n-eval", "60", "--n-calibration", "40",
            "--out", str(out), "--data-dir", str(SHARED_DATA), "--fast-epochs", "2", *FAST_MASKS]
    plain = detector_dir[1]["fast"]  # its fast path fitted on the 120 images alone
    result = run(*args, "--fast-n", "200", "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert plain["n_train"] == 120 and report["fast"]["n_train"] == 200
    assert report["fast"]["n_fit_maps"] > plain["n_fit_maps"] + 80  # ~80 clean + ~80 attacks more
    extra = out / "work" / "fast-train-bim"
    assert (extra / "manifest.json").is_file() and not any(p.name.startswith("masks") for p in extra.iterdir())
    meta = json.loads((out / "detector.json").read_text())
    fit, fast_fit = set(meta["images"]["fit"]["indices"]), set(meta["images"]["fast_fit"]["indices"])
    assert len(fit) == 120 and len(fast_fit) == 80 and not fit & fast_fit
    assert meta["images"]["fast_fit"] in reserved_images(meta)
    assert report["n_train"] == 120  # the exact detector: the masked images alone
    for bad in (["--fast-n", "100"], ["--fast-n", "200", "--no-fast"], ["--fast-n", "60000"]):
        refused = run(*args, *bad)
        assert refused.exit_code == 2 and "--fast-n" in refused.output and "Traceback" not in refused.output, bad


def test_retraining_without_the_fast_path_removes_the_old_one(detector_dir, tmp_path):
    """An earlier detector's fast path must not judge for a detector retrained without one."""
    import shutil

    out = tmp_path / "det"
    shutil.copytree(detector_dir[0], out)
    result = run("train", "--attack", "bim", "--n", "120", "--n-eval", "60", "--n-calibration", "40", "--out", str(out),
                 "--data-dir", str(SHARED_DATA), "--transfer", "fgsm", "--json", "--no-fast", *FAST_MASKS)
    assert result.exit_code == 0, result.output
    assert last_json(result)["fast"] is None and not (out / "fast").exists()
    data = load_attack_set(out / "work" / "test-bim")
    save_image(data.adv[0], tmp_path / "adv.png")
    row = json.loads(run("detect", str(tmp_path / "adv.png"), "--detector", str(out), "--json").stdout)
    assert row["path"] == "exact"


def test_detector_for_another_model_is_refused(detector_dir, tmp_path):
    out, _ = detector_dir
    img = tmp_path / "x.png"
    save_image(torch.rand(3, 224, 224), img)
    result = run("detect", str(img), "--detector", str(out), "--model", "torchvision:resnet18")
    assert result.exit_code == 2 and "was built for classifier cifar10-cnn" in result.output
