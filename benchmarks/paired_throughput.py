"""Throughput of two OpenVINO IRs in alternating rounds: their time ratio, robust to a shared machine's drift.

``speed.py`` times each form once, one after the other; on a shared VM whose speed moves by 20 % within minutes
the ratio of two such rows moves as much. This alternates rounds of batch calls of the two IRs (one thread,
float32) and prints each one's median throughput and the median and range of the per-round time ratio.

Usage:
    python benchmarks/paired_throughput.py MODEL.xml BACKBONE.xml [--rounds 12] [--calls 8] [--batch 8]

The IRs ``speed.py`` writes: ``OUT/FocusDist/openvino_fp32_dynamic/weights/openvino/model.xml`` and
``OUT/backbone/backbone.xml``. Random 256x256 inputs in [0, 1].
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from export_common import compile_openvino

CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": "1"}


def images_per_second(compiled: Any, inputs: np.ndarray, calls: int) -> float:
    """Images per second over ``calls`` calls of one batch."""
    start = time.perf_counter()
    for _ in range(calls):
        compiled(inputs)
    return calls * inputs.shape[0] / (time.perf_counter() - start)


def main() -> None:
    """Alternate the two IRs and print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("reference", type=Path, help="the IR the model's time is divided by (e.g. the backbone)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=8, help="batch calls per IR per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    compiled = {path: compile_openvino(path, CONFIG, threads=1) for path in (args.model, args.reference)}
    inputs = np.random.default_rng(0).random((args.batch, 3, args.size, args.size), dtype=np.float32)
    for model in compiled.values():
        images_per_second(model, inputs, 3)  # warm-up
    rates: dict[Path, list[float]] = {path: [] for path in compiled}
    for _ in range(args.rounds):
        for path, model in compiled.items():
            rates[path].append(images_per_second(model, inputs, args.calls))
    ratios = np.array(rates[args.reference]) / np.array(rates[args.model])
    print(f"OpenVINO FP32, 1 thread, batch {args.batch}, {args.rounds} alternating rounds of {args.calls} calls:\n")
    print("| IR | median img/s |\n|---|---|")
    for path, values in rates.items():
        print(f"| {path} | {np.median(values):.1f} |")
    print(
        f"\nTime ratio (model / reference): median {np.median(ratios):.2f}, "
        f"range {ratios.min():.2f} to {ratios.max():.2f} over the rounds."
    )


if __name__ == "__main__":
    main()
