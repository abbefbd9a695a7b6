"""torchrun with 2 gloo processes on CPU gives what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advdetect.splits import load_attack_set, load_mask_set

from .conftest import REPO, SHARED_DATA, needs_builtin, needs_shared

pytestmark = [needs_shared, needs_builtin, pytest.mark.slow]
ARGS = ["train", "--attack", "bim", "--n", "48", "--n-eval", "24", "--n-calibration", "16", "--iterations", "10",
        "--attack-batch", "16", "--shard-size", "8", "--transfer", "fgsm", "--fast-epochs", "1", "--fast-n", "48", "--data-dir",
        str(SHARED_DATA), "--json"]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # one thread per process, as torchrun sets: with the same threads results are bit-identical
    # (a different thread count reorders float sums: masks then agree to ~1e-6)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:  # files: no pipe fills
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)


def result(proc: subprocess.Popen, log: Path) -> dict:
    proc.wait(timeout=900)
    stdout, stderr = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout  # only rank 0 prints the result
    return json.loads(lines[0])


def test_two_gloo_ranks_equal_one_process(tmp_path):
    # both runs at once (one thread each: three on two cores); scheduling changes no result
    logs = [tmp_path / "one-log", tmp_path / "two-log"]
    procs = [start([sys.executable, "-m", "advdetect", *ARGS, "--out", str(tmp_path / "one")], logs[0]),
             start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "advdetect", "--", *ARGS, "--out", str(tmp_path / "two")], logs[1])]
    try:
        one, two = [result(proc, log) for proc, log in zip(procs, logs)]
    finally:
        for proc in procs:
            proc.kill()

    for split in ("train-bim", "test-bim", "test-fgsm"):
        a, b = (load_attack_set(tmp_path / run_ / "work" / split) for run_ in ("one", "two"))
        assert torch.equal(a.adv, b.adv) and torch.equal(a.adv_pred, b.adv_pred), split
        ma, mb = (load_mask_set(tmp_path / run_ / "work" / split) for run_ in ("one", "two"))
        for key in ma:  # the same mask for every image
            assert torch.equal(ma[key], mb[key]), (split, key)
        # rank 1 really wrote shards of its own: 2 ranks, round robin over 6 mask shards of 8 images
        assert len(json.loads((tmp_path / "two" / "work" / split / "masks" / "manifest.json").read_text())["shards"]) \
            == (len(a.labels) + 7) // 8
    assert not list((tmp_path / "two").rglob("manifest.rank*.json"))  # merged by rank 0

    # the detector is trained with DistributedDataParallel: same data, same gradients up to float
    # reordering and per-rank dropout, so its metrics agree within noise
    for attack in ("bim", "fgsm"):
        m1, m2 = one["metrics"][attack], two["metrics"][attack]
        assert m1["n_clean"] == m2["n_clean"] and m1["n_adversarial"] == m2["n_adversarial"]
        assert abs(m1["roc_auc"] - m2["roc_auc"]) <= 0.15, (m1["roc_auc"], m2["roc_auc"])
    assert (tmp_path / "two" / "detector.json").is_file()


def test_evaluate_under_two_gloo_ranks_rank_zero_alone_reports(quick_detector, tmp_path):
    """Both ranks share the attacks and masks; only rank 0 computes the rest and writes the report."""
    out = tmp_path / "eval"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "advdetect", "--", "-v", "evaluate", "--detector", str(quick_detector), "--out",
                           str(out), "--n", "16", "--attacks", "fgsm", "--eps", "8/255", "--baselines", "raw_image",
                           "--n-baseline", "16", "--no-adaptive", "--data-dir", str(SHARED_DATA), "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["attacks"]["fgsm@8/255"]["n_clean"] > 0
    for stage in ("detector_metrics", "transfer_matrix", "baselines"):  # once, by rank 0, not once per rank
        assert proc.stderr.count(f"evaluation stage: {stage}") == 1, (stage, proc.stderr[-3000:])
    assert proc.stderr.count("evaluation stage: attacks_and_masks") == 2  # the shared stage runs on both
    assert "rank 1: attack sets and masks done" in proc.stderr
    for name in ("report.html", "report.json", "report.md"):
        assert (out / name).is_file()
    masks = json.loads((out / "work" / "fgsm-8-255" / "masks" / "manifest.json").read_text())
    assert masks["complete"] and len(masks["shards"]) == 1
