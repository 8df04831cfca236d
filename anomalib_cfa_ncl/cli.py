"""anomalib's CLI with FocusDist: one-line errors for explained mistakes, and ``--seed_everything`` applied.

anomalib prints a full (rich) stack trace for any error. When the cause is an ordinary mistake (an unknown
backbone or layer, an unknown category, a missing dataset folder), anomalib_cfa_ncl raises an exception whose
message already says the fix; the CLI then prints just that message. Everything else keeps anomalib's trace.

anomalib 2.7 parses ``--seed_everything`` but never applies it; :func:`seed_from_config` does.

For FocusDist, ``anomalib export`` exports at ONNX opset 18 without the exporter's INFO wall
(:mod:`anomalib_cfa_ncl.onnx_export`), and ``anomalib predict`` writes the scores to ``predictions.csv`` and
logs where they and the images went.

The plugin hook (``anomalib_cfa_ncl_plugin``) calls :func:`install_cli_integration` when ``anomalib.cli.cli``
is imported, so it acts in the ``anomalib`` command only, never in user programs.

Example:
    >>> try:
    ...     FocusDist(backbone="resnet1000")  # doctest: +SKIP
    ... except ValueError as error:
    ...     print(user_error(error))  # doctest: +SKIP
    Unknown backbone 'resnet1000': use a timm model name such as 'resnet18' (...) Did you mean 'resnet200', ...?

"""

from __future__ import annotations

import csv
import functools
import importlib
import linecache
import logging
import sys
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
PREDICTIONS_FILE = "predictions.csv"

logger = logging.getLogger(__name__)


def _raised_on_purpose(error: BaseException) -> bool:
    """Whether a ``raise`` statement of this package raised ``error`` (not a bug deeper down, e.g. in torch)."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    filename = Path(traceback.tb_frame.f_code.co_filename).resolve()
    if PACKAGE_DIR not in filename.parents:
        return False
    return linecache.getline(str(filename), traceback.tb_lineno).lstrip().startswith("raise ")


def user_error(error: BaseException) -> BaseException | None:
    """Return the exception in ``error``'s chain that this package raised to explain a mistake, if any.

    Args:
        error (BaseException): The exception that ended the command.

    Returns:
        BaseException | None: The explaining exception (its message says the fix), or ``None`` for other errors.

    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, Exception) and _raised_on_purpose(current):
            return current
        current = current.__cause__ or current.__context__
    return None


def _instantiate(class_type: type, *args: Any, **kwargs: Any) -> Any:
    """Instantiate a model or datamodule for jsonargparse, stopping with the message of an explained mistake.

    jsonargparse would fold the exception into a multi-line "Does not validate against any of the Union
    subtypes" error and anomalib would print its trace; a ``SystemExit`` passes through both.
    """
    try:
        return class_type(*args, **kwargs)
    except Exception as error:
        explained = user_error(error)
        if explained is None:
            raise
        raise SystemExit(f"error: {explained}") from error


def _excepthook(previous: Any) -> Any:
    """Wrap ``sys.excepthook``: one line for an explained mistake, the previous hook for anything else."""

    def hook(exc_type: type[BaseException], exc: BaseException, traceback: Any) -> None:
        explained = user_error(exc)
        if explained is None:
            previous(exc_type, exc, traceback)
        else:
            print(f"error: {explained}", file=sys.stderr)

    hook.focusdist = True  # type: ignore[attr-defined]
    return hook


def seed_from_config(config: Any) -> int | None:
    """Seed every generator with the parsed ``--seed_everything`` when it is a number.

    anomalib 2.7's CLI accepts ``--seed_everything`` but never applies it, so seeded runs of ``anomalib train``
    differed. ``True`` (anomalib's default) keeps the run unseeded, as before.

    Args:
        config (Any): The parsed CLI configuration (a jsonargparse namespace or a mapping).

    Returns:
        int | None: The seed applied, or ``None`` when none was given.

    """
    subcommand = config.get("subcommand")
    seed = (config.get(subcommand) or {}).get("seed_everything") if subcommand else config.get("seed_everything")
    if isinstance(seed, bool) or not isinstance(seed, int):
        return None
    from lightning.pytorch import seed_everything

    return seed_everything(seed, workers=True)


def set_default_epochs(cli: Any) -> int | None:
    """Give a FocusDist run without ``max_epochs`` or ``max_steps`` FocusDist's own number of epochs.

    Set before Lightning's ``Trainer`` exists, so Lightning never announces its fallback of 1000 epochs; only a
    training subcommand says how many epochs it trains.

    Args:
        cli (Any): The ``AnomalibCLI`` after instantiating its classes.

    Returns:
        int | None: The epochs set, or ``None`` when the run is not FocusDist's or the user gave a length.

    """
    from anomalib_cfa_ncl import FocusDist

    model, engine = getattr(cli, "model", None), getattr(cli, "engine", None)
    if not isinstance(model, FocusDist) or engine is None:
        return None
    args = engine._cache.args  # the Trainer's arguments; anomalib builds the Trainer from them when it runs
    if args.get("max_epochs") is not None or args.get("max_steps", -1) not in {-1, None}:
        return None
    args["max_epochs"] = model.default_max_epochs()
    if cli.subcommand in {"fit", "train"}:
        logger.info("FocusDist: no --trainer.max_epochs given: training %d epochs.", args["max_epochs"])
    return args["max_epochs"]


def _seeded(instantiate_classes: Any) -> Any:
    """Wrap ``AnomalibCLI.instantiate_classes``: the seed before models and data are built, FocusDist's epochs after."""

    @functools.wraps(instantiate_classes)
    def wrapper(self: Any) -> None:
        seed_from_config(self.config)
        instantiate_classes(self)
        set_default_epochs(self)

    wrapper.focusdist = True  # type: ignore[attr-defined]
    return wrapper


def write_predictions(predictions: Any, path: Path) -> int:
    """Write one CSV row per predicted image: its path, ``pred_score`` and ``pred_label``.

    Args:
        predictions (Any): What ``Engine.predict`` returned: a list of batches (or of lists of batches, one per
            dataloader), or ``None``.
        path (Path): The CSV file to write.

    Returns:
        int: The number of rows written.

    """
    batches = [batch for item in predictions or [] for batch in (item if isinstance(item, list) else [item])]
    rows = []
    for batch in batches:
        labels = batch.pred_label if batch.pred_label is not None else [None] * len(batch.pred_score)
        for image, score, label in zip(batch.image_path, batch.pred_score, labels, strict=True):
            rows.append((image, f"{float(score):.6f}", "" if label is None else str(bool(label)).lower()))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("image", "pred_score", "pred_label"))
        writer.writerows(rows)
    return len(rows)


def _run_focusdist_subcommand(run_subcommand: Any) -> Any:
    """Wrap ``AnomalibCLI._run_subcommand`` for FocusDist: checkpoint checked first, quiet export, reported scores."""

    @functools.wraps(run_subcommand)
    def wrapper(self: Any) -> None:
        from anomalib_cfa_ncl import FocusDist
        from anomalib_cfa_ncl.models.focusdist.checkpoint import check_checkpoint_to_load
        from anomalib_cfa_ncl.onnx_export import onnx_export_kwargs, quiet_onnx_export

        if not isinstance(getattr(self, "model", None), FocusDist) or getattr(self, "engine", None) is None:
            run_subcommand(self)
            return
        run = getattr(self.engine, self.subcommand)
        kwargs = self._prepare_subcommand_kwargs(self.subcommand)
        check_checkpoint_to_load(kwargs.get("ckpt_path"))  # before Lightning's torch.load: ~190 lines of trace
        if self.subcommand not in {"export", "predict"}:
            run(**kwargs)
            return
        if self.subcommand == "export":
            kwargs["onnx_kwargs"] = onnx_export_kwargs(kwargs.get("onnx_kwargs"))
            with quiet_onnx_export():
                run(**kwargs)
            return
        predictions = run(**kwargs)
        root = Path(self.engine.trainer.default_root_dir)
        images = getattr(getattr(self.model, "visualizer", None), "output_dir", None) or root / "images"
        count = write_predictions(predictions, root / PREDICTIONS_FILE)
        logger.info(
            "FocusDist: %d images predicted: scores in %s, images in %s", count, root / PREDICTIONS_FILE, images
        )

    wrapper.focusdist = True  # type: ignore[attr-defined]
    return wrapper


def install_cli_integration() -> None:
    """Make anomalib's CLI report explained mistakes in one line and honour ``--seed_everything`` (idempotent).

    For FocusDist it also quiets ``anomalib export`` and reports where ``anomalib predict`` wrote its results.
    """
    from anomalib.data import AnomalibDataModule
    from anomalib.models import AnomalibModule

    # Called while anomalib.cli.cli finishes importing: take it from sys.modules, not from its parent package.
    cli_class = importlib.import_module("anomalib.cli.cli").AnomalibCLI
    if not getattr(cli_class.init_parser, "focusdist", False):
        original = cli_class.init_parser

        @functools.wraps(original)
        def init_parser(**kwargs: Any) -> Any:
            parser = original(**kwargs)
            for base in (AnomalibModule, AnomalibDataModule):
                parser.add_instantiator(_instantiate, base)
            return parser

        init_parser.focusdist = True  # type: ignore[attr-defined]
        cli_class.init_parser = staticmethod(init_parser)
    if not getattr(cli_class.instantiate_classes, "focusdist", False):
        cli_class.instantiate_classes = _seeded(cli_class.instantiate_classes)
    if not getattr(cli_class._run_subcommand, "focusdist", False):
        cli_class._run_subcommand = _run_focusdist_subcommand(cli_class._run_subcommand)
    if not getattr(sys.excepthook, "focusdist", False):
        sys.excepthook = _excepthook(sys.excepthook)
