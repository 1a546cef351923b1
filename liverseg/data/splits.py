"""Train/validation splits: ``split.json`` written once per run and read back by every later use.

Like nnU-Net's ``splits_final.json``: the split is drawn once (seeded), saved in the run folder and
reused on resume and by ``liverseg evaluate --split``, so validation cases never leak into
training. :func:`read_split` is the one reader of the file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from liverseg.errors import DataError
from liverseg.io import atomic_path

# How to fix a damaged split file, for the messages: training draws a missing split.json again
# from data.split_seed, which gives the same split for the same cases and data.num_train.
REDRAW_FIX = (
    "delete it and `liverseg train` draws it again from data.split_seed (the same split for "
    "the same cases), or give a run's split.json"
)


def read_split(path: str | Path) -> dict[str, list[str]]:
    """A ``split.json``: ``{"train": [ids], "val": [ids]}``.

    Raises:
        DataError: The file is missing, not JSON, lacks a list of case ids under ``"train"``
            or ``"val"``, or names a case in both; names the file and the fix.
    """
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist; give a run's split.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"split file {path} is not readable JSON ({exc}); {REDRAW_FIX}") from None
    for key in ("train", "val"):
        ids = split.get(key) if isinstance(split, dict) else None
        if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
            raise DataError(
                f'split file {path} has no list of case ids under "{key}"; expected '
                f'{{"train": [...], "val": [...]}} as liverseg train writes it: {REDRAW_FIX}'
            )
    both = sorted(set(split["train"]) & set(split["val"]))
    if both:
        raise DataError(
            f"split file {path} names {', '.join(both[:10])} for both training and validation; "
            f"{REDRAW_FIX}"
        )
    return split


def validation_cases(split_json: str | Path) -> list[str]:
    """The ``"val"`` case ids of a run's ``split.json``.

    Raises:
        DataError: The file is missing, not JSON, or has no list of ids under ``"val"``.
    """
    return read_split(split_json)["val"]


def load_or_create_split(
    path: Path, case_ids: Sequence[str], num_train: int, seed: int, split_file: str | None = None
) -> dict[str, list[str]]:
    """The train/validation split: read from ``split_file`` or ``path``, else a seeded shuffle.

    The split is written once to ``path`` and reused on every later run (and on resume), so the
    validation cases never leak into training.

    Args:
        path: ``<run dir>/split.json``.
        case_ids: Every training case id found in the dataset.
        num_train: Cases for training; the rest validate.
        seed: Seed of the shuffle.
        split_file: A split.json to use verbatim instead.

    Returns:
        ``{"train": [...], "val": [...]}``.
    """
    source = Path(split_file) if split_file else path
    if source.is_file():
        split = read_split(source)
        unknown = sorted(set(split["train"] + split["val"]) - set(case_ids))
        if unknown:
            raise DataError(
                f"{source}: split names cases not in the dataset ({', '.join(unknown[:10])}); "
                "delete it or fix data.root"
            )
        if not split["train"]:
            raise DataError(f"{source}: split has no training case; {REDRAW_FIX}")
    else:
        if not 0 < num_train < len(case_ids):
            raise DataError(
                f"data.num_train={num_train} but the dataset holds {len(case_ids)} cases; "
                f"set data.num_train between 1 and {len(case_ids) - 1}"
            )
        shuffled = sorted(case_ids)
        random.Random(seed).shuffle(shuffled)
        split = {"train": sorted(shuffled[:num_train]), "val": sorted(shuffled[num_train:])}
    if source != path or not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(split, indent=1))
    return split
