"""The Gaussian blur two ways: the depthwise convolution against the cached matrix products that
:func:`advdetect.masks.perturbation.gaussian_blur` uses up to ``MATRIX_BLUR_MAX`` px a side.

    python scripts/bench_blur.py

For each (batch, side, sigma): the largest difference between the two and the median milliseconds of each
(``--repeats`` calls after a warm-up). Prints one JSON line.
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

from advdetect.masks import perturbation  # noqa: E402

CASES = ((1, 32, 6.0), (4, 32, 0.75), (256, 32, 6.0), (256, 32, 1.5), (1, 224, 10.0), (16, 224, 10.0))


def convolution(x: torch.Tensor, sigma: float) -> torch.Tensor:
    default = perturbation.MATRIX_BLUR_MAX
    perturbation.MATRIX_BLUR_MAX = 0  # every side takes the convolution
    try:
        return perturbation.gaussian_blur(x, sigma)
    finally:
        perturbation.MATRIX_BLUR_MAX = default


def median_ms(fn, x: torch.Tensor, sigma: float, repeats: int) -> float:
    fn(x, sigma)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x, sigma)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rows = []
    with torch.no_grad():
        for batch, side, sigma in CASES:
            x = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
            diff = (convolution(x, sigma) - perturbation.gaussian_blur(x, sigma)).abs().max().item()
            rows.append({"batch": batch, "side": side, "sigma": sigma, "max_abs_diff": float(f"{diff:.2e}"),
                         "convolution_ms": median_ms(convolution, x, sigma, args.repeats),
                         "matrix_ms": median_ms(perturbation.gaussian_blur, x, sigma, args.repeats)})
    print(json.dumps({"torch_threads": torch.get_num_threads(), "cases": rows}))


if __name__ == "__main__":
    main()
