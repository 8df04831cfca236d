"""Edge cost of the patch bank's search alone: OpenVINO FP32 milliseconds per image for banks of several shapes.

The search (each location's nearest centre) is the largest cost a chosen bank adds to an exported model. This
converts ``PatchBank.distance`` alone, for an embedding of ``--channels`` x ``--grid`` x ``--grid`` (the default
model's at 256x256 input: 176 x 32 x 32), to OpenVINO and times it on random data at batch ``--batch``.

Usage:
    python benchmarks/bank_search.py [--banks 4096:176 4096:96 4096:64 2048:176] [--threads 1]

A bank ``SIZE:DIMS`` has ``SIZE`` centres searched on ``DIMS`` principal directions (``DIMS`` >= the channels:
every channel, no projection). Offline; the centres are k-means centres of random patches (the speed does not
depend on their values).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import openvino as ov
import torch
from torch import nn

from anomalib_cfa_ncl.models.focusdist import patch_bank
from anomalib_cfa_ncl.models.focusdist.patch_bank import PatchBank


class Search(nn.Module):
    """``PatchBank.distance`` as a module to convert."""

    def __init__(self, bank: PatchBank) -> None:
        super().__init__()
        self.bank = bank

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.bank.distance(embedding)


def built_bank(size: int, dimensions: int, channels: int, grid: int) -> PatchBank:
    """A bank of ``size`` centres on ``dimensions`` directions, fitted on random patches."""
    patch_bank.DIMENSIONS = dimensions
    bank = PatchBank(size)
    generator = torch.Generator().manual_seed(0)
    images = max(1, (patch_bank.POOL_PER_CENTRE * size) // (grid * grid))
    for batch in torch.randn(images, channels, grid, grid, generator=generator).split(16):
        bank.update(batch)
    bank.finalize()
    return bank


def milliseconds_per_image(bank: PatchBank, embedding: torch.Tensor, threads: int, calls: int) -> float:
    """Median of ``calls`` timed calls of the converted search, per image."""
    compiled = ov.Core().compile_model(
        ov.convert_model(Search(bank).eval(), example_input=embedding),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"},
    )
    inputs = embedding.numpy()
    for _ in range(3):
        compiled(inputs)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        compiled(inputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / embedding.shape[0] * 1e3


def main() -> None:
    """Time every bank and print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--banks", nargs="+", default=["4096:176", "4096:96", "4096:64", "2048:176"])
    parser.add_argument("--channels", type=int, default=176)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args()
    embedding = torch.randn(args.batch, args.channels, args.grid, args.grid)
    rows = ["| centres | searched on | ms per image |", "|---|---|---|"]
    for spec in args.banks:
        size, dimensions = (int(part) for part in spec.split(":"))
        bank = built_bank(size, dimensions, args.channels, args.grid)
        searched = f"{dimensions} directions" if bank.projection.numel() else f"{args.channels} channels"
        milliseconds = milliseconds_per_image(bank, embedding, args.threads, args.calls)
        rows.append(f"| {size} | {searched} | {milliseconds:.2f} |")
        print(rows[-1], flush=True)
    print(f"\nOpenVINO FP32, {args.threads} thread(s), batch {args.batch} of {args.grid}x{args.grid} locations:\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
