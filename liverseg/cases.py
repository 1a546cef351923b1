"""Find the cases of a Task03 folder (``imagesTr``/``labelsTr``/``imagesTs``, ``dataset.json``).

Discovery only lists files: a missing image or label is kept in the case list (its path does
not exist) so that the data doctor (:func:`check_dataset`) reports it together with every
other problem instead of stopping at the first one.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liverseg.constants import HIDDEN_PREFIX
from liverseg.errors import DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
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


def case_id_of(path: str | Path) -> str:
    """The case id of a NIfTI path: its name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``liver_2`` before ``liver_10``."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", text)
        if part
    )


def _is_nifti_name(name: str) -> bool:
    return name.endswith(NIFTI_SUFFIXES)


def _list_nifti(folder: Path) -> list[Path]:
    """NIfTI files of ``folder``; hidden names (macOS ``._liver_N.nii.gz``) are never opened."""
    if not folder.is_dir():
        return []
    files, hidden = [], 0
    for path in folder.iterdir():
        if path.name.startswith(HIDDEN_PREFIX):
            hidden += 1
        elif _is_nifti_name(path.name) and path.is_file():
            files.append(path)
    if hidden:
        log.info("%s: ignored %d hidden files (macOS ._ AppleDouble or dot files)", folder, hidden)
    return files


def _read_dataset_json(root: Path) -> dict | None:
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path}: expected a JSON object as in the Medical Segmentation Decathlon, but it "
            f"cannot be read ({exc}); fix or delete it (cases are then paired by file name)"
        ) from exc
    if not isinstance(content, dict):
        raise DataError(
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
        raise DataError(f"{where} must be a list, found {type(entries).__name__}; fix the file")
    cases = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DataError(
                f"{where}[{i}]: expected a path or {{'image': ..., 'label': ...}}, found "
                f"{entry!r}; fix the entry"
            )
        label = entry.get("label")
        if split == "training" and not isinstance(label, str):
            raise DataError(f"{where}[{i}]: expected a 'label' path, found {label!r}; fix it")
        if Path(entry["image"]).name.startswith(HIDDEN_PREFIX):
            continue
        image_path = root / entry["image"]
        label_path = root / label if split == "training" else None
        cases.append(Case(case_id_of(image_path), image_path, label_path))
    return cases


def _pair_by_name(root: Path, split: str) -> list[Case]:
    """Cases from the folder listing: the union of image and label names of ``split``."""
    image_folder, label_folder = SPLITS[split]
    images = {case_id_of(p): p for p in _list_nifti(root / image_folder)}
    if label_folder is None:
        return [Case(cid, path, None) for cid, path in images.items()]
    labels = {case_id_of(p): p for p in _list_nifti(root / label_folder)}
    cases = []
    for cid in images.keys() | labels.keys():
        # A missing partner gets the path it should have, so the doctor names it.
        image = images.get(cid, root / image_folder / labels.get(cid, Path(cid)).name)
        label = labels.get(cid, root / label_folder / images.get(cid, Path(cid)).name)
        cases.append(Case(cid, image, label))
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
        DataError: ``root`` or the training folders do not exist, or ``dataset.json`` is
            malformed.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"dataset folder {root} does not exist; expected a Task03 folder with imagesTr/, "
            "labelsTr/ and dataset.json (check the path, or create one with `liverseg phantoms`)"
        )
    content = _read_dataset_json(root)
    cases = _entries_from_json(root, content, split) if content is not None else None
    folders = [root / f for f in SPLITS[split] if f is not None]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing and (split == "training" or cases):
        raise DataError(
            f"{root}: looked for {' and '.join(missing)}, not found; expected the Task03 layout "
            "(imagesTr/, labelsTr/, imagesTs/); point at the folder that holds them"
        )
    if cases is None:
        cases = _pair_by_name(root, split)
    cases.sort(key=lambda case: natural_key(case.case_id))
    log.info("%s: %d %s cases", root, len(cases), split)
    return cases


def label_affine_matches(
    image_affine: np.ndarray, label_affine: np.ndarray, tolerance_mm: float
) -> bool:
    """Whether a label's affine equals its image's up to float noise.

    Args:
        image_affine: 4 x 4 voxel-to-scanner matrix of the image, mm.
        label_affine: 4 x 4 matrix of the label, mm.
        tolerance_mm: Largest accepted absolute difference of any entry, mm (Task03's
            ``liver_2`` differs by about 3e-4 mm).

    Returns:
        True when every entry differs by at most ``tolerance_mm``.
    """
    difference = np.abs(np.asarray(image_affine, float) - np.asarray(label_affine, float))
    return bool(np.all(np.isfinite(difference)) and difference.max() <= tolerance_mm)
