"""Peak memory of ``advdetect attack`` + ``advdetect masks`` against the number of images.

    python scripts/bench_memory.py --data ../shared/data/cifar10-jpeg/train --sizes 32,224 --counts 2000,20000

For each input size and image count, runs the two commands as fresh processes on the first
images of an ImageFolder (resized to the size) with a small random CNN exported to ``.pt2``, and
reads each process's peak resident set size from the kernel (``os.wait4``). Streaming means
the peak does not grow with the count. FGSM and one mask iteration keep it fast: memory does not
depend on either. Prints one JSON line; ``--keep`` keeps the sets (they take 15 GB per 10,000
images at 224 px).
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
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(path: Path, size: int) -> Path:
    """A random 3-channel CNN with global pooling, exported with a dynamic batch, and its sidecar."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(16, 32, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (torch.zeros(2, 3, size, size),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    path.with_name(path.name + ".json").write_text(json.dumps(
        {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [size, size]}))
    return path


def run(argv: list[str]) -> dict[str, float]:
    """Run a command; its wall time and peak RSS (MiB)."""
    start = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {proc.returncode}: {out.decode()[-500:]}")
    return {"seconds": round(time.time() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="An ImageFolder with at least max(--counts) images.")
    parser.add_argument("--sizes", default="32,224")
    parser.add_argument("--counts", default="2000,20000")
    parser.add_argument("--work", default=None, help="Scratch directory [default: a temporary one].")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    advdetect = str(Path(sys.executable).with_name("advdetect"))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        model = tiny_model(work / f"tiny{size}.pt2", size)
        for count in [int(c) for c in args.counts.split(",")]:
            out = work / f"set-{size}-{count}"
            attack = run([advdetect, "attack", "--model", str(model), "--data", args.data, "--split", "all",
                          "--attack", "fgsm", "--n", str(count), "--out", str(out), "--json"])
            masks = run([advdetect, "masks", "--in", str(out), "--iterations", "1", "--json"])
            disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**30
            results.append({"size": size, "n": count, "attack": attack, "masks": masks, "disk_gib": round(disk, 2)})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(out)
    summary = {}
    for size in {r["size"] for r in results}:
        rows = sorted((r for r in results if r["size"] == size), key=lambda r: r["n"])
        peak = [max(r["attack"]["peak_rss_mib"], r["masks"]["peak_rss_mib"]) for r in rows]
        summary[f"growth_{size}px"] = round(peak[-1] / peak[0] - 1, 4)  # largest count vs smallest
    print(json.dumps({"results": results, **summary, "torch_threads": torch.get_num_threads()}))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
