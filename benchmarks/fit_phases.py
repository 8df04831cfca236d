"""Where FocusDist's fit time goes: training epochs, the gate's choices, the statistics, validation.

Fits FocusDist with anomalib's ``Engine`` on one category (by default the embedded synthetic category of
``focusdist-demo``, no download) and times its phases by wrapping the functions that do them: the training epochs
(data loading, the image transformer's steps), the statistics (``fit_statistics``) and, inside them, the gate's
candidate scoring with its synthetic defects and bootstrap AUROCs, every backbone pass (``embed``) and the Gaussian's
updates and solves, and the validation after the last epoch. Nested phases are indented; their times are part of the
phase above them. On a GPU every timed call is bracketed by a device synchronisation, so a phase is charged for its
own kernels (at the cost of some overlap the fit would otherwise have). ``--peers`` fits Patchcore and Padim on the
same data for reference.

Usage:
    python benchmarks/fit_phases.py [--accelerator gpu] [--root DEVBENCH --category ihc] [--peers]

The backbone's ImageNet weights come from timm's cache (offline: ``HF_HUB_OFFLINE=1``) or the hub.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from anomalib.data import MVTecAD
from builders import LAYERS, build_model
from export_common import quiet_engine
from lightning.pytorch import Callback, seed_everything

from anomalib_cfa_ncl.data.synthetic import make_mvtec_dataset
from anomalib_cfa_ncl.models.focusdist import gate, synthetic_defects
from anomalib_cfa_ncl.models.focusdist.gaussian import StreamingGaussian
from anomalib_cfa_ncl.models.focusdist.lightning_model import FocusDist
from anomalib_cfa_ncl.models.focusdist.torch_model import FocusDistModel

DEMO_CATEGORY = "coffee"
# (depth, phase, owner, attribute): the functions timed, in the order the table lists them
TIMED = [
    (1, "statistics (gate + Gaussian)", FocusDistModel, "fit_statistics"),
    (2, "gate: candidates scored", gate, "score_candidates"),
    (3, "synthetic defects, Perlin blobs", synthetic_defects, "perlin_anomalies"),
    (3, "synthetic defects, thin lines", synthetic_defects, "thin_anomalies"),
    (3, "maps + bootstrap AUROCs", gate, "_family_mean_separation"),
    (2, "backbone passes (embed, all)", FocusDistModel, "embed"),
    (2, "Gaussian updates (all)", StreamingGaussian, "update"),
    (2, "Gaussian solves, gate's candidates", StreamingGaussian, "finalize_variants"),
    (2, "Gaussian solve, final", StreamingGaussian, "finalize"),
    (2, "Mahalanobis distances (all)", StreamingGaussian, "mahalanobis"),
]


class Clock:
    """Accumulates seconds and calls per phase; synchronises the GPU around every timed call."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def now(self) -> float:
        """Wall time after the device has finished its queued work."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        """Charge ``seconds`` to ``phase``."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.calls[phase] = self.calls.get(phase, 0) + 1

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` charging its time to ``phase``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(phase, self.now() - start)

        return timed


@contextmanager
def timed_functions(clock: Clock) -> Iterator[None]:
    """Wrap every function of ``TIMED`` for the duration of the block."""
    with ExitStack() as stack:
        for _, phase, owner, attribute in TIMED:
            stack.enter_context(mock.patch.object(owner, attribute, clock.wrap(phase, getattr(owner, attribute))))
        yield


class EpochClock(Callback):
    """Charges the training epochs (batches and data loading) and the validation to the clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.started = self.last_batch = self.started_validation = 0.0

    def on_train_epoch_start(self, *args: Any) -> None:
        self.started = self.clock.now()

    def on_train_batch_end(self, *args: Any) -> None:
        self.last_batch = self.clock.now()

    def on_train_epoch_end(self, *args: Any) -> None:
        # validation runs inside the epoch, after its last batch: the epoch ends at the last batch
        self.clock.add("training epochs (loading + steps)", self.last_batch - self.started)

    def on_validation_start(self, *args: Any) -> None:
        self.started_validation = self.clock.now()

    def on_validation_end(self, *args: Any) -> None:
        self.clock.add("validation (statistics + scoring)", self.clock.now() - self.started_validation)


def fit_focusdist(datamodule: MVTecAD, args: argparse.Namespace) -> tuple[Clock, float]:
    """Fit FocusDist with every phase timed; the clock and the whole fit's seconds."""
    clock = Clock(cuda=args.accelerator == "gpu")
    seed_everything(args.seed, workers=True)
    model = build_model("FocusDist", args.backbone, focusdist_arguments=None)
    assert isinstance(model, FocusDist)
    engine = quiet_engine(args.out / "FocusDist", args.epochs, args.accelerator, callbacks=[EpochClock(clock)])
    with timed_functions(clock):
        start = clock.now()
        engine.fit(model=model, datamodule=datamodule)
        total = clock.now() - start
    return clock, total


def fit_seconds(name: str, datamodule: MVTecAD, args: argparse.Namespace) -> float:
    """Seconds ``Engine.fit`` takes for a peer model on the same data."""
    seed_everything(args.seed, workers=True)
    engine = quiet_engine(args.out / name, None, args.accelerator)
    model = build_model(name, args.backbone)
    clock = Clock(cuda=args.accelerator == "gpu")
    start = clock.now()
    engine.fit(model=model, datamodule=datamodule)
    return clock.now() - start


def table(clock: Clock, total: float, peers: dict[str, float]) -> str:
    """Markdown table of the phases, their calls and their share of the whole fit."""
    rows = [(0, "FocusDist fit, whole", total, 1)]
    rows.append((1, "training epochs (loading + steps)", *_entry(clock, "training epochs (loading + steps)")))
    rows.append((1, "validation (statistics + scoring)", *_entry(clock, "validation (statistics + scoring)")))
    rows += [(depth + 1, phase, *_entry(clock, phase)) for depth, phase, _, _ in TIMED]
    lines = ["| phase | seconds | share of the fit | calls |", "|---|---|---|---|"]
    for depth, phase, seconds, calls in rows:
        lines.append(f"| {'&nbsp;' * 4 * depth}{phase} | {seconds:.2f} | {100 * seconds / total:.0f} % | {calls} |")
    for name, seconds in peers.items():
        lines.append(f"| {name} fit, whole | {seconds:.2f} | {100 * seconds / total:.0f} % | 1 |")
    return "\n".join(lines)


def _entry(clock: Clock, phase: str) -> tuple[float, int]:
    return clock.seconds.get(phase, 0.0), clock.calls.get(phase, 0)


def main() -> None:
    """Parse arguments, fit with timers, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("datasets/focusdist_fit_phases"))
    parser.add_argument("--category", default=DEMO_CATEGORY, help="an MVTec-format category below --root")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", choices=sorted(LAYERS))
    parser.add_argument("--epochs", type=int, default=None, help="FocusDist's own default (5) when not given")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--peers", action="store_true", help="also fit Patchcore and Padim on the same data")
    parser.add_argument("--out", type=Path, default=Path("results/fit_phases"))
    args = parser.parse_args()
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch: use --accelerator cpu.")
    if args.category == DEMO_CATEGORY and not (args.root / DEMO_CATEGORY).is_dir():
        make_mvtec_dataset(args.root, DEMO_CATEGORY, n_train=120, n_test_good=40, image_size=256)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    datamodule = MVTecAD(
        root=args.root, category=args.category, train_batch_size=16, eval_batch_size=16, num_workers=args.workers
    )
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}, torch {torch.__version__}, category {args.category}", flush=True)
    clock, total = fit_focusdist(datamodule, args)
    peers = {name: fit_seconds(name, datamodule, args) for name in ("Patchcore", "Padim")} if args.peers else {}
    print(table(clock, total, peers))


if __name__ == "__main__":
    main()
