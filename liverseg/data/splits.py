"""Train/validation splits: ``split.json`` written once per run and read back by every later use.

Like nnU-Net's ``splits_final.json``: the split is drawn once (seeded), saved in the run folder and
reused on resume and by ``liverseg evaluate --split``, so validation cases never leak into
training. :func:`read_split` is the one reader of the file.

With ``data.folds`` the cases are split into k folds instead, nnU-Net's cross-validation: the
folds are drawn once into ``<data.root>/splits_<K>fold_seed<S>.json`` (:func:`folds_path`), a
property of the dataset that every fold and every later experiment on it reads back
(:func:`read_folds` is its one reader), and each fold's run saves its own fold as ``split.json``.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from liverseg.errors import DataError
from liverseg.io import atomic_path
from liverseg.writable import check_writable_file

log = logging.getLogger(__name__)

# How to fix a damaged split file, for the messages: training draws a missing split.json again
# from data.split_seed, which gives the same split for the same cases and data.num_train.
REDRAW_FIX = (
    "delete it and `liverseg train` draws it again from data.split_seed (the same split for "
    "the same cases), or give a run's split.json"
)
# How to fix a damaged or outdated k-fold splits file.
REDRAW_FOLDS_FIX = (
    "delete it and training draws the folds again from data.split_seed (runs that trained on "
    "the old folds are then not comparable with the new ones)"
)


def read_split(path: str | Path) -> dict[str, list[str]]:
    """A ``split.json``: ``{"train": [ids], "val": [ids]}``.

    Raises:
        DataError: The file is missing, not JSON, lacks a list of case ids under ``"train"``
            or ``"val"``, or names a case in both; names the file and the fix.
    """
    path = Path(path)
    split = _read_json(path, "split file", "; give a run's split.json", REDRAW_FIX)
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


def folds_path(root: str | Path, folds: int, seed: int) -> Path:
    """The k-fold splits file of the dataset at ``root``: ``splits_<folds>fold_seed<seed>.json``."""
    return Path(root) / f"splits_{folds}fold_seed{seed}.json"


def draw_folds(case_ids: Sequence[str], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """nnU-Net's k-fold split: the sorted case ids shuffled with ``seed``, cut into ``folds`` parts.

    As scikit-learn's ``KFold(shuffle=True)``, which nnU-Net uses: the parts' sizes differ by at
    most one, the first ``len(case_ids) % folds`` being the larger. Fold k validates on part k
    and trains on all other cases, so every case is validated exactly once.

    Returns:
        One ``{"train": [ids], "val": [ids]}`` per fold, each list sorted.

    Raises:
        DataError: Fewer cases than folds.
    """
    count = len(case_ids)
    if not 2 <= folds <= count:
        fix = f"set data.folds between 2 and {count}" if count >= 2 else "add cases"
        raise DataError(
            f"data.folds={folds} but the dataset holds {count} cases: each fold needs a "
            f"validation case; {fix}"
        )
    shuffled = sorted(case_ids)
    random.Random(seed).shuffle(shuffled)
    size, larger = divmod(count, folds)
    splits, start = [], 0
    for fold in range(folds):
        stop = start + size + (fold < larger)
        val = set(shuffled[start:stop])
        splits.append({"train": sorted(set(shuffled) - val), "val": sorted(val)})
        start = stop
    return splits


def _is_split(entry: object) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(key), list) and all(isinstance(c, str) for c in entry[key])
        for key in ("train", "val")
    )


def read_folds(path: str | Path) -> list[dict[str, list[str]]]:
    """A k-fold splits file: ``[{"train": [ids], "val": [ids]}, ...]``, one entry per fold.

    Raises:
        DataError: The file is missing, not JSON, not a list of at least two such entries, or
            its folds do not validate every case exactly once and train on all the others;
            names the file and the fix.
    """
    path = Path(path)
    splits = _read_json(path, "splits file", "", REDRAW_FOLDS_FIX)
    if not isinstance(splits, list) or len(splits) < 2 or not all(map(_is_split, splits)):
        raise DataError(
            f'splits file {path} is not a list of {{"train": [...], "val": [...]}}, one per fold '
            f"(at least 2), as liverseg writes it; {REDRAW_FOLDS_FIX}"
        )
    cases = {c for split in splits for c in split["train"] + split["val"]}
    validated = Counter(c for split in splits for c in split["val"])
    problems = []
    twice = sorted(c for c, n in validated.items() if n > 1)
    never = sorted(cases - set(validated))
    if twice:
        problems.append(f"validates {', '.join(twice[:10])} in more than one fold")
    if never:
        problems.append(f"validates {', '.join(never[:10])} in no fold")
    for fold, split in enumerate(splits):
        if sorted(split["train"]) != sorted(cases - set(split["val"])):
            problems.append(f"fold {fold} does not train on exactly the cases it does not validate")
    if problems:
        raise DataError(
            f"splits file {path} {'; '.join(problems)}: each case must be validated in exactly "
            f"one fold; {REDRAW_FOLDS_FIX}"
        )
    return splits


def load_or_create_folds(
    path: str | Path, case_ids: Sequence[str], folds: int, seed: int
) -> list[dict[str, list[str]]]:
    """The k-fold splits of ``case_ids``: read from ``path``, else drawn and written there once.

    Every fold reads the same file, so no fold validates on a case another fold's model was
    trained to leave out, however the folds are run: one after another (``liverseg cv``) or at
    the same time on several machines (each draws the same folds and writes them atomically).

    Args:
        path: The splits file, :func:`folds_path`.
        case_ids: Every training case id found in the dataset.
        folds: How many folds (``data.folds``).
        seed: Seed of the shuffle (``data.split_seed``).

    Returns:
        One ``{"train": [...], "val": [...]}`` per fold.

    Raises:
        DataError: The file is damaged (:func:`read_folds`), holds another number of folds, or
            no longer matches the dataset's cases (cases added or removed since it was drawn).
    """
    path = Path(path)
    if not path.is_file():
        splits = draw_folds(case_ids, folds, seed)
        check_writable_file(path, "the k-fold splits file (written once beside the data)")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(splits, indent=1))
        log.info("drew %d folds of %d cases into %s", folds, len(case_ids), path)
        return splits
    splits = read_folds(path)
    if len(splits) != folds:
        raise DataError(
            f"splits file {path} holds {len(splits)} folds but data.folds={folds}; "
            f"{REDRAW_FOLDS_FIX}"
        )
    in_file, in_data = {c for split in splits for c in split["val"]}, set(case_ids)
    if in_file != in_data:
        new, gone = sorted(in_data - in_file), sorted(in_file - in_data)
        raise DataError(
            f"splits file {path} no longer matches the dataset's cases ({len(new)} not in it"
            f"{': ' + ', '.join(new[:10]) if new else ''}; {len(gone)} in it but gone"
            f"{': ' + ', '.join(gone[:10]) if gone else ''}): restore the dataset, or "
            f"{REDRAW_FOLDS_FIX}"
        )
    return splits


def load_or_create_fold_split(
    path: Path, root: str | Path, case_ids: Sequence[str], folds: int, fold: int, seed: int
) -> dict[str, list[str]]:
    """Fold ``fold`` of the dataset's k-fold splits, saved as the run's ``split.json``.

    The run's copy gives ``liverseg evaluate --split`` the fold's validation cases, and it
    catches a fold that would resume on other cases than it started with (the splits file was
    drawn again, or ``data.fold`` changed).

    Args:
        path: ``<run dir>/split.json``.
        root: ``data.root``, which holds the splits file (:func:`folds_path`).
        case_ids: Every training case id found in the dataset.
        folds: How many folds (``data.folds``).
        fold: Which of them, ``0 <= fold < folds`` (``data.fold``).
        seed: Seed of the shuffle (``data.split_seed``).

    Returns:
        ``{"train": [...], "val": [...]}``.

    Raises:
        DataError: As :func:`load_or_create_folds`, or the run's ``split.json`` holds another
            split than this fold.
    """
    shared = folds_path(root, folds, seed)
    split = load_or_create_folds(shared, case_ids, folds, seed)[fold]
    if path.is_file():
        saved = read_split(path)
        if set(saved["train"]) != set(split["train"]) or set(saved["val"]) != set(split["val"]):
            raise DataError(
                f"{path} is not fold {fold} of {shared}: this run started on other cases (the "
                "splits file was drawn again, or data.fold changed); restore them, or train the "
                "fold in a new run.dir"
            )
    else:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(split, indent=1))
    return split


def _read_json(path: Path, what: str, missing_hint: str, fix: str):
    """``path``'s JSON; a DataError naming ``what`` and the file when missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist{missing_hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} {path} is not readable JSON ({exc}); {fix}") from None
