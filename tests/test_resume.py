"""SIGKILL at any point, rerun with the same arguments: the same results as an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advdetect.storage import KILL_AFTER_SHARDS

from .conftest import REPO, SHARED_DATA, needs_builtin, needs_shared

pytestmark = [needs_shared, needs_builtin, pytest.mark.slow]


def advdetect(*args: str, kill_after: int | None = None) -> subprocess.Popen:
    """The CLI in a subprocess; ``kill_after=k``: it SIGKILLs itself right after its k-th stored shard."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop(KILL_AFTER_SHARDS, None)
    if kill_after is not None:
        env[KILL_AFTER_SHARDS] = str(kill_after)
    return subprocess.Popen([sys.executable, "-m", "advdetect", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*args: str) -> dict:
    proc = advdetect(*args, "--json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def shards_done(manifest: Path) -> int:
    try:
        return len(json.loads(manifest.read_text()).get("shards", {}))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def killed(proc: subprocess.Popen) -> bool:
    """Whether the run died by SIGKILL (at its kill point) rather than finishing."""
    proc.communicate(timeout=600)
    return proc.returncode == -signal.SIGKILL


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((directory / "manifest.json").read_text())
    parts = [load_file(directory / manifest["shards"][k]["file"]) for k in sorted(manifest["shards"])]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def assert_no_temp_files(root: Path) -> None:
    leftovers = [p for p in root.rglob(".*.tmp")]
    assert not leftovers, leftovers


def test_masks_killed_twice_then_resumed_equals_uninterrupted(tmp_path):
    attack_set = tmp_path / "set"
    finish("attack", "--attack", "fgsm", "--n", "40", "--data-dir", str(SHARED_DATA), "--out", str(attack_set))
    reference = tmp_path / "reference"
    shutil.copytree(attack_set, reference)
    args = ["--shard-size", "8", "--iterations", "20"]
    finish("masks", "--in", str(reference), *args)

    manifest = attack_set / "masks" / "manifest.json"
    killed_at = []
    for kill_after in (1, 2):  # killed just after the 1st of 5 shards lands, then after 2 more
        assert killed(advdetect("masks", "--in", str(attack_set), *args, kill_after=kill_after))
        killed_at.append(shards_done(manifest))
    assert killed_at == [1, 3]
    finish("masks", "--in", str(attack_set), *args)

    got, want = tensors(attack_set / "masks"), tensors(reference / "masks")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert json.loads(manifest.read_text())["complete"]
    assert_no_temp_files(attack_set)


def test_train_killed_mid_pipeline_then_resumed_equals_uninterrupted(tmp_path):
    args = ["--attack", "bim", "--n", "40", "--n-eval", "20", "--n-calibration", "16", "--iterations", "10",
            "--fast-n", "40", "--fast-epochs", "2", "--data-dir", str(SHARED_DATA)]
    want = finish("train", *args, "--out", str(tmp_path / "reference"))

    out = tmp_path / "det"
    # killed right after its 2nd shard: the training attack set's only shard, then its only mask shard
    assert killed(advdetect("train", *args, "--out", str(out), kill_after=2))
    assert shards_done(out / "work" / "train-bim" / "masks" / "manifest.json") == 1
    assert not (out / "work" / "calibration-bim").exists() and not (out / "detector.json").exists()
    got = finish("train", *args, "--out", str(out))

    assert got["metrics"] == want["metrics"] and got["threshold"] == want["threshold"]
    meta = json.loads((out / "detector.json").read_text())
    ref = json.loads((tmp_path / "reference" / "detector.json").read_text())
    assert meta["sha256"] == ref["sha256"]  # bit-identical detector weights
    assert_no_temp_files(out)
