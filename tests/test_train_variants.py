"""End to end, the other ways to train: the masks and explain commands, preservation, two-channel and
evidence-plane detectors, a bare `train` over every attack (split from test_commands.py, whose tests share
one detector, so that two pytest-xdist workers each take about half of the end-to-end work)."""

from __future__ import annotations

import json

import pytest
import torch

from advdetect.imageio import save_image
from advdetect.splits import load_attack_set, load_mask_set, load_split

from .conftest import SHARED_DATA, needs_builtin, needs_shared
from .test_commands import FAST_MASKS, last_json, run

pytestmark = [needs_shared, needs_builtin, pytest.mark.slow]


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
