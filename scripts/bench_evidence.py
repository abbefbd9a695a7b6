"""Batch-1 cost of a margin combination's evidence: its blurred and noisy copies stacked into one classifier
call (``margin.VARIANT_BATCH`` 256, the default) against one call per copy (``VARIANT_BATCH`` 1); and a whole
batch-1 verdict (``Guard.check``) with the image in the same call as its copies (``verdict_joined_ms``, what
``inference.judge`` does) against the image in a call of its own first (``verdict_own_call_ms``, as before).

    python scripts/bench_evidence.py --detector runs/headline-300

``--detector``: a detector whose fast path has a margin combination (``train --margin``). In one warm
process (the detector loaded once, as :class:`advdetect.Guard` holds it), ``--rounds`` interleaved rounds of
``--calls`` calls each; prints one JSON line with the median milliseconds of each round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advdetect import Guard  # noqa: E402
from advdetect.detector import margin as margin_module  # noqa: E402
from advdetect.fastpath import FastPath  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    guard = Guard.load(args.detector, device="cpu")
    fast = guard.deployment.fast
    if fast is None or fast.margin is None:
        raise SystemExit(f"{args.detector} has no margin combination; train it with `advdetect train --margin`")
    model, combination = guard.model, fast.margin
    x = torch.rand(1, len(model.info.mean), *model.info.input_size)

    def median_ms() -> float:
        times = []
        with torch.no_grad():
            logits = model(x)
            for _ in range(args.calls):
                start = time.perf_counter()
                combination.evidence(model, x, logits)
                times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 3)

    def verdict_ms() -> float:
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            guard.check(x)
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1000, 3)

    def own_call(self: FastPath, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, None]:
        return self.explainer.model.logits(images, batch_size), None  # the evidence then comes in `combine`

    result = {"detector": args.detector, "copies": len(combination.squeeze) + len(combination.noise),
              "stacked_ms": [], "one_call_each_ms": [], "verdict_joined_ms": [], "verdict_own_call_ms": []}
    joined = FastPath.logits_and_evidence
    default = margin_module.VARIANT_BATCH
    for _ in range(args.rounds):
        margin_module.VARIANT_BATCH = default
        result["stacked_ms"].append(median_ms())
        margin_module.VARIANT_BATCH = 1
        result["one_call_each_ms"].append(median_ms())
        margin_module.VARIANT_BATCH = default
        result["verdict_joined_ms"].append(verdict_ms())
        FastPath.logits_and_evidence = own_call
        result["verdict_own_call_ms"].append(verdict_ms())
        FastPath.logits_and_evidence = joined
    print(json.dumps(result))


if __name__ == "__main__":
    main()
