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
from advdetect.splits import load_attack_set, load_mask_set, load_split

from .conftest import SHARED_DATA, needs_builtin, needs_shared

pytestmark = [needs_shared, needs_builtin]
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
    for bad in (["--class-calibration"], ["--noise", "0.01"], ["--combiner", "mlp"], ["--margin", "--noise", "-1"]):
        refused = run(*args, *bad)
        assert refused.exit_code == 2 and ("--margin" in refused.output or "--noise" in refused.output), bad
        assert "Traceback" not in refused.output, bad
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


def test_masks_command(tmp_path):
    out = tmp_path / "set"
    assert run("attack", "--n", "12", "--data-dir", str(SHARED_DATA), "--out", str(out)).exit_code == 0
    result = run("masks", "--in", str(out), "--json", *FAST_MASKS)
    assert result.exit_code == 0, result.output
    summary = last_json(result)
    assert summary["n"] == 12 and 0 <= summary["clean"]["deleted_fraction"] <= 1
    masks = load_mask_set(out)
    assert masks["clean_mask"].shape == masks["adv_mask"].shape == (12, 1, 32, 32)


def test_explain_command_and_function(tmp_path):
    import advdetect

    img = tmp_path / "img.png"
    save_image(torch.rand(3, 32, 32), img)
    result = run("explain", str(img), "--out", str(tmp_path / "fig.png"), "--json", *FAST_MASKS)
    assert result.exit_code == 0, result.output
    r = last_json(result)
    assert 0 <= r["prob_after"] <= 1 and (tmp_path / "fig.png").stat().st_size > 1000
    e = advdetect.explain(torch.rand(3, 32, 32), "cifar10-cnn",
                          config=advdetect.MaskConfig(iterations=20))
    assert e.mask.shape == (1, 32, 32) and e.probs_after.shape == (10,)
    bad = run("explain", str(img), "--target", "zebra")
    assert bad.exit_code == 2 and "unknown class 'zebra'" in bad.output


def test_preservation_detector_recovers_with_deletion_masks(tmp_path, monkeypatch):
    """Detect on preservation masks; recovery still applies deletion masks (the only kind that remove a class)."""
    import advdetect.inference as inference
    from advdetect.masks import MaskConfig, MeaningfulPerturbation

    out = tmp_path / "det"
    result = run("train", "--attack", "bim", "--n", "40", "--n-eval", "20", "--n-calibration", "20",
                 "--game", "preserve", "--out", str(out), "--data-dir", str(SHARED_DATA), "--json", "--fast-n", "40",
                 "--fast-epochs", "2", *FAST_MASKS)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "detector.json").read_text())
    assert meta["mask_config"]["game"] == "preserve" and meta["recovery_config"]["game"] == "delete"
    assert (out / "work" / "test-bim" / "masks-preserve" / "manifest.json").is_file()
    assert (out / "work" / "test-bim" / "masks" / "manifest.json").is_file()  # deletion masks, for recovery
    assert not (out / "work" / "train-bim" / "masks").exists()  # training needs detection masks only
    preserve = load_mask_set(out / "work" / "test-bim", "preserve")["adv_mask"]
    delete = load_mask_set(out / "work" / "test-bim")["adv_mask"]
    assert preserve.mean() > delete.mean()  # preservation keeps what deletion removes: different masks

    games = []
    real = MeaningfulPerturbation.attribute

    def spy(self, images, target=None, progress=False):
        games.append(self.config.game)
        return real(self, images, target, progress)

    monkeypatch.setattr(MeaningfulPerturbation, "attribute", spy)
    data = load_attack_set(out / "work" / "test-bim")
    save_image(data.adv[0], tmp_path / "adv.png")
    r = inference.recover_image(tmp_path / "adv.png", out, method="mask", exact=True)
    assert games == ["preserve", "delete"] and len(r["recovered_top5"]) == 5
    games.clear()
    inference.recover_image(tmp_path / "adv.png", out, exact=True)  # the default light blur needs no deletion mask
    assert games == ["preserve"] and meta["recovery"]["method"] == "blur"
    games.clear()  # the fast path: amortized preservation masks judge, optimised deletion masks recover
    fast = inference.recover_image(tmp_path / "adv.png", out, method="mask")
    assert games == ["delete"] and json.loads((out / "fast" / "mask_net.json").read_text())["mask_config"][
        "game"] == "preserve"
    games.clear()
    inference.recover_image(tmp_path / "adv.png", out)
    assert games == [] and fast["score"] != r["score"]
    assert MaskConfig(game="preserve").for_recovery() == MaskConfig()


def test_two_channel_detector_end_to_end(tmp_path):
    """--game both: the detector reads [preservation, deletion] masks; detect and recover take the same path."""
    out = tmp_path / "det"
    result = run("train", "--attack", "bim", "--n", "24", "--n-eval", "16", "--n-calibration", "12", "--game", "both",
                 "--out", str(out), "--data-dir", str(SHARED_DATA), "--json", "--inputs", "masks", "--fast-epochs", "2",
                 *FAST_MASKS)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "detector.json").read_text())
    assert meta["mask_config"]["game"] == "both" and meta["recovery_config"]["game"] == "delete"
    masks = load_mask_set(out / "work" / "test-bim", "both")
    deletion = load_mask_set(out / "work" / "test-bim")  # recovery's masks: the second channel, computed alone
    assert masks["adv_mask"].shape[1] == 2 and torch.equal(masks["adv_mask"][:, 1:], deletion["adv_mask"])
    data = load_attack_set(out / "work" / "test-bim")
    save_image(data.adv[0], tmp_path / "adv.png")
    save_image(data.clean[0], tmp_path / "clean.png")
    detected = run("detect", str(tmp_path / "adv.png"), str(tmp_path / "clean.png"), "--detector", str(out), "--json")
    assert detected.exit_code == 0, detected.output
    from advdetect.detector import load_detector

    detector, _ = load_detector(out)
    rows = [json.loads(line) for line in detected.stdout.strip().splitlines()]  # JSON Lines
    scores = detector.decision_function(torch.cat([masks["adv_mask"][:1], masks["clean_mask"][:1]]))
    # the same masks as in training (the adversarial image only rounded to 8 bits by the PNG)
    assert rows[1]["score"] == pytest.approx(float(scores[1]), abs=1e-4)
    assert rows[0]["score"] == pytest.approx(float(scores[0]), abs=1e-2)
    recovered = run("recover", str(tmp_path / "adv.png"), "--detector", str(out), "--method", "mask", "--out",
                    str(tmp_path / "fig.png"), "--json")
    assert recovered.exit_code == 0, recovered.output
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_detector_with_evidence_planes_end_to_end(tmp_path):
    """train --inputs: the detector records its inputs; detect builds the same maps it was fitted on."""
    from advdetect.detector import load_detector

    out = tmp_path / "det"
    result = run("train", "--attack", "fgsm", "--n", "40", "--n-eval", "20", "--n-calibration", "20", "--out",
                 str(out), "--data-dir", str(SHARED_DATA), "--inputs", "confidence,masks,residual", "--json",
                 "--iterations", "20", "--fast-n", "40", "--fast-epochs", "2")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert set(report["metrics"]["fgsm"]["fpr_per_class"]) <= set(load_attack_set(out / "work" / "test-fgsm")
                                                                   .manifest["classes"])
    detector, _ = load_detector(out)
    assert detector.input_names() == ("masks", "residual", "confidence")
    held_out = load_split(out / "work" / "test-fgsm", "delete", inputs=detector.input_names())
    save_image(held_out.adv[0], tmp_path / "adv.png")
    row = json.loads(run("detect", str(tmp_path / "adv.png"), "--detector", str(out), "--exact", "--json").stdout)
    stored = float(detector.decision_function(held_out.masks_adv[:1])[0])
    assert row["score"] == pytest.approx(stored, abs=0.05)  # the PNG rounds pixels to 1/255; nothing else differs
    # the fast path reads the same inputs, from amortized masks
    from advdetect.fastpath import load_fast_path
    from advdetect.models import load_model

    fast = load_fast_path(out, load_model("cifar10-cnn"))
    assert fast.detector.input_names() == detector.input_names()
    row = json.loads(run("detect", str(tmp_path / "adv.png"), "--detector", str(out), "--json").stdout)
    assert row["path"] == "fast" and row["score"] == pytest.approx(float(fast.scores(held_out.adv[:1])[0]), abs=0.05)
    bad = run("train", "--inputs", "masks,colour", "--out", str(tmp_path / "x"), "--data-dir", str(SHARED_DATA))
    assert bad.exit_code == 2 and "colour" in bad.output and not (tmp_path / "x").exists()


def test_bare_train_fits_one_detector_on_every_attack(tmp_path):
    """No --attack: one detector, fitted on FGSM, BIM, PGD, MI-FGSM, CW and DeepFool, with a held-out row for each."""
    from advdetect.attacks import DETECTOR_ATTACKS
    from advdetect.cli import DETECTOR_ATTACKS as CLI_DEFAULT

    assert CLI_DEFAULT == DETECTOR_ATTACKS  # the CLI spells the list out to start without torch
    assert set(DETECTOR_ATTACKS) >= {"fgsm", "bim", "pgd", "mifgsm", "cw", "deepfool"}
    out = tmp_path / "det"
    result = run("train", "--n", "12", "--n-eval", "10", "--n-calibration", "10", "--iterations", "10", "--no-fast",
                 "--out", str(out), "--data-dir", str(SHARED_DATA), "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert list(report["metrics"]) == list(DETECTOR_ATTACKS)
    assert all(m["trained_on"] for m in report["metrics"].values())
    meta = json.loads((out / "detector.json").read_text())
    assert [a["name"] for a in meta["attacks"]] == list(DETECTOR_ATTACKS)
    assert {p.name for p in (out / "work").glob("train-*")} == {f"train-{a}" for a in DETECTOR_ATTACKS}


def test_default_fast_n_is_six_times_n_within_the_data():
    from advdetect.training import default_fast_n

    assert default_fast_n(300, 50_000) == 1800
    assert default_fast_n(300, 1000) == 1000  # capped by the training images there are
    assert default_fast_n(5000, 50_000) == 10_000 and default_fast_n(12_000, 50_000) == 12_000  # and at 10,000
    assert default_fast_n(300, 300) == 300 and default_fast_n(300, 1800, with_fast=False) == 300


def test_bare_train_fits_the_fast_detector_on_six_times_n_images(tmp_path):
    """No --fast-n: the fast detector fits on 6 x --n training images, the 5 x n beyond --n attacked, not masked."""
    out = tmp_path / "det"
    result = run("train", "--attack", "fgsm", "--n", "12", "--n-eval", "10", "--n-calibration", "10",
                 "--iterations", "10", "--fast-epochs", "1", "--out", str(out), "--data-dir", str(SHARED_DATA),
                 "--json")
    assert result.exit_code == 0, result.output
    report = last_json(result)
    assert report["n_train"] == 12 and report["fast"]["n_train"] == 72
    meta = json.loads((out / "detector.json").read_text())
    assert len(meta["images"]["fit"]["indices"]) == 12 and len(meta["images"]["fast_fit"]["indices"]) == 60
    extra = out / "work" / "fast-train-fgsm"
    assert not any(p.name.startswith("masks") for p in extra.iterdir())
    assert report["fast"]["n_fit_maps"] > 60  # the 12 images' maps alone would be at most 24
