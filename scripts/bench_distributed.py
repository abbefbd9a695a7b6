"""Masks per second with 1 process vs N torchrun processes (gloo on CPU, NCCL on GPUs).

    .venv/bin/python scripts/bench_distributed.py --data-dir ../shared/data [--n 256] [--nproc 2]

Builds one BIM attack set, copies it, computes its masks once with a single process and once
with ``torchrun --standalone --nproc-per-node N``, checks that the masks are identical and
prints one JSON object with the wall times (process start included) and masks per second.
On CPU each torchrun rank gets OMP_NUM_THREADS = cores / N, so both runs use every core; the
different thread counts reorder float sums, so the masks agree to float rounding rather than
bit for bit (``max_abs_mask_difference``; with equal threads per process they are identical).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def advdetect(args: list[str], nproc: int, threads: int) -> tuple[dict, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    if nproc == 1:
        cmd = [sys.executable, "-m", "advdetect", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "advdetect", "--", *args]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n", type=int, default=256, help="images (masks are computed for clean + adversarial)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from advdetect.splits import load_mask_set

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "set"
        data = ["--data-dir", args.data_dir] if args.data_dir else []
        advdetect(["attack", "--attack", "bim", "--n", str(args.n), "--out", str(base), "--device", args.device,
                   "--json", *data], 1, cores)
        results = {}
        for nproc in (1, args.nproc):
            directory = Path(tmp) / f"p{nproc}"
            shutil.copytree(base, directory)
            summary, seconds = advdetect(["masks", "--in", str(directory), "--shard-size", str(args.shard_size),
                                          "--device", args.device, "--json"], nproc, max(1, cores // nproc))
            results[nproc] = {"wall_seconds": round(seconds, 1), "masks": 2 * summary["n"],
                              "masks_per_second": round(2 * summary["n"] / seconds, 2)}
        one, many = (load_mask_set(Path(tmp) / f"p{k}") for k in (1, args.nproc))
        identical = all(torch.equal(one[k], many[k]) for k in one)
        diff = max(float((one[k].float() - many[k].float()).abs().max()) for k in one if k.endswith("_mask"))
    print(json.dumps({"device": args.device, "cores": cores, "n_images": args.n, "shard_size": args.shard_size,
                      "processes": {str(k): v for k, v in results.items()},
                      "speedup": round(results[args.nproc]["masks_per_second"] / results[1]["masks_per_second"], 2),
                      "identical_masks": identical, "max_abs_mask_difference": diff}))


if __name__ == "__main__":
    main()
