"""anomalib's MVTec AD and BTAD datamodules under the names users type: ``--data MVTec`` and ``--data BTAD``.

anomalib 2.7 renamed ``MVTec`` to ``MVTecAD``, and it calls BTAD ``BTech``. These subclasses behave exactly like
anomalib's, with two exceptions. When the category folder is missing, an unknown category or a download that
fails (no internet) is explained in one line that says the fix instead of failing inside the download. And
``num_workers`` defaults to anomalib's 8 only where the process may use 8 CPUs, fewer otherwise, so the default
no longer makes torch warn that the loader creates more workers than the machine suggests.

Importing this module also makes the names visible to ``anomalib.data.get_datamodule`` (and so to
``anomalib benchmark``), which looks them up as attributes of ``anomalib.data``.

Example:
    >>> from anomalib_cfa_ncl.data import MVTec
    >>> datamodule = MVTec(root="./datasets/MVTecAD", category="bottle")
    >>> datamodule.name
    'MVTec'

"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anomalib.data
from anomalib.data import AnomalibDataModule, BTech, MVTecAD
from anomalib.data.datamodules.image import btech, mvtecad
from anomalib.data.datasets.image.btech import CATEGORIES as BTAD_CATEGORIES
from anomalib.data.datasets.image.mvtecad import CATEGORIES as MVTEC_CATEGORIES

from .checks import check_missing_masks

__all__ = ["BTAD", "MVTec"]

ANOMALIB_NUM_WORKERS = 8  # the default of anomalib's MVTecAD and BTech


def available_cpus() -> int:
    """CPUs this process may run on: the number torch's DataLoader suggests as the most workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


DEFAULT_NUM_WORKERS = min(ANOMALIB_NUM_WORKERS, available_cpus())


def _categories_in(root: Path) -> list[str]:
    """Category folders below ``root`` (folders with a ``train`` folder)."""
    if not root.is_dir():
        return []
    return sorted(child.name for child in root.iterdir() if (child / "train").is_dir())


def _unknown_category_message(dataset: str, root: Path, category: str, known: Sequence[str]) -> str:
    choices = sorted({*known, *_categories_in(root)})
    close = difflib.get_close_matches(category, choices, n=1)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    return (
        f"Unknown {dataset} category {category!r} (no folder {root / category}). {hint}"
        f"Choose one of {', '.join(choices)} with --data.category, or point --data.root at the folder that holds "
        f"{category}/train."
    )


def prepare_or_explain(
    datamodule: AnomalibDataModule,
    prepare: Callable[[], None],
    dataset: str,
    known_categories: Sequence[str],
    url: str,
) -> None:
    """Run anomalib's ``prepare_data`` (which downloads a missing dataset), explaining what it cannot fix.

    Args:
        datamodule (AnomalibDataModule): The datamodule, with ``root`` and ``category``.
        prepare (Callable[[], None]): anomalib's ``prepare_data`` of the datamodule.
        dataset (str): Dataset name for the messages, e.g. ``"MVTec AD"``.
        known_categories (Sequence[str]): The categories anomalib can download.
        url (str): Where the dataset can be downloaded by hand.

    Raises:
        ValueError: If the category folder is missing and the category is not one of ``known_categories``.
        FileNotFoundError: If the category folder is missing and the download failed.

    """
    root, category = Path(datamodule.root), datamodule.category
    if (root / category).is_dir():
        prepare()
        return
    if category not in known_categories:
        raise ValueError(_unknown_category_message(dataset, root, category, known_categories))
    try:
        prepare()
    except Exception as error:
        msg = (
            f"{dataset} category {category!r} is not in {root} and downloading it failed ({type(error).__name__}: "
            f"{error}). Download {url} and extract it into {root}, or pass --data.root <folder that holds "
            f"{category}/train>."
        )
        raise FileNotFoundError(msg) from error


class MVTec(MVTecAD):
    """MVTec AD, the datamodule anomalib 2.7 calls ``MVTecAD``, under its former name ``MVTec``.

    Takes the same arguments as :class:`anomalib.data.MVTecAD` (``root``, ``category``, batch sizes, splits...).
    Any folder in MVTec layout works as ``root`` (``<root>/<category>/train/good``, ``test/<defect>``,
    ``ground_truth/<defect>/<name>_mask.png``), e.g. one written by :func:`make_mvtec_dataset`.

    Example:
        >>> datamodule = MVTec(root="./datasets/MVTecAD", category="bottle")
        >>> datamodule.prepare_data()  # downloads MVTec AD when missing  # doctest: +SKIP

    """

    def __init__(self, *args: Any, num_workers: int = DEFAULT_NUM_WORKERS, **kwargs: Any) -> None:
        super().__init__(*args, num_workers=num_workers, **kwargs)

    def prepare_data(self) -> None:
        """Use the category folder; download MVTec AD when it is missing; explain what cannot be fixed."""
        prepare_or_explain(self, super().prepare_data, "MVTec AD", MVTEC_CATEGORIES, mvtecad.DOWNLOAD_INFO.url)
        check_missing_masks(Path(self.root) / self.category)


class BTAD(BTech):
    """BTAD (beanTech Anomaly Detection), the datamodule anomalib calls ``BTech``, under its usual name.

    Takes the same arguments as :class:`anomalib.data.BTech` (``root`` defaults to ``"./datasets/BTech"``,
    ``category`` is ``"01"``, ``"02"`` or ``"03"``).

    Example:
        >>> datamodule = BTAD(root="./datasets/BTech", category="01")
        >>> datamodule.prepare_data()  # downloads BTAD when missing  # doctest: +SKIP

    """

    def __init__(self, *args: Any, num_workers: int = DEFAULT_NUM_WORKERS, **kwargs: Any) -> None:
        super().__init__(*args, num_workers=num_workers, **kwargs)

    def prepare_data(self) -> None:
        """Use the category folder; download BTAD when it is missing; explain what cannot be fixed."""
        prepare_or_explain(self, super().prepare_data, "BTAD", BTAD_CATEGORIES, btech.DOWNLOAD_INFO.url)


# get_datamodule (used by `anomalib benchmark`) resolves names as attributes of anomalib.data.
anomalib.data.MVTec = MVTec
anomalib.data.BTAD = BTAD
