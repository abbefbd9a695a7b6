"""evaluate never takes images the detector was fitted or calibrated on, compared by image identity: it passes
over them, and refuses a record that holds any."""

from __future__ import annotations

import pytest
import torch

from advdetect.data import CIFAR10_SIZES, select, shared_images
from advdetect.detector import MaskDetector, save_detector
from advdetect.errors import AdvDetectError
from advdetect.evaluation.config import EvaluateConfig
from advdetect.evaluation.guard import check_unseen, reserved_images, unseen_images
from advdetect.masks import MaskConfig
from advdetect.sources import ImageSource, Selection

N_EVAL, N_CAL, SEED = 200, 300, 0


class Indexed(ImageSource):
    """CIFAR-10 by index only (records never decode an image)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def subset_record(split: str, n: int, seed: int, offset: int = 0) -> dict:
    """What train and evaluate record for ``n`` CIFAR-10 images of ``split`` (seeded, from ``offset``)."""
    whole = Selection(Indexed(CIFAR10_SIZES[split]), list(range(CIFAR10_SIZES[split])),
                      {"dataset": "cifar10", "split": split})
    return select(whole, n, seed, offset).identify()


def meta(with_records: bool = True) -> dict:
    m = {"calibrated_on": "test", "seed": SEED, "n_eval": N_EVAL}
    if with_records:  # as train records them: 1000 training images fit, test images after the held-out calibrate
        m["images"] = {"fit": subset_record("train", 1000, SEED),
                       "calibration": subset_record("test", N_CAL, SEED + 1, offset=N_EVAL),
                       "held_out": subset_record("test", N_EVAL, SEED + 1)}
    return m


def seed_that_overlaps(n: int) -> int:
    """An evaluation seed other than the detector's whose first n test images include calibration images."""
    calibration = meta()["images"]["calibration"]
    for seed in range(1, 50):
        if shared_images([calibration], subset_record("test", n, seed + 1)):
            return seed
    raise AssertionError("no overlapping seed found")


@pytest.mark.parametrize("with_records", [True, False])
def test_other_seed_that_reaches_calibration_images_is_refused(with_records):
    n = 150  # <= n_eval: the old seed-comparing guard let this through for any other seed
    seed = seed_that_overlaps(n)
    config = EvaluateConfig(n=n, seed=seed, n_baseline=8, n_methods=8, adaptive_n=4)
    with pytest.raises(AdvDetectError, match="were used to fit or calibrate"):
        check_unseen(meta(with_records), subset_record("test", n, seed + 1), config)


def test_held_out_images_pass_and_more_than_held_out_do_not():
    config = EvaluateConfig(n=N_EVAL, seed=SEED, n_baseline=8, n_methods=8, adaptive_n=4)
    check_unseen(meta(), subset_record("test", N_EVAL, SEED + 1), config)  # exactly the held-out images
    bigger = EvaluateConfig(n=N_EVAL + 50, seed=SEED, n_baseline=8, n_methods=8, adaptive_n=4)
    with pytest.raises(AdvDetectError, match="50 of the 250"):
        check_unseen(meta(), subset_record("test", N_EVAL + 50, SEED + 1), bigger)


def test_records_are_disjoint_and_reconstruction_covers_calibration():
    records = meta()["images"]
    fit, cal, held = (set(records[k]["indices"]) for k in ("fit", "calibration", "held_out"))
    assert len(cal) == N_CAL and len(held) == N_EVAL and not cal & held
    assert records["fit"]["split"] == "train" and records["calibration"]["split"] == "test"
    legacy = reserved_images(meta(with_records=False))  # older detectors: everything after n_eval is reserved
    assert cal <= set(legacy[0]["indices"]) and not held & set(legacy[0]["indices"])


def test_train_records_images_in_detector_json(tmp_path):
    """save_detector keeps the record train passes it, and evaluate reads it back through the file."""
    from advdetect.detector import load_detector

    det = MaskDetector(epochs=1, batch_size=8).fit(torch.rand(16, 1, 32, 32), torch.arange(16) % 2)
    ident = {"name": "tiny", "sha256": "abc", "input_size": [32, 32], "num_classes": 10}
    save_detector(tmp_path, det, ident, MaskConfig(iterations=3), extra=meta())
    _, loaded = load_detector(tmp_path)
    assert reserved_images(loaded)[1]["indices"] == meta()["images"]["calibration"]["indices"]


def whole_test_split() -> Selection:
    return Selection(Indexed(CIFAR10_SIZES["test"]), list(range(CIFAR10_SIZES["test"])),
                     {"dataset": "cifar10", "split": "test"})


def test_evaluation_passes_over_the_detectors_images_in_the_seeded_order():
    """The detector's own seed: its held-out images first, then the calibration ones, passed over, then others."""
    n = N_EVAL + 100
    chosen = unseen_images(whole_test_split(), n, SEED + 1, meta())
    record = chosen.identify()
    config = EvaluateConfig(n=n, seed=SEED, n_baseline=8, n_methods=8, adaptive_n=4)
    check_unseen(meta(), record, config)  # none of them reserved
    order = subset_record("test", CIFAR10_SIZES["test"] - 1, SEED + 1)["indices"]
    assert record["indices"] == order[:N_EVAL] + order[N_EVAL + N_CAL:N_EVAL + N_CAL + 100]
    assert record["reserved_skipped"] == N_CAL and record["seed"] == SEED + 1


def test_an_evaluation_that_meets_no_reserved_image_is_the_plain_seeded_subset():
    plain = select(whole_test_split(), 150, 7)
    chosen = unseen_images(whole_test_split(), 150, 7, {"images": {"fit": subset_record("train", 100, 0)}})
    assert chosen.positions == plain.positions and "reserved_skipped" not in chosen.record


def test_too_few_unseen_images_is_one_clear_error():
    with pytest.raises(AdvDetectError, match=f"only {N_EVAL} of the 10000 test images .* use --n {N_EVAL} or fewer"):
        unseen_images(whole_test_split(), N_EVAL + 1, SEED + 1, meta(with_records=False))
