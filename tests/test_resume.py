"""SIGKILL at any point, rerun with the same arguments: the same results as an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from .conftest import REPO, SHARED_DATA, needs_builtin, needs_shared

pytestmark = [needs_shared, needs_builtin]


def advdetect(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
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


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if it finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the run never reached the kill point")


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
    for target in (1, 3):  # kill just after the 1st shard lands, then again mid-way
        proc = advdetect("masks", "--in", str(attack_set), *args)
        assert kill_when(proc, lambda: shards_done(manifest) >= target), "finished before the kill"
        killed_at.append(shards_done(manifest))
    assert killed_at[0] >= 1 and killed_at[1] > killed_at[0] and killed_at[1] < 5
    finish("masks", "--in", str(attack_set), *args)

    got, want = tensors(attack_set / "masks"), tensors(reference / "masks")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert json.loads(manifest.read_text())["complete"]
    assert_no_temp_files(attack_set)


def test_train_killed_mid_pipeline_then_resumed_equals_uninterrupted(tmp_path):
    args = ["--n", "40", "--n-eval", "20", "--n-calibration", "16", "--iterations", "10", "--data-dir", str(SHARED_DATA)]
    want = finish("train", *args, "--out", str(tmp_path / "reference"))

    out = tmp_path / "det"
    proc = advdetect("train", *args, "--out", str(out))
    # kill once the training masks are being written: the attack stage is done, the rest is not
    assert kill_when(proc, lambda: (out / "work" / "train-bim" / "masks" / "manifest.json").exists())
    assert not (out / "detector.json").exists()
    got = finish("train", *args, "--out", str(out))

    assert got["metrics"] == want["metrics"] and got["threshold"] == want["threshold"]
    meta = json.loads((out / "detector.json").read_text())
    ref = json.loads((tmp_path / "reference" / "detector.json").read_text())
    assert meta["sha256"] == ref["sha256"]  # bit-identical detector weights
    assert_no_temp_files(out)
