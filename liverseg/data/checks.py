"""The data doctor: every problem of a dataset, gathered before anything is reported.

:func:`check_case` checks one case, header first (including whether the file holds the data
bytes the header claims, :func:`liverseg.io.data_size_problem`), then voxels in the file's own
dtype (the CT value rules that prediction applies too, :mod:`liverseg.data.intensities`);
:func:`check_dataset` checks a whole Task03 folder (discovery problems, duplicate ids, every case).
Checks return :class:`liverseg.data.problems.Problem` records instead of raising.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener

from liverseg.constants import LABEL_VALUES, LIVER, TUMOR
from liverseg.data.cases import Case, discover_cases
from liverseg.data.intensities import ct_value_problems
from liverseg.data.problems import ERROR, WARNING, Problem, Problems
from liverseg.geometry import label_affine_matches, spacing_is_trustworthy, spacing_mm
from liverseg.io import data_size_problem, missing_file_reason
from liverseg.labels import invalid_label_values

log = logging.getLogger(__name__)

# 4x the largest Task03 volume (~260 M voxels): beyond it the header is corrupt, not the scan.
MAX_VOXELS = 1_000_000_000
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, MemoryError, ImageFileError)


def _open_volume(path: Path, role: str) -> tuple[object | None, list[Problem]]:
    """Load the header of ``path``; return the image if its voxels may be read."""
    message = _file_problem(path, role)
    if message is None:
        try:
            img = nib.load(str(path))
            # nibabel silently turns 0 or negative pixdim into 1 or abs(); read them as stored.
            with ImageOpener(path) as fileobj:
                stored = type(img.header).from_fileobj(fileobj, check=False)
            zooms = np.asarray(stored["pixdim"][1:4], float)
        except _READ_ERRORS as exc:
            message = (
                f"{role} is not a readable NIfTI file ({type(exc).__name__}: {exc}); expected a "
                ".nii/.nii.gz volume, replace it with a good copy"
            )
    if message is None:
        message = _header_problem(img, zooms, role)
    if message is not None:
        return None, [Problem(ERROR, path, message)]
    if len(img.shape) == 4:
        shape = img.shape
        message = (
            f"{role} shape {shape} has a trailing 4th dim of 1: accepted and read as 3D "
            f"{shape[:3]}; save it as 3D to silence this"
        )
        return img, [Problem(WARNING, path, message)]
    return img, []


def _file_problem(path: Path, role: str) -> str | None:
    """Why ``path`` is not a file with contents, or None."""
    if path.is_symlink() and not path.is_file():
        return (
            f"{role} is a {missing_file_reason(path)}: expected a NIfTI file here; point the "
            "link at the file (or copy the file in its place), or remove the case"
        )
    if not path.is_file():
        return f"{role} is missing: expected a NIfTI file here; add it or remove the case"
    if path.stat().st_size == 0:
        return (
            f"{role} is an empty file (0 bytes): expected a NIfTI volume; copy or download it again"
        )
    return None


def _header_problem(img, zooms: np.ndarray, role: str) -> str | None:
    """What is wrong with a loaded header (shape, size, spacing, data size), or None."""
    shape = img.shape
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        return f"{role} has shape {shape}: expected a 3D volume (W, H, D); save it as 3D"
    if int(np.prod(shape, dtype=np.int64)) == 0 or np.prod(shape, dtype=float) > MAX_VOXELS:
        return (
            f"{role} header claims shape {shape}: expected 1 to {MAX_VOXELS:,} voxels; the header "
            "is corrupt, replace the file"
        )
    spacing = np.asarray(spacing_mm(img.affine))
    finite = np.all(np.isfinite(zooms)) and np.all(np.isfinite(img.affine))
    if not (finite and np.all(zooms > 0) and np.all(spacing > 0)):
        return (
            f"{role} spacing is {zooms.tolist()} mm (affine: {spacing.round(4).tolist()} mm): "
            "expected positive finite voxel sizes; fix pixdim and the affine in the header"
        )
    try:
        size_problem = data_size_problem(img)
    except _READ_ERRORS as exc:
        size_problem = f"cannot be read ({type(exc).__name__}: {exc}); copy it again"
    return None if size_problem is None else f"{role} data: {size_problem}"


def _read_voxels(path: Path, img, role: str) -> tuple[np.ndarray | None, list[Problem]]:
    """Voxels in the file's own dtype (no float64 copy), shape (W, H, D), or the read error."""
    try:
        proxy = img.dataobj
        data = np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
    except _READ_ERRORS as exc:
        kind = "truncated" if isinstance(exc, EOFError) else "unreadable"
        return None, [
            Problem(
                ERROR,
                path,
                f"{role} voxel data is {kind} ({type(exc).__name__}: {exc}); expected "
                f"{np.prod(img.shape):,} voxels, copy or download the file again",
            )
        ]
    return data.reshape(data.shape[:3]), []


def _image_value_problems(path: Path, img, data: np.ndarray) -> list[Problem]:
    """The CT value checks prediction applies too (:mod:`liverseg.data.intensities`)."""
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    errors, warnings = ct_value_problems(data, slope, inter)
    return [Problem(ERROR, path, message) for message in errors] + [
        Problem(WARNING, path, message) for message in warnings
    ]


def _label_value_problems(path: Path, data: np.ndarray) -> list[Problem]:
    expected = ", ".join(map(str, LABEL_VALUES))
    fix = f"expected integers {{{expected}}} (background, liver, tumor); fix the label map"
    found = invalid_label_values(data)
    fractional = [v for v in found if not float(v).is_integer()]
    if fractional:
        return [Problem(ERROR, path, f"label holds non-integral values {fractional[:5]}: {fix}")]
    if found:
        return [Problem(ERROR, path, f"label values {found} outside the label set: {fix}")]
    if not np.any(data == TUMOR):
        liver = "liver only" if np.any(data == LIVER) else "no liver either"
        return [
            Problem(
                WARNING,
                path,
                f"no tumor voxel (value {TUMOR}), {liver}: fine for training (Task03 has 13 "
                "such cases), but tumor Dice is undefined (NaN) for this case",
            )
        ]
    return []


def _geometry_problems(case: Case, image, label, tolerance_mm: float, copy: bool) -> list[Problem]:
    """Label shape and affine against the image's."""
    if label.shape[:3] != image.shape[:3]:
        return [
            Problem(
                ERROR,
                case.label,
                f"label shape {label.shape[:3]} differs from its image's {image.shape[:3]} "
                f"({case.image}): expected one label voxel per image voxel; re-export the label",
            )
        ]
    if label_affine_matches(image.affine, label.affine, tolerance_mm):
        return []
    diff = float(np.abs(np.asarray(image.affine) - np.asarray(label.affine)).max())
    label_spacing, image_spacing = (
        np.asarray(spacing_mm(label.affine)),
        np.asarray(spacing_mm(image.affine)),
    )
    what = "affine"
    if not np.allclose(label_spacing, image_spacing, atol=tolerance_mm):
        what = (
            f"spacing {label_spacing.round(4).tolist()} mm (image: "
            f"{image_spacing.round(4).tolist()} mm) and affine"
        )
    message = f"label {what} differs from its image's by up to {diff:.4g} mm"
    if copy:
        return [Problem(WARNING, case.label, f"{message}; the image's geometry will be used")]
    return [
        Problem(
            ERROR,
            case.label,
            f"{message} (tolerance {tolerance_mm} mm): expected the image's geometry; if the "
            "voxels correspond, pass --copy-label-geometry (data.copy_label_geometry=true) to "
            "use the image's, or raise --affine-tolerance-mm",
        )
    ]


def check_case(
    case: Case, *, affine_tolerance_mm: float = 0.01, copy_label_geometry: bool = False
) -> list[Problem]:
    """Every problem of one case's image and label; never raises for a bad file.

    Headers are checked before any voxel is read; voxels are read in the file's own dtype.

    Args:
        case: The case; ``label`` None checks the image only.
        affine_tolerance_mm: Largest label/image affine entry difference taken as float noise.
        copy_label_geometry: Turn a label affine mismatch into a warning (image's one is used).

    Returns:
        The problems found, errors and warnings, in file order.
    """
    image, problems = _open_volume(case.image, "image")
    if image is not None:
        if not spacing_is_trustworthy(image.affine):
            problems.append(
                Problem(
                    WARNING,
                    case.image,
                    "identity-like affine (axis-aligned, "
                    f"{spacing_mm(image.affine)[0]:g} mm spacing on every axis): often a "
                    "converter's default or its halving by `liverseg prepare`, not the true "
                    "voxel size (Task03 cases 28-47); volumes in mL and sizes in mm from this "
                    "header are unreliable. Set the true spacing in the header if known",
                )
            )
        data, read_problems = _read_voxels(case.image, image, "image")
        problems += read_problems
        if data is not None:
            problems += _image_value_problems(case.image, image, data)
        del data
    if case.label is None:
        return problems
    label, label_problems = _open_volume(case.label, "label")
    problems += label_problems
    if label is None:
        return problems
    if image is not None:
        problems += _geometry_problems(case, image, label, affine_tolerance_mm, copy_label_geometry)
    data, read_problems = _read_voxels(case.label, label, "label")
    problems += read_problems
    if data is not None:
        problems += _label_value_problems(case.label, data)
    return problems


def _duplicate_problems(cases: list[Case]) -> list[Problem]:
    by_id: dict[str, list[Case]] = {}
    for case in cases:
        by_id.setdefault(case.case_id, []).append(case)
    return [
        Problem(
            ERROR,
            same[1].image,
            f"case id {case_id!r} appears {len(same)} times ("
            f"{', '.join(str(c.image) for c in same)}): expected unique ids; remove or rename "
            "the extra files or dataset.json entries",
        )
        for case_id, same in by_id.items()
        if len(same) > 1
    ]


def _outside_root_problems(root: Path, cases: list[Case]) -> tuple[list[Problem], list[Case]]:
    """Errors for case files that lie outside ``root`` as written, and the cases inside it.

    The path is judged as written (``..`` collapsed, symlinks not followed): a symlink inside the
    root that points elsewhere is the user's explicit choice and is accepted; a ``dataset.json``
    entry such as ``../../outside/x.nii.gz`` or ``/abs/x.nii.gz`` is not. Such files are not read.
    """
    top = Path(os.path.normpath(root.absolute()))
    problems, inside = [], []
    for case in cases:
        outside = [
            path
            for path in (case.image, case.label)
            if path is not None and not Path(os.path.normpath(path.absolute())).is_relative_to(top)
        ]
        problems += [
            Problem(
                ERROR,
                path,
                f"lies outside the dataset folder {root} (dataset.json names it with '..' or an "
                "absolute path), so copying or archiving the folder would lose it: expected every "
                "file of the dataset inside it. Copy the file into imagesTr/ or labelsTr/ and list "
                "it there; to keep it where it is, put a symlink to it inside the folder and list "
                "the link",
            )
            for path in outside
        ]
        if not outside:
            inside.append(case)
    return problems, inside


def _empty_dataset_problems(root: Path, cases: list[Case]) -> list[Problem]:
    """An error when no case has a label map: there is nothing to train on."""
    if any(case.label is not None for case in cases):
        return []
    has_json = (root / "dataset.json").is_file()
    listed = " (and dataset.json lists none under 'training')" if has_json else ""
    return [
        Problem(
            ERROR,
            root / "imagesTr",
            f"no training case{listed}: expected CT volumes (.nii/.nii.gz) in imagesTr/ and "
            "their label maps, same names, in labelsTr/; copy the cases in, or point at the "
            "folder that holds them",
        )
    ]


def check_dataset(
    root: str | Path,
    *,
    affine_tolerance_mm: float = 0.01,
    copy_label_geometry: bool = False,
    cases: list[Case] | None = None,
) -> Problems:
    """Every problem of a Task03-layout dataset, gathered before returning.

    Args:
        root: Dataset folder.
        affine_tolerance_mm: Largest label/image affine entry difference taken as float noise.
        copy_label_geometry: Report label affine mismatches as warnings (image's one is used).
        cases: Check only these (e.g. from :func:`find_cases`); default: discover the training
            and test cases of ``root`` and report discovery problems too (bad ``dataset.json``,
            files it does not list).

    Besides each case's own problems (:func:`check_case`), the dataset's: no labelled case at all
    (nothing to train on), duplicate ids, and files that lie outside ``root`` as written
    (a ``dataset.json`` entry with ``..`` or an absolute path; a symlink inside ``root`` is
    accepted), which are not read.

    Returns:
        The problems (a list with ``n_cases``, the number of cases checked).

    Raises:
        DataError: ``root`` or its ``imagesTr``/``labelsTr`` do not exist (nothing to check).
            A missing ``imagesTs/`` whose cases ``dataset.json`` lists is an error problem of
            that folder instead (its cases are not checked).
    """
    root = Path(root)
    problems: list[Problem] = []
    if cases is None:
        cases, problems = discover_cases(root)
    problems += _duplicate_problems(cases)
    problems += _empty_dataset_problems(root, cases)
    outside, inside = _outside_root_problems(root, cases)
    problems += outside
    for case in inside:
        log.info("checking %s", case.case_id)
        problems += check_case(
            case, affine_tolerance_mm=affine_tolerance_mm, copy_label_geometry=copy_label_geometry
        )
    return Problems(problems, n_cases=len(cases))
