"""Find the cases of a Task03 folder (``imagesTr``/``labelsTr``/``imagesTs``, ``dataset.json``).

Discovery only lists files: a missing image or label, or a symlink whose target is missing or
loops, is kept in the case list so that the data doctor (:func:`check_dataset`) reports it
together with every other problem instead of stopping at the first one (or dropping the case
without a word). The doctor also refuses ``dataset.json`` paths that leave the dataset folder
and a dataset without any training case. The checks of one case live in
:mod:`liverseg.data.checks` and are re-exported here; the problems found, their table and the
error that stops training, in :mod:`liverseg.data.problems`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from liverseg.constants import HIDDEN_PREFIX
from liverseg.data.problems import ERROR, WARNING, Problem
from liverseg.errors import DataError
from liverseg.io import case_id_of, list_nifti, natural_key

__all__ = ["Case", "MissingTestFolderError", "case_id_of", "discover_cases", "find_cases"]

log = logging.getLogger(__name__)

# split -> (image folder, label folder or None) and the dataset.json key listing it.
SPLITS = {"training": ("imagesTr", "labelsTr"), "test": ("imagesTs", None)}


@dataclass(frozen=True)
class Case:
    """One CT volume and its label map.

    Attributes:
        case_id: File name without ``.nii.gz`` / ``.nii``, e.g. ``"liver_12"``.
        image: Path of the CT (HU).
        label: Path of the label map, or None for unlabeled (``imagesTs``) cases.
    """

    case_id: str
    image: Path
    label: Path | None


class MissingTestFolderError(DataError):
    """dataset.json lists test cases but ``imagesTs/`` does not exist."""


class _DatasetJsonError(DataError):
    """dataset.json is malformed (the doctor reports it and pairs names instead)."""


def _read_dataset_json(root: Path) -> dict | None:
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _DatasetJsonError(
            f"{path}: expected a JSON object as in the Medical Segmentation Decathlon, but it "
            f"cannot be read ({exc}); fix or delete it (cases are then paired by file name)"
        ) from exc
    if not isinstance(content, dict):
        raise _DatasetJsonError(
            f"{path}: expected a JSON object with 'training' and 'test' lists, found "
            f"{type(content).__name__}; fix or delete it (cases are then paired by file name)"
        )
    return content


def _entries_from_json(root: Path, content: dict, split: str) -> list[Case] | None:
    """Cases listed under ``content[split]`` (paths relative to ``root``), or None if absent."""
    entries = content.get(split)
    if entries is None:
        return None
    where = f"{root / 'dataset.json'}: '{split}'"
    if not isinstance(entries, list):
        raise _DatasetJsonError(
            f"{where} must be a list, found {type(entries).__name__}; fix the file"
        )
    cases = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise _DatasetJsonError(
                f"{where}[{i}]: expected a path or {{'image': ..., 'label': ...}}, found "
                f"{entry!r}; fix the entry"
            )
        label = entry.get("label")
        if split == "training" and not isinstance(label, str):
            raise _DatasetJsonError(
                f"{where}[{i}]: expected a 'label' path, found {label!r}; fix it"
            )
        if Path(entry["image"]).name.startswith(HIDDEN_PREFIX):
            continue
        image_path = root / entry["image"]
        label_path = root / label if split == "training" else None
        cases.append(Case(case_id_of(image_path), image_path, label_path))
    return cases


def _pair_by_name(root: Path, split: str) -> list[Case]:
    """Cases from the folder listing: the union of image and label names of ``split``.

    Two files with one id (``liver_1.nii`` and ``liver_1.nii.gz``) give two cases, so the
    doctor reports the duplicate instead of one silently winning.
    """
    image_folder, label_folder = SPLITS[split]
    images, labels = {}, {}
    for path in list_nifti(root / image_folder):
        images.setdefault(case_id_of(path), []).append(path)
    if label_folder is not None:
        for path in list_nifti(root / label_folder):
            labels.setdefault(case_id_of(path), []).append(path)
    cases = []
    for cid in images.keys() | labels.keys():
        # A missing partner gets the path it should have, so the doctor names it.
        image_paths = images.get(cid) or [root / image_folder / labels[cid][0].name]
        label = None
        if label_folder is not None:
            label = labels.get(cid, [root / label_folder / image_paths[0].name])[0]
        cases += [Case(cid, image, label) for image in sorted(image_paths)]
    return cases


def find_cases(root: str | Path, split: str = "training") -> list[Case]:
    """List the cases of a Task03-layout folder.

    From ``dataset.json`` where it holds the split (paths relative to ``root``), else by
    pairing the names of ``imagesTr`` and ``labelsTr`` (``imagesTs`` for ``"test"``). Names
    starting with ``"."`` (macOS ``._liver_N.nii.gz`` AppleDouble files) are skipped unopened.
    Files are not opened or checked here: a case whose image or label is missing is still
    listed (with the expected path), so :func:`check_dataset` reports it.

    Args:
        root: Dataset folder holding ``imagesTr/`` etc.
        split: ``"training"`` (labelled) or ``"test"`` (``label`` is None).

    Returns:
        Cases sorted by id, digit runs by value (``liver_2`` before ``liver_10``). A dataset
        without ``imagesTs`` and without test entries has no test cases (empty list).

    Raises:
        MissingTestFolderError: ``split`` is ``"test"``, ``dataset.json`` lists test cases
            but ``imagesTs/`` does not exist (a :class:`DataError`).
        DataError: ``root`` or the training folders do not exist, or ``dataset.json`` is
            malformed.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    root = _existing_root(root)
    return _find(root, split, _read_dataset_json(root))


def _existing_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"dataset folder {root} does not exist; expected a Task03 folder with imagesTr/, "
            "labelsTr/ and dataset.json (check the path, or create one with `liverseg phantoms`)"
        )
    return root


def _find(root: Path, split: str, content: dict | None) -> list[Case]:
    """:func:`find_cases` given the parsed ``dataset.json`` (None: pair by name)."""
    cases = _entries_from_json(root, content, split) if content is not None else None
    folders = [root / f for f in SPLITS[split] if f is not None]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing and split == "test" and cases:
        raise MissingTestFolderError(
            f"{missing[0]}: not found, but {root / 'dataset.json'} lists {len(cases)} test "
            f"case(s) in it (e.g. {cases[0].image.name}); expected the Task03 imagesTs/ folder. "
            "Copy it from the archive, or empty the 'test' list if there are no test cases"
        )
    if missing and split == "training":
        raise DataError(
            f"{root}: looked for {' and '.join(missing)}, not found; expected the Task03 layout "
            "(imagesTr/, labelsTr/, imagesTs/); point at the folder that holds them"
        )
    if cases is None:
        cases = _pair_by_name(root, split)
    cases.sort(key=lambda case: natural_key(case.case_id))
    log.info("%s: %d %s cases", root, len(cases), split)
    return cases


def discover_cases(root: str | Path) -> tuple[list[Case], list[Problem]]:
    """Training and test cases of ``root``, plus the problems of discovery itself.

    Problems: a malformed ``dataset.json`` (cases are then paired by file name), a missing
    ``imagesTs/`` whose cases it lists, NIfTI files it does not list.

    Raises:
        DataError: ``root`` or its training folders do not exist.
    """
    root = _existing_root(root)
    problems = []
    try:
        content = _read_dataset_json(root)
        cases = _find(root, "training", content) + _test_cases(root, content, problems)
    except _DatasetJsonError as exc:
        problems.append(Problem(ERROR, root / "dataset.json", str(exc)))
        content = None
        cases = _find(root, "training", None) + _find(root, "test", None)
    if content is not None:
        listed = {p for case in cases for p in (case.image, case.label) if p is not None}
        for folder in ("imagesTr", "labelsTr", "imagesTs"):
            for path in sorted(list_nifti(root / folder), key=lambda p: natural_key(p.name)):
                if path not in listed:
                    problems.append(
                        Problem(
                            WARNING,
                            path,
                            "not listed in dataset.json, so it is ignored; add it to the "
                            "'training' or 'test' list, or remove it",
                        )
                    )
    return cases, problems


def _test_cases(root: Path, content: dict | None, problems: list[Problem]) -> list[Case]:
    """The test cases, or none plus an error problem when their listed folder is missing."""
    try:
        return _find(root, "test", content)
    except MissingTestFolderError as exc:
        problems.append(Problem(ERROR, root / SPLITS["test"][0], str(exc)))
        return []
